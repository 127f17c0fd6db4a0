//! Mooring's Greengrass stream manager: durable local streams that the official stream
//! manager SDKs (Python, Java, Node.js) use unmodified, with exports to the cloud.
//!
//! - [`log`]: the segment log (append-only files, CRC32C-framed records, group commit,
//!   torn-tail recovery) — the part that must never lose an acknowledged message;
//! - [`definition`] and [`model`]: stream definitions, limits and the rules of every operation;
//! - [`store`]: definitions and export checkpoints in the metadata store;
//! - [`codec`], [`api`] and [`server`]: the SDK wire protocol on TCP;
//! - [`export`]: the export engine and its destinations;
//! - [`client`]: a native protocol client for the `mooring streams` operator tools.
//!
//! [`StreamManagerService::start`] builds everything from a [`ServiceContext`]; `mooring
//! serve` then hands the listener to [`StreamManagerService::serve`] and registers the
//! [`StreamsHandle`] through which other services append.

pub mod api;
pub mod client;
pub mod codec;
pub mod definition;
pub mod export;
pub mod log;
pub mod metrics;
pub mod model;
pub mod server;
pub mod status;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use mooring_core::handles::{HandleError, StreamsHandle};
use mooring_core::ServiceContext;
use tokio::net::TcpListener;

use crate::export::{Destinations, ExportEngine, ExportSettings};
use crate::model::StreamManager;
use crate::status::Status;
use crate::store::DbCatalog;

/// The running stream manager.
#[derive(Clone)]
pub struct StreamManagerService {
    pub manager: Arc<StreamManager>,
    auth: server::AuthPolicy,
    ctx: ServiceContext,
}

impl StreamManagerService {
    /// Opens the store (recovering every stream), starts exports and TTL retention, and
    /// registers the streams handle.
    pub fn start(ctx: &ServiceContext) -> anyhow::Result<StreamManagerService> {
        let settings: ExportSettings = ctx.config.section("streams")?;
        let catalog = Arc::new(DbCatalog::new(ctx.db.clone())?);
        let metrics = metrics::StreamMetrics::default();
        metrics.register(&ctx.metrics);
        let destinations = Arc::new(Destinations::new(
            settings.clone(),
            ctx.config.region.clone(),
            ctx.handles.clone(),
            ctx.clock.clone(),
        ));
        let engine = ExportEngine::new(
            catalog.clone(),
            destinations,
            ctx.clock.clone(),
            settings,
            metrics.clone(),
            ctx.shutdown.token(),
        );
        let manager = StreamManager::open(
            ctx.service_dir("streams")?,
            catalog,
            ctx.clock.clone(),
            engine,
            metrics,
        )?;
        manager.start_exports();
        let retention = manager.clone();
        let shutdown = ctx.shutdown.clone();
        ctx.shutdown.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = shutdown.triggered() => {
                        retention.sync_all();
                        return;
                    }
                    _ = tick.tick() => retention.expire_all(),
                }
            }
        });
        ctx.handles.set_streams(Arc::new(Handle(manager.clone())));
        let config = &ctx.config.stream_manager;
        let auth = server::AuthPolicy {
            required_token: (config.require_auth).then(|| config.auth_token.clone()),
        };
        Ok(StreamManagerService {
            manager,
            auth,
            ctx: ctx.clone(),
        })
    }

    /// Serves the SDK protocol on `listener` until shutdown.
    pub async fn serve(self, listener: TcpListener) {
        server::serve(listener, self.manager, self.auth, self.ctx.shutdown.token()).await
    }
}

/// [`StreamsHandle`] for other services (rules, event targets).
struct Handle(Arc<StreamManager>);

impl StreamsHandle for Handle {
    fn append(&self, stream: &str, data: Bytes) -> BoxFuture<'_, Result<i64, HandleError>> {
        let stream = stream.to_string();
        Box::pin(async move {
            self.0
                .append(&stream, &data)
                .await
                .map_err(|e| match e.status {
                    Status::ResourceNotFound => HandleError::NotFound(format!("stream {stream}")),
                    Status::InvalidRequest | Status::RequestPayloadTooLarge => {
                        HandleError::Rejected(e.message)
                    }
                    _ => HandleError::Internal(e.message),
                })
        })
    }
}
