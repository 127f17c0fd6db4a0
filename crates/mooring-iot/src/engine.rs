//! The rules engine: runs every enabled rule whose topic filter matches a message.
//!
//! [`RulesEngine::on_message`] is the single entry point the broker calls for every
//! publish. It stays on the broker's hot path only for what must be synchronous: finding
//! the matching rules in a topic-filter trie, evaluating their SQL (the payload is parsed
//! once and shared), and queueing the outcome. Actions run on a background dispatcher with
//! a bounded queue and bounded concurrency ([`crate::actions`]); when the queue is full the
//! message is dropped for that rule and counted. Basic Ingest topics
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
use tokio::sync::mpsc;

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
    }
}

/// The rules engine.
pub struct RulesEngine {
    rules: RwLock<Arc<RuleSet>>,
    queue: mpsc::Sender<Job>,
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
    /// Creates the engine and starts its action dispatcher (needs a Tokio runtime).
    pub fn start(ctx: &ServiceContext, config: &IotConfig) -> Arc<RulesEngine> {
        let settings = config.engine.clone();
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let metrics = EngineMetrics::default();
        metrics.register(&ctx.metrics);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let engine = Arc::new(RulesEngine {
            rules: RwLock::new(Arc::new(RuleSet::default())),
            queue: tx,
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
            shutdown,
        ));
        engine
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
                });
            }
            EvalOutcome::Filtered => {}
        }
    }

    /// Runs the rules for one published message: evaluation now, actions in the background.
    pub fn on_message(&self, message: &InboundMessage) {
        for job in self.evaluate(message) {
            let rule = job.rule.name.clone();
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.queue.try_send(job).is_err() {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                self.metrics
                    .dropped
                    .get_or_create(&RuleLabels { rule: rule.clone() })
                    .inc();
                tracing::warn!(%rule, "rules engine queue full; message dropped for this rule");
            }
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
