//! The export engine: one worker per export configuration, each with its own persisted
//! checkpoint over the stream, shipping batches to a destination.
//!
//! A worker reads from its checkpoint (or `startSequenceNumber`, or the oldest retained
//! message if retention got there first), forms a batch of up to `batchSize` messages, waits
//! for `batchIntervalMillis` when set and the batch is not full, takes a slot from the shared
//! pool (`thread_pool_size`, served by `priority`, 1 first, unset last), and sends it. Success
//! advances the checkpoint over the processed prefix and persists it; failure records
//! `errorMessage` and retries the same messages after an exponential backoff with jitter,
//! capped at five minutes, forever. `disabled` parks the worker with its checkpoint kept.
//! Update diffs configurations by identifier: same identifier keeps the checkpoint unless
//! `startSequenceNumber` changed; removed identifiers stop and forget theirs. A batch's bytes
//! pass the shared bandwidth cap (`max_bandwidth_kbps`) before it is sent.

mod bandwidth;
mod destinations;
mod gate;
#[cfg(feature = "aws")]
pub mod iot;
#[cfg(feature = "aws")]
pub mod s3;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mooring_core::Clock;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use bandwidth::BandwidthLimit;
pub use destinations::Destinations;
use gate::PriorityGate;

use crate::definition::{ExportConfig, ExportKind, StreamDefinition};
use crate::log::{LogError, ReadOutcome, StoredMessage, StreamLog};
use crate::metrics::StreamMetrics;
use crate::model::Stream;
use crate::store::{ExportProgress, StreamCatalog};

/// Payload bytes one export batch may hold.
const BATCH_BYTE_CAP: usize = 5 * 1024 * 1024;

/// The `[streams]` configuration section: where exports go and how they retry.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSettings {
    /// Region for AWS destinations; the process region when empty.
    pub region: String,
    /// Static credentials for AWS destinations; the standard credential chain when empty.
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// Endpoint overrides (e.g. a local Kinesis); AWS's endpoints when empty.
    pub kinesis_endpoint: String,
    pub s3_endpoint: String,
    pub iotanalytics_endpoint: String,
    /// Used exactly as given: SiteWise's `data.` host prefix is not added to an override.
    pub iotsitewise_endpoint: String,
    /// Average export bandwidth across all exports in kilobits per second
    /// (`STREAM_MANAGER_EXPORTER_MAX_BANDWIDTH`); 0 is unlimited.
    pub max_bandwidth_kbps: u64,
    /// Multipart part size for S3 exports (at least 5 MiB).
    pub s3_min_part_size: i64,
    /// Exports that may send at the same time (`STREAM_MANAGER_EXPORTER_THREAD_POOL_SIZE`).
    pub thread_pool_size: usize,
    /// First retry delay; doubles per failure up to `retry_max_millis`.
    pub retry_initial_millis: u64,
    pub retry_max_millis: u64,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            region: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            session_token: String::new(),
            kinesis_endpoint: String::new(),
            s3_endpoint: String::new(),
            iotanalytics_endpoint: String::new(),
            iotsitewise_endpoint: String::new(),
            max_bandwidth_kbps: 0,
            s3_min_part_size: crate::definition::MIN_MULTIPART_THRESHOLD,
            thread_pool_size: 5,
            retry_initial_millis: 1000,
            retry_max_millis: 300_000,
        }
    }
}

/// One entry of DescribeMessageStream's `exportStatuses`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportStatus {
    pub export_config_identifier: String,
    pub last_exported_sequence_number: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_export_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    pub exported_bytes_from_stream: i64,
    pub exported_messages_count: i64,
}

/// What sending one batch achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Leading messages of the batch that are done (delivered or skipped as undeliverable).
    pub processed: usize,
    pub exported_messages: i64,
    pub exported_bytes: i64,
    /// Why the rest was not delivered, or which messages were skipped.
    pub error: Option<String>,
}

/// A place batches are shipped to.
pub trait Destination: Send + Sync {
    fn send<'a>(
        &'a self,
        stream: &'a str,
        config: &'a ExportConfig,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<BatchOutcome, String>>;

    /// Messages that will never be sent because the stream or the export was removed
    /// (S3 reports them as Canceled); nothing by default.
    fn cancel<'a>(
        &'a self,
        _stream: &'a str,
        _config: &'a ExportConfig,
        _pending: &'a [StoredMessage],
        _why: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

struct Worker {
    kind: ExportKind,
    config: watch::Sender<ExportConfig>,
    progress: Arc<Mutex<ExportProgress>>,
    cancel: CancellationToken,
}

struct EngineInner {
    catalog: Arc<dyn StreamCatalog>,
    destinations: Arc<Destinations>,
    clock: Arc<dyn Clock>,
    settings: ExportSettings,
    gate: PriorityGate,
    bandwidth: BandwidthLimit,
    metrics: StreamMetrics,
    workers: Mutex<HashMap<(String, String), Worker>>,
    shutdown: CancellationToken,
}

/// Owns every export worker; cheap to clone.
#[derive(Clone)]
pub struct ExportEngine {
    inner: Arc<EngineInner>,
}

fn initial_progress(config: &ExportConfig) -> ExportProgress {
    let start = config.start_sequence_number.unwrap_or(0);
    ExportProgress {
        start_sequence_number: start,
        last_exported_sequence_number: start - 1,
        ..Default::default()
    }
}

impl ExportEngine {
    pub fn new(
        catalog: Arc<dyn StreamCatalog>,
        destinations: Arc<Destinations>,
        clock: Arc<dyn Clock>,
        settings: ExportSettings,
        metrics: StreamMetrics,
        shutdown: CancellationToken,
    ) -> ExportEngine {
        ExportEngine {
            inner: Arc::new(EngineInner {
                catalog,
                destinations,
                clock,
                gate: PriorityGate::new(settings.thread_pool_size.max(1)),
                bandwidth: BandwidthLimit::new(settings.max_bandwidth_kbps),
                settings,
                metrics,
                workers: Mutex::new(HashMap::new()),
                shutdown,
            }),
        }
    }

    /// Brings the stream's workers in line with its definition.
    pub fn sync_stream(&self, stream: &Arc<Stream>) {
        let definition = stream.definition();
        let mut workers = self.inner.workers.lock().unwrap();
        let wanted: Vec<(String, ExportKind, ExportConfig)> = definition
            .exports
            .iter()
            .map(|(kind, config)| {
                (
                    config.identifier.clone().unwrap_or_default(),
                    *kind,
                    config.clone(),
                )
            })
            .collect();
        let stale: Vec<(String, String)> = workers
            .iter()
            .filter(|((s, id), worker)| {
                s == &definition.name
                    && !wanted
                        .iter()
                        .any(|(wid, kind, _)| wid == id && *kind == worker.kind)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(worker) = workers.remove(&key) {
                worker.cancel.cancel();
                self.cancel_pending(
                    stream,
                    &worker,
                    format!("export {} was removed before this task ran", key.1),
                );
            }
            let catalog = self.inner.catalog.clone();
            if let Err(e) = catalog.delete_progress(&key.0, &key.1) {
                tracing::warn!(error = %e, "could not forget an export checkpoint");
            }
        }
        for (id, kind, config) in wanted {
            let key = (definition.name.clone(), id.clone());
            if let Some(worker) = workers.get(&key) {
                worker.config.send_if_modified(|current| {
                    let changed = *current != config;
                    *current = config.clone();
                    changed
                });
                continue;
            }
            let progress = match self.inner.catalog.load_progress(&definition.name, &id) {
                Ok(Some(p)) => p,
                Ok(None) => initial_progress(&config),
                Err(e) => {
                    tracing::warn!(error = %e, "could not load an export checkpoint; starting over");
                    initial_progress(&config)
                }
            };
            let progress = Arc::new(Mutex::new(progress));
            let cancel = self.inner.shutdown.child_token();
            let (config_tx, config_rx) = watch::channel(config);
            let run = WorkerRun {
                engine: self.inner.clone(),
                stream: definition.name.clone(),
                identifier: id,
                kind,
                log: stream.log.clone(),
                config: config_rx,
                progress: progress.clone(),
                cancel: cancel.clone(),
            };
            tokio::spawn(run.run());
            workers.insert(
                key,
                Worker {
                    kind,
                    config: config_tx,
                    progress,
                    cancel,
                },
            );
        }
    }

    /// Stops every worker of a stream about to be deleted (call before its log goes).
    pub fn remove_stream(&self, stream: &Arc<Stream>) {
        let name = stream.definition().name;
        let mut workers = self.inner.workers.lock().unwrap();
        let keys: Vec<(String, String)> = workers
            .keys()
            .filter(|(s, _)| *s == name)
            .cloned()
            .collect();
        for key in keys {
            if let Some(worker) = workers.remove(&key) {
                worker.cancel.cancel();
                self.cancel_pending(
                    stream,
                    &worker,
                    format!("stream {name} was deleted before this task ran"),
                );
            }
        }
    }

    /// Hands the messages a removed S3 worker will never process to its destination,
    /// which reports them Canceled.
    fn cancel_pending(&self, stream: &Arc<Stream>, worker: &Worker, why: String) {
        if worker.kind != ExportKind::S3 {
            return;
        }
        let config = worker.config.borrow().clone();
        if config.status_config.is_none() {
            return;
        }
        let mut next = worker
            .progress
            .lock()
            .unwrap()
            .last_exported_sequence_number
            + 1;
        next = next.max(stream.log.storage_status().oldest_sequence_number);
        let mut pending = Vec::new();
        while let Ok(ReadOutcome::Messages(batch)) = stream.log.read(next, 1, 500, BATCH_BYTE_CAP) {
            let Some(last) = batch.last() else {
                break;
            };
            next = last.sequence_number + 1;
            pending.extend(batch);
        }
        if pending.is_empty() {
            return;
        }
        let destinations = self.inner.destinations.clone();
        let name = stream.definition().name;
        tokio::spawn(async move {
            let destination = destinations.for_kind(ExportKind::S3).await;
            destination.cancel(&name, &config, &pending, &why).await;
        });
    }

    pub fn statuses(&self, name: &str, definition: &StreamDefinition) -> Vec<ExportStatus> {
        let workers = self.inner.workers.lock().unwrap();
        definition
            .exports
            .iter()
            .map(|(_, config)| {
                let id = config.identifier.clone().unwrap_or_default();
                let progress = workers
                    .get(&(name.to_string(), id.clone()))
                    .map(|w| w.progress.lock().unwrap().clone())
                    .unwrap_or_else(|| initial_progress(config));
                ExportStatus {
                    export_config_identifier: id,
                    last_exported_sequence_number: progress.last_exported_sequence_number,
                    last_export_time: (progress.last_export_time > 0)
                        .then_some(progress.last_export_time),
                    error_message: progress.error_message,
                    exported_bytes_from_stream: progress.exported_bytes,
                    exported_messages_count: progress.exported_messages,
                }
            })
            .collect()
    }
}

struct WorkerRun {
    engine: Arc<EngineInner>,
    stream: String,
    identifier: String,
    kind: ExportKind,
    log: Arc<StreamLog>,
    config: watch::Receiver<ExportConfig>,
    progress: Arc<Mutex<ExportProgress>>,
    cancel: CancellationToken,
}

enum Wake {
    Cancelled,
    Changed,
}

impl WorkerRun {
    async fn persist_async(&self) {
        let catalog = self.engine.catalog.clone();
        let (stream, id) = (self.stream.clone(), self.identifier.clone());
        let snapshot = self.progress.lock().unwrap().clone();
        let result =
            tokio::task::spawn_blocking(move || catalog.put_progress(&stream, &id, &snapshot))
                .await;
        if !matches!(result, Ok(Ok(()))) {
            tracing::warn!(stream = %self.stream, export = %self.identifier, "could not persist an export checkpoint");
        }
    }

    /// Waits for a new message, a configuration change, a timeout, or cancellation.
    async fn wait(
        &mut self,
        log_changes: Option<&mut watch::Receiver<i64>>,
        timeout: Option<Duration>,
    ) -> Wake {
        let sleep = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let log_changed = async {
            match log_changes {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.cancel.cancelled() => Wake::Cancelled,
            _ = self.config.changed() => Wake::Changed,
            _ = log_changed => Wake::Changed,
            _ = sleep => Wake::Changed,
        }
    }

    async fn backoff(&mut self, attempt: &mut u32) -> Wake {
        let settings = &self.engine.settings;
        let base = settings
            .retry_initial_millis
            .saturating_mul(1u64 << (*attempt).min(20))
            .min(settings.retry_max_millis);
        let jittered = rand::thread_rng().gen_range(base / 2..=base.max(1));
        *attempt = attempt.saturating_add(1);
        self.wait(None, Some(Duration::from_millis(jittered))).await
    }

    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let config = self.config.borrow_and_update().clone();
            let start = config.start_sequence_number.unwrap_or(0);
            let restarted = {
                let mut p = self.progress.lock().unwrap();
                if p.start_sequence_number != start {
                    p.start_sequence_number = start;
                    p.last_exported_sequence_number = start - 1;
                    true
                } else {
                    false
                }
            };
            if restarted {
                self.persist_async().await;
            }
            if config.disabled == Some(true) {
                if let Wake::Cancelled = self.wait(None, None).await {
                    return;
                }
                continue;
            }
            let mut log_changes = self.log.subscribe();
            log_changes.borrow_and_update();
            let oldest = self.log.storage_status().oldest_sequence_number;
            let next = {
                let mut p = self.progress.lock().unwrap();
                let next = p.last_exported_sequence_number + 1;
                if next < oldest {
                    p.error_message = Some(format!(
                        "messages {next} to {} were removed by the stream's retention before they were exported",
                        oldest - 1
                    ));
                    p.last_exported_sequence_number = oldest - 1;
                    oldest
                } else {
                    next
                }
            };
            let batch_size = config
                .batch_size
                .unwrap_or(self.kind.batch_limit())
                .clamp(1, self.kind.batch_limit());
            let batch = match self.log.read(next, 1, batch_size, BATCH_BYTE_CAP) {
                Ok(ReadOutcome::Messages(m)) => m,
                Ok(ReadOutcome::TooLarge) => match self.log.read(next, 1, 1, usize::MAX) {
                    Ok(ReadOutcome::Messages(m)) => m,
                    _ => continue,
                },
                Ok(ReadOutcome::NotEnough { .. }) => {
                    if let Wake::Cancelled = self.wait(Some(&mut log_changes), None).await {
                        return;
                    }
                    continue;
                }
                Err(LogError::Closed) => return,
                Err(e) => {
                    self.progress.lock().unwrap().error_message =
                        Some(format!("reading the stream failed: {e}"));
                    if let Wake::Cancelled = self.backoff(&mut attempt).await {
                        return;
                    }
                    continue;
                }
            };
            if let Some(interval) = config.batch_interval_millis {
                if (batch.len() as i64) < batch_size {
                    let due = batch[0].ingest_time + interval;
                    let now = self.engine.clock.now_millis();
                    if now < due {
                        let wait = Duration::from_millis((due - now) as u64);
                        if let Wake::Cancelled = self.wait(Some(&mut log_changes), Some(wait)).await
                        {
                            return;
                        }
                        continue;
                    }
                }
            }
            let destination = self.engine.destinations.for_kind(self.kind).await;
            let permit = tokio::select! {
                _ = self.cancel.cancelled() => return,
                permit = self.engine.gate.acquire(config.priority) => permit,
            };
            let batch_bytes: usize = batch.iter().map(|m| m.payload.len()).sum();
            let result = tokio::select! {
                _ = self.cancel.cancelled() => return,
                result = async {
                    self.engine.bandwidth.take(batch_bytes).await;
                    destination.send(&self.stream, &config, &batch).await
                } => result,
            };
            drop(permit);
            let now = self.engine.clock.now_millis();
            let retry = match result {
                Ok(outcome) => {
                    {
                        let mut p = self.progress.lock().unwrap();
                        p.last_export_time = now;
                        if outcome.processed > 0 {
                            p.last_exported_sequence_number =
                                batch[outcome.processed - 1].sequence_number;
                        }
                        p.exported_bytes += outcome.exported_bytes;
                        p.exported_messages += outcome.exported_messages;
                        p.error_message = outcome.error.clone();
                    }
                    self.engine.metrics.exported(
                        &self.stream,
                        &self.identifier,
                        outcome.exported_messages as usize,
                        outcome.exported_bytes,
                    );
                    outcome.processed < batch.len()
                }
                Err(error) => {
                    tracing::debug!(stream = %self.stream, export = %self.identifier, %error, "export attempt failed");
                    let mut p = self.progress.lock().unwrap();
                    p.last_export_time = now;
                    p.error_message = Some(error);
                    true
                }
            };
            self.persist_async().await;
            if retry {
                self.engine
                    .metrics
                    .export_failed(&self.stream, &self.identifier);
                if let Wake::Cancelled = self.backoff(&mut attempt).await {
                    return;
                }
            } else {
                attempt = 0;
            }
        }
    }
}
