//! Kinesis Video Streams for Mooring: the control plane (streams, tags, retention, data
//! endpoints), PutMedia ingest with streamed acknowledgements, the fragment store, the
//! GetMedia / ListFragments / GetMediaForFragmentList readers, and playback: HLS and DASH
//! sessions ([`playback`], [`hls`], [`dash`], [`session`]) packaged as fMP4 ([`fmp4`]) or
//! MPEG-TS ([`mpegts`]) from [`packaging`], GetClip ([`clip`]), GetImages (`images`, with
//! `picture` decoding frames; the default-on `images` feature) and the [`console`] player.
//!
//! [`VideoService`] is registered with the AWS front door (restJson1, signing name
//! `kinesisvideo`). The split follows the project's convention: [`model`] holds the values and
//! rules, [`api`] one function per control-plane operation, [`ingest`] PutMedia, [`media`] the
//! readers, [`store`] the metadata persistence (with [`index`] writing fragment index rows
//! behind in batches), [`fragments`] the media persistence, and
//! [`mkv`] / [`ebml`] the incremental Matroska parser.

pub mod admission;
pub mod api;
pub mod clip;
pub mod console;
pub mod dash;
pub mod ebml;
pub mod fmp4;
pub mod fragments;
pub mod hls;
#[cfg(feature = "images")]
pub mod images;
pub mod index;
pub mod ingest;
pub mod low_latency;
pub mod media;
pub mod mkv;
pub mod model;
pub mod mpegts;
pub mod packaged_cache;
pub mod packaging;
#[cfg(feature = "images")]
pub mod picture;
pub mod playback;
pub mod session;
pub mod store;
pub mod stream_configurations;
pub mod tag_effects;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Response, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::sigv4::AuthFailure;
use mooring_aws::{
    Authentication, AwsError, AwsRequest, AwsService, BodyMode, OperationName, Protocol, Route,
};
use mooring_core::{Clock, ServiceContext};
use serde::Deserialize;

use crate::fragments::FragmentStore;
use crate::index::WriteBehindIndex;
use crate::model::{VideoError, VideoResult};
use crate::store::{SqliteVideoStore, VideoStore};

/// The `[video]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VideoConfig {
    /// How often an IDLE ack is sent while a PutMedia connection is quiet.
    pub idle_ack_interval_ms: u64,
    /// A PutMedia connection without data for this long is closed.
    pub idle_timeout_secs: u64,
    /// Maximum PutMedia connection duration (ERROR 4003 after it).
    pub max_connection_secs: u64,
    /// How far in the future a producer timestamp may lie before ERROR 4007.
    pub max_producer_clock_skew_secs: u64,
    /// GetMedia ends when no new fragment arrives for this long.
    pub get_media_idle_ms: u64,
    /// How often retention is enforced.
    pub retention_sweep_secs: u64,
    /// Enforce KVS's TPS quotas and archived-media point budgets (400
    /// ClientLimitExceededException), as AWS does. Off by default, as in other local
    /// emulators, because scripts and test suites call faster than 5 TPS per stream.
    pub rate_limits: bool,
    /// PutMedia ingest rate per stream (bytes/s; 0 unlimited). KVS: 12.5 MB/s.
    pub put_media_bytes_per_sec: u64,
    /// GetMedia output rate per session (bytes/s; 0 unlimited). KVS: 25 MB/s.
    pub get_media_bytes_per_sec: u64,
    /// Tracks allowed per PutMedia document (KVS: 3, a soft limit). With 1, the legacy
    /// one-track rule, more tracks get ERROR 4005; otherwise ERROR 4012.
    pub max_tracks: usize,
    /// KMS key states for streams' KmsKeyId (key id, ARN or alias → Enabled, Disabled,
    /// PendingDeletion, AccessDenied, Unavailable, InvalidUsage, ValidationError,
    /// NotFound). Mooring has no KMS; listed keys in a non-Enabled state make PutMedia
    /// and GetMedia fail with the 45xx errors KVS reports. Unlisted keys are Enabled.
    pub kms_keys: std::collections::HashMap<String, String>,
    /// Serve every LIVE fMP4 HLS session as Low-Latency HLS (without it, a client adds
    /// `&LowLatency=ON` to the session URL); see [`low_latency`].
    pub low_latency_hls: bool,
    /// `[video.outbound]`: where image generation writes its images (S3-compatible).
    pub outbound: tag_effects::VideoOutbound,
    /// MQTT topic for fragment notifications (`{StreamName}` is replaced); empty disables.
    pub notification_topic: String,
    /// Deliver fragment notifications to the configuration's SNS topic (through
    /// `[video.outbound]`). Off by default: a self-hosted site often has no SNS.
    pub sns_notifications: bool,
    /// Byte budget of the cache of packaged media segments that playback sessions share.
    pub packaged_cache_bytes: usize,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            idle_ack_interval_ms: 2_000,
            idle_timeout_secs: 30,
            max_connection_secs: 45 * 60,
            max_producer_clock_skew_secs: 3_600,
            get_media_idle_ms: 3_000,
            retention_sweep_secs: 60,
            rate_limits: false,
            put_media_bytes_per_sec: 12_500_000,
            get_media_bytes_per_sec: 25_000_000,
            max_tracks: 3,
            kms_keys: Default::default(),
            low_latency_hls: false,
            outbound: Default::default(),
            notification_topic: "kinesisvideo/{StreamName}/notifications".into(),
            sns_notifications: false,
            packaged_cache_bytes: 64 << 20,
        }
    }
}

/// Shared state of the video service.
pub struct VideoState {
    pub ctx: ServiceContext,
    pub config: VideoConfig,
    pub store: Arc<dyn VideoStore>,
    pub fragments: Arc<FragmentStore>,
    pub admission: admission::Admission,
    /// Playback session keys and live-session numbering (HLS, DASH).
    pub playback: playback::PlaybackState,
    /// The fragments still being received, for low-latency HLS.
    pub live_edges: low_latency::LiveEdges,
    /// Packaged fMP4 media segments shared by all sessions (`[video] packaged_cache_bytes`).
    pub packaged: packaged_cache::PackagedCache,
    /// Image generation and notification configurations.
    pub configurations: stream_configurations::ConfigurationStore,
    /// Queue of persisted fragments tagged for image generation or notification.
    pub tag_effects: tag_effects::TagEffects,
}

impl VideoState {
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.ctx.clock
    }

    /// Runs a blocking store call on the blocking pool.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> VideoResult<T>
    where
        F: FnOnce(&VideoState) -> VideoResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let state = self.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| VideoError::internal(e.to_string()))?
    }
}

/// The Kinesis Video Streams service behind the front door.
pub struct VideoService {
    state: Arc<VideoState>,
}

const CONTROL_PATHS: &[&str] = &[
    "/createStream",
    "/describeStream",
    "/listStreams",
    "/updateStream",
    "/deleteStream",
    "/updateDataRetention",
    "/tagStream",
    "/untagStream",
    "/listTagsForStream",
    "/TagResource",
    "/UntagResource",
    "/ListTagsForResource",
    "/getDataEndpoint",
    "/updateImageGenerationConfiguration",
    "/describeImageGenerationConfiguration",
    "/updateNotificationConfiguration",
    "/describeNotificationConfiguration",
];
const MEDIA_PATHS: &[&str] = &[
    "/putMedia",
    "/getMedia",
    "/listFragments",
    "/getMediaForFragmentList",
];
/// Archived-media playback operations (POST, SigV4).
const PLAYBACK_PATHS: &[&str] = &[
    "/getHLSStreamingSessionURL",
    "/getDASHStreamingSessionURL",
    "/getClip",
];

/// Unsigned GET resources: HLS/DASH session resources (authorized by their session token)
/// and the console's player page.
fn is_unsigned_resource(route: &Route<'_>) -> bool {
    route.method == Method::GET
        && (route.path.starts_with("/hls/v1/")
            || route.path.starts_with("/dash/v1/")
            || route.path.starts_with(console::PLAYER_PREFIX))
}

impl VideoService {
    /// Opens the store, cleans up after a crash and starts the retention sweep.
    pub fn new(ctx: &ServiceContext) -> anyhow::Result<Arc<VideoService>> {
        let config: VideoConfig = ctx.config.section("video")?;
        for (key, kms_state) in &config.kms_keys {
            ingest::kms_state_error(kms_state)
                .map_err(|e| anyhow::anyhow!("video.kms_keys.{key}: {e}"))?;
        }
        let index = Arc::new(WriteBehindIndex::new(Arc::new(SqliteVideoStore::open(
            ctx.db.clone(),
        )?))?);
        let fragments = Arc::new(
            FragmentStore::open(ctx.service_dir("video")?, index.clone())
                .map_err(|e| anyhow::anyhow!("opening the video fragment store: {e}"))?,
        );
        let store: Arc<dyn VideoStore> = index.clone();
        // On shutdown the queued index rows are committed (a crash leaves them to recovery).
        let shutdown = ctx.shutdown.clone();
        ctx.shutdown.spawn(async move {
            shutdown.triggered().await;
            let flushed = tokio::task::spawn_blocking(move || index.flush()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "committing the video fragment index at shutdown failed");
            }
        });
        let keys = session::SessionKeys::load_or_create(&ctx.service_dir("video-sessions")?)
            .map_err(|e| anyhow::anyhow!("loading the video session key: {e}"))?;
        let configurations = stream_configurations::ConfigurationStore::open(ctx.db.clone())?;
        let (tag_effects, tagged) = tag_effects::TagEffects::new();
        let packaged = packaged_cache::PackagedCache::new(config.packaged_cache_bytes);
        let state = Arc::new(VideoState {
            ctx: ctx.clone(),
            admission: admission::Admission::new(config.rate_limits),
            config,
            store,
            fragments,
            playback: playback::PlaybackState::new(keys),
            live_edges: low_latency::LiveEdges::default(),
            packaged,
            configurations,
            tag_effects,
        });
        ctx.shutdown.spawn(tag_effects::run(state.clone(), tagged));
        let sweeper = state.clone();
        ctx.shutdown.spawn(async move {
            let period = Duration::from_secs(sweeper.config.retention_sweep_secs.max(1));
            loop {
                tokio::select! {
                    _ = sweeper.ctx.shutdown.triggered() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                let result = sweeper
                    .blocking(|s| {
                        let now = s.clock().now_millis();
                        for stream in s.store.all_streams()? {
                            s.fragments.enforce_retention(
                                &stream.arn,
                                stream.retention_hours,
                                now,
                            )?;
                        }
                        Ok(())
                    })
                    .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "video retention sweep failed");
                }
            }
        });
        Ok(Arc::new(VideoService { state }))
    }

    pub fn state(&self) -> &Arc<VideoState> {
        &self.state
    }
}

/// Renders a service error in the restJson1 shape KVS uses (both `message` and `Message`,
/// both error-type header spellings).
pub fn error_response(err: &VideoError, operation: &str) -> Response<Body> {
    let status = StatusCode::from_u16(err.kind.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = AwsError::new(status, err.kind.code(), err.message.clone())
        .with("Message", err.message.clone())
        .into_response(Protocol::RestJson1);
    if let Ok(v) = HeaderValue::from_str(err.kind.code()) {
        response.headers_mut().insert("x-amz-ErrorType", v);
    }
    response
        .extensions_mut()
        .insert(OperationName(operation.to_string()));
    response
}

impl AwsService for VideoService {
    fn name(&self) -> &'static str {
        "kinesisvideo"
    }

    fn signing_names(&self) -> &'static [&'static str] {
        &["kinesisvideo"]
    }

    fn protocol(&self) -> Protocol {
        Protocol::RestJson1
    }

    fn matches(&self, route: &Route<'_>) -> bool {
        (route.method == Method::POST
            && (CONTROL_PATHS.contains(&route.path)
                || MEDIA_PATHS.contains(&route.path)
                || PLAYBACK_PATHS.contains(&route.path)
                || (cfg!(feature = "images") && route.path == "/getImages")))
            || is_unsigned_resource(route)
    }

    fn authentication(&self, route: &Route<'_>) -> Authentication {
        if is_unsigned_resource(route) {
            Authentication::Service
        } else {
            Authentication::SigV4
        }
    }

    fn body_mode(&self, route: &Route<'_>) -> BodyMode {
        if route.path == "/putMedia" {
            BodyMode::Streaming
        } else {
            BodyMode::Buffered
        }
    }

    fn auth_error(&self, failure: &AuthFailure) -> AwsError {
        let (status, code, message) = match failure {
            AuthFailure::Missing => (
                StatusCode::FORBIDDEN,
                "MissingAuthenticationTokenException",
                "Missing Authentication Token".to_string(),
            ),
            AuthFailure::Incomplete(m) => {
                (StatusCode::BAD_REQUEST, "IncompleteSignature", m.clone())
            }
            AuthFailure::UnknownAccessKey | AuthFailure::InvalidToken => (
                StatusCode::FORBIDDEN,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.".to_string(),
            ),
            AuthFailure::SignatureMismatch(m) => (
                StatusCode::FORBIDDEN,
                "InvalidSignatureException",
                m.clone(),
            ),
            AuthFailure::Expired(m) => (StatusCode::BAD_REQUEST, "RequestExpired", m.clone()),
        };
        AwsError::new(status, code, message.clone()).with("Message", message)
    }

    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>> {
        let state = self.state.clone();
        Box::pin(async move {
            let path = request.request.uri().path().to_string();
            let request_id = request.context.request_id.clone();
            if let Err(e) = state.admission.admit_request(&path, &request) {
                let mut response = error_response(&e, admission::operation_name(&path));
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-amz-RequestId", v);
                }
                return response;
            }
            let mut response = match path.as_str() {
                "/putMedia" => ingest::put_media(state, request).await,
                "/getMedia" => media::get_media(state, request).await,
                "/listFragments" => media::list_fragments(state, request).await,
                "/getMediaForFragmentList" => {
                    media::get_media_for_fragment_list(state, request).await
                }
                "/getHLSStreamingSessionURL" => {
                    playback::get_session_url(state, request, false).await
                }
                "/getDASHStreamingSessionURL" => {
                    playback::get_session_url(state, request, true).await
                }
                "/getClip" => clip::get_clip(state, request).await,
                #[cfg(feature = "images")]
                "/getImages" => images::get_images(state, request).await,
                p if p.starts_with(console::PLAYER_PREFIX) => {
                    console::player_page(state, request).await
                }
                p if p.starts_with("/hls/v1/") || p.starts_with("/dash/v1/") => {
                    playback::session_resource(state, request).await
                }
                _ => api::dispatch(state, &path, request).await,
            };
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert("x-amz-RequestId", v);
            }
            response
        })
    }
}
