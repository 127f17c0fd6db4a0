//! The TCP and TLS accept loops.
//!
//! The plain listener serves anonymous clients (subject to `mqtt.allow_anonymous`). The TLS
//! listener presents a server certificate issued by Mooring's CA for `localhost` and
//! `127.0.0.1`, requires a client certificate chaining to that CA, accepts ALPN
//! `x-amzn-mqtt-ca` (as AWS IoT's port 443) and `mqtt`, and identifies the client by AWS's
//! certificate id (hex SHA-256 of the DER certificate).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mooring_core::pki::CertificateAuthority;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Principal, Transport};
use crate::broker::Broker;
use crate::connection::{self, PeerInfo};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts plain-TCP MQTT connections until shutdown.
pub async fn serve_tcp(broker: Broker, listener: TcpListener) {
    let shutdown = broker.shutdown().clone();
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let peer = PeerInfo {
                        transport: Transport::Tcp,
                        remote: Some(remote),
                        principal: Principal::Anonymous,
                    };
                    shutdown.spawn(connection::serve(broker.clone(), stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The TLS configuration of the MQTTS listener.
pub fn tls_acceptor(ca: &CertificateAuthority) -> anyhow::Result<TlsAcceptor> {
    let (cert_pem, key_pem) = ca
        .server_certificate(&["localhost".to_string(), "127.0.0.1".to_string()])
        .context("issuing the MQTTS server certificate")?;
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the server certificate")?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parsing the server key")?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.certificate_pem().as_bytes()) {
        roots
            .add(cert.context("parsing the CA certificate")?)
            .context("adding the CA certificate")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the client certificate verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("installing the server certificate")?;
    config.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec(), b"mqtt".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts MQTT over TLS with client certificates until shutdown.
pub async fn serve_tls(broker: Broker, listener: TcpListener, acceptor: TlsAcceptor) {
    let shutdown = broker.shutdown().clone();
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let broker = broker.clone();
                    shutdown.spawn(async move {
                        let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let Some(der) = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.as_ref().to_vec())
                        else {
                            return;
                        };
                        let peer = PeerInfo {
                            transport: Transport::Tls,
                            remote: Some(remote),
                            principal: Principal::Certificate {
                                certificate_id: Arc::from(hex::encode(Sha256::digest(&der))),
                            },
                        };
                        connection::serve(broker, tls, peer).await
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mqtts accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
