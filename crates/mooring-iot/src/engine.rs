//! The rules engine: runs every enabled rule whose topic filter matches a message.
//!
//! [`RulesEngine::on_message`] is the single entry point the broker calls for every
//! publish. It stays on the broker's hot path only for what must be synchronous: finding
//! the matching rules in a topic-filter trie, evaluating their SQL (the payload is parsed
//! once and shared), and queueing the outcome. Actions run on a background dispatcher with
//! a bounded queue and bounded concurrency ([`crate::actions`]); when the queue is full the
//! message is dropped for that rule and counted. Matched executions pass through the
//! durable [`crate::journal`] first, so their actions run at least once even across a
//! crash; [`RulesEngine::on_message_durable`] lets the broker hold a QoS 1 PUBACK until
//! then. Basic Ingest topics
//! (`$aws/rules/<name>/...`) go to the named rule only, with the prefix removed from
//! `topic()`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use mooring_core::ServiceContext;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, oneshot};

use crate::journal::Journal;

use crate::actions::ActionRuntime;
use crate::config::IotConfig;
use crate::model::{compile, CompiledRule, StoredRule};
use crate::sql::{self, EvalOutcome, ExternalFunctions, MessageFacts, NoExternalFunctions, Value};
use crate::topic::{parse_basic_ingest, FilterIndex};

/// A message as the broker hands it to the rules engine.
#[derive(Debug, Clone, Default)]
pub struct InboundMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT client id of the publisher; `None` for HTTP publishes (`clientid()` is `n/a`).
    pub client_id: Option<String>,
    /// Certificate id or IAM identity of the publisher.
    pub principal: Option<String>,
    pub source_ip: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    /// When the broker received the message (epoch ms); the engine's clock when absent.
    pub timestamp_ms: Option<i64>,
    /// Trace id of an MQTT message; generated when absent and the message came over MQTT.
    pub trace_id: Option<String>,
}

/// One rule's outcome for one message, waiting for its actions.
#[derive(Debug)]
pub struct Job {
    pub rule: Arc<CompiledRule>,
    pub facts: Arc<MessageFacts>,
    pub output: Value,
    pub variables: Vec<(String, Value)>,
    /// The execution's row in the durable journal, deleted once its actions have run.
    pub journal_id: Option<i64>,
}

/// The executions one message caused, on their way into the journal.
struct JournalBatch {
    jobs: Vec<Job>,
    /// Resolved once the executions are durable (or journaling failed).
    durable: Option<oneshot::Sender<Result<(), String>>>,
}

/// A rule in the engine with its metric counters, resolved once when the rule set is built
/// so that the hot path only increments them.
struct LoadedRule {
    rule: Arc<CompiledRule>,
    evaluations: Counter,
    matches: Counter,
}

#[derive(Default)]
struct RuleSet {
    by_name: HashMap<String, Arc<LoadedRule>>,
    index: FilterIndex<Arc<LoadedRule>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub rule: String,
    pub action: String,
    pub outcome: String,
}

/// The engine's metrics, registered under `mooring_iot_*`.
#[derive(Clone, Default)]
pub struct EngineMetrics {
    pub evaluations: Family<RuleLabels, Counter>,
    pub matches: Family<RuleLabels, Counter>,
    pub dropped: Family<RuleLabels, Counter>,
    pub actions: Family<ActionLabels, Counter>,
    pub rule_not_found: Counter,
    pub journal_failures: Counter,
}

impl EngineMetrics {
    fn register(&self, metrics: &mooring_core::metrics::Metrics) {
        metrics.register(
            "iot_rule_evaluations",
            "Messages evaluated by each topic rule",
            self.evaluations.clone(),
        );
        metrics.register(
            "iot_rule_matches",
            "Messages for which a topic rule's WHERE clause was true",
            self.matches.clone(),
        );
        metrics.register(
            "iot_rule_dropped",
            "Matched messages dropped because the action queue was full",
            self.dropped.clone(),
        );
        metrics.register(
            "iot_rule_actions",
            "Rule actions run, by rule, action type and outcome (success or failure)",
            self.actions.clone(),
        );
        metrics.register(
            "iot_rule_not_found",
            "Basic Ingest messages for unknown or disabled rules",
            self.rule_not_found.clone(),
        );
        metrics.register(
            "iot_rule_journal_failures",
            "Group commits of the rules journal that failed (their executions ran unjournaled)",
            self.journal_failures.clone(),
        );
    }
}

/// The rules engine.
pub struct RulesEngine {
    rules: RwLock<Arc<RuleSet>>,
    queue: mpsc::Sender<Job>,
    /// Present when executions are journaled before their actions run.
    journal_queue: Option<mpsc::Sender<JournalBatch>>,
    journal: Option<Journal>,
    in_flight: Arc<AtomicUsize>,
    external: OnceLock<Arc<dyn ExternalFunctions>>,
    account_id: String,
    clock: Arc<dyn mooring_core::Clock>,
    pub metrics: EngineMetrics,
}

impl std::fmt::Debug for RulesEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesEngine").finish_non_exhaustive()
    }
}

impl RulesEngine {
    /// Creates the engine and starts its action dispatcher and, when `engine.durable` is on
    /// (the default), the journal writer (needs a Tokio runtime).
    pub fn start(ctx: &ServiceContext, config: &IotConfig) -> Arc<RulesEngine> {
        let settings = config.engine.clone();
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let metrics = EngineMetrics::default();
        metrics.register(&ctx.metrics);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let journal = if settings.durable {
            match Journal::open(ctx.db.clone()) {
                Ok(journal) => Some(journal),
                Err(e) => {
                    tracing::error!(error = %e, "opening the rules journal failed; actions are not durable");
                    None
                }
            }
        } else {
            None
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let journal_queue = journal.as_ref().map(|journal| {
            let (journal_tx, journal_rx) = mpsc::channel(settings.queue_capacity.max(1));
            ctx.shutdown.spawn(write_journal(
                journal.clone(),
                journal_rx,
                tx.clone(),
                metrics.clone(),
                in_flight.clone(),
                ctx.shutdown.clone(),
            ));
            ctx.shutdown.spawn(remove_finished(
                journal.clone(),
                done_rx,
                ctx.shutdown.clone(),
            ));
            journal_tx
        });
        let engine = Arc::new(RulesEngine {
            rules: RwLock::new(Arc::new(RuleSet::default())),
            queue: tx,
            journal_queue,
            journal,
            in_flight: in_flight.clone(),
            external: OnceLock::new(),
            account_id: ctx.config.account_id.clone(),
            clock: ctx.clock.clone(),
            metrics: metrics.clone(),
        });
        let runtime = Arc::new(ActionRuntime::new(ctx, config, metrics));
        let shutdown = ctx.shutdown.clone();
        ctx.shutdown.spawn(crate::actions::dispatch(
            runtime,
            rx,
            in_flight,
            settings.concurrency,
            done_tx,
            shutdown,
        ));
        engine
    }

    /// Queues again the executions a previous run journaled but did not finish: each
    /// surviving row's rule is evaluated again against its message. Rows whose rule is gone,
    /// disabled or no longer matches are deleted. Answers how many were queued.
    pub fn replay_pending(&self) -> usize {
        let Some(journal) = &self.journal else {
            return 0;
        };
        let pending = match journal.pending() {
            Ok(pending) => pending,
            Err(e) => {
                tracing::error!(error = %e, "reading the rules journal failed");
                return 0;
            }
        };
        let set = self.rule_set();
        let mut stale = Vec::new();
        let mut jobs = Vec::new();
        for execution in pending {
            let rule = set
                .by_name
                .get(&execution.rule)
                .filter(|r| !r.rule.disabled);
            let Some(rule) = rule else {
                stale.push(execution.id);
                continue;
            };
            let facts = Arc::new(execution.facts);
            match sql::evaluate(&rule.rule.statement, &facts, self.external()) {
                EvalOutcome::Matched { output, variables } => jobs.push(Job {
                    rule: rule.rule.clone(),
                    facts,
                    output,
                    variables,
                    journal_id: Some(execution.id),
                }),
                EvalOutcome::Filtered => stale.push(execution.id),
            }
        }
        if let Err(e) = journal.remove(&stale) {
            tracing::error!(error = %e, "removing stale journal rows failed");
        }
        let queued = jobs.len();
        if queued > 0 {
            tracing::info!(
                executions = queued,
                "replaying rule executions left pending by the previous run"
            );
            self.in_flight.fetch_add(queued, Ordering::SeqCst);
            let queue = self.queue.clone();
            let in_flight = self.in_flight.clone();
            tokio::spawn(async move {
                for job in jobs {
                    if queue.send(job).await.is_err() {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            });
        }
        queued
    }

    /// Wires the functions that reach other services (`aws_lambda`, `get_thing_shadow`,
    /// `get_registry_data`). Only the first call has an effect.
    pub fn set_external_functions(&self, external: Arc<dyn ExternalFunctions>) {
        let _ = self.external.set(external);
    }

    fn external(&self) -> &dyn ExternalFunctions {
        match self.external.get() {
            Some(e) => e.as_ref(),
            None => &NoExternalFunctions,
        }
    }

    /// Replaces the engine's rule set; rules that do not compile are skipped with an error
    /// in the log (they were validated when stored, so this means a changed engine).
    pub fn replace_all(&self, rules: &[StoredRule]) {
        let mut set = RuleSet::default();
        for stored in rules {
            match compile(stored) {
                Ok(rule) => {
                    let labels = RuleLabels {
                        rule: rule.name.clone(),
                    };
                    let loaded = Arc::new(LoadedRule {
                        evaluations: self.metrics.evaluations.get_or_create(&labels).clone(),
                        matches: self.metrics.matches.get_or_create(&labels).clone(),
                        rule: Arc::new(rule),
                    });
                    if let Some(from) = &loaded.rule.statement.from {
                        set.index.insert(from, loaded.clone());
                    }
                    set.by_name.insert(loaded.rule.name.clone(), loaded);
                }
                Err(e) => {
                    tracing::error!(rule = %stored.name, error = %e, "stored rule does not compile; skipped")
                }
            }
        }
        if let Ok(mut current) = self.rules.write() {
            *current = Arc::new(set);
        }
    }

    fn rule_set(&self) -> Arc<RuleSet> {
        self.rules.read().map(|r| r.clone()).unwrap_or_default()
    }

    fn facts(&self, message: &InboundMessage, topic: &str) -> MessageFacts {
        let mut facts = MessageFacts::new(topic, message.payload.clone());
        facts.client_id = message.client_id.clone();
        facts.principal = message.principal.clone();
        facts.source_ip = message.source_ip.clone();
        facts.trace_id = message.trace_id.clone().or_else(|| {
            message
                .client_id
                .as_ref()
                .map(|_| uuid::Uuid::new_v4().to_string())
        });
        facts.timestamp_ms = message
            .timestamp_ms
            .unwrap_or_else(|| self.clock.now_millis());
        facts.account_id = self.account_id.clone();
        facts.user_properties = message.user_properties.clone();
        facts.content_type = message.content_type.clone();
        facts.response_topic = message.response_topic.clone();
        facts.correlation_data = message.correlation_data.clone();
        facts.payload_format_indicator = message.payload_format_indicator;
        facts
    }

    /// Evaluates every matching rule and answers the jobs their actions would run, without
    /// queueing them (what [`RulesEngine::on_message`] does before queueing).
    pub fn evaluate(&self, message: &InboundMessage) -> Vec<Job> {
        let set = self.rule_set();
        let mut jobs = Vec::new();
        if let Some(ingest) = parse_basic_ingest(&message.topic) {
            match set
                .by_name
                .get(ingest.rule_name)
                .filter(|r| !r.rule.disabled)
            {
                Some(rule) => {
                    let facts = Arc::new(self.facts(message, ingest.topic));
                    self.run_rule(rule, &facts, &mut jobs);
                }
                None => {
                    self.metrics.rule_not_found.inc();
                    tracing::debug!(
                        rule = ingest.rule_name,
                        "Basic Ingest message for an unknown or disabled rule dropped"
                    );
                }
            }
            return jobs;
        }
        if message.topic.starts_with("$aws/rules/") {
            return jobs;
        }
        let mut matched: Vec<Arc<LoadedRule>> = Vec::new();
        set.index.for_each_match(&message.topic, |loaded| {
            if !loaded.rule.disabled {
                matched.push(loaded.clone());
            }
        });
        if matched.is_empty() {
            return jobs;
        }
        let facts = Arc::new(self.facts(message, &message.topic));
        for rule in &matched {
            self.run_rule(rule, &facts, &mut jobs);
        }
        jobs
    }

    fn run_rule(&self, loaded: &LoadedRule, facts: &Arc<MessageFacts>, jobs: &mut Vec<Job>) {
        loaded.evaluations.inc();
        match sql::evaluate(&loaded.rule.statement, facts, self.external()) {
            EvalOutcome::Matched { output, variables } => {
                loaded.matches.inc();
                jobs.push(Job {
                    rule: loaded.rule.clone(),
                    facts: facts.clone(),
                    output,
                    variables,
                    journal_id: None,
                });
            }
            EvalOutcome::Filtered => {}
        }
    }

    /// Runs the rules for one published message: evaluation now, actions in the background.
    pub fn on_message(&self, message: &InboundMessage) {
        drop(self.submit(message, false));
    }

    /// [`RulesEngine::on_message`], answering a receiver that resolves once the executions
    /// the message caused are in the durable journal; `None` when no rule matched, the
    /// journal is off, or the queue was full (the executions were dropped and counted).
    pub fn on_message_durable(
        &self,
        message: &InboundMessage,
    ) -> Option<oneshot::Receiver<Result<(), String>>> {
        self.submit(message, true)
    }

    fn submit(
        &self,
        message: &InboundMessage,
        want_durable: bool,
    ) -> Option<oneshot::Receiver<Result<(), String>>> {
        let jobs = self.evaluate(message);
        if jobs.is_empty() {
            return None;
        }
        let Some(journal_queue) = &self.journal_queue else {
            for job in jobs {
                self.enqueue(job);
            }
            return None;
        };
        let (durable, receiver) = if want_durable {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let count = jobs.len();
        self.in_flight.fetch_add(count, Ordering::SeqCst);
        if let Err(e) = journal_queue.try_send(JournalBatch { jobs, durable }) {
            let batch = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            };
            self.in_flight.fetch_sub(count, Ordering::SeqCst);
            for job in &batch.jobs {
                self.count_dropped(&job.rule.name);
            }
            return None;
        }
        receiver
    }

    fn count_dropped(&self, rule: &str) {
        self.metrics
            .dropped
            .get_or_create(&RuleLabels {
                rule: rule.to_string(),
            })
            .inc();
        tracing::warn!(%rule, "rules engine queue full; message dropped for this rule");
    }

    fn enqueue(&self, job: Job) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.queue.try_send(job) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            self.count_dropped(&job.rule.name);
        }
    }

    /// Waits until every queued rule execution has finished its actions (tests, benches).
    pub async fn wait_idle(&self) {
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// The number of enabled and disabled rules loaded.
    pub fn rule_count(&self) -> usize {
        self.rule_set().by_name.len()
    }
}

/// Writes journal batches in group commits, acknowledges them, and hands their jobs to
/// the dispatcher. When the journal cannot be written the jobs still run, unjournaled, and
/// the waiting publishers are told.
async fn write_journal(
    journal: Journal,
    mut batches: mpsc::Receiver<JournalBatch>,
    dispatch: mpsc::Sender<Job>,
    metrics: EngineMetrics,
    in_flight: Arc<AtomicUsize>,
    shutdown: mooring_core::Shutdown,
) {
    const MAX_BATCHES_PER_COMMIT: usize = 1024;
    loop {
        let first = tokio::select! {
            _ = shutdown.triggered() => return,
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        let mut group = vec![first];
        while group.len() < MAX_BATCHES_PER_COMMIT {
            match batches.try_recv() {
                Ok(batch) => group.push(batch),
                Err(_) => break,
            }
        }
        let entries: Vec<(String, Arc<MessageFacts>)> = group
            .iter()
            .flat_map(|b| b.jobs.iter())
            .map(|j| (j.rule.name.clone(), j.facts.clone()))
            .collect();
        let writer = journal.clone();
        let written = tokio::task::spawn_blocking(move || {
            let refs: Vec<(&str, &MessageFacts)> = entries
                .iter()
                .map(|(rule, facts)| (rule.as_str(), facts.as_ref()))
                .collect();
            writer.append(&refs)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let mut ids = match &written {
            Ok(ids) => ids.clone().into_iter(),
            Err(e) => {
                metrics.journal_failures.inc();
                tracing::error!(error = %e, "writing the rules journal failed; these executions are not durable");
                Vec::new().into_iter()
            }
        };
        let mut jobs = Vec::new();
        for batch in group {
            if let Some(durable) = batch.durable {
                let _ = durable.send(written.as_ref().map(|_| ()).map_err(|e| e.clone()));
            }
            jobs.extend(batch.jobs);
        }
        for mut job in jobs {
            job.journal_id = ids.next();
            if dispatch.send(job).await.is_err() {
                in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Deletes the journal rows of finished executions, a batch at a time.
async fn remove_finished(
    journal: Journal,
    mut finished: mpsc::UnboundedReceiver<i64>,
    shutdown: mooring_core::Shutdown,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.triggered() => return,
            id = finished.recv() => match id {
                Some(id) => id,
                None => return,
            },
        };
        let mut ids = vec![first];
        while let Ok(id) = finished.try_recv() {
            ids.push(id);
        }
        let writer = journal.clone();
        let removed = tokio::task::spawn_blocking(move || writer.remove(&ids)).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::error!("removing finished executions from the rules journal failed; they will run again after a restart");
        }
    }
}
