"""AWS IoT Core's per-client limits in the default `aws` profile, driven with raw sockets and
paho-mqtt against the real `mooring` binary: at most one CONNECT per second per client id (an
excess CONNECT is refused, the connected client keeps its connection, and no `connect_failed`
event is emitted since that event is only for authorization failures), and 512 KiB/s of
throughput per connection (the excess is delayed, not dropped). The `strict` profile has
neither limit, and the `[broker]` section changes both.

Timing assertions are lower bounds with wide margins (a slow machine only makes them
easier to meet); nothing asserts that something is fast.
"""

import queue
import time

from test_mqtt import STRICT, V5, Client, raw_connack

KIB = 1024
# Just under AWS's 128 KB payload limit.
CHUNK = 120 * KIB


def pingable(s):
    """Whether the raw connection `s` still answers PINGREQ."""
    s.sendall(b"\xc0\x00")
    s.settimeout(10)
    return s.recv(2) == b"\xd0\x00"


def test_second_connect_within_a_second_is_refused(mooring):
    events = Client(mooring, client_id="limits-observer")
    events.sub("$aws/events/presence/connect_failed/#", 1)
    first, ack = raw_connack(mooring, "connect-rate")
    assert ack[3] == 0, ack
    # Back to back, well inside one second: refused, MQTT 3.1.1 with return code 3 and
    # MQTT 5 with 0x9F (connection rate exceeded).
    second, ack = raw_connack(mooring, "connect-rate")
    assert ack[3] == 3, ack
    third, ack = raw_connack(mooring, "connect-rate", version=5)
    assert ack[3] == 0x9F, ack
    # The refused attempts did not take the first connection over.
    assert pingable(first)
    try:
        msg = events.get(timeout=1.0)
        raise AssertionError(f"unexpected event on {msg.topic}")
    except queue.Empty:
        pass
    # Once the second has passed, the id connects again (and takes the session over).
    time.sleep(1.2)
    again, ack = raw_connack(mooring, "connect-rate")
    assert ack[3] == 0, ack
    for s in (first, second, third, again):
        s.close()


def test_connect_rate_limit_is_configurable_and_absent_in_strict(mooring_factory):
    for extra in (["--set", "broker.connects_per_second_per_client=0"], STRICT):
        m = mooring_factory(extra_args=extra)
        sockets = []
        for _ in range(3):
            s, ack = raw_connack(m, "no-connect-limit")
            assert ack[3] == 0, (extra, ack)
            sockets.append(s)
        for s in sockets:
            s.close()
        m.stop()


def send_bulk(m, topic, chunks, **client_args):
    """Publishes `chunks` QoS 1 messages of `CHUNK` bytes on `topic` from one connection
    while a second connection subscribes; returns the seconds until the last arrived and
    the payloads received, in order."""
    sub = Client(m, **client_args)
    sub.sub(topic, 1)
    pub = Client(m, **client_args)
    payloads = [bytes([i]) * CHUNK for i in range(chunks)]
    started = time.time()
    infos = [pub.pub(topic, p, 1, wait=False) for p in payloads]
    received = [sub.expect(topic, timeout=60).payload for _ in payloads]
    elapsed = time.time() - started
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    sub.stop()
    pub.stop()
    return elapsed, received, payloads


def test_throughput_over_512_kib_per_second_is_delayed_not_dropped(mooring):
    # 16 x 120 KiB = 1,920 KiB: after the first second's 512 KiB, the rest needs at least
    # 2.75 s at 512 KiB/s. Unthrottled, loopback moves it in well under a second.
    elapsed, received, payloads = send_bulk(mooring, "bulk/default", 16)
    assert received == payloads
    assert elapsed >= 1.5, f"1,920 KiB went through in {elapsed:.2f} s"


def test_throughput_limit_is_configurable(mooring_factory):
    m = mooring_factory(
        extra_args=["--set", f"broker.bytes_per_second_per_connection={256 * KIB}"])
    # 9 x 120 KiB = 1,080 KiB at 256 KiB/s: at least (1,080 - 256) / 256 = 3.2 s. The
    # default 512 KiB/s would need only 1.1 s, so 2 s shows the setting applies.
    elapsed, received, payloads = send_bulk(m, "bulk/tuned", 9, protocol=V5)
    assert received == payloads
    assert elapsed >= 2.0, f"1,080 KiB went through in {elapsed:.2f} s"


def test_throughput_to_a_subscriber_over_512_kib_per_second_is_delayed_not_dropped(mooring):
    # Four publishers send 4 x 120 KiB each, all at once: each stays within its own first
    # second's 512 KiB, so nothing holds them back. The subscriber's 1,920 KiB then need at
    # least (1,920 - 512 - one 256 KiB batch taken before the pause) / 512 = 2.25 s on its
    # connection. Unthrottled, loopback delivers them in well under a second.
    topic = "bulk/fan-in"
    sub = Client(mooring, client_id="fan-in-subscriber")
    sub.sub(topic, 1)
    pubs = [Client(mooring, client_id=f"fan-in-publisher-{k}") for k in range(4)]
    payloads = {bytes([16 * k + i]) * CHUNK for k in range(4) for i in range(4)}
    started = time.time()
    infos = [p.pub(topic, bytes([16 * k + i]) * CHUNK, 1, wait=False)
             for k, p in enumerate(pubs) for i in range(4)]
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    published = time.time() - started
    received = {sub.expect(topic, timeout=60).payload for _ in range(16)}
    elapsed = time.time() - started
    assert received == payloads
    # The publishers were not held back; the subscriber was.
    assert published < 1.5, f"the publishers took {published:.2f} s"
    assert elapsed >= 1.8, f"1,920 KiB reached one subscriber in {elapsed:.2f} s"
    for c in [sub, *pubs]:
        c.stop()
