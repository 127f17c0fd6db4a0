"""MQTT broker interop: paho-mqtt (3.1.1 and 5), mosquitto_pub/mosquitto_sub and raw sockets
against the real `mooring` binary, in the default `aws` profile and the `strict` profile.

Covers pub/sub at each QoS, retained messages (exact-match delivery, deletion, survival across
restarts), wills (and MQTT 5 will delay), persistent sessions across restarts and a SIGKILL
right after PUBACK, client-id takeover, every lifecycle payload field by field, `#` not
matching `$aws/...` or the parent level, malformed and oversized packets closing only their
own connection with the right reason code, mTLS with a client certificate issued from the
data directory's CA, and MQTT over WebSocket.
"""

import datetime
import hashlib
import json
import queue
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
STRICT = ["--set", "mqtt.profile=strict"]


def hostport(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


class Client:
    """A paho client that records everything it receives."""

    def __init__(self, m, client_id=None, protocol=V311, clean=True, will=None, props=None,
                 transport="tcp", tls_context=None, keepalive=60, port=None, connect=True):
        self.client_id = client_id or f"c-{uuid.uuid4().hex[:8]}"
        self.protocol = protocol
        kwargs = {}
        if protocol != V5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=protocol, transport=transport, **kwargs)
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.subacks = {}
        self.pubacks = {}
        self.disconnects = queue.Queue()
        self.c.on_connect = lambda c, u, flags, rc, p: self.connacks.put((flags, rc, p))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, rcs)
        self.c.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.c.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.put(rc)
        if will:
            self.c.will_set(*will[:3], retain=will[3] if len(will) > 3 else False,
                            properties=will[4] if len(will) > 4 else None)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        if tls_context is not None:
            self.c.tls_set_context(tls_context)
        if port is None:
            if transport == "websockets":
                port = hostport(m.endpoints["http"])
            elif tls_context is not None:
                port = ("localhost", hostport(m.endpoints["mqtts"])[1])
            else:
                port = hostport(m.endpoints["mqtt"])
        self.host, self.port = port
        self.keepalive = keepalive
        self.clean = clean
        self.props = props
        if connect:
            self.connect()

    def connect(self, expect_ok=True):
        if self.protocol == V5:
            self.c.connect(self.host, self.port, self.keepalive, clean_start=self.clean,
                           properties=self.props)
        else:
            self.c.connect(self.host, self.port, self.keepalive)
        self.c.loop_start()
        flags, rc, props = self.connacks.get(timeout=10)
        if expect_ok:
            assert rc == 0, f"CONNACK {rc}"
        self.session_present = flags.session_present
        self.connack_props = props
        self.connack_rc = rc
        return self

    def sub(self, topic, qos=1, options=None):
        if options is not None:
            rc, mid = self.c.subscribe(topic, options=options)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == 0
        deadline = time.time() + 10
        while mid not in self.subacks:
            assert time.time() < deadline, "no SUBACK"
            time.sleep(0.01)
        return self.subacks[mid]

    def pub(self, topic, payload, qos=0, retain=False, props=None, wait=True):
        info = self.c.publish(topic, payload, qos, retain, properties=props)
        if wait:
            info.wait_for_publish(10)
            assert info.is_published()
        return info

    def get(self, timeout=5):
        return self.messages.get(timeout=timeout)

    def expect(self, topic, timeout=5):
        """The next message on `topic` (other topics are skipped)."""
        deadline = time.time() + timeout
        while True:
            remaining = deadline - time.time()
            try:
                msg = self.messages.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(f"no message on {topic}") from None
            if msg.topic == topic:
                return msg

    def nothing(self, timeout=0.7):
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {msg.topic}: {msg.payload!r}")

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def event(msg):
    return json.loads(msg.payload)


# ---- raw packets, for what paho will not send ----------------------------------------------

def enc_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def varint(n):
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_connect(m, client_id, version=4, keepalive=60, will=None):
    """A socket whose CONNECT was accepted."""
    s, connack = raw_connack(m, client_id, version, keepalive, will)
    assert connack[3] == 0, connack
    return s


def raw_connack(m, client_id, version=4, keepalive=60, will=None):
    """Sends a raw CONNECT; returns the socket and the CONNACK's bytes, whatever its code."""
    flags = 0x02
    payload = enc_str(client_id)
    if will:
        flags |= 0x04 | 0x08  # will, QoS 1
        if version == 5:
            payload += b"\x00"
        payload += enc_str(will[0]) + enc_str(will[1])
    vh = enc_str("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        vh += b"\x00"
    body = vh + payload
    s = socket.create_connection(hostport(m.endpoints["mqtt"]), timeout=10)
    s.sendall(b"\x10" + varint(len(body)) + body)
    header = s.recv(2)
    assert header[0] == 0x20, header
    rest = b""
    while len(rest) < header[1]:
        rest += s.recv(header[1] - len(rest))
    return s, header + rest


def read_until_closed(s, timeout=10):
    s.settimeout(timeout)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk


def pass_connect_interval():
    """Waits out the `aws` profile's one CONNECT per second per client id, before a client id
    connects again."""
    time.sleep(1.1)


def observer(m, **kw):
    o = Client(m, client_id=f"observer-{uuid.uuid4().hex[:6]}", **kw)
    o.sub("$aws/events/#", 1)
    return o


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [V311, V5])
def test_pubsub_at_each_qos(mooring, protocol):
    sub = Client(mooring, protocol=protocol)
    pub = Client(mooring, protocol=protocol)
    # aws profile: QoS 2 subscriptions are granted QoS 1.
    granted = sub.sub("t/qos", 2)
    assert [int(getattr(g, "value", g)) for g in granted] == [1]
    for qos in (0, 1):
        pub.pub("t/qos", f"q{qos}".encode(), qos)
        msg = sub.expect("t/qos")
        assert msg.payload == f"q{qos}".encode() and msg.qos == qos and not msg.retain
    if protocol == V5:
        assert sub.connack_props.MaximumQoS == 1
    sub.stop()
    pub.stop()


def test_qos2_round_trip_in_strict_profile(mooring_factory):
    m = mooring_factory(extra_args=STRICT)
    for protocol in (V311, V5):
        sub = Client(m, protocol=protocol)
        assert [int(getattr(g, "value", g)) for g in sub.sub("s/q2", 2)] == [2]
        pub = Client(m, protocol=protocol)
        for i in range(5):
            pub.pub("s/q2", f"m{i}".encode(), 2)
        got = [sub.expect("s/q2") for _ in range(5)]
        assert [g.payload for g in got] == [f"m{i}".encode() for i in range(5)]
        assert all(g.qos == 2 for g in got)
        sub.nothing()
        sub.stop()
        pub.stop()


def test_qos2_publish_is_refused_in_aws_profile(mooring):
    c = Client(mooring, protocol=V5)
    c.c.publish("x/y", b"z", 2)
    rc = c.disconnects.get(timeout=10)
    assert rc.value == 0x9B  # QoS not supported


def mosquitto(tool, m, *args):
    """The command line of Debian's `mosquitto_pub`/`mosquitto_sub` pointed at `m`."""
    host, port = hostport(m.endpoints["mqtt"])
    return [tool, "-h", host, "-p", str(port), *args]


def mosquitto_pub(m, *args):
    """Runs `mosquitto_pub` to completion; returns the finished process (stdout, stderr)."""
    return subprocess.run(mosquitto("mosquitto_pub", m, *args), capture_output=True, text=True,
                          check=True, timeout=15)


def mosquitto_sub(m, obs, client_id, *args):
    """Starts `mosquitto_sub` as `client_id` and waits until its subscription is in place,
    seen by the lifecycle observer `obs`."""
    proc = subprocess.Popen(mosquitto("mosquitto_sub", m, "-i", client_id, *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    obs.expect(f"$aws/events/subscriptions/subscribed/{client_id}", timeout=10)
    return proc


# topic|qos|retain|payload for each message mosquitto_sub prints.
MOSQ_FORMAT = ["-F", "%t|%q|%r|%p"]


def test_mosquitto_clients(mooring):
    obs = observer(mooring)
    sub = mosquitto_sub(mooring, obs, "mq-all", "-t", "mosq/#", "-q", "1", "-C", "2", "-v",
                        "-W", "15")
    for version in ("mqttv311", "mqttv5"):
        mosquitto_pub(mooring, "-t", f"mosq/{version}", "-m", f"via {version}", "-q", "1",
                      "-V", version)
    out, _ = sub.communicate(timeout=20)
    assert out.splitlines() == ["mosq/mqttv311 via mqttv311", "mosq/mqttv5 via mqttv5"]


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_qos1_retained_and_will(mooring, version):
    obs = observer(mooring)
    v = ["-V", version]
    # QoS 1 retained publish: mosquitto_pub's trace shows the broker's PUBACK.
    pub = mosquitto_pub(mooring, *v, "-i", "mq-pub", "-d", "-q", "1", "-r",
                        "-t", "mosq/retained", "-m", "kept")
    assert pub.stdout.splitlines() == [
        "Client mq-pub sending CONNECT",
        "Client mq-pub received CONNACK (0)",
        "Client mq-pub sending PUBLISH (d0, q1, r1, m1, 'mosq/retained', ... (4 bytes))",
        "Client mq-pub received PUBACK (Mid: 1, RC:0)",
        "Client mq-pub sending DISCONNECT",
    ]
    # A later subscriber to the exact topic gets it with RETAIN=1 at QoS 1 ...
    got = subprocess.run(mosquitto("mosquitto_sub", mooring, *v, "-t", "mosq/retained", "-q", "1",
                                   "-C", "1", "-W", "10", *MOSQ_FORMAT),
                         capture_output=True, text=True, timeout=15)
    assert (got.returncode, got.stdout) == (0, "mosq/retained|1|1|kept\n")
    # ... a wildcard subscriber does not (aws profile: exact-match retained delivery only);
    # mosquitto_sub times out (exit 27) having printed nothing.
    got = subprocess.run(mosquitto("mosquitto_sub", mooring, *v, "-t", "mosq/+", "-q", "1",
                                   "-C", "1", "-W", "1", *MOSQ_FORMAT),
                         capture_output=True, text=True, timeout=15)
    assert (got.returncode, got.stdout, got.stderr) == (27, "", "Timed out\n")

    # Will: a mosquitto_sub killed without DISCONNECT has its retained QoS 1 will published.
    watch = mosquitto_sub(mooring, obs, "mq-watch", *v, "-t", "mosq/will", "-q", "1", "-C", "1",
                          "-W", "15", *MOSQ_FORMAT)
    dying = mosquitto_sub(mooring, obs, "mq-dying", *v, "-t", "mosq/quiet",
                          "--will-topic", "mosq/will", "--will-payload", "gone",
                          "--will-qos", "1", "--will-retain")
    dying.kill()
    dying.wait()
    out, _ = watch.communicate(timeout=20)
    assert (watch.returncode, out) == (0, "mosq/will|1|0|gone\n")  # live: RETAIN=0
    d = event(obs.expect("$aws/events/presence/disconnected/mq-dying"))
    assert d["disconnectReason"] == "CONNECTION_LOST" and d["clientInitiatedDisconnect"] is False
    got = subprocess.run(mosquitto("mosquitto_sub", mooring, *v, "-t", "mosq/will", "-q", "1",
                                   "-C", "1", "-W", "10", *MOSQ_FORMAT),
                         capture_output=True, text=True, timeout=15)
    assert (got.returncode, got.stdout) == (0, "mosq/will|1|1|gone\n")

    # A mosquitto_sub that exits by itself sends DISCONNECT: its will is not published.
    watch = mosquitto_sub(mooring, obs, "mq-watch-2", *v, "-t", "mosq/will2", "-q", "1",
                          "-C", "1", "-W", "3", *MOSQ_FORMAT)
    polite = mosquitto_sub(mooring, obs, "mq-polite", *v, "-t", "mosq/polite", "-C", "1",
                           "--will-topic", "mosq/will2", "--will-payload", "gone")
    mosquitto_pub(mooring, *v, "-t", "mosq/polite", "-m", "bye")
    assert polite.communicate(timeout=15)[0] == "bye\n" and polite.returncode == 0
    d = event(obs.expect("$aws/events/presence/disconnected/mq-polite"))
    assert d["disconnectReason"] == "CLIENT_INITIATED_DISCONNECT"
    out, err = watch.communicate(timeout=20)
    assert (watch.returncode, out, err) == (27, "", "Timed out\n")


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_persistent_session_survives_sigkill(mooring, version):
    # mosquitto_sub -c: a persistent session; -E exits (with DISCONNECT) once subscribed.
    v = ["-V", version]
    subprocess.run(mosquitto("mosquitto_sub", mooring, *v, "-c", "-i", "mq-durable", "-q", "1",
                             "-t", "mosq/durable", "-E"), check=True, timeout=15)
    pub = mosquitto_pub(mooring, *v, "-i", "mq-writer", "-d", "-q", "1", "-t", "mosq/durable",
                        "-m", "while away")
    assert "Client mq-writer received PUBACK (Mid: 1, RC:0)" in pub.stdout.splitlines()
    mooring.kill()  # acknowledged, then SIGKILL
    mooring.start()
    got = subprocess.run(mosquitto("mosquitto_sub", mooring, *v, "-c", "-i", "mq-durable",
                                   "-q", "1", "-t", "mosq/durable", "-C", "1", "-W", "10",
                                   *MOSQ_FORMAT),
                         capture_output=True, text=True, timeout=15)
    assert (got.returncode, got.stdout) == (0, "mosq/durable|1|0|while away\n")


def test_mosquitto_v5_properties(mooring):
    obs = observer(mooring)
    fmt = ["-F", "%t|%q|%P|%C|%R|%D|%F|%p"]
    sub5 = mosquitto_sub(mooring, obs, "mq-sub5", "-V", "mqttv5", "-t", "mosq/props", "-q", "1",
                         "-C", "2", "-W", "15", *fmt)
    sub3 = mosquitto_sub(mooring, obs, "mq-sub3", "-t", "mosq/props", "-q", "1", "-C", "2",
                         "-W", "15", *MOSQ_FORMAT)
    # User properties keep their order and repeats; the other v5 properties are forwarded.
    mosquitto_pub(mooring, "-V", "mqttv5", "-q", "1", "-t", "mosq/props", "-m", "hello",
                  "-D", "publish", "user-property", "a", "1",
                  "-D", "publish", "user-property", "a", "2",
                  "-D", "publish", "user-property", "b", "x y",
                  "-D", "publish", "content-type", "text/plain",
                  "-D", "publish", "response-topic", "mosq/reply",
                  "-D", "publish", "correlation-data", "id-7",
                  "-D", "publish", "payload-format-indicator", "1")
    # From an MQTT 3.1.1 publisher a v5 subscriber sees no properties.
    mosquitto_pub(mooring, "-q", "1", "-t", "mosq/props", "-m", "plain")
    out, _ = sub5.communicate(timeout=20)
    assert out.splitlines() == [
        "mosq/props|1|a:1 a:2 b:x y|text/plain|mosq/reply|id-7|1|hello",
        "mosq/props|1||||||plain",
    ]
    out, _ = sub3.communicate(timeout=20)
    assert out.splitlines() == ["mosq/props|1|0|hello", "mosq/props|1|0|plain"]
    # A refused QoS 1 publish (a topic with 8 slashes) gets PUBACK 0x90 (144).
    pub = mosquitto_pub(mooring, "-V", "mqttv5", "-i", "mq-deep", "-d", "-q", "1",
                        "-t", "a/b/c/d/e/f/g/h/i", "-m", "x")
    assert pub.stdout.splitlines()[3] == "Client mq-deep received PUBACK (Mid: 1, RC:144)"
    assert pub.stderr == "Warning: Publish 1 failed: Topic Name invalid.\n"


def test_hash_excludes_parent_and_dollar_topics_in_aws(mooring):
    sub = Client(mooring)
    sub.sub("#", 1)
    sub.sub("sensor/#", 1)
    pub = Client(mooring)
    # The events of pub's own connection must not reach "#".
    pub.pub("sensor", b"parent", 1)
    pub.pub("sensor/a", b"child", 1)
    first = sub.get()
    second = sub.get()
    topics = sorted([(first.topic, first.payload), (second.topic, second.payload)])
    # "#" matches sensor and sensor/a; sensor/# matches only sensor/a (one copy per client).
    assert topics == [("sensor", b"parent"), ("sensor/a", b"child")]
    sub.nothing()


def test_hash_matches_parent_in_strict(mooring_factory):
    m = mooring_factory(extra_args=STRICT)
    sub = Client(m)
    sub.sub("sensor/#", 1)
    pub = Client(m)
    pub.pub("sensor", b"parent", 1)
    assert sub.expect("sensor").payload == b"parent"


def test_retained_messages_aws_rules_and_restart(mooring):
    pub = Client(mooring)
    pub.pub("ret/a", b"kept", 1, retain=True)
    pub.pub("ret/b", b"also", 1, retain=True)
    exact = Client(mooring)
    exact.sub("ret/a", 1)
    msg = exact.expect("ret/a")
    assert msg.payload == b"kept" and msg.retain
    wildcard = Client(mooring)
    wildcard.sub("ret/#", 1)
    wildcard.nothing()  # aws: wildcard filters do not get stored retained messages
    shared = Client(mooring)
    shared.sub("$share/g/ret/a", 1)
    shared.nothing()
    # Live retained publishes arrive with RETAIN=0 to existing subscribers.
    pub.pub("ret/a", b"newer", 1, retain=True)
    live = wildcard.expect("ret/a")
    assert live.payload == b"newer" and not live.retain
    # Empty payload deletes (and is still forwarded).
    pub.pub("ret/b", b"", 1, retain=True)
    assert wildcard.expect("ret/b").payload == b""
    for c in (pub, exact, wildcard, shared):
        c.stop()
    mooring.restart()
    after = Client(mooring)
    after.sub("ret/a", 1)
    msg = after.expect("ret/a")
    assert msg.payload == b"newer" and msg.retain
    after.sub("ret/b", 1)
    after.nothing()


def test_retained_wildcard_delivery_in_strict(mooring_factory):
    m = mooring_factory(extra_args=STRICT)
    pub = Client(m)
    pub.pub("r/x", b"1", 1, retain=True)
    sub = Client(m)
    sub.sub("r/+", 1)
    msg = sub.expect("r/x")
    assert msg.retain and msg.payload == b"1"


def test_will_on_connection_loss_not_on_disconnect(mooring):
    sub = Client(mooring)
    sub.sub("will/#", 1)
    s = raw_connect(mooring, "will-dev", will=("will/dev", "gone"))
    s.close()  # network drop
    msg = sub.expect("will/dev")
    assert msg.payload == b"gone"
    polite = Client(mooring, will=("will/polite", b"should not", 1))
    polite.stop()
    sub.nothing()


def test_will_delay_v5(mooring):
    sub = Client(mooring)
    sub.sub("wd/#", 1)
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 2
    connect_props = Properties(PacketTypes.CONNECT)
    connect_props.SessionExpiryInterval = 60
    c = Client(mooring, client_id="wd-dev", protocol=V5, clean=False,
               will=("wd/dev", b"late", 1, False, will_props), props=connect_props)
    lost = time.time()
    c.c.socket().shutdown(socket.SHUT_RDWR)  # connection lost, will is delayed
    c.c.loop_stop()  # may take up to paho's 1 s select timeout, so time from `lost`
    assert sub.expect("wd/dev", timeout=8).payload == b"late"
    assert time.time() - lost >= 1.95, "the will came before its 2 s delay"
    # Reconnecting within the delay cancels the will.
    long_delay = Properties(PacketTypes.WILLMESSAGE)
    long_delay.WillDelayInterval = 5
    c2 = Client(mooring, client_id="wd-dev2", protocol=V5, clean=False,
                will=("wd/dev2", b"never", 1, False, long_delay), props=connect_props)
    c2.c.socket().shutdown(socket.SHUT_RDWR)
    c2.c.loop_stop()
    pass_connect_interval()
    c3 = Client(mooring, client_id="wd-dev2", protocol=V5, clean=False, props=connect_props)
    assert c3.session_present
    sub.nothing(3.0)


@pytest.mark.parametrize("protocol", [V311, V5])
def test_persistent_session_survives_restart_with_queued_messages(mooring, protocol):
    props = None
    if protocol == V5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    sub = Client(mooring, client_id="persist-1", protocol=protocol, clean=False, props=props)
    assert not sub.session_present
    sub.sub("q/#", 1)
    sub.stop()
    pub = Client(mooring)
    for i in range(3):
        pub.pub(f"q/{i}", f"m{i}".encode(), 1)
    pub.pub("q/zero", b"qos0 is not queued", 0)
    pub.stop()
    mooring.restart()
    again = Client(mooring, client_id="persist-1", protocol=protocol, clean=False, props=props)
    assert again.session_present
    got = [again.get() for _ in range(3)]
    assert [(g.topic, g.payload, g.qos) for g in got] == [(f"q/{i}", f"m{i}".encode(), 1) for i in range(3)]
    again.nothing()
    # The subscription itself survived too.
    p2 = Client(mooring)
    p2.pub("q/live", b"live", 1)
    assert again.expect("q/live").payload == b"live"


def test_message_acknowledged_before_sigkill_is_delivered_after_restart(mooring):
    sub = Client(mooring, client_id="crash-sub", clean=False)
    sub.sub("crash/t", 1)
    sub.stop()
    pub = Client(mooring)
    info = pub.pub("crash/t", b"durable", 1)  # returns after PUBACK
    assert info.is_published()
    mooring.kill()
    mooring.start()
    again = Client(mooring, client_id="crash-sub", clean=False)
    assert again.session_present
    assert again.expect("crash/t").payload == b"durable"


def test_clean_session_discards_state(mooring):
    sub = Client(mooring, client_id="cleaner", clean=False)
    sub.sub("cl/t", 1)
    sub.stop()
    Client(mooring).pub("cl/t", b"queued", 1)
    pass_connect_interval()
    fresh = Client(mooring, client_id="cleaner", clean=True)
    assert not fresh.session_present
    fresh.nothing()


def test_client_id_takeover(mooring):
    obs = observer(mooring)
    wsub = Client(mooring)
    wsub.sub("takeover/will", 1)
    first = Client(mooring, client_id="dup", protocol=V5, will=("takeover/will", b"old gone", 1),
                   connect=False)
    first.c.reconnect_delay_set(min_delay=120, max_delay=240)  # no paho auto-reconnect
    first.connect()
    pass_connect_interval()
    second = Client(mooring, client_id="dup", protocol=V5)
    rc = first.disconnects.get(timeout=10)
    assert rc.value == 0x8E  # session taken over
    assert wsub.expect("takeover/will").payload == b"old gone"
    events = []
    deadline = time.time() + 2
    while time.time() < deadline:
        try:
            msg = obs.get(timeout=0.2)
        except queue.Empty:
            continue
        if msg.topic.endswith("/dup") and "/presence/" in msg.topic:
            events.append(event(msg))
    connected = [e for e in events if e["eventType"] == "connected"]
    gone = [e for e in events if e["eventType"] == "disconnected"]
    assert len(connected) == 2 and len(gone) == 1, events
    gone = gone[0]
    assert gone["disconnectReason"] == "DUPLICATE_CLIENTID"
    assert gone["clientInitiatedDisconnect"] is False
    assert gone["versionNumber"] == connected[0]["versionNumber"]
    assert gone["sessionIdentifier"] == connected[0]["sessionIdentifier"]
    assert connected[1]["versionNumber"] > connected[0]["versionNumber"]
    second.pub("takeover/still", b"ok", 1)


def assert_fields(payload, expected_keys):
    assert list(payload.keys()) == expected_keys, payload


def test_lifecycle_payloads_field_by_field(mooring):
    obs = observer(mooring)
    before = int(time.time() * 1000)
    dev = Client(mooring, client_id="life-1")
    c = event(obs.expect("$aws/events/presence/connected/life-1"))
    assert_fields(c, ["clientId", "timestamp", "eventType", "sessionIdentifier",
                      "principalIdentifier", "ipAddress", "versionNumber"])
    assert c["clientId"] == "life-1" and c["eventType"] == "connected"
    assert before - 1000 <= c["timestamp"] <= int(time.time() * 1000) + 1000
    assert str(uuid.UUID(c["sessionIdentifier"])) == c["sessionIdentifier"]
    assert c["principalIdentifier"] == "anonymous"
    assert c["ipAddress"] == "127.0.0.1"
    assert isinstance(c["versionNumber"], int) and c["versionNumber"] >= 1

    dev.sub("chat/42", 1)
    s = event(obs.expect("$aws/events/subscriptions/subscribed/life-1"))
    assert_fields(s, ["clientId", "timestamp", "eventType", "sessionIdentifier",
                      "principalIdentifier", "topics"])
    assert s["eventType"] == "subscribed" and s["topics"] == ["chat/42"]
    assert s["sessionIdentifier"] == c["sessionIdentifier"]
    # The seed's handler: topics[0].split('/')[1] == 'chat' ... here arr[0] is "chat".
    assert s["topics"][0].split("/") == ["chat", "42"]

    dev.c.unsubscribe("chat/42")
    u = event(obs.expect("$aws/events/subscriptions/unsubscribed/life-1"))
    assert_fields(u, ["clientId", "timestamp", "eventType", "sessionIdentifier",
                      "principalIdentifier", "topics"])
    assert u["eventType"] == "unsubscribed" and u["topics"] == ["chat/42"]

    dev.stop()
    d = event(obs.expect("$aws/events/presence/disconnected/life-1"))
    assert_fields(d, ["clientId", "timestamp", "eventType", "sessionIdentifier",
                      "principalIdentifier", "clientInitiatedDisconnect", "disconnectReason",
                      "versionNumber"])
    assert d["eventType"] == "disconnected"
    assert d["clientInitiatedDisconnect"] is True
    assert d["disconnectReason"] == "CLIENT_INITIATED_DISCONNECT"
    assert d["versionNumber"] == c["versionNumber"]
    assert d["sessionIdentifier"] == c["sessionIdentifier"]

    # Network loss.
    s2 = raw_connect(mooring, "life-2")
    c2 = event(obs.expect("$aws/events/presence/connected/life-2"))
    s2.close()
    d2 = event(obs.expect("$aws/events/presence/disconnected/life-2"))
    assert d2["disconnectReason"] == "CONNECTION_LOST" and d2["clientInitiatedDisconnect"] is False
    assert d2["versionNumber"] == c2["versionNumber"]

    # Reconnect: versionNumber grows.
    pass_connect_interval()
    again = Client(mooring, client_id="life-1")
    c3 = event(obs.expect("$aws/events/presence/connected/life-1"))
    assert c3["versionNumber"] > c["versionNumber"]
    assert c3["sessionIdentifier"] != c["sessionIdentifier"]
    again.stop()

    # Client ids with + or # get no events; "#" never matches $aws topics.
    everything = Client(mooring)
    everything.sub("#", 1)
    odd = Client(mooring, client_id="odd+id")
    odd.stop()
    obs.expect("$aws/events/presence/disconnected/life-1")
    with pytest.raises(AssertionError):
        obs.expect("$aws/events/presence/connected/odd+id", timeout=1)
    everything.nothing()


def test_keep_alive_timeout_in_strict(mooring_factory):
    m = mooring_factory(extra_args=STRICT)
    obs = observer(m)
    s = raw_connect(m, "sleepy", keepalive=1)
    started = time.time()
    assert read_until_closed(s) == b""
    assert 1.2 <= time.time() - started <= 4
    d = event(obs.expect("$aws/events/presence/disconnected/sleepy"))
    assert d["disconnectReason"] == "MQTT_KEEP_ALIVE_TIMEOUT"


def test_keep_alive_is_clamped_in_aws(mooring):
    c = Client(mooring, protocol=V5, keepalive=5)
    assert c.connack_props.ServerKeepAlive == 30


def parked_connections(m):
    """`mooring_mqtt_connections_parked` from /metrics."""
    body = urllib.request.urlopen(m.url + "/metrics").read().decode()
    for line in body.splitlines():
        if line.startswith("mooring_mqtt_connections_parked "):
            return int(float(line.split()[1]))
    raise AssertionError("no mooring_mqtt_connections_parked in /metrics:\n" + body)


def until_parked(m, at_least, timeout=10):
    deadline = time.time() + timeout
    while (n := parked_connections(m)) < at_least:
        assert time.time() < deadline, f"{n} connections parked, expected {at_least}"
        time.sleep(0.05)


def test_idle_connections_are_parked_and_still_served(mooring):
    # An idle plain-TCP connection gives up its task: one thread waits on its socket and
    # resumes it when the client sends, when a message is queued for it, or when it is
    # kicked. Paho clients and boto3 drive each of those from outside.
    data = mooring.client("iot-data")
    obs = observer(mooring)
    echo = Client(mooring, client_id="parked-echo")
    echo.sub("parked/echo", 1)
    clients = [Client(mooring, client_id=f"parked-{i}", protocol=V5 if i % 2 else V311)
               for i in range(20)]
    for i, c in enumerate(clients):
        c.sub(f"parked/{i}", 1)
    until_parked(mooring, len(clients) + 2)

    # A message queued for a parked connection (iot-data Publish, QoS 1 and 0).
    for i in range(len(clients)):
        data.publish(topic=f"parked/{i}", qos=1 if i % 3 else 0, payload=f"to {i}".encode())
    for i, c in enumerate(clients):
        assert c.expect(f"parked/{i}").payload == f"to {i}".encode()

    # Packets from parked clients: QoS 1 publishes (acknowledged) that reach another
    # parked subscriber.
    until_parked(mooring, len(clients) + 2)
    for i, c in enumerate(clients):
        c.pub("parked/echo", f"from {i}".encode(), 1)
    got = sorted(echo.expect("parked/echo").payload for _ in clients)
    assert got == sorted(f"from {i}".encode() for i in range(len(clients)))

    # A kick (DeleteConnection) reaches a parked connection.
    until_parked(mooring, len(clients) + 2)
    data.delete_connection(clientId="parked-1")
    assert clients[1].disconnects.get(timeout=10).value == 0x98
    gone = event(obs.expect("$aws/events/presence/disconnected/parked-1"))
    assert gone["disconnectReason"] == "API_INITIATED_DISCONNECT"
    clients[1].c.loop_stop()

    # Clients closing their sockets while parked are lost connections, and leave the lot.
    for c in clients[2:6]:
        c.c.loop_stop()
        c.c.socket().close()
    lost = {}
    while len(lost) < 4:
        msg = obs.get(timeout=10)
        if msg.topic.startswith("$aws/events/presence/disconnected/"):
            lost[event(msg)["clientId"]] = event(msg)["disconnectReason"]
    assert lost == {c.client_id: "CONNECTION_LOST" for c in clients[2:6]}
    assert parked_connections(mooring) <= len(clients) + 2 - 5


def test_malformed_and_oversized_packets_close_only_that_connection(mooring):
    obs = observer(mooring)
    healthy = Client(mooring)
    healthy.sub("ok/#", 1)

    # MQTT 5: a string longer than its packet -> DISCONNECT 0x81 Malformed Packet.
    s = raw_connect(mooring, "bad-v5", version=5)
    s.sendall(b"\x30\x05\x00\x10abc")
    data = read_until_closed(s)
    assert data[:1] == b"\xe0" and data[2] == 0x81, data
    d = event(obs.expect("$aws/events/presence/disconnected/bad-v5"))
    assert d["disconnectReason"] == "CLIENT_ERROR"

    # MQTT 5: a packet larger than the maximum packet size -> 0x95 before the body arrives.
    s = raw_connect(mooring, "big-v5", version=5)
    s.sendall(b"\x30" + varint(10_000_000))
    data = read_until_closed(s)
    assert data[:1] == b"\xe0" and data[2] == 0x95, data

    # MQTT 5 via paho: a 129 KB payload is over AWS's 128 KB limit.
    big = Client(mooring, protocol=V5)
    big.c.publish("ok/big", b"x" * (129 * 1024), 1)
    assert big.disconnects.get(timeout=10).value == 0x95

    # MQTT 3.1.1: reserved packet type 0 -> connection closed.
    s = raw_connect(mooring, "bad-v3")
    s.sendall(b"\x00\x00")
    assert read_until_closed(s) == b""

    # Everyone else keeps working.
    pub = Client(mooring)
    pub.pub("ok/still", b"fine", 1)
    assert healthy.expect("ok/still").payload == b"fine"
    healthy.nothing(0.3)


def test_reserved_topics_in_aws(mooring):
    c = Client(mooring, protocol=V5)
    info = c.pub("$aws/events/presence/connected/fake", b"{}", 1)
    assert c.pubacks[info.mid].value == 0x87
    granted = c.sub("$aws/rules/myrule", 1)
    assert granted[0].value == 0x8F
    info = c.pub("$aws/things/t1/shadow/update", b"{}", 1, retain=True)
    assert c.pubacks[info.mid].value == 0x87  # no retained messages on $ topics


def test_mqtt5_properties_round_trip(mooring):
    sub = Client(mooring, protocol=V5)
    sub.sub("p5/t", 1)
    pub = Client(mooring, protocol=V5)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("b", "2"), ("a", "1"), ("b", "3")]
    props.ResponseTopic = "p5/reply"
    props.CorrelationData = b"\x00corr"
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 60
    pub.pub("p5/t", b"{}", 1, props=props)
    msg = sub.expect("p5/t")
    p = msg.properties
    assert p.UserProperty == [("b", "2"), ("a", "1"), ("b", "3")]
    assert p.ResponseTopic == "p5/reply"
    assert p.CorrelationData == b"\x00corr"
    assert p.ContentType == "application/json"
    assert p.PayloadFormatIndicator == 1
    assert 58 <= p.MessageExpiryInterval <= 60
    # 3.1.1 subscriber gets the same message without properties.
    old = Client(mooring, protocol=V311)
    old.sub("p5/t", 1)
    pub.pub("p5/t", b"x", 1, props=props)
    assert old.expect("p5/t").payload == b"x"
    # Topic alias from the client.
    alias = Properties(PacketTypes.PUBLISH)
    alias.TopicAlias = 3
    pub.pub("p5/t", b"aliased-1", 1, props=alias)
    pub.pub("", b"aliased-2", 1, props=alias)
    assert sub.expect("p5/t").payload == b"x"
    assert sub.expect("p5/t").payload == b"aliased-1"
    assert sub.expect("p5/t").payload == b"aliased-2"
    # CONNACK properties of the aws profile.
    cp = pub.connack_props
    assert cp.MaximumQoS == 1 and cp.TopicAliasMaximum == 8
    assert cp.SubscriptionIdentifierAvailable == 0 and cp.SharedSubscriptionAvailable == 1
    assert cp.ReceiveMaximum == 100 and cp.RetainAvailable == 1


def test_session_expiry_is_capped_and_message_expiry_applies(mooring):
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 7200
    sub = Client(mooring, client_id="exp-1", protocol=V5, clean=False, props=props)
    assert sub.connack_props.SessionExpiryInterval == 3600
    sub.sub("exp/t", 1)
    sub.stop()
    pub = Client(mooring, protocol=V5)
    short = Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval = 1
    pub.pub("exp/t", b"expires", 1, props=short)
    pub.pub("exp/t", b"stays", 1)
    time.sleep(2.2)
    again = Client(mooring, client_id="exp-1", protocol=V5, clean=False, props=props)
    assert again.session_present
    assert again.expect("exp/t").payload == b"stays"
    again.nothing()


def test_shared_subscription_delivers_each_message_once(mooring):
    members = [Client(mooring) for _ in range(2)]
    for m_ in members:
        m_.sub("$share/workers/jobs/+", 1)
    plain = Client(mooring)
    plain.sub("jobs/+", 1)
    pub = Client(mooring)
    for i in range(20):
        pub.pub(f"jobs/{i}", str(i).encode(), 1)
    assert sorted(int(plain.get().payload) for _ in range(20)) == list(range(20))
    got = []
    for m_ in members:
        while True:
            try:
                got.append(int(m_.get(timeout=1).payload))
            except queue.Empty:
                break
    assert sorted(got) == list(range(20))


def test_no_local_subscription_option(mooring):
    c = Client(mooring, protocol=V5)
    opts = mqtt.SubscribeOptions(qos=1, noLocal=True)
    c.sub("nl/t", options=opts)
    c.pub("nl/t", b"mine", 1)
    c.nothing()
    other = Client(mooring)
    other.pub("nl/t", b"theirs", 1)
    assert c.expect("nl/t").payload == b"theirs"


def test_anonymous_refused_emits_connect_failed(mooring_factory, tmp_path):
    m = mooring_factory(extra_args=["--set", "mqtt.allow_anonymous=false"])
    ctx, _ = tls_context_with_client_cert(m, tmp_path)
    obs = Client(m, client_id="tls-observer", tls_context=ctx)
    obs.sub("$aws/events/#", 1)
    refused = Client(m, client_id="anon-1", protocol=V5, connect=False)
    refused.connect(expect_ok=False)
    assert refused.connack_rc.value == 0x87
    f = event(obs.expect("$aws/events/presence/connect_failed/anon-1"))
    assert_fields(f, ["clientId", "timestamp", "eventType", "sessionIdentifier",
                      "principalIdentifier", "connectFailureReason", "ipAddress"])
    assert f["eventType"] == "connect_failed"
    assert f["connectFailureReason"] == "AUTHORIZATION_FAILED"
    assert f["ipAddress"] == "127.0.0.1"


def tls_context_with_client_cert(m, tmp_path):
    """Issues a client certificate from the data directory's CA (as CreateKeysAndCertificate
    will) and returns an SSL context presenting it, plus its certificate id."""
    cert_path, key_path, cert_id = issue_client_certificate(m, tmp_path)
    ctx = ssl.create_default_context(cafile=str(m.data_dir / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
    return ctx, cert_id


def issue_client_certificate(m, tmp_path):
    """Issues a client certificate from the data directory's CA; returns the certificate and
    key file paths and the certificate id."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_dir = m.data_dir / "ca"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    cert_path = tmp_path / f"device-{uuid.uuid4().hex[:6]}.pem"
    key_path = tmp_path / f"device-{uuid.uuid4().hex[:6]}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_id = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    # Certificate clients must be registered, ACTIVE and carry a policy (see test_iot_security).
    iot = m.client("iot")
    registered = iot.register_certificate(
        certificatePem=cert.public_bytes(serialization.Encoding.PEM).decode(), status="ACTIVE")
    policy_name = f"allow-all-{uuid.uuid4().hex[:8]}"
    iot.create_policy(policyName=policy_name, policyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}))
    iot.attach_policy(policyName=policy_name, target=registered["certificateArn"])
    return cert_path, key_path, cert_id


def test_tls_with_client_certificate(mooring, tmp_path):
    ctx, cert_id = tls_context_with_client_cert(mooring, tmp_path)
    obs = observer(mooring)
    dev = Client(mooring, client_id="tls-dev", tls_context=ctx, protocol=V5)
    c = event(obs.expect("$aws/events/presence/connected/tls-dev"))
    assert c["principalIdentifier"] == cert_id
    dev.sub("tls/t", 1)
    plain = Client(mooring)
    plain.pub("tls/t", b"over tls", 1)
    assert dev.expect("tls/t").payload == b"over tls"
    # Without a client certificate the handshake fails.
    bare = ssl.create_default_context(cafile=str(mooring.data_dir / "ca" / "ca.pem"))
    host, port = "localhost", hostport(mooring.endpoints["mqtts"])[1]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with socket.create_connection((host, port), timeout=5) as raw:
            with bare.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(b"\x10\x00")
                if tls.recv(10) == b"":
                    raise ConnectionError("closed")


@pytest.mark.parametrize("protocol", [V311, V5])
def test_websocket(mooring, protocol):
    ws = Client(mooring, transport="websockets", protocol=protocol)
    ws.sub("ws/t", 1)
    tcp = Client(mooring)
    tcp.pub("ws/t", b"to websocket", 1)
    assert ws.expect("ws/t").payload == b"to websocket"
    tcp.sub("ws/back", 1)
    ws.pub("ws/back", b"from websocket", 1)
    assert tcp.expect("ws/back").payload == b"from websocket"
    ws.stop()


def presigned_mqtt_path(m, secret=None):
    """A SigV4-presigned `/mqtt` path as AWS IoT's SDKs build it (service iotdevicegateway)."""
    from botocore.auth import SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    key, real_secret = m.credentials()
    url = f"http://{m.endpoints['http']}/mqtt"
    request = AWSRequest(method="GET", url=url)
    SigV4QueryAuth(Credentials(key, secret or real_secret), "iotdevicegateway",
                   m.endpoints["region"], expires=300).add_auth(request)
    return request.url.split(m.endpoints["http"], 1)[1], key


def test_websocket_with_sigv4_presigned_url(mooring_factory):
    m = mooring_factory(extra_args=["--set", "mqtt.allow_anonymous=false"])
    path, key = presigned_mqtt_path(m)
    signed = Client(m, client_id="ws-signed", transport="websockets", protocol=V5, connect=False)
    signed.c.ws_set_options(path=path)
    signed.connect()
    signed.sub("$aws/events/presence/connected/+", 1)
    other = Client(m, client_id="ws-signed-2", transport="websockets", connect=False)
    other.c.ws_set_options(path=presigned_mqtt_path(m)[0])
    other.connect()
    c = event(signed.expect("$aws/events/presence/connected/ws-signed-2"))
    assert c["principalIdentifier"] == f"{m.endpoints['account_id']}/{key}"
    # A bad signature is refused at the HTTP upgrade; unsigned is refused without anonymous.
    for bad_path in (presigned_mqtt_path(m, secret="wrong")[0], "/mqtt"):
        bad = Client(m, transport="websockets", connect=False)
        bad.c.ws_set_options(path=bad_path)
        with pytest.raises(Exception):
            bad.c.connect(bad.host, bad.port, 60)


def test_subscription_identifiers_strict_supported_aws_refused(mooring_factory):
    strict = mooring_factory(extra_args=STRICT)
    c = Client(strict, protocol=V5)
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 77
    rc, mid = c.c.subscribe("sid/+", 1, properties=props)
    time.sleep(0.5)
    Client(strict).pub("sid/x", b"tagged", 1)
    msg = c.expect("sid/x")
    assert msg.properties.SubscriptionIdentifier == [77]

    aws = mooring_factory()
    c = Client(aws, protocol=V5)
    c.c.subscribe("sid/+", 1, properties=props)
    assert c.disconnects.get(timeout=10).value == 0xA1


def test_outbound_topic_aliases(mooring):
    props = Properties(PacketTypes.CONNECT)
    props.TopicAliasMaximum = 2
    sub = Client(mooring, protocol=V5, props=props)
    sub.sub("al/+", 1)
    pub = Client(mooring)
    for topic in ("al/a", "al/a", "al/b", "al/c", "al/a", "al/c"):
        pub.pub(topic, topic.encode(), 1)
    got = [sub.get() for _ in range(6)]
    # paho does not resolve aliases itself: resolve them here from the wire values.
    expected = ["al/a", "al/a", "al/b", "al/c", "al/a", "al/c"]
    aliases = [getattr(g.properties, "TopicAlias", None) for g in got]
    assert aliases == [1, 1, 2, None, 1, None], aliases
    assert [g.topic for g in got] == ["al/a", "", "al/b", "al/c", "", "al/c"]
    mapping, resolved = {}, []
    for g, alias in zip(got, aliases):
        if g.topic and alias:
            mapping[alias] = g.topic
        resolved.append(g.topic or mapping[alias])
    assert resolved == expected
    assert [g.payload.decode() for g in got] == expected


# ---- AWS limits, throttling, enhanced auth and the remaining disconnect reasons ---------------

def test_aws_size_and_count_limits(mooring):
    # Client id: 128 bytes accepted, 129 refused (MQTT 5: 0x85; 3.1.1: return code 2).
    ok = Client(mooring, client_id="i" * 128, protocol=V5)
    ok.stop()
    long_id = Client(mooring, client_id="i" * 129, protocol=V5, connect=False)
    long_id.connect(expect_ok=False)
    assert long_id.connack_rc.value == 0x85
    long_id3 = Client(mooring, client_id="j" * 129, connect=False)
    long_id3.connect(expect_ok=False)
    # paho reports a 3.1.1 return code as the MQTT 5 reason code it maps to (2 -> 0x85) ...
    assert long_id3.connack_rc.value == 0x85
    # ... on the wire it is return code 2, Identifier rejected.
    s, connack = raw_connack(mooring, "k" * 129)
    assert connack == b"\x20\x02\x00\x02"
    s.close()

    c = Client(mooring, protocol=V5)
    # Topics: 256 bytes and 7 slashes are the maximum.
    info = c.pub("t" * 256, b"x", 1)
    assert c.pubacks[info.mid].value == 0
    info = c.pub("t" * 257, b"x", 1)
    assert c.pubacks[info.mid].value == 0x90
    info = c.pub("a/b/c/d/e/f/g/h", b"x", 1)
    assert c.pubacks[info.mid].value == 0
    info = c.pub("a/b/c/d/e/f/g/h/i", b"x", 1)
    assert c.pubacks[info.mid].value == 0x90
    granted = c.sub("a/b/c/d/e/f/g/h/i", 1)
    assert granted[0].value == 0x8F

    # At most 8 filters per SUBSCRIBE and 50 subscriptions per connection.
    granted = c.sub([(f"lim/{i}", 1) for i in range(9)])
    assert [g.value for g in granted] == [1] * 8 + [0x97]
    for batch in range(5):
        granted = c.sub([(f"more/{batch}/{i}", 1) for i in range(8)])
        assert [g.value for g in granted] == [1] * 8
    granted = c.sub([("last/1", 1), ("last/2", 1), ("last/3", 1)])
    assert [g.value for g in granted] == [1, 1, 0x97]  # 8 + 40 + 2 = 50
    # Re-subscribing to a filter the connection already has is not a new subscription.
    assert c.sub("lim/0", 0)[0].value == 0


def test_publish_rate_limit_throttles(mooring):
    obs = observer(mooring)
    # MQTT 5: beyond 100 publishes in a second, QoS 1 publishes are refused with 0x97.
    c = Client(mooring, protocol=V5, connect=False)
    c.c.max_inflight_messages_set(500)
    c.connect()
    infos = [c.pub("rate/v5", b"x", 1, wait=False) for _ in range(130)]
    for info in infos:
        info.wait_for_publish(10)
    codes = [c.pubacks[i.mid].value for i in infos]
    assert codes.count(0x97) >= 30 and codes.count(0) >= 90, codes
    assert codes[:100] == [0] * 100
    # MQTT 3.1.1 cannot be told: the connection is closed as THROTTLED and its will sent.
    watcher = Client(mooring)
    watcher.sub("rate/will", 1)
    s = raw_connect(mooring, "rate-v3", will=("rate/will", "gone"))
    publish = b"\x30" + varint(2 + 6 + 1) + enc_str("rate/x") + b"y"
    s.sendall(publish * 150)
    assert read_until_closed(s) == b""
    d = event(obs.expect("$aws/events/presence/disconnected/rate-v3"))
    assert d["disconnectReason"] == "THROTTLED" and d["clientInitiatedDisconnect"] is False
    assert watcher.expect("rate/will").payload == b"gone"


def test_publish_rate_limit_is_configurable(mooring_factory):
    m = mooring_factory(extra_args=["--set", "broker.publishes_per_second=0"])
    sub = Client(m)
    sub.sub("unlimited", 0)
    s = raw_connect(m, "fast-v3")
    s.sendall((b"\x30" + varint(2 + 9 + 1) + enc_str("unlimited") + b"y") * 300)
    for _ in range(300):
        assert sub.expect("unlimited").payload == b"y"
    s.close()


def test_reserved_topic_publish_closes_v311_as_forbidden_access(mooring):
    obs = observer(mooring)
    s = raw_connect(mooring, "forbidden-v3")
    s.sendall(b"\x30" + varint(2 + 33 + 2) + enc_str("$aws/events/presence/connected/xy") + b"{}")
    assert read_until_closed(s) == b""
    d = event(obs.expect("$aws/events/presence/disconnected/forbidden-v3"))
    assert d["disconnectReason"] == "FORBIDDEN_ACCESS"


def test_websocket_ttl_expiration(mooring_factory):
    m = mooring_factory(extra_args=["--set", "broker.websocket_ttl_secs=2"])
    obs = observer(m)
    started = time.time()
    ws = Client(m, client_id="ws-ttl", transport="websockets", protocol=V5)
    assert ws.disconnects.get(timeout=10).value == 0xA0  # Maximum connect time
    assert 1.5 <= time.time() - started <= 6
    d = event(obs.expect("$aws/events/presence/disconnected/ws-ttl"))
    assert d["disconnectReason"] == "WEBSOCKET_TTL_EXPIRATION"
    # Plain TCP connections have no TTL: the observer, connected before the WebSocket client,
    # is still connected well past 2 s and still receives.
    obs.nothing(1.0)
    assert time.time() - started > 2.5 and obs.disconnects.empty()
    obs.sub("ttl/still", 1)
    Client(m).pub("ttl/still", b"here", 1)
    assert obs.expect("ttl/still").payload == b"here"


@pytest.mark.parametrize("profile", ["aws", "strict"])
def test_enhanced_authentication_is_refused(mooring_factory, profile):
    m = mooring_factory(extra_args=["--set", f"mqtt.profile={profile}"])
    # CONNECT with an Authentication Method: CONNACK 0x8C Bad authentication method.
    props = Properties(PacketTypes.CONNECT)
    props.AuthenticationMethod = "SCRAM-SHA-1"
    c = Client(m, protocol=V5, props=props, connect=False)
    c.connect(expect_ok=False)
    assert c.connack_rc.value == 0x8C
    # AUTH without an authentication method at CONNECT: DISCONNECT 0x82 Protocol Error.
    s = raw_connect(m, "auth-v5", version=5)
    s.sendall(b"\xf0\x02\x18\x00")  # AUTH, reason 0x18 Continue authentication
    data = read_until_closed(s)
    assert data[:1] == b"\xe0" and data[2] == 0x82, data
    # MQTT 3.1.1 has no AUTH: packet type 15 is reserved, the connection closes.
    s = raw_connect(m, "auth-v3")
    s.sendall(b"\xf0\x00")
    assert read_until_closed(s) == b""


def test_broker_section_keep_alive_cap_and_refused_subscriptions(mooring_factory):
    m = mooring_factory(extra_args=STRICT + [
        "--set", "broker.max_keep_alive=60",
        "--set", 'broker.refused_subscriptions=["test/nosubscribe"]',
    ])
    c = Client(m, protocol=V5, keepalive=120)
    assert c.connack_props.ServerKeepAlive == 60
    assert [g.value for g in c.sub([("test/nosubscribe", 2), ("test/ok", 2)])] == [0x80, 2]
    c3 = Client(m, keepalive=120)
    assert c3.sub("test/nosubscribe", 1)[0].value == 0x80


def test_delete_connection_with_boto3(mooring):
    """iot-data DeleteConnection: closes the connection as API_INITIATED_DISCONNECT (MQTT 5
    reason 0x98), sends the will unless preventWillMessage, keeps or ends the session."""
    data = mooring.client("iot-data")
    obs = observer(mooring)
    wsub = Client(mooring)
    wsub.sub("dc/will/#", 1)

    # Default: the will is sent and a persistent session is kept.
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    dev = Client(mooring, client_id="dc-dev", protocol=V5, clean=False, props=props,
                 will=("dc/will/1", b"bye", 1), connect=False)
    dev.c.reconnect_delay_set(min_delay=120, max_delay=240)
    dev.connect()
    dev.sub("dc/queue", 1)
    reply = data.delete_connection(clientId="dc-dev")
    assert reply["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert dev.disconnects.get(timeout=10).value == 0x98
    assert wsub.expect("dc/will/1").payload == b"bye"
    gone = event(obs.expect("$aws/events/presence/disconnected/dc-dev"))
    assert gone["disconnectReason"] == "API_INITIATED_DISCONNECT"
    assert gone["clientInitiatedDisconnect"] is False
    dev.c.loop_stop()
    Client(mooring).pub("dc/queue", b"kept", 1)
    back = Client(mooring, client_id="dc-dev", protocol=V5, clean=False, props=props)
    assert back.session_present
    assert back.expect("dc/queue").payload == b"kept"

    # preventWillMessage and cleanSession: no will, and the session is gone.
    data.delete_connection(clientId="dc-dev", preventWillMessage=True, cleanSession=True)
    assert back.disconnects.get(timeout=10).value == 0x98
    back.c.loop_stop()
    wsub.nothing()
    again = Client(mooring, client_id="dc-dev", protocol=V5, clean=False, props=props)
    assert not again.session_present
    again.stop()

    # A client id that is not connected, and one that can never be.
    with pytest.raises(data.exceptions.ResourceNotFoundException):
        data.delete_connection(clientId="nobody-here")
    with pytest.raises(data.exceptions.InvalidRequestException):
        data.delete_connection(clientId="$reserved")
    obs.stop()
    wsub.stop()
