//! What persisted fragments tagged `AWS_KINESISVIDEO_IMAGE_GENERATION` or
//! `AWS_KINESISVIDEO_NOTIFICATION` cause, per the stream's configurations
//! ([`crate::stream_configurations`]).
//!
//! Ingest hands each such fragment to [`TagEffects::fragment_persisted`] right after its
//! PERSISTED ack; that never blocks (a full queue drops the work with a warning). A background
//! task then:
//! * generates images (sampling interval, format, size, JPEG quality) from the fragment and
//!   writes them to the S3 destination with aws-sdk-s3, configured by `[video.outbound]`
//!   (endpoint, region, credentials; MinIO or moto keep it local), under the key
//!   `{ImagePrefix}_{AccountID}_{StreamName}_{ImageTimecode}_{RandomID}.{jpg|png}` with the
//!   `aws_kinesisvideo_*` and custom-tag object metadata;
//! * builds the notification message (`StreamArn`, `FragmentNumber`, timestamps,
//!   `NotificationType` `PERSISTED`, `NotificationPayload`) and delivers it: to the
//!   configuration's SNS topic with aws-sdk-sns when `[video] sns_notifications` is on
//!   (`[video.outbound]` again, `sns_endpoint_url` overriding `endpoint_url`; a failed publish
//!   is retried three times with backoff, then logged), and, as a Mooring option, in the SNS
//!   envelope an SQS subscriber of the topic would see, on the MQTT topic
//!   `[video] notification_topic` (empty disables it).
//!
//! Unlike KVS, which starts about a minute after a configuration update, Mooring applies a
//! configuration to the next tagged fragment.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use mooring_core::handles::PublishMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::model::{FragmentMeta, Stream};
use crate::stream_configurations::ConfigKind;
use crate::VideoState;

/// The smallest sampling interval a configuration may ask for.
pub const MIN_SAMPLING_INTERVAL_MS: i64 = 200;
const IMAGE_GENERATION_TAG: &str = "AWS_KINESISVIDEO_IMAGE_GENERATION";
const NOTIFICATION_TAG: &str = "AWS_KINESISVIDEO_NOTIFICATION";
const NOTIFICATION_SUBJECT: &str = "Kinesis Video Streams Notification";
/// Tagged fragments waiting for the background task.
const QUEUE_DEPTH: usize = 1024;

/// The `[video.outbound]` section: the S3-compatible endpoint and credentials image
/// generation writes to. Empty strings mean the SDK's defaults (AWS's endpoint, the standard
/// credential chain, the process region).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoOutbound {
    pub region: String,
    pub endpoint_url: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// SNS's endpoint when it is not `endpoint_url` (an S3-only store such as MinIO).
    pub sns_endpoint_url: String,
}

/// A persisted fragment carrying one of the triggering tags.
#[derive(Debug, Clone)]
pub struct TaggedFragment {
    pub arn: String,
    pub meta: FragmentMeta,
}

/// The ingest side of the effects: a queue to the background task.
pub struct TagEffects {
    queue: mpsc::Sender<TaggedFragment>,
}

/// Whether a fragment's tags ask for anything.
pub fn is_triggering(meta: &FragmentMeta) -> bool {
    meta.tags
        .iter()
        .any(|(name, _)| name == IMAGE_GENERATION_TAG || name == NOTIFICATION_TAG)
}

impl TagEffects {
    /// The queue and its receiving end, for [`run`].
    pub fn new() -> (TagEffects, mpsc::Receiver<TaggedFragment>) {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        (TagEffects { queue }, rx)
    }

    /// Called after a fragment's PERSISTED ack; never waits.
    pub fn fragment_persisted(&self, arn: &str, meta: &FragmentMeta) {
        if !is_triggering(meta) {
            return;
        }
        let fragment = TaggedFragment {
            arn: arn.to_string(),
            meta: meta.clone(),
        };
        if let Err(e) = self.queue.try_send(fragment) {
            tracing::warn!(error = %e, "video tag effects queue full; fragment skipped");
        }
    }
}

/// The custom (non-reserved) tags of a fragment, as KVS passes them on.
fn custom_tags(meta: &FragmentMeta) -> BTreeMap<String, String> {
    meta.tags
        .iter()
        .filter(|(name, _)| !name.starts_with("AWS_"))
        .cloned()
        .collect()
}

fn has_tag(meta: &FragmentMeta, tag: &str) -> bool {
    meta.tags.iter().any(|(name, _)| name == tag)
}

fn enabled(config: &Option<Value>) -> Option<&Value> {
    config.as_ref().filter(|c| c["Status"] == "ENABLED")
}

/// The background task: applies the configurations to each tagged fragment in turn.
pub async fn run(state: Arc<VideoState>, mut rx: mpsc::Receiver<TaggedFragment>) {
    let outbound = Outbound::new(
        state.config.outbound.clone(),
        state.ctx.config.region.clone(),
    );
    loop {
        let fragment = tokio::select! {
            _ = state.ctx.shutdown.triggered() => return,
            next = rx.recv() => match next {
                Some(f) => f,
                None => return,
            },
        };
        let arn = fragment.arn.clone();
        let looked_up = state
            .blocking(move |s| {
                let stream = s.store.stream_by_arn(&arn)?;
                let images = s.configurations.get(&arn, ConfigKind::ImageGeneration)?;
                let notify = s.configurations.get(&arn, ConfigKind::Notification)?;
                Ok((stream, images, notify))
            })
            .await;
        let (stream, images, notify) = match looked_up {
            Ok((Some(stream), images, notify)) => (stream, images, notify),
            Ok((None, _, _)) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading video stream configurations failed");
                continue;
            }
        };
        if has_tag(&fragment.meta, NOTIFICATION_TAG) {
            if let Some(config) = enabled(&notify) {
                notify_persisted(&state, &outbound, &stream, &fragment.meta, config).await;
            }
        }
        if has_tag(&fragment.meta, IMAGE_GENERATION_TAG) {
            if let Some(config) = enabled(&images) {
                generate_images(&state, &outbound, &stream, &fragment.meta, config).await;
            }
        }
    }
}

/// The notification `Message` for a persisted fragment.
pub fn notification_message(stream: &Stream, meta: &FragmentMeta) -> Value {
    json!({
        "StreamArn": stream.arn,
        "FragmentNumber": meta.number(),
        "FragmentStartProducerTimestamp": meta.producer_ms,
        "FragmentStartServerTimestamp": meta.server_ms,
        "NotificationType": "PERSISTED",
        "NotificationPayload": custom_tags(meta),
    })
}

/// The MQTT topic for a stream's notifications.
fn notification_topic(template: &str, stream: &Stream) -> String {
    template.replace("{StreamName}", &stream.name)
}

/// Attempts at publishing one notification to SNS, and the wait before the first retry
/// (doubled each time).
const SNS_ATTEMPTS: u32 = 4;
const SNS_FIRST_BACKOFF_MS: u64 = 500;

async fn notify_persisted(
    state: &VideoState,
    outbound: &Outbound,
    stream: &Stream,
    meta: &FragmentMeta,
    config: &Value,
) {
    let topic_arn = config["DestinationConfig"]["Uri"].as_str().unwrap_or("");
    let message = notification_message(stream, meta).to_string();
    if state.config.sns_notifications {
        let mut backoff = std::time::Duration::from_millis(SNS_FIRST_BACKOFF_MS);
        for attempt in 1..=SNS_ATTEMPTS {
            match outbound
                .publish_sns(topic_arn, NOTIFICATION_SUBJECT, &message)
                .await
            {
                Ok(()) => break,
                Err(e) if attempt == SNS_ATTEMPTS => {
                    tracing::warn!(error = %e, stream = %stream.name, topic = topic_arn, "delivering a video notification to SNS failed; dropped");
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "SNS publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
    let template = &state.config.notification_topic;
    if template.is_empty() {
        return;
    }
    let now = state.clock().now_millis();
    let timestamp = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let envelope = json!({
        "Type": "Notification",
        "MessageId": uuid::Uuid::new_v4().to_string(),
        "TopicArn": topic_arn,
        "Subject": NOTIFICATION_SUBJECT,
        "Message": message,
        "Timestamp": timestamp,
    });
    let message = PublishMessage {
        topic: notification_topic(template, stream),
        payload: Bytes::from(envelope.to_string()),
        qos: 1,
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    let published = match state.ctx.handles.broker() {
        Ok(broker) => broker.publish(message).await,
        Err(e) => Err(e),
    };
    if let Err(e) = published {
        tracing::warn!(error = %e, stream = %stream.name, "publishing a video notification failed");
    }
}

/// The S3 object key of one generated image (without the destination's path prefix).
pub fn image_key(
    prefix: Option<&str>,
    account: &str,
    stream: &str,
    timecode_ms: i64,
    extension: &str,
) -> String {
    let random = uuid::Uuid::new_v4();
    let tail = format!("{account}_{stream}_{timecode_ms}_{random}.{extension}");
    match prefix.filter(|p| !p.is_empty()) {
        Some(p) => format!("{p}_{tail}"),
        None => tail,
    }
}

/// The instants (ms on the selector's clock) sampled from a fragment starting at `start`.
pub fn sample_instants(start: i64, duration_ms: i64, interval_ms: i64) -> Vec<i64> {
    let interval = interval_ms.max(MIN_SAMPLING_INTERVAL_MS);
    let mut out = vec![start];
    let mut at = start + interval;
    while at < start + duration_ms {
        out.push(at);
        at += interval;
    }
    out
}

#[cfg(not(feature = "outbound"))]
struct Outbound;

#[cfg(not(feature = "outbound"))]
impl Outbound {
    fn new(_settings: VideoOutbound, _region: String) -> Outbound {
        Outbound
    }

    async fn publish_sns(
        &self,
        _topic: &str,
        _subject: &str,
        _message: &str,
    ) -> Result<(), String> {
        Err("Mooring was built without the outbound feature".into())
    }
}

#[cfg(not(feature = "outbound"))]
async fn generate_images(
    _state: &Arc<VideoState>,
    _outbound: &Outbound,
    stream: &Stream,
    _meta: &FragmentMeta,
    _config: &Value,
) {
    tracing::warn!(stream = %stream.name, "image generation skipped: Mooring was built without the outbound feature");
}

#[cfg(feature = "outbound")]
use generation::{generate_images, Outbound};

#[cfg(feature = "outbound")]
mod generation {
    use aws_sdk_s3::primitives::ByteStream;
    use tokio::sync::OnceCell;

    use super::*;
    use crate::picture::{encode, ImageFormat};
    use crate::store::TimeClock;
    use crate::stream_configurations::DestinationUri;

    /// The fragment tag whose value starts generated images' keys.
    const IMAGE_PREFIX_TAG: &str = "AWS_KINESISVIDEO_IMAGE_PREFIX";

    /// The S3 and SNS clients, built on first use from `[video.outbound]`.
    pub struct Outbound {
        settings: VideoOutbound,
        process_region: String,
        sdk: OnceCell<aws_config::SdkConfig>,
        s3: OnceCell<aws_sdk_s3::Client>,
        sns: OnceCell<aws_sdk_sns::Client>,
    }

    impl Outbound {
        pub fn new(settings: VideoOutbound, process_region: String) -> Outbound {
            Outbound {
                settings,
                process_region,
                sdk: OnceCell::new(),
                s3: OnceCell::new(),
                sns: OnceCell::new(),
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
                        "mooring-video-outbound",
                    )
                })
                .await
        }

        async fn sns(&self) -> &aws_sdk_sns::Client {
            self.sns
                .get_or_init(|| async {
                    let mut builder = aws_sdk_sns::config::Builder::from(self.sdk().await);
                    let endpoint = if self.settings.sns_endpoint_url.is_empty() {
                        &self.settings.endpoint_url
                    } else {
                        &self.settings.sns_endpoint_url
                    };
                    if !endpoint.is_empty() {
                        builder = builder.endpoint_url(endpoint);
                    }
                    aws_sdk_sns::Client::from_conf(builder.build())
                })
                .await
        }

        /// Publishes one message to an SNS topic, in the topic's own region.
        pub async fn publish_sns(
            &self,
            topic_arn: &str,
            subject: &str,
            message: &str,
        ) -> Result<(), String> {
            let mut publish = self
                .sns()
                .await
                .publish()
                .topic_arn(topic_arn)
                .subject(subject)
                .message(message)
                .customize();
            if let Some(region) = topic_arn.split(':').nth(3).filter(|r| !r.is_empty()) {
                publish = publish.config_override(
                    aws_sdk_sns::config::Builder::default()
                        .region(aws_sdk_sns::config::Region::new(region.to_string())),
                );
            }
            publish
                .send()
                .await
                .map(|_| ())
                .map_err(|e| aws_sdk_sns::error::DisplayErrorContext(e).to_string())
        }

        async fn s3(&self) -> &aws_sdk_s3::Client {
            self.s3
                .get_or_init(|| async {
                    let mut builder = aws_sdk_s3::config::Builder::from(self.sdk().await);
                    if !self.settings.endpoint_url.is_empty() {
                        builder = builder
                            .endpoint_url(&self.settings.endpoint_url)
                            .force_path_style(true);
                    }
                    aws_sdk_s3::Client::from_conf(builder.build())
                })
                .await
        }
    }

    pub async fn generate_images(
        state: &Arc<VideoState>,
        outbound: &Outbound,
        stream: &Stream,
        meta: &FragmentMeta,
        config: &Value,
    ) {
        let Some(destination) = config["DestinationConfig"]["Uri"]
            .as_str()
            .and_then(DestinationUri::parse)
        else {
            return;
        };
        let clock = if config["ImageSelectorType"] == "PRODUCER_TIMESTAMP" {
            TimeClock::Producer
        } else {
            TimeClock::Server
        };
        let format = if config["Format"] == "PNG" {
            ImageFormat::Png
        } else {
            let quality = config["FormatConfig"]["JPEGQuality"]
                .as_str()
                .and_then(|q| q.parse::<u8>().ok())
                .unwrap_or(80);
            ImageFormat::Jpeg { quality }
        };
        let dimension = |name: &str| config[name].as_u64().map(|v| v as u32);
        let (width, height) = (dimension("WidthPixels"), dimension("HeightPixels"));
        let start = match clock {
            TimeClock::Producer => meta.producer_ms,
            TimeClock::Server => meta.server_ms,
        };
        let interval = config["SamplingInterval"].as_i64().unwrap_or(1000);
        let instants = sample_instants(start, meta.duration_ms, interval);
        let arn = stream.arn.clone();
        let wanted = instants.clone();
        let encoded = state
            .blocking(move |s| {
                let pictures = crate::images::pictures_at(s, &arn, clock, &wanted)?;
                Ok(pictures
                    .into_iter()
                    .map(|p| {
                        p.ok()
                            .and_then(|picture| encode(&picture, format, width, height).ok())
                    })
                    .collect::<Vec<_>>())
            })
            .await;
        let encoded = match encoded {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, stream = %stream.name, "image generation could not read the fragment");
                return;
            }
        };
        let prefix = meta
            .tags
            .iter()
            .find(|(name, _)| name == IMAGE_PREFIX_TAG)
            .map(|(_, v)| v.as_str());
        let account = &state.ctx.arns.account_id;
        let path = destination.path.trim_end_matches('/');
        let client = outbound.s3().await;
        for (instant, image) in instants.into_iter().zip(encoded) {
            let Some(image) = image else {
                tracing::debug!(stream = %stream.name, instant, "no picture at a sampled instant");
                continue;
            };
            let key = image_key(prefix, account, &stream.name, instant, format.extension());
            let key = if path.is_empty() {
                key
            } else {
                format!("{path}/{key}")
            };
            let mut put = client
                .put_object()
                .bucket(&destination.authority)
                .key(&key)
                .content_type(format.content_type())
                .metadata("aws_kinesisvideo_fragment_number", meta.number())
                .metadata(
                    "aws_kinesisvideo_producer_timestamp",
                    meta.producer_ms.to_string(),
                )
                .metadata(
                    "aws_kinesisvideo_server_timestamp",
                    meta.server_ms.to_string(),
                )
                .body(ByteStream::from(image));
            for (name, value) in custom_tags(meta) {
                put = put.metadata(name, value);
            }
            if let Err(e) = put.send().await {
                tracing::warn!(
                    error = %aws_sdk_s3::error::DisplayErrorContext(e),
                    bucket = %destination.authority,
                    key = %key,
                    "writing a generated image failed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(tags: &[(&str, &str)]) -> FragmentMeta {
        FragmentMeta {
            seq: 3,
            timecode: 0,
            producer_ms: 1_700_000_000_000,
            server_ms: 1_700_000_000_500,
            duration_ms: 1000,
            size: 10,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn only_reserved_trigger_tags_trigger() {
        assert!(is_triggering(&meta(&[(NOTIFICATION_TAG, "")])));
        assert!(is_triggering(&meta(&[
            ("a", "b"),
            (IMAGE_GENERATION_TAG, "")
        ])));
        assert!(!is_triggering(&meta(&[("a", "b")])));
    }

    #[test]
    fn notification_messages_have_the_documented_members() {
        let stream = Stream {
            name: "cam".into(),
            arn: "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam/1".into(),
            device_name: None,
            media_type: None,
            kms_key_id: String::new(),
            retention_hours: 1,
            version: "v".into(),
            status: "ACTIVE".into(),
            creation_ms: 0,
            storage_tier: "HOT".into(),
            tags: BTreeMap::new(),
        };
        let m = notification_message(&stream, &meta(&[(NOTIFICATION_TAG, ""), ("door", "open")]));
        assert_eq!(
            m,
            json!({
                "StreamArn": stream.arn,
                "FragmentNumber": crate::model::fragment_number(3),
                "FragmentStartProducerTimestamp": 1_700_000_000_000i64,
                "FragmentStartServerTimestamp": 1_700_000_000_500i64,
                "NotificationType": "PERSISTED",
                "NotificationPayload": {"door": "open"},
            })
        );
        assert_eq!(
            notification_topic("kinesisvideo/{StreamName}/notifications", &stream),
            "kinesisvideo/cam/notifications"
        );
    }

    #[test]
    fn keys_and_sampling_follow_the_spec() {
        let key = image_key(Some("pre"), "123", "cam", 42, "jpg");
        let parts: Vec<&str> = key.trim_end_matches(".jpg").split('_').collect();
        assert_eq!(&parts[..4], &["pre", "123", "cam", "42"]);
        assert_eq!(parts[4].len(), 36);
        assert!(image_key(None, "123", "cam", 42, "png").starts_with("123_cam_42_"));
        assert_eq!(sample_instants(1000, 1000, 400), vec![1000, 1400, 1800]);
        assert_eq!(sample_instants(1000, 100, 400), vec![1000]);
        assert_eq!(sample_instants(0, 1000, 50).len(), 5);
    }
}
