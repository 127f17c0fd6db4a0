//! The broker core: sessions, the router, retained messages, wills, in-process subscribers
//! and hooks. No I/O happens here; connections (see `connection`) drive it.
//!
//! Locking: the subscription trie and the retained map sit behind read-write locks that
//! publishers only read; each session has its own mutex, held for a few microseconds to
//! queue a message or to move queued messages into flight. The session map is touched only
//! on connect, disconnect, expiry and direct delivery, never per message. Routing a publish
//! therefore takes one shared trie read and one short lock per receiving session.
//!
//! Durability: a QoS 1/2 message queued for a persistent session, a retained publish and a
//! persistent session's subscriptions produce [`StoreOp`]s; the caller decides whether to
//! wait for them (a PUBACK waits, a lifecycle event does not).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mooring_core::handles::{BrokerHandle, HandleError, PublishMessage};
use mooring_core::{Clock, Shutdown};
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::auth::{AllowAll, Authorizer, ClientInfo};
use crate::codec::{self, reason, Packet, Properties, SubscriptionOptions};
use crate::connection::{self, ParkedConnection};
use crate::lifecycle::{self, DisconnectReason, EventIdentity};
use crate::parking::{ParkToken, ParkingLot};
use crate::profile::Profile;
use crate::store::{
    BrokerStore, Loaded, MessageProperties, Persister, StoreOp, StoredMessage, StoredSession,
    StoredSubscription,
};
use crate::topic;
use crate::trie::{Matched, SubscriberId, SubscriptionTrie};
use crate::BrokerError;

/// Messages waiting for a client (queued plus in flight) beyond which new ones are dropped.
pub const MAX_QUEUED_PER_CLIENT: usize = 10_000;
/// A connected subscriber with this many messages waiting is backlogged: the connections
/// whose publishes reach it read nothing more until it drains below [`BACKLOG_LOW_WATER`],
/// so a subscriber that keeps reading receives everything instead of losing QoS 0 messages
/// at [`MAX_QUEUED_PER_CLIENT`].
pub const BACKLOG_HIGH_WATER: usize = 1_000;
/// A backlogged subscriber releases its publishers once its backlog is below this.
pub const BACKLOG_LOW_WATER: usize = 500;
/// A backlogged subscriber that has not drained below the low-water mark this long after a
/// publisher started waiting for it is slow: publishers stop waiting for it (its messages
/// beyond [`MAX_QUEUED_PER_CLIENT`] are dropped, as without the wait) until it drains. So a
/// subscriber that keeps up on average loses nothing, and one that cannot (or stops reading)
/// holds its publishers for at most this long per backlog, not at its own pace.
pub const BACKLOG_STALL: Duration = Duration::from_secs(1);
/// Bytes of queued messages one pass of [`Broker::fill_outgoing`] encodes before the
/// connection writes them (a fast subscriber of large messages gets them in large writes).
const OUTGOING_BATCH: usize = 256 * 1024;
/// In-flight QoS 1/2 messages the broker accepts from one client (CONNACK Receive Maximum).
pub const SERVER_RECEIVE_MAXIMUM: u16 = 100;

/// What routing a client's publish produced: the store operations that make it durable,
/// what the publish hooks are making durable (for an acknowledged publish), and the
/// subscribers it left backlogged.
#[derive(Default)]
pub struct Routed {
    pub ops: Vec<StoreOp>,
    pub barriers: Vec<DurableReceiver>,
    pub backlogged: Vec<Arc<Session>>,
}

/// Where a message came from; publish hooks see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    pub client_id: Option<String>,
    pub principal: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub protocol_version: Option<u8>,
}

/// An application message inside the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: MessageProperties,
    /// Absolute expiry (MQTT 5 Message Expiry Interval), epoch ms.
    pub expires_at_ms: Option<i64>,
    pub origin: Origin,
}

impl Message {
    fn stored(&self, retain: bool) -> StoredMessage {
        StoredMessage {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain,
            properties: self.properties.clone(),
            expires_at_ms: self.expires_at_ms,
        }
    }

    fn from_stored(m: StoredMessage) -> Message {
        Message {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
            properties: m.properties,
            expires_at_ms: m.expires_at_ms,
            origin: Origin::default(),
        }
    }
}

/// Sees every message routed by the broker, with its origin (rules engine, metrics).
pub trait PublishHook: Send + Sync + 'static {
    fn on_publish(&self, message: &Arc<Message>);

    /// [`PublishHook::on_publish`] for a message the publisher wants acknowledged (QoS 1
    /// and 2): the answered receiver resolves once what the hook keeps for the message is
    /// durable, and the acknowledgement waits for it (the rules engine's action journal).
    fn on_publish_durable(&self, message: &Arc<Message>) -> Option<DurableReceiver> {
        self.on_publish(message);
        None
    }
}

/// Resolves once something a publish caused is durable, or with why it is not.
pub type DurableReceiver = oneshot::Receiver<Result<(), String>>;

impl<F: Fn(&Arc<Message>) + Send + Sync + 'static> PublishHook for F {
    fn on_publish(&self, message: &Arc<Message>) {
        self(message)
    }
}

/// The callback of an in-process subscription.
pub type MessageCallback = Arc<dyn Fn(&Arc<Message>) + Send + Sync>;

/// An in-process subscriber's sink.
enum InternalSink {
    Channel(mpsc::Sender<Arc<Message>>),
    Callback(MessageCallback),
}

/// What a trie entry points at.
#[derive(Clone)]
enum Target {
    Session(Arc<Session>),
    Internal(Arc<InternalSink>),
}

#[derive(Clone)]
struct SubEntry {
    options: SubscriptionOptions,
    subscription_id: Option<u32>,
    target: Target,
}

/// A message waiting in a session's queue.
#[derive(Debug, Clone)]
struct Queued {
    message: Arc<Message>,
    qos: u8,
    retain: bool,
    subscription_ids: Vec<u32>,
    /// Row in the durable queue, for persistent sessions.
    seq: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AwaitedAck {
    /// QoS 1: PUBACK.
    Ack,
    /// QoS 2: PUBREC.
    Received,
    /// QoS 2 after PUBREL: PUBCOMP.
    Complete,
}

#[derive(Debug)]
struct Inflight {
    queued: Queued,
    stage: AwaitedAck,
}

struct ConnectionLink {
    id: u64,
    line: KickLine,
}

/// How the broker reaches the connection of a [`ConnectionLink`]: to close it (a kick) or,
/// while it is parked ([`crate::parking`]), to wake it.
enum KickLine {
    /// Its task runs and listens on this channel.
    Running(oneshot::Sender<Kick>),
    /// Parked: whoever gives it work (or kicks it) wakes it with the token. A parked
    /// connection holds no channel, to stay small.
    Parked(ParkToken),
    /// Woken from the lot and not yet running again ([`Broker::relink`] makes it `Running`).
    Waking,
    /// Kicked. `Some` while the kick waits for the connection to run again and take it.
    Kicked(Option<Kick>),
}

/// An order to close a live connection from outside it (takeover, `DeleteConnection`, a
/// revoked certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kick {
    pub reason: DisconnectReason,
    /// Whether the connection's will is published.
    pub send_will: bool,
    /// Whether the session ends with the connection (`DeleteConnection` `cleanSession`).
    pub end_session: bool,
}

impl Kick {
    /// A kick with the reason's usual will behaviour, keeping the session.
    pub fn new(reason: DisconnectReason) -> Kick {
        Kick {
            reason,
            send_will: reason.sends_will(),
            end_session: false,
        }
    }
}

pub(crate) struct SessionState {
    session_id: uuid::Uuid,
    protocol_version: u8,
    expiry_secs: u32,
    connection: Option<ConnectionLink>,
    generation: u32,
    subscriptions: BTreeMap<String, StoredSubscription>,
    queue: VecDeque<Queued>,
    inflight: BTreeMap<u16, Inflight>,
    next_packet_id: u16,
    resend_inflight: bool,
    client: Option<Arc<ClientInfo>>,
    client_receive_maximum: u16,
    /// (MQTT 5 caps it below 2^32.)
    client_max_packet_size: u32,
    /// Topic aliases this connection's client accepts from the broker (MQTT 5).
    client_topic_alias_maximum: u16,
    /// Aliases assigned on the current connection, allocated by the first: boxed, an
    /// unused map takes 8 bytes of every session instead of 48.
    #[allow(clippy::box_collection)]
    outbound_aliases: Option<Box<HashMap<String, u16>>>,
    dropped: u32,
    /// Publishers wait for this session's backlog to drain (it passed the high-water mark).
    backlogged: bool,
    /// The backlog did not drain while a publisher waited: publishers no longer wait for it
    /// (until it drains).
    stalled: bool,
    /// The connection task waiting for work ([`Session::notified`]), and whether work was
    /// signalled since it last looked (a permit, as `tokio::sync::Notify` keeps one). Kept
    /// here rather than in a `Notify` beside the state, which would take twice the room.
    waiter: Option<std::task::Waker>,
    signalled: bool,
}

impl SessionState {
    fn backlog(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    /// Tells the connection task there may be work ([`Session::notified`]).
    fn signal(&mut self) {
        if let Some(waker) = self.signal_unwoken() {
            waker.wake();
        }
    }

    /// [`SessionState::signal`], leaving the wake-up to the caller, which does it once the
    /// session's lock is released (so the woken task does not find it still held).
    fn signal_unwoken(&mut self) -> Option<std::task::Waker> {
        self.signalled = true;
        self.waiter.take()
    }
}

/// One MQTT session (lives across connections when persistent).
pub struct Session {
    client_id: Arc<str>,
    state: Mutex<SessionState>,
}

impl Session {
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Resolves when messages may be waiting for the connection (at once when that was
    /// signalled since the last time it resolved).
    pub fn notified(&self) -> impl std::future::Future<Output = ()> + Unpin + '_ {
        std::future::poll_fn(move |cx| {
            let mut state = self.lock();
            if std::mem::take(&mut state.signalled) {
                return std::task::Poll::Ready(());
            }
            if !state
                .waiter
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.waiter = Some(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session identifier reported in lifecycle events.
    pub fn session_identifier(&self) -> String {
        self.lock().session_id.to_string()
    }
}

/// Settings the broker needs from the configuration.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub profile: Profile,
    pub allow_anonymous: bool,
    pub account_id: String,
}

/// The result of opening a session for a new connection.
pub struct Opened {
    pub session: Arc<Session>,
    pub connection_id: u64,
    pub session_present: bool,
    pub kicked: oneshot::Receiver<Kick>,
    pub expiry_secs: u32,
    pub version_number: u64,
}

/// What a connection asks for when it opens a session.
pub struct OpenRequest {
    pub client: Arc<ClientInfo>,
    pub clean_start: bool,
    pub expiry_secs: u32,
    pub client_receive_maximum: u16,
    pub client_max_packet_size: usize,
    pub client_topic_alias_maximum: u16,
}

pub(crate) struct BrokerInner {
    pub(crate) settings: BrokerSettings,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
    sessions: Mutex<SessionTable>,
    trie: RwLock<SubscriptionTrie<SubEntry>>,
    retained: RwLock<HashMap<String, Arc<Message>>>,
    hooks: RwLock<Arc<Vec<Arc<dyn PublishHook>>>>,
    authorizer: RwLock<Arc<dyn Authorizer>>,
    persister: Persister,
    next_seq: AtomicU64,
    next_connection: AtomicU64,
    next_internal: AtomicU64,
    versions: VersionClock,
    /// When each client id last connected, while that matters to the CONNECT rate limit.
    recent_connects: Mutex<RecentConnects>,
    /// Signalled when a backlogged session drains below the low-water mark.
    drained: Notify,
    /// Where idle connections wait without a task; started by the first one (`None` if its
    /// thread could not start: connections then keep their tasks).
    parking: OnceLock<Option<ParkingLot<ParkedConnection>>>,
    /// Connections parked now (`mooring_mqtt_connections_parked`).
    parked_gauge: prometheus_client::metrics::gauge::Gauge,
}

/// The sessions by client id: a set of the sessions themselves, looked up by their client
/// id, so an entry is one pointer (a map would hold the id again).
#[derive(Default)]
struct SessionTable(std::collections::HashSet<ByClientId>);

struct ByClientId(Arc<Session>);

impl std::hash::Hash for ByClientId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.client_id.hash(state)
    }
}

impl PartialEq for ByClientId {
    fn eq(&self, other: &Self) -> bool {
        self.0.client_id == other.0.client_id
    }
}

impl Eq for ByClientId {}

impl std::borrow::Borrow<str> for ByClientId {
    fn borrow(&self) -> &str {
        &self.0.client_id
    }
}

impl SessionTable {
    fn get(&self, client_id: &str) -> Option<&Arc<Session>> {
        self.0.get(client_id).map(|s| &s.0)
    }

    /// Adds `session`, replacing the one with its client id.
    fn insert(&mut self, session: Arc<Session>) {
        self.0.replace(ByClientId(session));
    }

    fn remove(&mut self, client_id: &str) {
        self.0.remove(client_id);
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.0.iter().map(|s| &s.0)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Lifecycle version numbers. AWS's `versionNumber` only has to grow from one connection of
/// a client id to the next (it may skip values), so one counter serves every client id and
/// nothing is kept or written per client id. Numbers are handed out below a durable
/// ceiling: it is written `VERSION_STEP` ahead at start-up, and raised by another step when
/// half of the margin is used (by the connection that crosses it, whose CONNACK waits for
/// the write). So no number is handed out twice across restarts.
struct VersionClock {
    next: AtomicU64,
    ceiling: AtomicU64,
}

const VERSION_STEP: u64 = 1 << 20;

impl VersionClock {
    /// Continues after `handed_out` (the loaded ceiling); `ceiling` is already durable.
    fn new(handed_out: u64, ceiling: u64) -> VersionClock {
        VersionClock {
            next: AtomicU64::new(handed_out + 1),
            ceiling: AtomicU64::new(ceiling),
        }
    }

    /// The next number; adds the write that raises the ceiling to `ops` when it is due.
    fn next(&self, ops: &mut Vec<StoreOp>) -> u64 {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let ceiling = self.ceiling.load(Ordering::Relaxed);
        if number + VERSION_STEP / 2 > ceiling
            && self
                .ceiling
                .compare_exchange(
                    ceiling,
                    ceiling + VERSION_STEP,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            ops.push(StoreOp::PutVersionCeiling(ceiling + VERSION_STEP));
        }
        number
    }
}

/// Accepted CONNECTs younger than the rate limit's interval, by client id. Older entries
/// are pruned whenever the map has doubled since the last pruning, so it stays about as
/// large as the number of ids that connected within the interval.
#[derive(Default)]
struct RecentConnects {
    at: HashMap<Arc<str>, std::time::Instant>,
    prune_at_len: usize,
}

/// The broker; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<BrokerInner>,
}

/// A subscription held by in-process code; dropping it unsubscribes.
pub struct InternalSubscription {
    broker: Weak<BrokerInner>,
    id: u64,
    filter: String,
    /// Messages, for channel subscriptions.
    pub receiver: Option<mpsc::Receiver<Arc<Message>>>,
}

impl Drop for InternalSubscription {
    fn drop(&mut self) {
        if let Some(inner) = self.broker.upgrade() {
            inner
                .trie
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.filter, None, &SubscriberId::Internal(self.id));
        }
    }
}

impl Broker {
    /// Builds the broker over `store`, restoring retained messages and persistent sessions.
    pub fn new(
        settings: BrokerSettings,
        store: Arc<dyn BrokerStore>,
        clock: Arc<dyn Clock>,
        shutdown: Shutdown,
    ) -> Result<Broker, BrokerError> {
        // Parked connections keep their instants relative to this.
        crate::parking::epoch();
        let loaded = store.load()?;
        let version_ceiling = loaded.version_ceiling + VERSION_STEP;
        store.apply(&[StoreOp::PutVersionCeiling(version_ceiling)])?;
        let persister = Persister::start(store);
        let broker = Broker {
            inner: Arc::new(BrokerInner {
                settings,
                clock,
                shutdown,
                sessions: Mutex::new(SessionTable::default()),
                trie: RwLock::new(SubscriptionTrie::new()),
                retained: RwLock::new(HashMap::new()),
                hooks: RwLock::new(Arc::new(Vec::new())),
                authorizer: RwLock::new(Arc::new(AllowAll)),
                persister,
                next_seq: AtomicU64::new(crate::store::max_sequence(&loaded) + 1),
                next_connection: AtomicU64::new(1),
                next_internal: AtomicU64::new(1),
                versions: VersionClock::new(loaded.version_ceiling, version_ceiling),
                recent_connects: Mutex::new(RecentConnects::default()),
                drained: Notify::new(),
                parking: OnceLock::new(),
                parked_gauge: Default::default(),
            }),
        };
        broker.restore(loaded);
        Ok(broker)
    }

    fn restore(&self, loaded: Loaded) {
        let now = self.now();
        {
            let mut retained = self
                .inner
                .retained
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for (m, _) in loaded.retained {
                retained.insert(m.topic.clone(), Arc::new(Message::from_stored(m)));
            }
        }
        let mut messages = loaded.messages;
        let mut expired = Vec::new();
        for s in loaded.sessions {
            let disconnected = s.disconnected_ms.unwrap_or(now);
            let ends_at = disconnected.saturating_add(s.expiry_secs as i64 * 1000);
            if s.expiry_secs != u32::MAX && ends_at <= now {
                expired.push(StoreOp::DeleteSession(s.client_id.clone()));
                continue;
            }
            let queue: VecDeque<Queued> = messages
                .remove(&s.client_id)
                .unwrap_or_default()
                .into_iter()
                .map(|(seq, m)| Queued {
                    qos: m.qos,
                    retain: m.retain,
                    message: Arc::new(Message::from_stored(m)),
                    subscription_ids: Vec::new(),
                    seq: Some(seq),
                })
                .collect();
            let session = Arc::new(Session {
                client_id: Arc::from(s.client_id.as_str()),
                state: Mutex::new(SessionState {
                    // (Stored by this broker, so always a UUID; a damaged one is replaced.)
                    session_id: s
                        .session_id
                        .parse()
                        .unwrap_or_else(|_| uuid::Uuid::new_v4()),
                    protocol_version: s.protocol_version,
                    expiry_secs: s.expiry_secs,
                    connection: None,
                    generation: 0,
                    subscriptions: s.subscriptions.clone(),
                    queue,
                    inflight: BTreeMap::new(),
                    next_packet_id: 1,
                    resend_inflight: false,
                    client: None,
                    client_receive_maximum: u16::MAX,
                    client_max_packet_size: u32::MAX,
                    client_topic_alias_maximum: 0,
                    outbound_aliases: None,
                    dropped: 0,
                    backlogged: false,
                    stalled: false,
                    waiter: None,
                    signalled: false,
                }),
            });
            {
                let mut trie = self.inner.trie.write().unwrap_or_else(|e| e.into_inner());
                for (raw, sub) in &s.subscriptions {
                    if let Ok(parsed) = topic::parse_filter(raw) {
                        trie.insert(
                            parsed.filter,
                            parsed.share_group,
                            SubscriberId::Client(session.client_id.clone()),
                            SubEntry {
                                options: sub.options(),
                                subscription_id: sub.subscription_id,
                                target: Target::Session(session.clone()),
                            },
                        );
                    }
                }
            }
            self.inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(session.clone());
            if s.expiry_secs != u32::MAX {
                self.schedule_expiry(session, 0, Duration::from_millis((ends_at - now) as u64));
            }
        }
        for client_id in messages.into_keys() {
            expired.push(StoreOp::DeleteSession(client_id));
        }
        self.inner.persister.submit(expired);
    }

    pub fn profile(&self) -> &Profile {
        &self.inner.settings.profile
    }

    pub fn settings(&self) -> &BrokerSettings {
        &self.inner.settings
    }

    pub fn now(&self) -> i64 {
        self.inner.clock.now_millis()
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    /// Installs the authorizer (the IoT policy engine).
    pub fn set_authorizer(&self, authorizer: Arc<dyn Authorizer>) {
        *self
            .inner
            .authorizer
            .write()
            .unwrap_or_else(|e| e.into_inner()) = authorizer;
    }

    pub fn authorizer(&self) -> Arc<dyn Authorizer> {
        self.inner
            .authorizer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds a hook that sees every routed message.
    pub fn add_publish_hook(&self, hook: Arc<dyn PublishHook>) {
        let mut hooks = self.inner.hooks.write().unwrap_or_else(|e| e.into_inner());
        let mut next: Vec<_> = hooks.iter().cloned().collect();
        next.push(hook);
        *hooks = Arc::new(next);
    }

    /// Subscribes in-process; messages arrive on the returned subscription's receiver
    /// (bounded by `capacity`; a full channel drops the message).
    pub fn subscribe_channel(
        &self,
        filter: &str,
        capacity: usize,
    ) -> Result<InternalSubscription, BrokerError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mut sub = self.subscribe_internal(filter, InternalSink::Channel(tx))?;
        sub.receiver = Some(rx);
        Ok(sub)
    }

    /// Subscribes in-process with a callback run on the publisher's task.
    pub fn subscribe_callback(
        &self,
        filter: &str,
        callback: MessageCallback,
    ) -> Result<InternalSubscription, BrokerError> {
        self.subscribe_internal(filter, InternalSink::Callback(callback))
    }

    fn subscribe_internal(
        &self,
        filter: &str,
        sink: InternalSink,
    ) -> Result<InternalSubscription, BrokerError> {
        topic::validate_filter(filter, false, &Profile::strict())
            .map_err(|e| BrokerError::Invalid(e.to_string()))?;
        let id = self.inner.next_internal.fetch_add(1, Ordering::Relaxed);
        self.inner
            .trie
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                filter,
                None,
                SubscriberId::Internal(id),
                SubEntry {
                    options: SubscriptionOptions {
                        qos: 1,
                        ..Default::default()
                    },
                    subscription_id: None,
                    target: Target::Internal(Arc::new(sink)),
                },
            );
        Ok(InternalSubscription {
            broker: Arc::downgrade(&self.inner),
            id,
            filter: filter.to_string(),
            receiver: None,
        })
    }

    /// Delivers `message` to exactly one client's session, bypassing the router and
    /// subscriptions (Jobs replies). Waits until it is durable when the session is
    /// persistent and the QoS is 1 or more.
    pub async fn deliver_to_client(
        &self,
        client_id: &str,
        message: Message,
    ) -> Result<(), BrokerError> {
        let session = self
            .session(client_id)
            .ok_or_else(|| BrokerError::NotFound(format!("no session for client {client_id}")))?;
        let qos = message.qos.min(self.profile().maximum_qos);
        let message = Arc::new(message);
        let mut ops = Vec::new();
        self.enqueue(&session, &message, qos, false, Vec::new(), &mut ops);
        self.persist(ops).await
    }

    /// Publishes from in-process code; returns once durable where that matters.
    pub async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        let ops = self.route(Arc::new(message));
        self.persist(ops).await
    }

    /// Waits for `ops` to be durable.
    pub async fn persist(&self, ops: Vec<StoreOp>) -> Result<(), BrokerError> {
        if ops.is_empty() {
            return Ok(());
        }
        match self.inner.persister.submit_durable(ops).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::Store(e)),
            Err(_) => Err(BrokerError::Store("the persister has stopped".into())),
        }
    }

    /// The receiver resolves once `ops` are durable.
    pub fn persist_later(&self, ops: Vec<StoreOp>) -> oneshot::Receiver<Result<(), String>> {
        self.inner.persister.submit_durable(ops)
    }

    /// Queues `ops` without waiting.
    pub fn persist_background(&self, ops: Vec<StoreOp>) {
        self.inner.persister.submit(ops)
    }

    /// Routes a message to every matching subscriber; returns the store operations that
    /// make it durable (retained update, queued messages of persistent sessions).
    pub fn route(&self, message: Arc<Message>) -> Vec<StoreOp> {
        self.route_with_hooks(message, None, None)
    }

    /// [`Broker::route`] for a message a client published. When it will be acknowledged
    /// (`durable`) the answer includes what the publish hooks are making durable, which the
    /// acknowledgement must wait for; it always names the subscribers the message left
    /// backlogged, which the publisher's connection waits for ([`Broker::wait_for_room`])
    /// before it reads more.
    pub fn route_from_client(&self, message: Arc<Message>, durable: bool) -> Routed {
        let mut routed = Routed::default();
        routed.ops = self.route_with_hooks(
            message,
            durable.then_some(&mut routed.barriers),
            Some(&mut routed.backlogged),
        );
        routed
    }

    /// Resolves once none of `sessions` is backlogged any more: each has drained below the
    /// low-water mark, disconnected, or is slow (still backlogged [`BACKLOG_STALL`] after the
    /// wait began; it is then marked so that publishers stop waiting for it).
    pub async fn wait_for_room(&self, sessions: Vec<Arc<Session>>) {
        let deadline = tokio::time::Instant::now() + BACKLOG_STALL;
        for session in sessions {
            loop {
                let drained = self.inner.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                {
                    let mut state = session.lock();
                    if !state.backlogged || state.stalled || state.connection.is_none() {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        state.stalled = true;
                        tracing::debug!(client_id = %session.client_id, backlog = state.backlog(), "slow subscriber; publishers stop waiting for it");
                        break;
                    }
                }
                let _ = tokio::time::timeout_at(deadline, drained).await;
            }
        }
    }

    /// Releases the publishers waiting for `state`'s session once its backlog is below the
    /// low-water mark.
    fn release_backlog(&self, state: &mut SessionState) {
        if state.backlogged && state.backlog() < BACKLOG_LOW_WATER {
            state.backlogged = false;
            state.stalled = false;
            self.inner.drained.notify_waiters();
        }
    }

    fn route_with_hooks(
        &self,
        message: Arc<Message>,
        mut barriers: Option<&mut Vec<DurableReceiver>>,
        mut backlogged: Option<&mut Vec<Arc<Session>>>,
    ) -> Vec<StoreOp> {
        let mut ops = Vec::new();
        let hooks = self
            .inner
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for hook in hooks.iter() {
            match &mut barriers {
                Some(barriers) => barriers.extend(hook.on_publish_durable(&message)),
                None => hook.on_publish(&message),
            }
        }
        if message.retain {
            let mut retained = self
                .inner
                .retained
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if message.payload.is_empty() {
                if retained.remove(&message.topic).is_some() {
                    ops.push(StoreOp::DeleteRetained(message.topic.clone()));
                }
            } else {
                retained.insert(message.topic.clone(), message.clone());
                ops.push(StoreOp::PutRetained(message.stored(true), self.now()));
            }
        }
        let matched = self
            .inner
            .trie
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .matches(&message.topic, self.profile().hash_excludes_parent);
        if matched.is_empty() {
            return ops;
        }
        // One delivery per subscriber, at the highest matching QoS.
        struct Delivery {
            qos: u8,
            retain_as_published: bool,
            subscription_ids: Vec<u32>,
            target: Target,
        }
        // In match order; a subscriber matched by several filters is found by a linear
        // search while there are few matches (the common case, no hashing or map), else
        // through an index.
        let mut deliveries: Vec<(SubscriberId, Delivery)> = Vec::with_capacity(matched.len());
        let mut index: Option<HashMap<SubscriberId, usize>> =
            (matched.len() > 8).then(HashMap::new);
        let origin_client = message.origin.client_id.as_deref();
        let mut add = |id: SubscriberId, entry: SubEntry| {
            if entry.options.no_local {
                if let SubscriberId::Client(c) = &id {
                    if Some(&**c) == origin_client {
                        return;
                    }
                }
            }
            let found = match &index {
                Some(index) => index.get(&id).copied(),
                None => deliveries.iter().position(|(known, _)| *known == id),
            };
            let at = match found {
                Some(at) => at,
                None => {
                    if let Some(index) = &mut index {
                        index.insert(id.clone(), deliveries.len());
                    }
                    deliveries.push((
                        id,
                        Delivery {
                            qos: 0,
                            retain_as_published: false,
                            subscription_ids: Vec::new(),
                            target: entry.target.clone(),
                        },
                    ));
                    deliveries.len() - 1
                }
            };
            let d = &mut deliveries[at].1;
            d.qos = d.qos.max(entry.options.qos);
            d.retain_as_published |= entry.options.retain_as_published;
            if let Some(id) = entry.subscription_id {
                d.subscription_ids.push(id);
            }
        };
        for m in matched {
            match m {
                Matched::Direct(id, entry) => add(id, entry),
                Matched::Shared { members, .. } => {
                    if let Some((id, entry)) = pick_share_member(members) {
                        add(id, entry)
                    }
                }
            }
        }
        let authorizer = self.authorizer();
        for (_, d) in deliveries {
            let qos = message.qos.min(d.qos);
            match d.target {
                Target::Internal(sink) => match &*sink {
                    InternalSink::Channel(tx) => {
                        let _ = tx.try_send(message.clone());
                    }
                    InternalSink::Callback(f) => f(&message),
                },
                Target::Session(session) => {
                    let client = session.lock().client.clone();
                    if let Some(client) = client {
                        if !authorizer.receive(&client, &message.topic) {
                            continue;
                        }
                    }
                    let retain = d.retain_as_published && message.retain;
                    let full = self.enqueue(
                        &session,
                        &message,
                        qos,
                        retain,
                        d.subscription_ids,
                        &mut ops,
                    );
                    if let (true, Some(backlogged)) = (full, &mut backlogged) {
                        backlogged.push(session);
                    }
                }
            }
        }
        ops
    }

    /// Queues `message` for `session`; true when the session is connected and backlogged
    /// (past the high-water mark and not stalled), so the publisher should wait for it.
    fn enqueue(
        &self,
        session: &Arc<Session>,
        message: &Arc<Message>,
        qos: u8,
        retain: bool,
        subscription_ids: Vec<u32>,
        ops: &mut Vec<StoreOp>,
    ) -> bool {
        let mut state = session.lock();
        let connected = state.connection.is_some();
        if !connected && qos == 0 {
            return false;
        }
        let backlog = state.backlog();
        if backlog >= MAX_QUEUED_PER_CLIENT {
            state.dropped = state.dropped.saturating_add(1);
            if state.dropped.is_power_of_two() {
                tracing::warn!(client_id = %session.client_id, dropped = state.dropped, "client queue full; dropping messages");
            }
            return connected && !state.stalled;
        }
        let full = connected && backlog + 1 >= BACKLOG_HIGH_WATER && !state.stalled;
        if full {
            state.backlogged = true;
        }
        let seq = if qos > 0 && state.expiry_secs > 0 {
            let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
            let mut stored = message.stored(retain);
            stored.qos = qos;
            ops.push(StoreOp::PutMessage {
                client_id: session.client_id.to_string(),
                seq,
                message: stored,
            });
            Some(seq)
        } else {
            None
        };
        state.queue.push_back(Queued {
            message: message.clone(),
            qos,
            retain,
            subscription_ids,
            seq,
        });
        let waiter = match state.connection.as_mut() {
            Some(link) => {
                self.wake_parked(link);
                state.signal_unwoken()
            }
            None => None,
        };
        drop(state);
        if let Some(waker) = waiter {
            waker.wake();
        }
        full
    }

    /// Applies the per-client-id CONNECT rate limit: true (and the CONNECT recorded) when
    /// `client_id` may connect now.
    pub fn admit_connect(&self, client_id: &Arc<str>) -> bool {
        let Some(per_second) = self.profile().connects_per_second_per_client else {
            return true;
        };
        let interval = Duration::from_secs(1) / per_second.max(1);
        let now = std::time::Instant::now();
        let mut recent = self
            .inner
            .recent_connects
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(last) = recent.at.get(client_id) {
            if now.duration_since(*last) < interval {
                return false;
            }
        }
        recent.at.insert(client_id.clone(), now);
        if recent.at.len() >= recent.prune_at_len {
            recent.at.retain(|_, t| now.duration_since(*t) < interval);
            recent.prune_at_len = (recent.at.len() * 2).max(64);
        }
        true
    }

    /// Opens (creating, resuming or replacing) the session for a new connection. An
    /// existing connection with the same client id is told to close (takeover).
    pub fn open_session(&self, request: OpenRequest) -> (Opened, Vec<StoreOp>) {
        let client_id = request.client.client_id.clone();
        let version = request.client.protocol_version;
        let connection_id = self.inner.next_connection.fetch_add(1, Ordering::Relaxed);
        let (kick_tx, kick_rx) = oneshot::channel();
        let mut ops = Vec::new();
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let existing = sessions.get(&client_id).cloned();
        let mut session_present = false;
        let session = match existing {
            Some(session) => {
                let resumable = {
                    let mut state = session.lock();
                    if let Some(mut link) = state.connection.take() {
                        self.kick(&mut link, Kick::new(DisconnectReason::DuplicateClientId));
                    }
                    !request.clean_start
                        && (self.profile().cross_version_sessions
                            || state.protocol_version == version)
                };
                if resumable {
                    session_present = true;
                    session
                } else {
                    self.discard_session(&session, &mut ops);
                    sessions.remove(&client_id);
                    let fresh = self.new_session(client_id.clone(), version);
                    sessions.insert(fresh.clone());
                    fresh
                }
            }
            None => {
                let fresh = self.new_session(client_id.clone(), version);
                sessions.insert(fresh.clone());
                fresh
            }
        };
        drop(sessions);
        let expiry_secs = request.expiry_secs;
        {
            let mut state = session.lock();
            state.connection = Some(ConnectionLink {
                id: connection_id,
                line: KickLine::Running(kick_tx),
            });
            state.generation = state.generation.wrapping_add(1);
            state.protocol_version = version;
            state.expiry_secs = expiry_secs;
            state.resend_inflight = true;
            state.client = Some(request.client.clone());
            state.client_receive_maximum = request.client_receive_maximum;
            state.client_max_packet_size =
                request.client_max_packet_size.min(u32::MAX as usize) as u32;
            state.client_topic_alias_maximum = request.client_topic_alias_maximum;
            state.outbound_aliases = None;
            if expiry_secs > 0 {
                ops.push(StoreOp::PutSession(stored_session(&session, &state, None)));
            } else if session_present {
                ops.push(StoreOp::DeleteSession(client_id.to_string()));
                for q in state.queue.iter_mut() {
                    q.seq = None;
                }
                for f in state.inflight.values_mut() {
                    f.queued.seq = None;
                }
            }
        }
        let version_number = self.inner.versions.next(&mut ops);
        session.lock().signal();
        (
            Opened {
                session,
                connection_id,
                session_present,
                kicked: kick_rx,
                expiry_secs,
                version_number,
            },
            ops,
        )
    }

    fn new_session(&self, client_id: Arc<str>, version: u8) -> Arc<Session> {
        Arc::new(Session {
            client_id,
            state: Mutex::new(SessionState {
                session_id: uuid::Uuid::new_v4(),
                protocol_version: version,
                expiry_secs: 0,
                connection: None,
                generation: 0,
                subscriptions: BTreeMap::new(),
                queue: VecDeque::new(),
                inflight: BTreeMap::new(),
                next_packet_id: 1,
                resend_inflight: false,
                client: None,
                client_receive_maximum: u16::MAX,
                client_max_packet_size: u32::MAX,
                client_topic_alias_maximum: 0,
                outbound_aliases: None,
                dropped: 0,
                backlogged: false,
                stalled: false,
                waiter: None,
                signalled: false,
            }),
        })
    }

    /// The session of `client_id`, connected or not.
    fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .cloned()
    }

    /// Tells the connection of `link` to close (waking it if it is parked); false when it
    /// was already told, or has ended.
    fn kick(&self, link: &mut ConnectionLink, kick: Kick) -> bool {
        self.wake_parked(link);
        match std::mem::replace(&mut link.line, KickLine::Kicked(None)) {
            KickLine::Running(tx) => {
                if let Err(kick) = tx.send(kick) {
                    // The connection dropped its receiver on its way to the parking lot:
                    // it takes the kick when it runs again.
                    link.line = KickLine::Kicked(Some(kick));
                }
                true
            }
            KickLine::Parked(_) | KickLine::Waking => {
                link.line = KickLine::Kicked(Some(kick));
                true
            }
            KickLine::Kicked(pending) => {
                link.line = KickLine::Kicked(pending);
                false
            }
        }
    }

    /// Wakes the connection of `link` if it is parked.
    fn wake_parked(&self, link: &mut ConnectionLink) {
        if let KickLine::Parked(token) = link.line {
            link.line = KickLine::Waking;
            if let Some(Some(lot)) = self.inner.parking.get() {
                lot.wake(token);
            }
        }
    }

    /// Called by a parked connection that runs again: its new kick channel, or the kick it
    /// was given meanwhile. A connection no longer linked to its session was taken over
    /// (the only way a link is replaced from outside).
    pub(crate) fn relink(
        &self,
        session: &Session,
        connection_id: u64,
    ) -> Result<oneshot::Receiver<Kick>, Kick> {
        let mut state = session.lock();
        let Some(link) = state.connection.as_mut().filter(|l| l.id == connection_id) else {
            return Err(Kick::new(DisconnectReason::DuplicateClientId));
        };
        match &mut link.line {
            KickLine::Kicked(pending) => Err(pending
                .take()
                .unwrap_or(Kick::new(DisconnectReason::DuplicateClientId))),
            line => {
                let (tx, rx) = oneshot::channel();
                *line = KickLine::Running(tx);
                Ok(rx)
            }
        }
    }

    /// Parks an idle connection of `record.session` (see [`crate::parking`]); `kicked` is
    /// its kick channel's receiver, dropped here. Gives the socket and record back when the
    /// session has work for it (messages queued, a kick), or the connection cannot be
    /// parked: the caller carries on with them (and [`Broker::relink`]s first).
    // (The error gives the caller back what it moved in, on a rare path: no boxing.)
    #[allow(clippy::result_large_err)]
    pub(crate) fn park(
        &self,
        socket: std::net::TcpStream,
        deadline: Option<std::time::Instant>,
        record: ParkedConnection,
        kicked: Option<oneshot::Receiver<Kick>>,
    ) -> Result<(), (std::net::TcpStream, ParkedConnection)> {
        let Some(lot) = self.parking_lot() else {
            return Err((socket, record));
        };
        let session = record.session().clone();
        let connection_id = record.connection_id();
        let mut state = session.lock();
        if let Some(kick) = kicked.and_then(|mut rx| rx.try_recv().ok()) {
            // Kicked since the connection last looked: it takes the kick when it runs again.
            if let Some(link) = state.connection.as_mut().filter(|l| l.id == connection_id) {
                link.line = KickLine::Kicked(Some(kick));
            }
            return Err((socket, record));
        }
        let has_work = !state.queue.is_empty() || state.resend_inflight;
        let Some(link) = state.connection.as_mut().filter(|l| {
            l.id == connection_id && matches!(l.line, KickLine::Running(_)) && !has_work
        }) else {
            return Err((socket, record));
        };
        // Under the session's lock, so whoever queues work next sees the token. Replacing
        // the line drops the kick channel's sender (the record holds no receiver).
        link.line = KickLine::Parked(lot.park(socket, deadline, record)?);
        // The ended task's waker would keep its memory.
        state.waiter = None;
        Ok(())
    }

    /// The parking lot, started on first use with a task that resumes every parked
    /// connection when the shutdown begins (the shutdown waits for that task, and so for
    /// the connections' new tasks).
    fn parking_lot(&self) -> Option<&ParkingLot<ParkedConnection>> {
        self.inner
            .parking
            .get_or_init(|| {
                let weak = Arc::downgrade(&self.inner);
                let lot = ParkingLot::start(
                    tokio::runtime::Handle::current(),
                    self.inner.parked_gauge.clone(),
                    move |socket, record| {
                        if let Some(inner) = weak.upgrade() {
                            let broker = Broker { inner };
                            broker.shutdown().spawn(connection::resume(
                                broker.clone(),
                                socket,
                                record,
                            ));
                        }
                    },
                );
                match lot {
                    Ok(lot) => {
                        let weak = Arc::downgrade(&self.inner);
                        let shutdown = self.shutdown().clone();
                        self.shutdown().spawn(async move {
                            shutdown.triggered().await;
                            if let Some(inner) = weak.upgrade() {
                                if let Some(Some(lot)) = inner.parking.get() {
                                    lot.close();
                                }
                            }
                        });
                        Some(lot)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "idle connections will not be parked");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Adds the broker's gauges to the process's `/metrics`.
    pub fn register_metrics(&self, metrics: &mooring_core::metrics::Metrics) {
        metrics.register(
            "mqtt_connections_parked",
            "Idle plain-TCP MQTT connections waiting in the parking lot, without a task",
            self.inner.parked_gauge.clone(),
        );
    }

    /// Connections parked now (idle plain-TCP connections without a task).
    pub fn parked_connections(&self) -> usize {
        match self.inner.parking.get() {
            Some(Some(lot)) => lot.parked(),
            _ => 0,
        }
    }

    /// Closes the live connection of `client_id` (AWS `DeleteConnection` gives
    /// `API_INITIATED_DISCONNECT`). Returns whether a connection was there to close.
    pub fn disconnect_client(&self, client_id: &str, kick: Kick) -> bool {
        let Some(session) = self.session(client_id) else {
            return false;
        };
        let mut state = session.lock();
        state
            .connection
            .as_mut()
            .is_some_and(|link| self.kick(link, kick))
    }

    /// Closes every live connection authenticated as `principal_identifier` (for example a
    /// certificate id when the certificate is revoked); returns how many were closed.
    pub fn disconnect_principal(&self, principal_identifier: &str, kick: Kick) -> usize {
        let sessions: Vec<Arc<Session>> = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut closed = 0;
        for session in sessions {
            let mut state = session.lock();
            let matches = state
                .client
                .as_ref()
                .is_some_and(|c| &*c.principal_identifier == principal_identifier);
            if !matches {
                continue;
            }
            if let Some(link) = state.connection.as_mut() {
                if self.kick(link, kick) {
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Removes a session's subscriptions from the trie and its durable state.
    fn discard_session(&self, session: &Arc<Session>, ops: &mut Vec<StoreOp>) {
        let subs: Vec<String> = {
            let mut state = session.lock();
            state.queue.clear();
            state.inflight.clear();
            std::mem::take(&mut state.subscriptions)
                .into_keys()
                .collect()
        };
        let mut trie = self.inner.trie.write().unwrap_or_else(|e| e.into_inner());
        for raw in subs {
            if let Ok(p) = topic::parse_filter(&raw) {
                trie.remove(
                    p.filter,
                    p.share_group,
                    &SubscriberId::Client(session.client_id.clone()),
                );
            }
        }
        ops.push(StoreOp::DeleteSession(session.client_id.to_string()));
    }

    /// Called when a connection ends. `expiry_override` is a DISCONNECT's new session
    /// expiry. Non-persistent sessions end at once; persistent ones start their expiry timer.
    pub fn close_connection(
        &self,
        session: &Arc<Session>,
        connection_id: u64,
        expiry_override: Option<u32>,
    ) {
        let mut ops = Vec::new();
        let (still_current, expiry, generation) = {
            let mut state = session.lock();
            let current = state.connection.as_ref().map(|c| c.id) == Some(connection_id);
            if current {
                state.connection = None;
                state.client = None;
                state.waiter = None;
                if let Some(e) = expiry_override {
                    state.expiry_secs = e;
                }
                // QoS 0 messages are not kept for offline clients.
                state.queue.retain(|q| q.qos > 0);
                if std::mem::take(&mut state.backlogged) {
                    // Its publishers no longer wait for it.
                    state.stalled = false;
                    self.inner.drained.notify_waiters();
                }
                if state.expiry_secs > 0 {
                    let now = self.now();
                    ops.push(StoreOp::PutSession(stored_session(
                        session,
                        &state,
                        Some(now),
                    )));
                }
            }
            (current, state.expiry_secs, state.generation)
        };
        if !still_current {
            return;
        }
        if expiry == 0 {
            let mut sessions = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.client_id);
                drop(sessions);
                self.discard_session(session, &mut ops);
            }
        } else if expiry != u32::MAX {
            self.schedule_expiry(
                session.clone(),
                generation,
                Duration::from_secs(expiry as u64),
            );
        }
        self.persist_background(ops);
    }

    fn schedule_expiry(&self, session: Arc<Session>, generation: u32, after: Duration) {
        let broker = self.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => {}
                _ = shutdown.triggered() => return,
            }
            broker.expire_if_idle(&session, generation);
        });
    }

    fn expire_if_idle(&self, session: &Arc<Session>, generation: u32) {
        {
            let state = session.lock();
            if state.connection.is_some() || state.generation != generation {
                return;
            }
        }
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !sessions
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            return;
        }
        sessions.remove(&session.client_id);
        drop(sessions);
        let mut ops = Vec::new();
        self.discard_session(session, &mut ops);
        tracing::debug!(client_id = %session.client_id, "session expired");
        self.persist_background(ops);
    }

    /// Publishes a will after `delay_secs` unless the session reconnects first.
    pub fn schedule_will(&self, session: Arc<Session>, will: Message, delay_secs: u32) {
        if delay_secs == 0 {
            let ops = self.route(Arc::new(will));
            self.persist_background(ops);
            return;
        }
        let generation = session.lock().generation;
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(delay_secs as u64)).await;
            let reconnected = {
                let state = session.lock();
                state.generation != generation || state.connection.is_some()
            };
            if !reconnected {
                let ops = broker.route(Arc::new(will));
                broker.persist_background(ops);
            }
        });
    }

    /// Adds subscriptions to a session; returns per-filter reason codes and store ops.
    /// Retained messages due to the new subscriptions are queued after the SUBACK's codes.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filters: &[(String, SubscriptionOptions)],
        subscription_id: Option<u32>,
        client: &ClientInfo,
    ) -> (Vec<u8>, Vec<String>, Vec<StoreOp>) {
        let profile = self.profile();
        let authorizer = self.authorizer();
        let v5 = client.protocol_version == codec::V5;
        let fail = |code: u8| if v5 { code } else { 0x80 };
        let mut codes = Vec::with_capacity(filters.len());
        let mut accepted = Vec::new();
        let mut retained_to_send: Vec<(Arc<Message>, u8, Option<u32>)> = Vec::new();
        let mut ops = Vec::new();
        for (index, (raw, options)) in filters.iter().enumerate() {
            if profile
                .max_filters_per_subscribe
                .is_some_and(|max| index >= max)
            {
                codes.push(fail(reason::QUOTA_EXCEEDED));
                continue;
            }
            let parsed = match topic::parse_filter(raw) {
                Ok(p) => p,
                Err(_) => {
                    codes.push(fail(reason::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            if topic::validate_filter(parsed.filter, parsed.share_group.is_some(), profile).is_err()
            {
                codes.push(fail(reason::TOPIC_FILTER_INVALID));
                continue;
            }
            if profile.refused_subscriptions.iter().any(|f| f == raw) {
                codes.push(reason::UNSPECIFIED_ERROR);
                continue;
            }
            if !authorizer.subscribe(client, raw) {
                codes.push(fail(reason::NOT_AUTHORIZED));
                continue;
            }
            if parsed.share_group.is_some() && options.no_local {
                codes.push(fail(reason::PROTOCOL_ERROR));
                continue;
            }
            let qos = options.qos.min(profile.maximum_qos);
            let stored = StoredSubscription {
                qos,
                no_local: options.no_local,
                retain_as_published: options.retain_as_published,
                retain_handling: options.retain_handling,
                subscription_id,
            };
            let existed = {
                let mut state = session.lock();
                if !state.subscriptions.contains_key(raw)
                    && profile
                        .max_subscriptions_per_connection
                        .is_some_and(|max| state.subscriptions.len() >= max)
                {
                    drop(state);
                    codes.push(fail(reason::QUOTA_EXCEEDED));
                    continue;
                }
                state
                    .subscriptions
                    .insert(raw.clone(), stored.clone())
                    .is_some()
            };
            self.inner
                .trie
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    parsed.filter,
                    parsed.share_group,
                    SubscriberId::Client(session.client_id.clone()),
                    SubEntry {
                        options: stored.options(),
                        subscription_id,
                        target: Target::Session(session.clone()),
                    },
                );
            codes.push(qos);
            accepted.push(raw.clone());
            let wants_retained = parsed.share_group.is_none()
                && match options.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if wants_retained {
                let retained = self
                    .inner
                    .retained
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                if profile.retained_only_exact {
                    if let Some(m) = retained.get(parsed.filter) {
                        retained_to_send.push((m.clone(), qos, subscription_id));
                    }
                } else {
                    for m in retained.values() {
                        if topic::matches(parsed.filter, &m.topic, profile) {
                            retained_to_send.push((m.clone(), qos, subscription_id));
                        }
                    }
                }
            }
        }
        let now = self.now();
        for (m, qos, sub_id) in retained_to_send {
            if m.expires_at_ms.is_some_and(|e| e <= now) {
                continue;
            }
            if !authorizer.receive(client, &m.topic) {
                continue;
            }
            self.enqueue(
                session,
                &m,
                m.qos.min(qos),
                true,
                sub_id.into_iter().collect(),
                &mut ops,
            );
        }
        if !accepted.is_empty() {
            self.save_session(session, &mut ops);
        }
        (codes, accepted, ops)
    }

    /// Removes subscriptions; returns per-filter reason codes and store ops.
    pub fn unsubscribe(
        &self,
        session: &Arc<Session>,
        filters: &[String],
    ) -> (Vec<u8>, Vec<String>, Vec<StoreOp>) {
        let mut codes = Vec::new();
        let mut removed_filters = Vec::new();
        let mut ops = Vec::new();
        for raw in filters {
            let removed = session.lock().subscriptions.remove(raw).is_some();
            if removed {
                if let Ok(p) = topic::parse_filter(raw) {
                    self.inner
                        .trie
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(
                            p.filter,
                            p.share_group,
                            &SubscriberId::Client(session.client_id.clone()),
                        );
                }
                codes.push(reason::SUCCESS);
                removed_filters.push(raw.clone());
            } else if topic::parse_filter(raw).is_err() {
                codes.push(reason::TOPIC_FILTER_INVALID);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        if !removed_filters.is_empty() {
            self.save_session(session, &mut ops);
        }
        (codes, removed_filters, ops)
    }

    fn save_session(&self, session: &Arc<Session>, ops: &mut Vec<StoreOp>) {
        let state = session.lock();
        if state.expiry_secs > 0 {
            ops.push(StoreOp::PutSession(stored_session(session, &state, None)));
        }
    }

    /// Moves queued messages into flight (within the client's Receive Maximum) and encodes
    /// them, resending unacknowledged ones first after a reconnect.
    pub fn fill_outgoing(
        &self,
        session: &Arc<Session>,
        connection_id: u64,
        version: u8,
        out: &mut BytesMut,
    ) -> Vec<StoreOp> {
        let now = self.now();
        let mut ops = Vec::new();
        let mut state = session.lock();
        if state.connection.as_ref().map(|c| c.id) != Some(connection_id) {
            return ops;
        }
        if state.resend_inflight {
            state.resend_inflight = false;
            let mut resend = Vec::new();
            for (pid, f) in state.inflight.iter() {
                match f.stage {
                    AwaitedAck::Complete => {
                        codec::encode(&Packet::PubRel(codec::Ack::new(*pid, 0)), version, out)
                    }
                    _ => resend.push(*pid),
                }
            }
            for pid in resend {
                let queued = &state.inflight[&pid].queued;
                encode_outgoing(queued, pid, true, version, now, None, out);
            }
        }
        let receive_max = state.client_receive_maximum as usize;
        let alias_max = state.client_topic_alias_maximum;
        let max_packet = state.client_max_packet_size as usize;
        // Messages leave the queue under the session's lock and are encoded after it is
        // released, so publishers routing to this session do not wait for the copying.
        // (A client with a Maximum Packet Size has each message sized under the lock.)
        let mut deferred: Vec<(Queued, u16, Option<OutboundAlias>)> = Vec::new();
        let mut batch_bytes = 0;
        while let Some(q) = state.queue.front() {
            if q.qos > 0 && state.inflight.len() >= receive_max {
                break;
            }
            let q = state.queue.pop_front().expect("front exists");
            if q.message.expires_at_ms.is_some_and(|e| e <= now) {
                if let Some(seq) = q.seq {
                    ops.push(StoreOp::DeleteMessage {
                        client_id: session.client_id.to_string(),
                        seq,
                    });
                }
                continue;
            }
            let pid = if q.qos > 0 {
                next_packet_id(&mut state)
            } else {
                0
            };
            let alias = if version == codec::V5 && alias_max > 0 {
                topic_alias(
                    state.outbound_aliases.get_or_insert_default(),
                    alias_max,
                    &q.message.topic,
                )
            } else {
                None
            };
            if max_packet != u32::MAX as usize {
                let start = out.len();
                encode_outgoing(&q, pid, false, version, now, alias, out);
                let size = out.len() - start;
                out.truncate(start);
                if size > max_packet {
                    // Too large for this client: discarded as if delivered (MQTT 5
                    // 3.1.2.25).
                    if let Some(seq) = q.seq {
                        ops.push(StoreOp::DeleteMessage {
                            client_id: session.client_id.to_string(),
                            seq,
                        });
                    }
                    continue;
                }
            }
            batch_bytes += q.message.payload.len() + q.message.topic.len() + 16;
            if q.qos > 0 {
                let stage = if q.qos == 2 {
                    AwaitedAck::Received
                } else {
                    AwaitedAck::Ack
                };
                deferred.push((q.clone(), pid, alias));
                state.inflight.insert(pid, Inflight { queued: q, stage });
            } else {
                deferred.push((q, pid, alias));
            }
            if out.len() + batch_bytes > OUTGOING_BATCH {
                // Let the connection write; it will be notified again.
                state.signal();
                break;
            }
        }
        self.release_backlog(&mut state);
        drop(state);
        for (q, pid, alias) in &deferred {
            encode_outgoing(q, *pid, false, version, now, *alias, out);
        }
        ops
    }

    /// Handles PUBACK / PUBREC / PUBCOMP from the client for an outgoing message.
    /// Returns a PUBREL to send for PUBREC.
    pub fn acknowledge(
        &self,
        session: &Arc<Session>,
        packet: &Packet,
    ) -> (Option<Packet>, Vec<StoreOp>) {
        let mut ops = Vec::new();
        let mut state = session.lock();
        let mut reply = None;
        let finished = match packet {
            Packet::PubAck(a) => match state.inflight.get(&a.packet_id) {
                Some(f) if f.stage == AwaitedAck::Ack => state.inflight.remove(&a.packet_id),
                _ => None,
            },
            Packet::PubRec(a) => {
                if let Some(f) = state.inflight.get_mut(&a.packet_id) {
                    if a.code >= 0x80 {
                        state.inflight.remove(&a.packet_id)
                    } else {
                        f.stage = AwaitedAck::Complete;
                        reply = Some(Packet::PubRel(codec::Ack::new(a.packet_id, 0)));
                        None
                    }
                } else {
                    reply = Some(Packet::PubRel(codec::Ack::new(
                        a.packet_id,
                        reason::PACKET_ID_NOT_FOUND,
                    )));
                    None
                }
            }
            Packet::PubComp(a) => match state.inflight.get(&a.packet_id) {
                Some(f) if f.stage == AwaitedAck::Complete => state.inflight.remove(&a.packet_id),
                _ => None,
            },
            _ => None,
        };
        if let Some(f) = finished {
            if let Some(seq) = f.queued.seq {
                ops.push(StoreOp::DeleteMessage {
                    client_id: session.client_id.to_string(),
                    seq,
                });
            }
            if !state.queue.is_empty() {
                state.signal();
            }
            self.release_backlog(&mut state);
        }
        (reply, ops)
    }

    /// Publishes a lifecycle event (QoS 1, not waited for).
    pub fn publish_event(&self, topic: String, payload: String) {
        let message = Message {
            topic,
            payload: Bytes::from(payload),
            qos: 1,
            retain: false,
            properties: MessageProperties {
                content_type: None,
                ..Default::default()
            },
            expires_at_ms: None,
            origin: Origin::default(),
        };
        let ops = self.route(Arc::new(message));
        self.persist_background(ops);
    }

    pub(crate) fn event_identity(&self, client: &ClientInfo, session_id: String) -> EventIdentity {
        EventIdentity {
            client_id: client.client_id.to_string(),
            thing_name: self.authorizer().exclusive_thing(client),
            session_identifier: session_id,
            principal_identifier: client.principal_identifier.to_string(),
        }
    }

    /// Emits `connect_failed` for a refused CONNECT.
    pub fn emit_connect_failed(&self, client: &ClientInfo) {
        if !lifecycle::emits_events(&client.client_id) || client.client_id.is_empty() {
            return;
        }
        let id = self.event_identity(client, uuid::Uuid::new_v4().to_string());
        let ip = client.source_ip.map(|i| i.to_string()).unwrap_or_default();
        let (topic, payload) = lifecycle::connect_failed(&id, self.now(), &ip);
        self.publish_event(topic, payload);
    }

    /// Number of sessions (connected or not).
    pub fn session_count(&self) -> usize {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The retained message on `topic`, if any (for iot-data GetRetainedMessage).
    pub fn retained(&self, topic: &str) -> Option<Arc<Message>> {
        self.inner
            .retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .cloned()
    }

    /// Closes every live connection whose client matches `predicate`, telling each
    /// `reason` (as a takeover does); returns how many were told. The IoT control plane uses
    /// it when a certificate stops being ACTIVE.
    pub fn disconnect_clients(
        &self,
        predicate: impl Fn(&ClientInfo) -> bool,
        reason: DisconnectReason,
    ) -> usize {
        let sessions: Vec<Arc<Session>> = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut closed = 0;
        for session in sessions {
            let mut state = session.lock();
            if !state.client.as_deref().is_some_and(&predicate) {
                continue;
            }
            if let Some(link) = state.connection.as_mut() {
                if self.kick(link, Kick::new(reason)) {
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Every retained message, sorted by topic (for iot-data ListRetainedMessages).
    pub fn retained_messages(&self) -> Vec<Arc<Message>> {
        let mut all: Vec<_> = self
            .inner
            .retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.topic.cmp(&b.topic));
        all
    }
}

fn pick_share_member(members: Vec<(SubscriberId, SubEntry)>) -> Option<(SubscriberId, SubEntry)> {
    let online: Vec<&(SubscriberId, SubEntry)> = members
        .iter()
        .filter(|(_, e)| match &e.target {
            Target::Session(s) => s.lock().connection.is_some(),
            Target::Internal(_) => true,
        })
        .collect();
    let mut rng = rand::thread_rng();
    if let Some(chosen) = online.choose(&mut rng) {
        return Some((*chosen).clone());
    }
    members.choose(&mut rng).cloned()
}

/// A topic alias sent to a client, and whether the topic goes along with it (the first
/// time the alias is used).
type OutboundAlias = (u16, bool);

/// The alias to send `topic` under, if any; assigns aliases while the client allows more.
fn topic_alias(
    aliases: &mut HashMap<String, u16>,
    maximum: u16,
    topic: &str,
) -> Option<OutboundAlias> {
    if let Some(alias) = aliases.get(topic) {
        Some((*alias, false))
    } else if aliases.len() < maximum as usize {
        let alias = aliases.len() as u16 + 1;
        aliases.insert(topic.to_string(), alias);
        Some((alias, true))
    } else {
        None
    }
}

fn next_packet_id(state: &mut SessionState) -> u16 {
    loop {
        let id = state.next_packet_id;
        state.next_packet_id = state.next_packet_id.wrapping_add(1).max(1);
        if !state.inflight.contains_key(&id) {
            return id;
        }
    }
}

fn stored_session(
    session: &Session,
    state: &SessionState,
    disconnected: Option<i64>,
) -> StoredSession {
    StoredSession {
        client_id: session.client_id.to_string(),
        session_id: state.session_id.to_string(),
        protocol_version: state.protocol_version,
        expiry_secs: state.expiry_secs,
        disconnected_ms: disconnected,
        subscriptions: state.subscriptions.clone(),
    }
}

/// Encodes a queued message as the PUBLISH this client gets, without copying the message
/// (MQTT 5 properties are built only for MQTT 5 clients). `alias` is the topic alias and
/// whether the topic is sent with it.
fn encode_outgoing(
    q: &Queued,
    pid: u16,
    dup: bool,
    version: u8,
    now: i64,
    alias: Option<OutboundAlias>,
    out: &mut BytesMut,
) {
    let m = &q.message;
    let properties = (version == codec::V5).then(|| Properties {
        payload_format_indicator: m.properties.payload_format_indicator,
        content_type: m.properties.content_type.clone(),
        response_topic: m.properties.response_topic.clone(),
        correlation_data: m.properties.correlation_data.clone().map(Bytes::from),
        user_properties: m.properties.user_properties.clone(),
        message_expiry_interval: m.expires_at_ms.map(|e| ((e - now).max(0) / 1000) as u32),
        subscription_identifiers: q.subscription_ids.clone(),
        topic_alias: alias.map(|(a, _)| a),
        ..Default::default()
    });
    let topic = match alias {
        Some((_, false)) => "",
        _ => m.topic.as_str(),
    };
    codec::encode_publish(
        codec::PublishHeader {
            dup,
            qos: q.qos,
            retain: q.retain,
            topic,
            packet_id: pid,
        },
        properties.as_ref(),
        &m.payload,
        out,
    );
}

/// The broker as other services see it through core's handle registry.
impl BrokerHandle for Broker {
    fn publish(
        &self,
        message: PublishMessage,
    ) -> futures::future::BoxFuture<'_, Result<(), HandleError>> {
        Box::pin(async move {
            let profile = self.profile().clone();
            topic::validate_publish_topic(&message.topic, false, &Profile::strict())
                .map_err(|e| HandleError::Rejected(e.to_string()))?;
            if profile
                .max_payload
                .is_some_and(|max| message.payload.len() > max)
            {
                return Err(HandleError::Rejected(
                    "payload larger than the 128 KB limit".into(),
                ));
            }
            let now = self.now();
            let m = Message {
                topic: message.topic,
                payload: message.payload,
                qos: message.qos.min(profile.maximum_qos),
                retain: message.retain,
                properties: MessageProperties {
                    payload_format_indicator: None,
                    content_type: message.content_type,
                    response_topic: message.response_topic,
                    correlation_data: message.correlation_data.map(|b| b.to_vec()),
                    user_properties: message.user_properties,
                },
                expires_at_ms: message
                    .message_expiry_interval
                    .map(|s| now + s as i64 * 1000),
                origin: Origin::default(),
            };
            Broker::publish(self, m)
                .await
                .map_err(|e| HandleError::Internal(e.to_string()))
        })
    }
}

/// Used by connections to learn whether a will must wait for the session.
pub(crate) fn will_delay(properties: &Properties, session_expiry: u32) -> u32 {
    properties
        .will_delay_interval
        .unwrap_or(0)
        .min(session_expiry)
}
