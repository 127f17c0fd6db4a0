//! Export destinations: Kinesis Data Streams, IoT Analytics, IoT SiteWise and S3 through the
//! official AWS SDKs, and the HTTP test target. AWS clients are built on first use from
//! [`ExportSettings`] (region, endpoint override, static credentials or the standard chain)
//! with a rustls/ring HTTPS client. A build without the `aws` feature reports the AWS
//! destinations as unavailable in the export's error.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::OnceCell;

#[cfg(feature = "aws")]
use super::iot::{ExactEndpoint, IotAnalyticsDestination, IotSiteWiseDestination};
#[cfg(feature = "aws")]
use super::s3::S3Destination;
use super::{BatchOutcome, Destination, ExportSettings};
use crate::definition::{ExportConfig, ExportKind};
use crate::log::StoredMessage;

/// The destinations of every export kind, created lazily.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
pub struct Destinations {
    settings: ExportSettings,
    process_region: String,
    #[cfg(feature = "aws")]
    aws: OnceCell<aws_config::SdkConfig>,
    kinesis: OnceCell<Arc<dyn Destination>>,
    s3: OnceCell<Arc<dyn Destination>>,
    iot_analytics: OnceCell<Arc<dyn Destination>>,
    iot_sitewise: OnceCell<Arc<dyn Destination>>,
    http: Arc<dyn Destination>,
    handles: Arc<mooring_core::handles::ServiceHandles>,
    clock: Arc<dyn mooring_core::Clock>,
}

impl Destinations {
    /// `handles` reaches the stream manager itself (S3 status streams).
    pub fn new(
        settings: ExportSettings,
        process_region: String,
        handles: Arc<mooring_core::handles::ServiceHandles>,
        clock: Arc<dyn mooring_core::Clock>,
    ) -> Destinations {
        Destinations {
            settings,
            process_region,
            #[cfg(feature = "aws")]
            aws: OnceCell::new(),
            kinesis: OnceCell::new(),
            s3: OnceCell::new(),
            iot_analytics: OnceCell::new(),
            iot_sitewise: OnceCell::new(),
            http: Arc::new(HttpDestination::new()),
            handles,
            clock,
        }
    }

    #[cfg(feature = "aws")]
    async fn aws_config(&self) -> &aws_config::SdkConfig {
        self.aws
            .get_or_init(|| {
                mooring_aws::outbound::sdk_config(
                    mooring_aws::outbound::OutboundCredentials {
                        region: &self.settings.region,
                        access_key_id: &self.settings.access_key_id,
                        secret_access_key: &self.settings.secret_access_key,
                        session_token: &self.settings.session_token,
                    },
                    &self.process_region,
                    "mooring-streams-config",
                )
            })
            .await
    }

    pub async fn for_kind(&self, kind: ExportKind) -> Arc<dyn Destination> {
        match kind {
            ExportKind::Http => self.http.clone(),
            #[cfg(feature = "aws")]
            ExportKind::Kinesis => self
                .kinesis
                .get_or_init(|| async {
                    let mut builder =
                        aws_sdk_kinesis::config::Builder::from(self.aws_config().await);
                    if !self.settings.kinesis_endpoint.is_empty() {
                        builder = builder.endpoint_url(self.settings.kinesis_endpoint.clone());
                    }
                    Arc::new(KinesisDestination {
                        client: aws_sdk_kinesis::Client::from_conf(builder.build()),
                    }) as Arc<dyn Destination>
                })
                .await
                .clone(),
            #[cfg(feature = "aws")]
            ExportKind::S3 => self
                .s3
                .get_or_init(|| async {
                    let mut builder = aws_sdk_s3::config::Builder::from(self.aws_config().await);
                    if !self.settings.s3_endpoint.is_empty() {
                        builder = builder
                            .endpoint_url(self.settings.s3_endpoint.clone())
                            .force_path_style(true);
                    }
                    Arc::new(S3Destination::new(
                        aws_sdk_s3::Client::from_conf(builder.build()),
                        self.settings.s3_min_part_size,
                        self.handles.clone(),
                        self.clock.clone(),
                    )) as Arc<dyn Destination>
                })
                .await
                .clone(),
            #[cfg(feature = "aws")]
            ExportKind::IotAnalytics => self
                .iot_analytics
                .get_or_init(|| async {
                    let mut builder =
                        aws_sdk_iotanalytics::config::Builder::from(self.aws_config().await);
                    if !self.settings.iotanalytics_endpoint.is_empty() {
                        builder = builder.endpoint_url(self.settings.iotanalytics_endpoint.clone());
                    }
                    Arc::new(IotAnalyticsDestination {
                        client: aws_sdk_iotanalytics::Client::from_conf(builder.build()),
                    }) as Arc<dyn Destination>
                })
                .await
                .clone(),
            #[cfg(feature = "aws")]
            ExportKind::IotSiteWise => self
                .iot_sitewise
                .get_or_init(|| async {
                    let mut builder =
                        aws_sdk_iotsitewise::config::Builder::from(self.aws_config().await);
                    let endpoint = &self.settings.iotsitewise_endpoint;
                    if !endpoint.is_empty() {
                        builder = builder.endpoint_url(endpoint.clone());
                        if let Some(authority) = endpoint
                            .parse::<http::Uri>()
                            .ok()
                            .and_then(|u| u.authority().map(|a| a.to_string()))
                        {
                            builder = builder.interceptor(ExactEndpoint { authority });
                        }
                    }
                    Arc::new(IotSiteWiseDestination {
                        client: aws_sdk_iotsitewise::Client::from_conf(builder.build()),
                    }) as Arc<dyn Destination>
                })
                .await
                .clone(),
            #[allow(unreachable_patterns)]
            other => Arc::new(Unimplemented(other)),
        }
    }
}

/// An AWS destination in a build without the `aws` feature.
#[cfg_attr(feature = "aws", allow(dead_code))]
struct Unimplemented(ExportKind);

impl Destination for Unimplemented {
    fn send<'a>(
        &'a self,
        _stream: &'a str,
        _config: &'a ExportConfig,
        _batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<BatchOutcome, String>> {
        let kind = self.0.as_str();
        Box::pin(async move {
            Err(format!(
                "exports to {kind} need Mooring built with the `aws` feature; messages are kept until then"
            ))
        })
    }
}

/// Kinesis `PutRecords`, one call per batch, a random UUID partition key per record.
#[cfg(feature = "aws")]
struct KinesisDestination {
    client: aws_sdk_kinesis::Client,
}

#[cfg(feature = "aws")]
impl Destination for KinesisDestination {
    fn send<'a>(
        &'a self,
        _stream: &'a str,
        config: &'a ExportConfig,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<BatchOutcome, String>> {
        Box::pin(async move {
            let stream_name = config.kinesis_stream_name.clone().unwrap_or_default();
            let mut records = Vec::with_capacity(batch.len());
            for message in batch {
                records.push(
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .data(aws_sdk_kinesis::primitives::Blob::new(
                            message.payload.to_vec(),
                        ))
                        .partition_key(uuid::Uuid::new_v4().to_string())
                        .build()
                        .map_err(|e| e.to_string())?,
                );
            }
            let response = self
                .client
                .put_records()
                .stream_name(stream_name)
                .set_records(Some(records))
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "Kinesis PutRecords failed: {}",
                        aws_sdk_kinesis::error::DisplayErrorContext(e)
                    )
                })?;
            let mut outcome = BatchOutcome::default();
            for (message, result) in batch.iter().zip(response.records()) {
                if let Some(code) = result.error_code() {
                    outcome.error = Some(format!(
                        "Kinesis rejected record {}: {code}: {}",
                        message.sequence_number,
                        result.error_message().unwrap_or_default()
                    ));
                    break;
                }
                outcome.processed += 1;
                outcome.exported_messages += 1;
                outcome.exported_bytes += message.payload.len() as i64;
            }
            Ok(outcome)
        })
    }
}

/// The HTTP test target: one POST per message (`RAW_NOT_BATCHED`) or one JSON array per
/// batch (`JSON_BATCHED`); any 2xx is success.
struct HttpDestination {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpDestination {
    fn new() -> HttpDestination {
        HttpDestination {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn post(&self, uri: &str, content_type: &str, body: Bytes) -> Result<(), String> {
        let request = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .map_err(|e| format!("invalid export uri {uri:?}: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("POST {uri} failed: {e}"))?;
        let status = response.status();
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("POST {uri} answered {status}"))
        }
    }
}

impl Destination for HttpDestination {
    fn send<'a>(
        &'a self,
        stream: &'a str,
        config: &'a ExportConfig,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<BatchOutcome, String>> {
        Box::pin(async move {
            let uri = config.uri.clone().unwrap_or_default();
            let mut outcome = BatchOutcome::default();
            if config.export_format == Some(1) {
                let body: Vec<serde_json::Value> = batch
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "streamName": stream,
                            "sequenceNumber": m.sequence_number,
                            "ingestTime": m.ingest_time,
                            "payload": base64::engine::general_purpose::STANDARD.encode(&m.payload),
                        })
                    })
                    .collect();
                let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
                self.post(&uri, "application/json", body.into()).await?;
                outcome.processed = batch.len();
                outcome.exported_messages = batch.len() as i64;
                outcome.exported_bytes = batch.iter().map(|m| m.payload.len() as i64).sum();
                return Ok(outcome);
            }
            for message in batch {
                if let Err(e) = self
                    .post(&uri, "application/octet-stream", message.payload.clone())
                    .await
                {
                    if outcome.processed == 0 {
                        return Err(e);
                    }
                    outcome.error = Some(e);
                    break;
                }
                outcome.processed += 1;
                outcome.exported_messages += 1;
                outcome.exported_bytes += message.payload.len() as i64;
            }
            Ok(outcome)
        })
    }
}
