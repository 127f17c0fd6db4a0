//! Outbound AWS calls of the `s3`, `sqs` and `kinesis` rule actions.
//!
//! The clients are the official AWS SDK crates, built on first use from the `[iot.outbound]`
//! settings (region, one endpoint for all three services or one per service, static
//! credentials or the SDK's standard chain) over a rustls/ring HTTPS client. Pointing the
//! endpoint at moto, LocalStack or MinIO keeps everything local; leaving it empty calls AWS.

//!
//! Without the `aws` feature (the fuzz targets) every call fails with an error saying so.

use bytes::Bytes;

use crate::config::OutboundSettings;

#[cfg(feature = "aws")]
pub use sdk::OutboundClients;

#[cfg(not(feature = "aws"))]
pub use without_sdk::OutboundClients;

#[cfg(not(feature = "aws"))]
mod without_sdk {
    use super::*;

    const MISSING: &str = "Mooring was built without the aws feature";

    /// Stands in for the SDK clients.
    pub struct OutboundClients;

    impl OutboundClients {
        pub fn new(_settings: OutboundSettings, _process_region: String) -> OutboundClients {
            OutboundClients
        }

        pub async fn put_object(
            &self,
            _bucket: &str,
            _key: &str,
            _canned_acl: Option<&str>,
            _body: Bytes,
        ) -> Result<(), String> {
            Err(MISSING.into())
        }

        pub async fn send_message(&self, _queue_url: &str, _body: String) -> Result<(), String> {
            Err(MISSING.into())
        }

        pub async fn put_record(
            &self,
            _stream: &str,
            _partition_key: &str,
            _data: Bytes,
        ) -> Result<(), String> {
            Err(MISSING.into())
        }
    }
}

#[cfg(feature = "aws")]
mod sdk {
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_s3::primitives::ByteStream;
    use tokio::sync::OnceCell;

    use super::*;

    /// Lazily built SDK clients for the outbound actions.
    pub struct OutboundClients {
        settings: OutboundSettings,
        process_region: String,
        sdk: OnceCell<aws_config::SdkConfig>,
        s3: OnceCell<aws_sdk_s3::Client>,
        sqs: OnceCell<aws_sdk_sqs::Client>,
        kinesis: OnceCell<aws_sdk_kinesis::Client>,
    }

    /// Renders an SDK error with its service error code and message.
    fn sdk_error<E: std::error::Error>(e: E) -> String {
        aws_sdk_s3::error::DisplayErrorContext(e).to_string()
    }

    impl OutboundClients {
        pub fn new(settings: OutboundSettings, process_region: String) -> OutboundClients {
            OutboundClients {
                settings,
                process_region,
                sdk: OnceCell::new(),
                s3: OnceCell::new(),
                sqs: OnceCell::new(),
                kinesis: OnceCell::new(),
            }
        }

        async fn sdk(&self) -> &aws_config::SdkConfig {
            self.sdk
                .get_or_init(|| {
                    mooring_aws::outbound::sdk_config(
                        mooring_aws::outbound::OutboundCredentials {
                            region: &self.settings.region,
                            access_key_id: &self.settings.access_key_id,
                            secret_access_key: &self.settings.secret_access_key,
                            session_token: &self.settings.session_token,
                        },
                        &self.process_region,
                        "mooring-iot-outbound",
                    )
                })
                .await
        }

        /// The endpoint for one service: its own setting, else the shared one, else AWS's.
        fn endpoint<'a>(&'a self, specific: &'a str) -> Option<&'a str> {
            [specific, self.settings.endpoint_url.as_str()]
                .into_iter()
                .find(|e| !e.is_empty())
        }

        async fn s3(&self) -> &aws_sdk_s3::Client {
            self.s3
                .get_or_init(|| async {
                    let mut builder = aws_sdk_s3::config::Builder::from(self.sdk().await);
                    if let Some(endpoint) = self.endpoint(&self.settings.s3_endpoint) {
                        builder = builder.endpoint_url(endpoint).force_path_style(true);
                    }
                    aws_sdk_s3::Client::from_conf(builder.build())
                })
                .await
        }

        async fn sqs(&self) -> &aws_sdk_sqs::Client {
            self.sqs
                .get_or_init(|| async {
                    let mut builder = aws_sdk_sqs::config::Builder::from(self.sdk().await);
                    if let Some(endpoint) = self.endpoint(&self.settings.sqs_endpoint) {
                        builder = builder.endpoint_url(endpoint);
                    }
                    aws_sdk_sqs::Client::from_conf(builder.build())
                })
                .await
        }

        async fn kinesis(&self) -> &aws_sdk_kinesis::Client {
            self.kinesis
                .get_or_init(|| async {
                    let mut builder = aws_sdk_kinesis::config::Builder::from(self.sdk().await);
                    if let Some(endpoint) = self.endpoint(&self.settings.kinesis_endpoint) {
                        builder = builder.endpoint_url(endpoint);
                    }
                    aws_sdk_kinesis::Client::from_conf(builder.build())
                })
                .await
        }

        /// PutObject of `body` at `bucket`/`key`, with the canned ACL when given.
        pub async fn put_object(
            &self,
            bucket: &str,
            key: &str,
            canned_acl: Option<&str>,
            body: Bytes,
        ) -> Result<(), String> {
            let mut request = self
                .s3()
                .await
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(body));
            if let Some(acl) = canned_acl {
                request = request.acl(aws_sdk_s3::types::ObjectCannedAcl::from(acl));
            }
            request.send().await.map(|_| ()).map_err(sdk_error)
        }

        /// SendMessage of `body` to the queue at `queue_url`.
        pub async fn send_message(&self, queue_url: &str, body: String) -> Result<(), String> {
            self.sqs()
                .await
                .send_message()
                .queue_url(queue_url)
                .message_body(body)
                .send()
                .await
                .map(|_| ())
                .map_err(sdk_error)
        }

        /// PutRecord of `data` to `stream` under `partition_key`.
        pub async fn put_record(
            &self,
            stream: &str,
            partition_key: &str,
            data: Bytes,
        ) -> Result<(), String> {
            self.kinesis()
                .await
                .put_record()
                .stream_name(stream)
                .partition_key(partition_key)
                .data(Blob::new(data.to_vec()))
                .send()
                .await
                .map(|_| ())
                .map_err(sdk_error)
        }
    }
}
