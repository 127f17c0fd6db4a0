//! The one way Mooring builds an AWS SDK configuration for its outbound calls (rule actions,
//! stream exports, video image delivery): rustls with ring for HTTPS, the configured region or
//! the process's, and static credentials when configured, else the standard credential chain.
//! Each caller then sets its own per-service endpoint on the service client's builder.

/// What a service's configuration says about outbound AWS calls.
#[derive(Debug, Clone, Copy)]
pub struct OutboundCredentials<'a> {
    /// The configured region; empty means the process's region.
    pub region: &'a str,
    /// Static credentials; an empty key id means the standard AWS credential chain.
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    /// Empty when the static credentials are long-term.
    pub session_token: &'a str,
}

/// Loads the SDK configuration shared by every outbound client of one service.
/// `provider_name` names the static credentials in the SDK's logs.
pub async fn sdk_config(
    settings: OutboundCredentials<'_>,
    process_region: &str,
    provider_name: &'static str,
) -> aws_config::SdkConfig {
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let region = if settings.region.is_empty() {
        process_region
    } else {
        settings.region
    };
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https)
        .region(aws_config::Region::new(region.to_owned()));
    if !settings.access_key_id.is_empty() {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            settings.access_key_id.to_owned(),
            settings.secret_access_key.to_owned(),
            (!settings.session_token.is_empty()).then(|| settings.session_token.to_owned()),
            None,
            provider_name,
        ));
    }
    loader.load().await
}
