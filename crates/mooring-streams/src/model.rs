//! The stream manager's state and rules: which streams exist, what each operation does to
//! them, and every status the SDK can get back. No sockets and no CBOR here.
//!
//! [`StreamManager`] owns one [`Stream`] per name: its effective definition and its segment
//! log. Definitions go to the [`StreamCatalog`] before an operation answers; messages go to
//! the log. Administrative operations (create, update, delete) are serialised by one lock;
//! appends and reads only take the map's read lock and then the stream's own log lock, so
//! streams never wait for each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mooring_core::Clock;
use serde::Serialize;

use crate::definition::{MessageStreamDefinition, ReadRequest, StreamDefinition};
use crate::export::{ExportEngine, ExportStatus};
use crate::log::{LogError, LogLimits, ReadOutcome, StoredMessage, StreamLog};
use crate::metrics::StreamMetrics;
use crate::status::{Status, StreamError};
use crate::store::StreamCatalog;

/// Payload bytes one ReadMessages response may carry (well under the 1 GiB frame limit).
pub const READ_RESPONSE_CAP: usize = 64 * 1024 * 1024;

/// One stream: its definition and its data.
pub struct Stream {
    definition: RwLock<StreamDefinition>,
    pub log: Arc<StreamLog>,
}

impl Stream {
    pub fn definition(&self) -> StreamDefinition {
        self.definition
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatusInfo {
    pub oldest_sequence_number: i64,
    pub newest_sequence_number: i64,
    pub total_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStreamInfo {
    pub definition: MessageStreamDefinition,
    pub storage_status: StorageStatusInfo,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub export_statuses: Vec<ExportStatus>,
}

fn limits_of(definition: &StreamDefinition) -> LogLimits {
    LogLimits {
        max_size: definition.max_size,
        segment_size: definition.segment_size,
        ttl_millis: definition.ttl_millis,
        overwrite_oldest: definition.overwrite_oldest(),
        flush_on_write: definition.flush_on_write && !definition.is_memory(),
    }
}

fn log_error(stream: &str, error: LogError) -> StreamError {
    match error {
        LogError::Full { .. } => StreamError::new(
            Status::InvalidRequest,
            format!("message stream {stream:?} is full: {error}"),
        ),
        LogError::TooLarge { .. } => {
            StreamError::new(Status::RequestPayloadTooLarge, error.to_string())
        }
        LogError::Closed => StreamError::not_found(stream),
        LogError::Corrupt { .. } => {
            StreamError::new(Status::MessageStoreReadError, error.to_string())
        }
        LogError::Io(e) => StreamError::new(
            Status::UnknownFailure,
            format!("storage error on stream {stream:?}: {e}"),
        ),
    }
}

pub struct StreamManager {
    root: PathBuf,
    catalog: Arc<dyn StreamCatalog>,
    clock: Arc<dyn Clock>,
    streams: RwLock<BTreeMap<String, Arc<Stream>>>,
    admin: tokio::sync::Mutex<()>,
    pub exports: ExportEngine,
    metrics: StreamMetrics,
}

impl StreamManager {
    /// Loads every stream from the catalog and opens (recovering) its log.
    pub fn open(
        root: PathBuf,
        catalog: Arc<dyn StreamCatalog>,
        clock: Arc<dyn Clock>,
        exports: ExportEngine,
        metrics: StreamMetrics,
    ) -> anyhow::Result<Arc<StreamManager>> {
        std::fs::create_dir_all(&root)?;
        let manager = Arc::new(StreamManager {
            root,
            catalog: catalog.clone(),
            clock,
            streams: RwLock::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            exports,
            metrics,
        });
        let mut known = std::collections::HashSet::new();
        for wire in catalog.load_definitions()? {
            let definition = wire
                .validated()
                .map_err(|e| anyhow::anyhow!("stored definition is invalid: {}", e.message))?;
            let dir = manager.stream_dir(&definition.name);
            known.insert(dir.clone());
            let stream = manager.open_stream(definition)?;
            manager
                .streams
                .write()
                .unwrap()
                .insert(stream.definition().name.clone(), stream);
        }
        // Data of streams whose deletion was interrupted.
        for entry in std::fs::read_dir(&manager.root)? {
            let path = entry?.path();
            if path.is_dir() && !known.contains(&path) {
                tracing::info!(dir = %path.display(), "removing data of a deleted stream");
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        Ok(manager)
    }

    /// Starts exporters for every loaded stream; call once the manager is shared.
    pub fn start_exports(self: &Arc<Self>) {
        let streams: Vec<Arc<Stream>> = self.streams.read().unwrap().values().cloned().collect();
        for stream in streams {
            self.exports.sync_stream(&stream);
        }
    }

    fn stream_dir(&self, name: &str) -> PathBuf {
        self.root.join(hex::encode(name.as_bytes()))
    }

    fn open_stream(&self, definition: StreamDefinition) -> anyhow::Result<Arc<Stream>> {
        let limits = limits_of(&definition);
        let log = if definition.is_memory() {
            StreamLog::in_memory(limits)
        } else {
            StreamLog::open(&self.stream_dir(&definition.name), limits)?
        };
        Ok(Arc::new(Stream {
            definition: RwLock::new(definition),
            log: Arc::new(log),
        }))
    }

    pub fn now_millis(&self) -> i64 {
        self.clock.now_millis()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Stream>, StreamError> {
        self.streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| StreamError::not_found(name))
    }

    async fn persist_definition(&self, definition: &StreamDefinition) -> Result<(), StreamError> {
        let catalog = self.catalog.clone();
        let wire = definition.to_wire();
        tokio::task::spawn_blocking(move || catalog.put_definition(&wire))
            .await
            .map_err(StreamError::internal)?
            .map_err(StreamError::internal)
    }

    pub async fn create(
        self: &Arc<Self>,
        wire: &MessageStreamDefinition,
    ) -> Result<(), StreamError> {
        let definition = wire.validated()?;
        let _admin = self.admin.lock().await;
        if self.get(&definition.name).is_ok() {
            return Err(StreamError::new(
                Status::InvalidRequest,
                format!("message stream {:?} already exists", definition.name),
            ));
        }
        self.check_status_streams(&definition)?;
        let dir = self.stream_dir(&definition.name);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let stream = self
            .open_stream(definition.clone())
            .map_err(StreamError::internal)?;
        self.persist_definition(&definition).await?;
        self.streams
            .write()
            .unwrap()
            .insert(definition.name.clone(), stream.clone());
        self.exports.sync_stream(&stream);
        Ok(())
    }

    /// Status streams must exist before an export refers to them.
    fn check_status_streams(&self, definition: &StreamDefinition) -> Result<(), StreamError> {
        for (_, config) in &definition.exports {
            if let Some(name) = config
                .status_config
                .as_ref()
                .and_then(|s| s.status_stream_name.as_deref())
            {
                if name != definition.name && self.get(name).is_err() {
                    return Err(StreamError::new(
                        Status::InvalidRequest,
                        format!(
                            "status stream {name:?} of export {:?} does not exist; create it first",
                            config.identifier.as_deref().unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub async fn update(
        self: &Arc<Self>,
        wire: &MessageStreamDefinition,
    ) -> Result<(), StreamError> {
        let definition = wire.validated()?;
        let _admin = self.admin.lock().await;
        let stream = self.get(&definition.name)?;
        let current = stream.definition();
        if current.persistence != definition.persistence {
            return Err(StreamError::new(
                Status::UpdateNotAllowed,
                "persistence of a message stream cannot be changed",
            ));
        }
        let stored = stream.log.storage_status().total_bytes;
        if definition.max_size < stored && !definition.overwrite_oldest() {
            return Err(StreamError::new(
                Status::UpdateFailed,
                format!(
                    "maxSize {} is smaller than the {stored} bytes the stream holds; use OverwriteOldestData or delete the stream",
                    definition.max_size
                ),
            ));
        }
        let latest = stream.log.storage_status().newest_sequence_number;
        for (kind, config) in &definition.exports {
            let changed_start = current
                .exports
                .iter()
                .find(|(k, c)| k == kind && c.identifier == config.identifier)
                .map(|(_, c)| c.start_sequence_number != config.start_sequence_number)
                .unwrap_or(false);
            if let Some(start) = config.start_sequence_number {
                if changed_start && start > latest + 1 {
                    return Err(StreamError::new(
                        Status::InvalidRequest,
                        format!(
                            "startSequenceNumber {start} of export {:?} is beyond the newest sequence number {latest}",
                            config.identifier.as_deref().unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        self.check_status_streams(&definition)?;
        self.persist_definition(&definition).await?;
        stream
            .log
            .set_limits(limits_of(&definition), self.now_millis())
            .map_err(|e| log_error(&definition.name, e))?;
        *stream.definition.write().unwrap() = definition;
        self.exports.sync_stream(&stream);
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), StreamError> {
        let _admin = self.admin.lock().await;
        let stream = self.get(name)?;
        let catalog = self.catalog.clone();
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || catalog.delete_stream(&owned))
            .await
            .map_err(StreamError::internal)?
            .map_err(StreamError::internal)?;
        self.streams.write().unwrap().remove(name);
        self.exports.remove_stream(&stream);
        stream.log.close_and_delete();
        Ok(())
    }

    pub fn list(&self) -> Vec<String> {
        self.streams.read().unwrap().keys().cloned().collect()
    }

    pub fn describe(&self, name: &str) -> Result<MessageStreamInfo, StreamError> {
        let stream = self.get(name)?;
        let definition = stream.definition();
        let storage = stream.log.storage_status();
        Ok(MessageStreamInfo {
            definition: definition.to_wire(),
            storage_status: StorageStatusInfo {
                oldest_sequence_number: storage.oldest_sequence_number,
                newest_sequence_number: storage.newest_sequence_number,
                total_bytes: storage.total_bytes,
            },
            export_statuses: self.exports.statuses(name, &definition),
        })
    }

    /// Appends and returns the sequence number once the message is as durable as the
    /// stream's definition promises.
    pub async fn append(&self, name: &str, payload: &[u8]) -> Result<i64, StreamError> {
        if payload.is_empty() {
            return Err(StreamError::new(
                Status::InvalidRequest,
                "payload must not be empty",
            ));
        }
        let stream = self.get(name)?;
        let seq = stream
            .log
            .append(payload, self.now_millis())
            .map_err(|e| log_error(name, e))?;
        if stream.log.limits().flush_on_write {
            stream
                .log
                .sync_through(seq)
                .await
                .map_err(|e| log_error(name, e))?;
        }
        self.metrics.appended(name, payload.len());
        Ok(seq)
    }

    /// ReadMessages, long-polling up to the request's timeout.
    pub async fn read(
        &self,
        name: &str,
        request: ReadRequest,
    ) -> Result<Vec<StoredMessage>, StreamError> {
        let stream = self.get(name)?;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(request.timeout_millis.max(0) as u64);
        let mut changes = stream.log.subscribe();
        loop {
            changes.borrow_and_update();
            let outcome = stream
                .log
                .read(request.start, request.min, request.max, READ_RESPONSE_CAP)
                .map_err(|e| log_error(name, e))?;
            match outcome {
                ReadOutcome::Messages(messages) => {
                    self.metrics.read(name, messages.len());
                    return Ok(messages);
                }
                ReadOutcome::TooLarge => {
                    return Err(StreamError::new(
                        Status::ResponsePayloadTooLarge,
                        format!(
                            "the first {} messages exceed the {READ_RESPONSE_CAP}-byte response limit; read fewer at a time",
                            request.min
                        ),
                    ))
                }
                ReadOutcome::NotEnough { available } => {
                    let expired = tokio::time::Instant::now() >= deadline;
                    if request.timeout_millis == 0 || expired {
                        return Err(StreamError::new(
                            Status::NotEnoughMessages,
                            format!(
                                "only {available} messages available from sequence number {} of stream {name:?}, at least {} requested",
                                request.start, request.min
                            ),
                        ));
                    }
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) if stream.log.is_closed() => return Err(StreamError::not_found(name)),
                Ok(Ok(())) | Err(_) => continue,
                Ok(Err(_)) => return Err(StreamError::not_found(name)),
            }
        }
    }

    /// Retention by TTL across every stream; run periodically.
    pub fn expire_all(&self) {
        let now = self.now_millis();
        let streams: Vec<Arc<Stream>> = self.streams.read().unwrap().values().cloned().collect();
        for stream in streams {
            if let Err(e) = stream.log.expire(now) {
                tracing::warn!(error = %e, "TTL retention failed");
            }
        }
    }

    /// Fsyncs every file-backed stream (clean shutdown).
    pub fn sync_all(&self) {
        let streams: Vec<Arc<Stream>> = self.streams.read().unwrap().values().cloned().collect();
        for stream in streams {
            if let Err(e) = stream.log.sync_all() {
                tracing::warn!(error = %e, "final fsync failed");
            }
        }
    }
}
