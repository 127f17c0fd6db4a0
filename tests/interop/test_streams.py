"""The Greengrass stream manager, driven by the official `stream-manager` SDK (and, for what
the SDK cannot send, raw frames built with cbor2 exactly as the Java and Node.js SDKs write
them) against the real binary."""

import http.server
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import cbor2
import pytest
from stream_manager import (
    ConnectFailedException,
    ExportDefinition,
    HTTPConfig,
    InvalidRequestException,
    KinesisConfig,
    MessageStreamDefinition,
    NotEnoughMessagesException,
    Persistence,
    ReadMessagesOptions,
    RequestPayloadTooLargeException,
    ResourceNotFoundException,
    StrategyOnFull,
    StreamManagerClient,
    UpdateFailedException,
    UpdateNotAllowedException,
    ValidationException,
)
from stream_manager import (
    S3ExportTaskDefinition,
    S3ExportTaskExecutorConfig,
    StatusConfig,
    StatusLevel,
    StatusMessage,
    Util,
)
from stream_manager.data import ExportFormat, Status


def sm_port(m):
    return int(m.endpoints["stream_manager"].rsplit(":", 1)[1])


def client_for(m, **kwargs):
    return StreamManagerClient(port=sm_port(m), **kwargs)


@pytest.fixture
def sm(mooring):
    client = client_for(mooring)
    yield client
    client.close()


def definition(name, **kwargs):
    kwargs.setdefault("strategy_on_full", StrategyOnFull.OverwriteOldestData)
    return MessageStreamDefinition(name=name, **kwargs)


def read_all(client, name, start=0, count=None):
    status = client.describe_message_stream(name).storage_status
    if count is None:
        count = status.newest_sequence_number - max(start, status.oldest_sequence_number) + 1
    out = []
    while len(out) < count:
        batch = client.read_messages(
            name,
            ReadMessagesOptions(
                desired_start_sequence_number=start + len(out),
                min_message_count=1,
                max_message_count=min(500, count - len(out)),
            ),
        )
        out.extend(batch)
    return out


# --- raw protocol helpers --------------------------------------------------------------


class RawConnection:
    def __init__(self, m, version_byte=1, connect=None, op=1):
        self.sock = socket.create_connection(("127.0.0.1", sm_port(m)), timeout=10)
        self.sock.sendall(bytes([version_byte]))
        if version_byte != 1:
            return
        connect = connect if connect is not None else {
            "requestId": "c", "protocolVersion": "1.1.0",
            "otherSupportedProtocolVersions": ["1.0.0"], "sdkVersion": "test",
        }
        self.send(op, cbor2.dumps(connect))

    def send(self, op, payload: bytes):
        self.sock.sendall(struct.pack(">iB", len(payload) + 1, op & 0xFF) + payload)

    def recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def recv_frame(self):
        length, op = struct.unpack(">iB", self.recv_exact(5))
        return op, cbor2.loads(self.recv_exact(length - 1))

    def handshake(self):
        assert self.recv_exact(1) == b"\x01"
        return self.recv_frame()

    def closed(self):
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self):
        self.sock.close()


# --- operations ------------------------------------------------------------------------


def test_create_describe_list_delete(sm):
    assert sm.list_streams() == []
    sm.create_message_stream(definition("s1"))
    sm.create_message_stream(definition("with space, comma.dot-dash_", persistence=Persistence.Memory))
    assert sm.list_streams() == ["s1", "with space, comma.dot-dash_"]
    info = sm.describe_message_stream("s1")
    d = info.definition
    assert d.name == "s1"
    assert d.max_size == 268435456
    assert d.stream_segment_size == 16777216
    assert d.strategy_on_full == StrategyOnFull.OverwriteOldestData
    assert d.persistence == Persistence.File
    assert d.flush_on_write is False
    assert d.time_to_live_millis is None
    s = info.storage_status
    assert (s.oldest_sequence_number, s.newest_sequence_number, s.total_bytes) == (0, -1, 0)
    assert info.export_statuses == [] or info.export_statuses is None
    with pytest.raises(InvalidRequestException, match="already exists"):
        sm.create_message_stream(definition("s1"))
    sm.delete_message_stream("s1")
    assert sm.list_streams() == ["with space, comma.dot-dash_"]
    for call in (
        lambda: sm.delete_message_stream("s1"),
        lambda: sm.describe_message_stream("s1"),
        lambda: sm.append_message("s1", b"x"),
        lambda: sm.read_messages("s1"),
        lambda: sm.update_message_stream(definition("s1")),
    ):
        with pytest.raises(ResourceNotFoundException, match="s1"):
            call()
    # Recreating a deleted stream starts from sequence number 0 again.
    sm.create_message_stream(definition("s1"))
    assert sm.append_message("s1", b"again") == 0


def test_append_and_read_with_options(sm):
    sm.create_message_stream(definition("r"))
    seqs = [sm.append_message("r", f"m{i}".encode()) for i in range(10)]
    assert seqs == list(range(10))
    # Default options: one message from the start.
    [first] = sm.read_messages("r")
    assert (first.stream_name, first.sequence_number, first.payload) == ("r", 0, b"m0")
    assert abs(first.ingest_time - time.time() * 1000) < 60_000
    got = sm.read_messages("r", ReadMessagesOptions(desired_start_sequence_number=3,
                                                     min_message_count=2, max_message_count=4))
    assert [(m.sequence_number, m.payload) for m in got] == [(i, f"m{i}".encode()) for i in range(3, 7)]
    # Fewer than max available: everything available is returned.
    got = sm.read_messages("r", ReadMessagesOptions(desired_start_sequence_number=8, max_message_count=100))
    assert [m.sequence_number for m in got] == [8, 9]
    with pytest.raises(NotEnoughMessagesException):
        sm.read_messages("r", ReadMessagesOptions(desired_start_sequence_number=8, min_message_count=3,
                                                  max_message_count=5))
    with pytest.raises(NotEnoughMessagesException):
        sm.read_messages("r", ReadMessagesOptions(desired_start_sequence_number=10))
    info = sm.describe_message_stream("r").storage_status
    assert (info.oldest_sequence_number, info.newest_sequence_number) == (0, 9)
    assert info.total_bytes == sum(24 + len(f"m{i}") for i in range(10))


def test_client_side_validation_still_applies(sm):
    sm.create_message_stream(definition("v"))
    with pytest.raises(ValidationException):
        sm.read_messages("v", ReadMessagesOptions(min_message_count=5, max_message_count=2))
    with pytest.raises(ValidationException):
        sm.create_message_stream(MessageStreamDefinition(name="no-strategy"))


def test_long_poll_returns_as_soon_as_enough_messages_arrive(sm, mooring):
    sm.create_message_stream(definition("lp"))
    writer = client_for(mooring)

    def append_later():
        time.sleep(0.5)
        for i in range(3):
            writer.append_message("lp", f"late{i}".encode())
            time.sleep(0.1)

    t = threading.Thread(target=append_later)
    started = time.monotonic()
    t.start()
    got = sm.read_messages("lp", ReadMessagesOptions(min_message_count=3, max_message_count=10,
                                                      read_timeout_millis=10_000))
    took = time.monotonic() - started
    t.join()
    writer.close()
    assert [m.payload for m in got] == [b"late0", b"late1", b"late2"]
    assert 0.5 <= took < 5, took

    # Not enough before the timeout: NotEnoughMessages after roughly the timeout.
    started = time.monotonic()
    with pytest.raises(NotEnoughMessagesException):
        sm.read_messages("lp", ReadMessagesOptions(desired_start_sequence_number=3,
                                                   read_timeout_millis=800))
    took = time.monotonic() - started
    assert 0.7 <= took < 5, took


def test_blocked_read_does_not_block_appends_on_the_same_connection(sm):
    """One client = one socket: the append's response overtakes the pending read's."""
    sm.create_message_stream(definition("same"))
    result = {}

    def reader():
        result["messages"] = sm.read_messages(
            "same", ReadMessagesOptions(min_message_count=2, max_message_count=2, read_timeout_millis=20_000))
        result["read_done"] = time.monotonic()

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    assert sm.append_message("same", b"one") == 0
    first_ack = time.monotonic()
    assert "read_done" not in result
    assert sm.append_message("same", b"two") == 1
    t.join(10)
    assert [m.payload for m in result["messages"]] == [b"one", b"two"]
    assert result["read_done"] >= first_ack


def test_deleting_a_stream_ends_blocked_reads(sm, mooring):
    sm.create_message_stream(definition("gone"))
    other = client_for(mooring)
    errors = []

    def reader():
        try:
            sm.read_messages("gone", ReadMessagesOptions(read_timeout_millis=20_000))
        except Exception as e:  # noqa: BLE001 - asserting the type below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    other.delete_message_stream("gone")
    t.join(10)
    other.close()
    assert len(errors) == 1 and isinstance(errors[0], ResourceNotFoundException), errors


def test_concurrent_appends_from_many_clients_get_unique_sequence_numbers(mooring):
    admin = client_for(mooring)
    admin.create_message_stream(definition("c", flush_on_write=True))
    acked = {}
    lock = threading.Lock()

    def worker(w):
        c = client_for(mooring)
        for i in range(40):
            payload = f"{w}:{i}".encode()
            seq = c.append_message("c", payload)
            with lock:
                acked[seq] = payload
        c.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(acked) == list(range(320))
    for m in read_all(admin, "c"):
        assert acked[m.sequence_number] == m.payload
    admin.close()


def test_size_limits_and_strategies(sm):
    sm.create_message_stream(definition("reject", max_size=2048, stream_segment_size=1024,
                                        strategy_on_full=StrategyOnFull.RejectNewData))
    accepted = 0
    with pytest.raises(InvalidRequestException, match="full"):
        while True:
            sm.append_message("reject", b"x" * 100)
            accepted += 1
    assert accepted == 2048 // 124
    with pytest.raises(RequestPayloadTooLargeException):
        sm.append_message("reject", b"y" * 4096)

    sm.create_message_stream(definition("over", max_size=2048, stream_segment_size=1024))
    for i in range(100):
        assert sm.append_message("over", bytes([i]) * 100) == i
    status = sm.describe_message_stream("over").storage_status
    assert status.newest_sequence_number == 99
    assert status.oldest_sequence_number > 80
    assert status.total_bytes <= 2048
    # Reading from before the oldest message starts at the oldest.
    got = sm.read_messages("over", ReadMessagesOptions(desired_start_sequence_number=0, max_message_count=100))
    assert got[0].sequence_number == status.oldest_sequence_number
    assert [m.sequence_number for m in got] == list(range(status.oldest_sequence_number, 100))
    assert all(m.payload == bytes([m.sequence_number]) * 100 for m in got)


def test_update_rules(sm):
    sm.create_message_stream(definition("u", max_size=4096, strategy_on_full=StrategyOnFull.RejectNewData))
    for _ in range(20):
        sm.append_message("u", b"z" * 100)
    with pytest.raises(UpdateNotAllowedException):
        sm.update_message_stream(definition("u", max_size=4096, persistence=Persistence.Memory,
                                            strategy_on_full=StrategyOnFull.RejectNewData))
    with pytest.raises(UpdateFailedException, match="maxSize"):
        sm.update_message_stream(definition("u", max_size=1024, strategy_on_full=StrategyOnFull.RejectNewData))
    sm.update_message_stream(definition("u", max_size=1 << 20, time_to_live_millis=3_600_000,
                                        flush_on_write=True, strategy_on_full=StrategyOnFull.RejectNewData))
    d = sm.describe_message_stream("u").definition
    assert (d.max_size, d.time_to_live_millis, d.flush_on_write) == (1 << 20, 3_600_000, True)
    assert sm.append_message("u", b"after update") == 20
    # Omitted fields revert to defaults; switching to overwrite with a small maxSize trims.
    sm.update_message_stream(definition("u", max_size=1024))
    info = sm.describe_message_stream("u")
    assert info.definition.time_to_live_millis is None
    assert info.definition.flush_on_write is False
    assert info.storage_status.total_bytes <= 1024
    assert info.storage_status.newest_sequence_number == 20


def test_file_streams_survive_restart_and_memory_streams_do_not(mooring):
    c = client_for(mooring)
    c.create_message_stream(definition("file"))
    c.create_message_stream(definition("mem", persistence=Persistence.Memory))
    for i in range(5):
        c.append_message("file", f"f{i}".encode())
        c.append_message("mem", f"m{i}".encode())
    c.close()
    mooring.restart()
    c = client_for(mooring)
    assert sorted(c.list_streams()) == ["file", "mem"]
    assert [m.payload for m in read_all(c, "file")] == [f"f{i}".encode() for i in range(5)]
    assert c.append_message("file", b"next") == 5
    mem = c.describe_message_stream("mem")
    assert mem.definition.persistence == Persistence.Memory
    assert mem.storage_status.newest_sequence_number == -1
    c.close()


@pytest.mark.parametrize("flush_on_write", [True, False], ids=["flushOnWrite", "page-cache"])
def test_sigkill_right_after_acks_loses_nothing(mooring, flush_on_write):
    # Without flushOnWrite an acknowledged record is in the page cache, which outlives the
    # process: written with pwrite, or (a busy stream's 64 KiB segments fill in well under the
    # spare threshold) copied into a mapped spare segment.
    admin = client_for(mooring)
    admin.create_message_stream(definition("crash", flush_on_write=flush_on_write,
                                           stream_segment_size=64 * 1024))
    admin.close()
    acked = {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w):
        c = client_for(mooring, request_timeout=5)
        i = 0
        while not stop.is_set():
            payload = f"writer {w} message {i} ".encode() * 8
            try:
                seq = c.append_message("crash", payload)
            except Exception:  # noqa: BLE001 - the server is being killed
                return
            with lock:
                acked[seq] = payload
            i += 1

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    mooring.kill()
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) > 50, len(acked)
    mooring.start()
    c = client_for(mooring)
    stored = {m.sequence_number: m.payload for m in read_all(c, "crash")}
    missing = [seq for seq in acked if stored.get(seq) != acked[seq]]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    # Sequence numbers continue after the newest stored message, never reused.
    newest = c.describe_message_stream("crash").storage_status.newest_sequence_number
    assert newest >= max(acked)
    assert c.append_message("crash", b"after restart") == newest + 1
    c.close()


def test_torn_tail_is_truncated_on_restart(mooring):
    c = client_for(mooring)
    c.create_message_stream(definition("torn"))
    for i in range(10):
        c.append_message("torn", f"record {i}".encode() * 10)
    c.close()
    mooring.stop()
    seg_dir = mooring.data_dir / "streams" / b"torn".hex()
    segments = sorted(seg_dir.glob("*.seg"))
    assert segments and segments[-1].name == "00000000000000000000.seg"
    last = segments[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:
        f.truncate(size - 30)  # cut the last record in the middle of its payload
    mooring.start()
    c = client_for(mooring)
    got = read_all(c, "torn")
    assert [m.payload for m in got] == [f"record {i}".encode() * 10 for i in range(9)]
    status = c.describe_message_stream("torn").storage_status
    assert status.newest_sequence_number == 8
    assert c.append_message("torn", b"fresh") == 9
    assert last.stat().st_size == status.total_bytes + 24 + len(b"fresh")
    c.close()


# --- protocol details the SDK cannot produce ----------------------------------------------


JAVA_CONNECT = bytes.fromhex(
    "010000008f01bf69726571756573744964782431356630623238352d62646164"
    "2d343037632d623738322d3136656263383230303463336f70726f746f636f6c"
    "56657273696f6e65312e312e30781e6f74686572537570706f7274656450726f"
    "746f636f6c56657273696f6e738165312e302e306a73646b56657273696f6e65"
    "312e312e306961757468546f6b656e63746f6bff")
JAVA_APPEND = bytes.fromhex(
    "0000005104bf69726571756573744964782432616234343730662d633963662d"
    "343032312d386633622d323633306530353337636161646e616d656a54657374"
    "53747265616d677061796c6f61644568656c6c6fff")
NODE_CONNECT = bytes.fromhex(
    "010000005c01a46972657175657374496461206f70726f746f636f6c56657273696f6e65312e312e30781e6f746865"
    "72537570706f7274656450726f746f636f6c56657273696f6e738165312e302e306a73646b56657273696f6e65312e"
    "312e30")
NODE_APPEND = bytes.fromhex(
    "0000002404a3697265717565737449646120646e616d65627331677061796c6f61644568656c6c6f")


def raw(m):
    s = socket.create_connection(("127.0.0.1", sm_port(m)), timeout=10)
    conn = RawConnection.__new__(RawConnection)
    conn.sock = s
    return conn


def test_java_sdk_frames_replayed_byte_for_byte(sm, mooring):
    sm.create_message_stream(definition("TestStream"))
    conn = raw(mooring)
    # Header and payload split across writes, as the SDKs do.
    conn.sock.sendall(JAVA_CONNECT[:1])
    time.sleep(0.05)
    conn.sock.sendall(JAVA_CONNECT[1:6])
    time.sleep(0.05)
    conn.sock.sendall(JAVA_CONNECT[6:])
    op, resp = conn.handshake()
    assert op == 6
    assert resp["status"] == 0
    assert resp["requestId"] == "15f0b285-bdad-407c-b782-16ebc82004c3"
    assert resp["protocolVersion"] == "1.1.0"
    assert resp["supportedProtocolVersions"] == ["1.0.0", "1.1.0"]
    assert resp["clientIdentifier"]
    conn.sock.sendall(JAVA_APPEND)
    op, resp = conn.recv_frame()
    assert op == 9
    assert resp == {"requestId": "2ab4470f-c9cf-4021-8f3b-2630e0537caa", "status": 0, "sequenceNumber": 0}
    conn.close()
    assert sm.read_messages("TestStream")[0].payload == b"hello"


def test_node_sdk_duplicate_request_ids_are_fine(sm, mooring):
    sm.create_message_stream(definition("s1"))
    conn = raw(mooring)
    conn.sock.sendall(NODE_CONNECT)
    op, resp = conn.handshake()
    assert (op, resp["status"], resp["requestId"]) == (6, 0, " ")
    conn.sock.sendall(NODE_APPEND + NODE_APPEND)
    responses = [conn.recv_frame(), conn.recv_frame()]
    assert sorted(r["sequenceNumber"] for _, r in responses) == [0, 1]
    assert all(op == 9 and r["requestId"] == " " for op, r in responses)
    conn.close()


def test_unknown_operation_and_bad_payloads(mooring):
    conn = RawConnection(mooring)
    op, resp = conn.handshake()
    assert resp["status"] == 0
    conn.send(42, cbor2.dumps({"requestId": "x"}))
    op, resp = conn.recv_frame()
    assert op == 17
    assert resp["requestId"] == "x" and resp["status"] == 18 and resp["errorMessage"]
    # A response code sent as a request is unknown too.
    conn.send(9, cbor2.dumps({"requestId": "y"}))
    assert conn.recv_frame()[0] == 17
    # Wrong types and server-side validation: InvalidRequest on the operation's response.
    conn.send(4, cbor2.dumps({"requestId": "a", "name": 7, "payload": b"x"}))
    op, resp = conn.recv_frame()
    assert (op, resp["requestId"], resp["status"]) == (9, "a", 3)
    conn.send(2, cbor2.dumps({"requestId": "b", "definition": {"name": "tiny", "maxSize": 10,
                                                                 "strategyOnFull": 0}}))
    op, resp = conn.recv_frame()
    assert (op, resp["status"]) == (7, 3) and "maxSize" in resp["errorMessage"]
    conn.send(2, cbor2.dumps({"requestId": "c", "definition": {"name": "bad/name", "strategyOnFull": 0}}))
    op, resp = conn.recv_frame()
    assert (op, resp["status"]) == (7, 3) and "name" in resp["errorMessage"]
    conn.send(5, cbor2.dumps({"requestId": "d", "streamName": "nope",
                              "readMessagesOptions": {"minMessageCount": 5, "maxMessageCount": 1}}))
    op, resp = conn.recv_frame()
    assert (op, resp["status"]) == (10, 3)
    # Null is treated as absent; unknown keys are ignored.
    conn.send(2, cbor2.dumps({"requestId": "e", "future": 1, "definition": {
        "name": "nulls", "strategyOnFull": 1, "timeToLiveMillis": None, "exportDefinition": None}}))
    op, resp = conn.recv_frame()
    assert (op, resp["status"]) == (7, 0), resp
    conn.send(4, cbor2.dumps({"requestId": "f", "name": "nulls", "payload": b""}))
    op, resp = conn.recv_frame()
    assert (op, resp["status"]) == (9, 3)
    # Undecodable payload without a request id: the connection is closed, the server lives on.
    conn.send(4, b"\xff\xfe")
    assert conn.closed()
    c = client_for(mooring)
    assert "nulls" in c.list_streams()
    c.close()


def test_handshake_refusals(mooring):
    conn = RawConnection(mooring, version_byte=2)
    op, resp = conn.handshake()
    assert (op, resp["status"]) == (6, 8)
    assert conn.closed()
    conn = RawConnection(mooring, op=11)
    op, resp = conn.handshake()
    assert (op, resp["status"]) == (6, 9)
    conn = RawConnection(mooring, connect={"requestId": "v", "protocolVersion": "banana"})
    assert conn.handshake()[1]["status"] == 11
    conn = RawConnection(mooring, connect={"requestId": "v", "protocolVersion": "9.9.9"})
    assert conn.handshake()[1]["status"] == 10
    # An oversized length field closes the connection.
    conn = RawConnection(mooring)
    assert conn.handshake()[1]["status"] == 0
    conn.sock.sendall(struct.pack(">i", (1 << 30) + 1))
    assert conn.closed()


def test_auth_token_is_checked_when_required(mooring_factory, monkeypatch):
    m = mooring_factory(extra_args=["--set", "stream_manager.require_auth=true",
                                    "--set", "stream_manager.auth_token=s3cret"])
    monkeypatch.delenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", raising=False)
    with pytest.raises(ConnectFailedException):
        client_for(m)
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "wrong")
    with pytest.raises(ConnectFailedException):
        client_for(m)
    # Java sends "" when the variable is unset: treated as missing.
    conn = RawConnection(m, connect={"requestId": "j", "protocolVersion": "1.1.0", "authToken": ""})
    assert conn.handshake()[1]["status"] == 2
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "s3cret")
    c = client_for(m)
    assert c.list_streams() == []
    c.close()


def test_auth_is_off_by_default(mooring, monkeypatch):
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "anything")
    c = client_for(mooring)
    assert c.list_streams() == []
    c.close()


def test_sdk_honours_the_port_environment_variable(mooring, monkeypatch):
    monkeypatch.setenv("STREAM_MANAGER_SERVER_PORT", str(sm_port(mooring)))
    c = StreamManagerClient()
    assert c.list_streams() == []
    c.close()


# --- exports -------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto():
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def export_args(moto_url=None, s3=False):
    args = ["--set", "streams.retry_initial_millis=200", "--set", "streams.retry_max_millis=1000",
            "--set", "streams.access_key_id=testing", "--set", "streams.secret_access_key=testing",
            "--set", "streams.region=us-east-1"]
    if moto_url:
        args += ["--set", f"streams.kinesis_endpoint={moto_url}"]
    if moto_url and s3:
        args += ["--set", f"streams.s3_endpoint={moto_url}"]
    return args


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kinesis_records(kinesis, name):
    shard = kinesis.describe_stream(StreamName=name)["StreamDescription"]["Shards"][0]["ShardId"]
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard,
                                    ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    out = []
    while True:
        resp = kinesis.get_records(ShardIterator=it, Limit=1000)
        out.extend(resp["Records"])
        if not resp["Records"]:
            return out
        it = resp["NextShardIterator"]


def test_kinesis_export_against_moto(mooring_factory, moto, tmp_path):
    kinesis = boto3.client("kinesis", endpoint_url=moto, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
    kinesis.create_stream(StreamName="ks", ShardCount=1)
    m = mooring_factory(extra_args=export_args(moto))
    c = client_for(m)
    c.create_message_stream(definition("to-kinesis", export_definition=ExportDefinition(
        kinesis=[KinesisConfig(identifier="k1", kinesis_stream_name="ks", batch_size=10)])))
    payloads = [f"reading {i}".encode() for i in range(25)]
    for p in payloads:
        c.append_message("to-kinesis", p)

    def exported():
        [status] = c.describe_message_stream("to-kinesis").export_statuses
        return status if status.last_exported_sequence_number == 24 else None

    status = wait_for(exported, what="kinesis export")
    assert status.export_config_identifier == "k1"
    assert status.exported_messages_count == 25
    assert status.exported_bytes_from_stream == sum(len(p) for p in payloads)
    assert status.error_message is None
    assert status.last_export_time > 0
    records = kinesis_records(kinesis, "ks")
    assert [r["Data"] for r in records] == payloads
    keys = [r["PartitionKey"] for r in records]
    assert len(set(keys)) == 25 and all(len(k) == 36 and k.count("-") == 4 for k in keys)

    # The checkpoint is persisted: after a restart nothing is sent twice, new data follows.
    c.close()
    m.restart()
    c = client_for(m)
    c.append_message("to-kinesis", b"after restart")
    wait_for(lambda: c.describe_message_stream("to-kinesis").export_statuses[0]
             .last_exported_sequence_number == 25, what="export after restart")
    assert [r["Data"] for r in kinesis_records(kinesis, "ks")] == payloads + [b"after restart"]
    c.close()


def test_kinesis_export_to_missing_stream_retries_and_reports(mooring_factory, moto):
    kinesis = boto3.client("kinesis", endpoint_url=moto, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
    m = mooring_factory(extra_args=export_args(moto))
    c = client_for(m)
    c.create_message_stream(definition("late", export_definition=ExportDefinition(
        kinesis=[KinesisConfig(identifier="k", kinesis_stream_name="not-yet")])))
    c.append_message("late", b"waiting")
    status = wait_for(lambda: c.describe_message_stream("late").export_statuses[0].error_message,
                      what="an export error")
    assert "ResourceNotFound" in status or "not-yet" in status, status
    assert c.describe_message_stream("late").export_statuses[0].last_exported_sequence_number == -1
    kinesis.create_stream(StreamName="not-yet", ShardCount=1)
    wait_for(lambda: c.describe_message_stream("late").export_statuses[0]
             .last_exported_sequence_number == 0, what="the retry to succeed")
    assert [r["Data"] for r in kinesis_records(kinesis, "not-yet")] == [b"waiting"]
    assert c.describe_message_stream("late").export_statuses[0].error_message is None
    c.close()


class Capture(http.server.BaseHTTPRequestHandler):
    """Records POSTs; fails the first `failures` of them with 503."""

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        with server.lock:
            server.attempts += 1
            fail = server.attempts <= server.failures
            if not fail:
                server.bodies.append((self.headers["Content-Type"], body))
        self.send_response(503 if fail else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def capture():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    server.lock = threading.Lock()
    server.attempts = 0
    server.failures = 0
    server.bodies = []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()


def test_http_export_backs_off_and_resumes_without_gaps(mooring_factory, capture):
    import json

    capture.failures = 3
    m = mooring_factory(extra_args=export_args())
    c = client_for(m)
    uri = f"http://127.0.0.1:{capture.server_address[1]}/ingest"
    c.create_message_stream(definition("h", export_definition=ExportDefinition(http=[
        HTTPConfig(identifier="raw", uri=uri, batch_size=5),
    ])))
    for i in range(12):
        c.append_message("h", f"h{i}".encode())
    wait_for(lambda: c.describe_message_stream("h").export_statuses[0].last_exported_sequence_number == 11,
             what="http export")
    assert capture.attempts >= 3 + 12
    raw_bodies = [b for ct, b in capture.bodies if ct == "application/octet-stream"]
    assert raw_bodies == [f"h{i}".encode() for i in range(12)]
    status = c.describe_message_stream("h").export_statuses[0]
    assert status.exported_messages_count == 12 and status.error_message is None

    # JSON_BATCHED, disabled and re-enabled through UpdateMessageStream.
    capture.bodies.clear()
    c.update_message_stream(definition("h", export_definition=ExportDefinition(http=[
        HTTPConfig(identifier="raw", uri=uri, batch_size=5),
        HTTPConfig(identifier="json", uri=uri, batch_size=20, export_format=ExportFormat.JSON_BATCHED,
                   disabled=True, start_sequence_number=10),
    ])))
    time.sleep(1.0)
    assert capture.bodies == []
    statuses = {s.export_config_identifier: s for s in c.describe_message_stream("h").export_statuses}
    assert statuses["json"].last_exported_sequence_number == 9
    c.update_message_stream(definition("h", export_definition=ExportDefinition(http=[
        HTTPConfig(identifier="raw", uri=uri, batch_size=5),
        HTTPConfig(identifier="json", uri=uri, batch_size=20, export_format=ExportFormat.JSON_BATCHED,
                   start_sequence_number=10),
    ])))
    wait_for(lambda: capture.bodies, what="json batch")
    ct, body = capture.bodies[0]
    assert ct == "application/json"
    batch = json.loads(body)
    assert [(e["streamName"], e["sequenceNumber"]) for e in batch] == [("h", 10), ("h", 11)]
    import base64
    assert [base64.b64decode(e["payload"]) for e in batch] == [b"h10", b"h11"]
    assert all(e["ingestTime"] > 0 for e in batch)
    c.close()


def test_s3_export_tasks_against_moto(mooring_factory, moto, tmp_path):
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="export-bucket")
    m = mooring_factory(extra_args=export_args(moto, s3=True))
    c = client_for(m)
    c.create_message_stream(definition("statuses", persistence=Persistence.Memory))
    c.create_message_stream(definition("files", export_definition=ExportDefinition(
        s3_task_executor=[S3ExportTaskExecutorConfig(
            identifier="s3",
            size_threshold_for_multipart_upload_bytes=5 * 1024 * 1024,
            status_config=StatusConfig(status_level=StatusLevel.INFO, status_stream_name="statuses"),
        )])))
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello from the edge\n")
    large = tmp_path / "large.bin"
    large_bytes = os.urandom(6 * 1024 * 1024 + 123)
    large.write_bytes(large_bytes)
    tasks = [
        S3ExportTaskDefinition(input_url=f"file://{small}", bucket="export-bucket",
                               key="logs/!{timestamp:yyyy}/!{timestamp:MM}/small.txt",
                               user_metadata={"device": "pump-7"}),
        S3ExportTaskDefinition(input_url=f"file:{large}", bucket="export-bucket", key="big/large.bin"),
        S3ExportTaskDefinition(input_url=f"file://{tmp_path}/missing.txt", bucket="export-bucket", key="x"),
        S3ExportTaskDefinition(input_url=f"file://{small}", bucket="no-such-bucket", key="y"),
    ]
    for task in tasks:
        c.append_message("files", Util.validate_and_serialize_to_json_bytes(task))

    wait_for(lambda: c.describe_message_stream("files").export_statuses[0]
             .last_exported_sequence_number == 3, timeout=60, what="all S3 tasks")
    status = c.describe_message_stream("files").export_statuses[0]
    assert status.exported_messages_count == 2
    assert "no-such-bucket" in (status.error_message or "") or "NoSuchBucket" in (status.error_message or "")

    year, month = time.strftime("%Y %m", time.gmtime()).split()
    obj = s3.get_object(Bucket="export-bucket", Key=f"logs/{year}/{month}/small.txt")
    assert obj["Body"].read() == b"hello from the edge\n"
    assert obj["Metadata"] == {"device": "pump-7"}
    big = s3.get_object(Bucket="export-bucket", Key="big/large.bin")
    assert big["Body"].read() == large_bytes
    assert "-" in big["ETag"], "expected a multipart upload ETag"

    messages = [Util.deserialize_json_bytes_to_obj(m.payload, StatusMessage) for m in read_all(c, "statuses")]
    by_task = {}
    for msg in messages:
        assert msg.status_context.stream_name == "files"
        assert msg.status_context.export_identifier == "s3"
        by_task.setdefault(msg.status_context.sequence_number, []).append(msg.status)
    assert by_task[0] == [Status.InProgress, Status.Success]
    assert by_task[1] == [Status.InProgress, Status.Success]
    assert by_task[2] == [Status.InProgress, Status.Failure]
    assert by_task[3] == [Status.InProgress, Status.Failure]
    first = messages[0]
    assert first.status_context.s3_export_task_definition.bucket == "export-bucket"
    assert first.timestamp_epoch_ms > 0
    c.close()


# --- IoT Analytics and IoT SiteWise exports ---------------------------------------------
# moto implements neither BatchPutMessage nor BatchPutAssetPropertyValue, so these exports
# go to a capture server that records every request and answers what the test scripts.
# SiteWise requests are checked against botocore's service model (method, path, SigV4 scope,
# body members). botocore no longer ships an iotanalytics model, so BatchPutMessage is checked
# against the explicit wire description below instead.

import base64
import json
import re

import botocore.session
from botocore.validate import ParamValidator
from stream_manager import (
    AssetPropertyValue,
    IoTAnalyticsConfig,
    IoTSiteWiseConfig,
    PutAssetPropertyValueEntry,
    Quality,
    TimeInNanos,
    Variant,
)

BOTOCORE = botocore.session.get_session()


class AwsCapture(http.server.BaseHTTPRequestHandler):
    """Records restJson requests (header names lower-cased: HTTP header names are
    case-insensitive and hyper sends them in lower case); `server.respond(path, body)` gives
    (status, json), recorded with the request as `answer`."""

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        parsed = json.loads(body)
        headers = {name.lower(): value for name, value in self.headers.items()}
        with server.lock:
            status, answer = server.respond(self.path, parsed)
            server.requests.append({"method": self.command, "path": self.path, "headers": headers,
                                    "body": parsed, "answer": (status, answer)})
        if server.delay:
            time.sleep(server.delay)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def aws_capture():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AwsCapture)
    server.lock = threading.Lock()
    server.requests = []
    server.delay = 0
    server.respond = lambda path, body: (200, {})
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()


def check_signature(request, signing_name):
    """A SigV4 header-signed request with the exporter's test credentials and region."""
    auth = request["headers"].get("authorization", "")
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=testing/"), auth
    assert f"/us-east-1/{signing_name}/aws4_request" in auth, auth
    assert re.search(r", SignedHeaders=[a-z0-9;-]*\bhost\b[a-z0-9;-]*, Signature=[0-9a-f]{64}$", auth), auth
    assert re.fullmatch(r"\d{8}T\d{6}Z", request["headers"]["x-amz-date"])


def check_against_model(request, service, operation):
    """The request is exactly what botocore would send for `operation`."""
    model = BOTOCORE.get_service_model(service).operation_model(operation)
    assert request["method"] == model.http["method"] == "POST"
    assert request["path"] == model.http["requestUri"]
    assert request["headers"]["content-type"] == "application/json"
    check_signature(request, BOTOCORE.get_service_model(service).signing_name)
    report = ParamValidator().validate(request["body"], model.input_shape)
    assert not report.has_errors(), report.generate_report()
    status, answer = request["answer"]
    if status == 200:  # what the test scripted is something the service could answer
        report = ParamValidator().validate(answer, model.output_shape)
        assert not report.has_errors(), report.generate_report()


# IoT Analytics BatchPutMessage on the wire, as the aws-sdk-iotanalytics crate the exporter
# uses writes and reads it (operation/batch_put_message.rs: POST /messages/batch,
# application/json, SigV4 name "iotanalytics"; protocol_serde/shape_message.rs: messageId
# string, payload base64 blob; shape_batch_put_message*.rs: batchPutMessageErrorEntries with
# messageId, errorCode, errorMessage), with the API's limits from spec §9.4.
IOTANALYTICS_BATCH_PUT_MESSAGE = {
    "method": "POST",
    "path": "/messages/batch",
    "content_type": "application/json",
    "signing_name": "iotanalytics",
    "channel_name": re.compile(r"(?!__)[a-zA-Z0-9_]{1,128}"),
    "messages": (1, 100),
    "message_members": {"messageId", "payload"},
    "message_id": re.compile(r"[\x00-\x7f]{1,128}"),
    "response_members": {"batchPutMessageErrorEntries"},
    "error_entry_members": {"messageId", "errorCode", "errorMessage"},
}


def is_canonical_base64(value):
    """A blob member as the AWS SDKs write it: standard alphabet, padded."""
    if not isinstance(value, str):
        return False
    try:
        return base64.b64encode(base64.b64decode(value, validate=True)).decode() == value
    except ValueError:
        return False


def check_batch_put_message(request):
    """The request (and the answer the test scripted) match IoT Analytics BatchPutMessage
    exactly: every member present is known and well-formed, every required one is there."""
    shape = IOTANALYTICS_BATCH_PUT_MESSAGE
    assert request["method"] == shape["method"]
    assert request["path"] == shape["path"]
    assert request["headers"]["content-type"] == shape["content_type"]
    check_signature(request, shape["signing_name"])
    body = request["body"]
    assert set(body) == {"channelName", "messages"}, body.keys()
    assert isinstance(body["channelName"], str) and shape["channel_name"].fullmatch(body["channelName"])
    messages = body["messages"]
    low, high = shape["messages"]
    assert isinstance(messages, list) and low <= len(messages) <= high, len(messages)
    for message in messages:
        assert isinstance(message, dict) and set(message) == shape["message_members"], message
        assert isinstance(message["messageId"], str) and shape["message_id"].fullmatch(message["messageId"])
        assert is_canonical_base64(message["payload"]), message["payload"]
    ids = [m["messageId"] for m in messages]
    assert len(set(ids)) == len(ids), f"message ids must be unique within a batch: {ids}"
    status, answer = request["answer"]
    if status == 200:
        assert set(answer) <= shape["response_members"], answer
        for entry in answer.get("batchPutMessageErrorEntries", []):
            assert set(entry) <= shape["error_entry_members"] and entry["messageId"] in ids, entry
            assert all(isinstance(v, str) for v in entry.values()), entry


def test_batch_put_message_description_refuses_what_the_service_would():
    """The explicit IoT Analytics description is strict: each wrong shape fails it."""
    auth = ("AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iotanalytics/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-date, Signature=" + "0" * 64)

    def request(**changes):
        r = {"method": "POST", "path": "/messages/batch",
             "headers": {"content-type": "application/json", "authorization": auth,
                         "x-amz-date": "20260101T000000Z"},
             "body": {"channelName": "ch_1", "messages": [{"messageId": "a1", "payload": "eyJ4IjoxfQ=="}]},
             "answer": (200, {"batchPutMessageErrorEntries": []})}
        for key, value in changes.items():
            r[key] = value
        return r

    check_batch_put_message(request())
    wrong = [
        request(path="/messages"),
        request(method="PUT"),
        request(headers={"content-type": "application/json", "x-amz-date": "20260101T000000Z"}),
        request(headers={"content-type": "application/json", "x-amz-date": "20260101T000000Z",
                         "authorization": auth.replace("iotanalytics", "iotsitewise")}),
        request(body={"channelName": "__ch", "messages": [{"messageId": "a", "payload": "AA=="}]}),
        request(body={"channelName": "ch", "messages": []}),
        request(body={"channelName": "ch", "messages": [{"messageId": "a", "payload": "AA=="}] * 2}),
        request(body={"channelName": "ch", "messages": [{"messageId": "a", "payload": "not base64!"}]}),
        request(body={"channelName": "ch", "messages": [{"messageId": "", "payload": "AA=="}]}),
        request(body={"channelName": "ch", "messages": [{"messageId": "a", "payload": {"x": 1}}]}),
        request(body={"channelName": "ch", "messages": [{"id": "a", "payload": "AA=="}]}),
        request(body={"channel": "ch", "messages": [{"messageId": "a", "payload": "AA=="}]}),
        request(answer=(200, {"errorEntries": []})),
        request(answer=(200, {"batchPutMessageErrorEntries": [{"messageId": "zz", "errorCode": "x"}]})),
    ]
    for r in wrong:
        with pytest.raises(AssertionError):
            check_batch_put_message(r)


def iot_args(capture):
    url = f"http://127.0.0.1:{capture.server_address[1]}"
    return export_args() + ["--set", f"streams.iotanalytics_endpoint={url}",
                            "--set", f"streams.iotsitewise_endpoint={url}"]


def test_iot_analytics_export_against_capture_server(mooring_factory, aws_capture):
    failed_once = set()

    def respond(path, body):
        errors = []
        for m in body["messages"]:
            if m["messageId"] == "gw-2":  # rejected for good: skipped, never resent
                errors.append({"messageId": "gw-2", "errorCode": "InvalidRequestException",
                               "errorMessage": "payload is not valid"})
            elif m["messageId"] == "gw-7" and "gw-7" not in failed_once:  # transient
                failed_once.add("gw-7")
                errors.append({"messageId": "gw-7", "errorCode": "ServiceUnavailableException",
                               "errorMessage": "try again"})
        return 200, {"batchPutMessageErrorEntries": errors}

    aws_capture.respond = respond
    m = mooring_factory(extra_args=iot_args(aws_capture))
    c = client_for(m)
    config = dict(identifier="ita", iot_channel="plant_channel", iot_msg_id_prefix="gw-", batch_size=10)
    c.create_message_stream(definition("to-ita", export_definition=ExportDefinition(
        iot_analytics=[IoTAnalyticsConfig(disabled=True, **config)])))
    payloads = [json.dumps({"reading": i}).encode() for i in range(12)]
    for p in payloads:
        c.append_message("to-ita", p)
    c.update_message_stream(definition("to-ita", export_definition=ExportDefinition(
        iot_analytics=[IoTAnalyticsConfig(**config)])))

    wait_for(lambda: c.describe_message_stream("to-ita").export_statuses[0]
             .last_exported_sequence_number == 11, what="IoT Analytics export")
    requests = list(aws_capture.requests)
    for r in requests:
        check_batch_put_message(r)
        assert r["body"]["channelName"] == "plant_channel"
    # First call: messages 0-9 in order, ids are the prefix and the sequence number.
    first = requests[0]["body"]["messages"]
    assert [msg["messageId"] for msg in first] == [f"gw-{i}" for i in range(10)]
    assert [base64.b64decode(msg["payload"]) for msg in first] == payloads[:10]
    # The transient failure of 7 resends from 7 on; 2 is never resent.
    second = requests[1]["body"]["messages"]
    assert [msg["messageId"] for msg in second] == [f"gw-{i}" for i in range(7, 12)]
    assert len(requests) == 2
    status = c.describe_message_stream("to-ita").export_statuses[0]
    # 12 messages, one rejected for good; 7, 8 and 9 count once (delivered by the retry).
    assert status.exported_messages_count == 11
    assert status.exported_bytes_from_stream == sum(len(p) for i, p in enumerate(payloads) if i != 2)
    assert status.error_message is None  # cleared by the successful retry
    c.close()


def test_iot_analytics_permanent_rejection_is_reported(mooring_factory, aws_capture):
    aws_capture.respond = lambda path, body: (200, {"batchPutMessageErrorEntries": [
        {"messageId": m["messageId"], "errorCode": "InvalidRequestException", "errorMessage": "bad"}
        for m in body["messages"] if m["messageId"] == "1"]})
    m = mooring_factory(extra_args=iot_args(aws_capture))
    c = client_for(m)
    # Disabled while appending, so both messages are there when the first batch forms (an
    # enabled export sends whatever is available at once, which may be "zero" alone).
    c.create_message_stream(definition("ita2", export_definition=ExportDefinition(
        iot_analytics=[IoTAnalyticsConfig(identifier="x", iot_channel="ch", batch_size=2, disabled=True)])))
    c.append_message("ita2", b"zero")
    c.append_message("ita2", b"one")
    c.update_message_stream(definition("ita2", export_definition=ExportDefinition(
        iot_analytics=[IoTAnalyticsConfig(identifier="x", iot_channel="ch", batch_size=2)])))
    status = wait_for(lambda: (s := c.describe_message_stream("ita2").export_statuses[0])
                      .last_exported_sequence_number == 1 and s, what="export")
    assert len(aws_capture.requests) == 1, "a rejected message is not sent again"
    [request] = aws_capture.requests
    check_batch_put_message(request)
    assert request["body"]["channelName"] == "ch"
    # Without a prefix the id is the sequence number alone.
    assert [msg["messageId"] for msg in request["body"]["messages"]] == ["0", "1"]
    assert [base64.b64decode(msg["payload"]) for msg in request["body"]["messages"]] == [b"zero", b"one"]
    assert status.exported_messages_count == 1 and status.exported_bytes_from_stream == 4
    assert "message 1 skipped" in status.error_message
    assert "InvalidRequestException" in status.error_message
    c.close()


ASSET_ID = "7e3f8a2c-0d4b-4c5e-9f60-1a2b3c4d5e6f"
PROPERTY_ID = "0b9d6c1e-5a4f-4e3d-8c2b-9a8f7e6d5c4b"


def sitewise_entry(entry_id, alias, value, seconds):
    return PutAssetPropertyValueEntry(
        entry_id=entry_id, property_alias=alias,
        property_values=[AssetPropertyValue(value=Variant(double_value=value),
                                            timestamp=TimeInNanos(time_in_seconds=seconds, offset_in_nanos=250),
                                            quality=Quality.GOOD)])


def test_iot_sitewise_export_against_capture_server(mooring_factory, aws_capture):
    def respond(path, body):
        errors = [{"entryId": e["entryId"], "errors": [{
            "errorCode": "TimestampOutOfRangeException", "errorMessage": "too old",
            "timestamps": [e["propertyValues"][0]["timestamp"]]}]}
            for e in body["entries"] if e["entryId"] == "late"]
        return 200, {"errorEntries": errors}

    aws_capture.respond = respond
    m = mooring_factory(extra_args=iot_args(aws_capture))
    c = client_for(m)
    c.create_message_stream(definition("to-sw", export_definition=ExportDefinition(
        iot_sitewise=[IoTSiteWiseConfig(identifier="sw", batch_size=10, disabled=True)])))
    now = int(time.time())
    messages = [
        Util.validate_and_serialize_to_json_bytes(sitewise_entry("t1", "/plant/pump/temp", 21.5, now)),
        b"this is not JSON",
        Util.validate_and_serialize_to_json_bytes(sitewise_entry("late", "/plant/pump/temp", 1.0, 1000)),
        # Valid JSON the SiteWise model refuses (two value types): skipped, not sent.
        json.dumps({"entryId": "both", "propertyAlias": "/a", "propertyValues": [
            {"value": {"doubleValue": 1.0, "integerValue": 1}, "timestamp": {"timeInSeconds": now}}]}).encode(),
        json.dumps({"entryId": "ids", "assetId": ASSET_ID, "propertyId": PROPERTY_ID, "propertyValues": [
            {"value": {"integerValue": 7}, "timestamp": {"timeInSeconds": now, "offsetInNanos": 0}},
            {"value": {"booleanValue": True}, "timestamp": {"timeInSeconds": now + 1}, "quality": "UNCERTAIN"},
            {"value": {"stringValue": "on"}, "timestamp": {"timeInSeconds": now + 2}}]}).encode(),
        # SiteWise IDs are UUIDs; the service would refuse the whole request for this one, so
        # it is skipped, not sent.
        json.dumps({"entryId": "short-ids", "assetId": "a1b2", "propertyId": "p3", "propertyValues": [
            {"value": {"integerValue": 7}, "timestamp": {"timeInSeconds": now}}]}).encode(),
        # A second entry "t1" cannot share a request with the first: it goes in the next one.
        Util.validate_and_serialize_to_json_bytes(sitewise_entry("t1", "/plant/pump/temp", 22.0, now + 5)),
    ]
    for msg in messages:
        c.append_message("to-sw", msg)
    c.update_message_stream(definition("to-sw", export_definition=ExportDefinition(
        iot_sitewise=[IoTSiteWiseConfig(identifier="sw", batch_size=10)])))
    wait_for(lambda: c.describe_message_stream("to-sw").export_statuses[0]
             .last_exported_sequence_number == 6, what="SiteWise export")
    requests = list(aws_capture.requests)
    assert [[e["entryId"] for e in r["body"]["entries"]] for r in requests] == [["t1", "late", "ids"], ["t1"]]
    for r in requests:
        check_against_model(r, "iotsitewise", "BatchPutAssetPropertyValue")
        # Sent to the configured endpoint itself, without the model's "data." host prefix.
        assert r["headers"]["host"] == f"127.0.0.1:{aws_capture.server_address[1]}"
    sent = [e for r in requests for e in r["body"]["entries"]]
    assert [e["entryId"] for e in sent] == ["t1", "late", "ids", "t1"]
    # Entries go out exactly as appended.
    assert sent[0] == json.loads(messages[0])
    assert sent[2] == json.loads(messages[4])
    assert sent[3] == json.loads(messages[6])
    status = c.describe_message_stream("to-sw").export_statuses[0]
    assert status.exported_messages_count == 3
    assert status.exported_bytes_from_stream == len(messages[0]) + len(messages[4]) + len(messages[6])
    # Holding an entry back for the next request is not a failure: both requests went out in
    # one export pass, and the skipped messages are what errorMessage reports.
    assert status.error_message is not None
    for skipped in ("message 1 skipped: not a PutAssetPropertyValueEntry JSON",
                    "message 2 skipped: SiteWise rejected entry late: TimestampOutOfRangeException: too old",
                    "message 3 skipped: value must hold exactly one of",
                    'message 5 skipped: assetId "a1b2" must be a SiteWise ID'):
        assert skipped in status.error_message, status.error_message
    assert "retried" not in status.error_message
    c.close()


def test_sitewise_rejections_are_reported_not_retried(mooring_factory, aws_capture):
    aws_capture.respond = lambda path, body: (200, {"errorEntries": [
        {"entryId": "late", "errors": [{"errorCode": "TimestampOutOfRangeException", "errorMessage": "too old",
                                        "timestamps": [{"timeInSeconds": 1000, "offsetInNanos": 250}]}]}]})
    m = mooring_factory(extra_args=iot_args(aws_capture))
    c = client_for(m)
    c.create_message_stream(definition("sw2", export_definition=ExportDefinition(
        iot_sitewise=[IoTSiteWiseConfig(identifier="sw", batch_size=3, disabled=True)])))
    c.append_message("sw2", b"{broken")
    c.append_message("sw2", Util.validate_and_serialize_to_json_bytes(sitewise_entry("late", "/p", 1.0, 1000)))
    c.append_message("sw2", Util.validate_and_serialize_to_json_bytes(sitewise_entry("ok", "/p", 2.0, int(time.time()))))
    c.update_message_stream(definition("sw2", export_definition=ExportDefinition(
        iot_sitewise=[IoTSiteWiseConfig(identifier="sw", batch_size=3)])))
    status = wait_for(lambda: (s := c.describe_message_stream("sw2").export_statuses[0])
                      .last_exported_sequence_number == 2 and s, what="export")
    assert len(aws_capture.requests) == 1
    assert status.exported_messages_count == 1
    assert "message 0 skipped: not a PutAssetPropertyValueEntry JSON" in status.error_message
    assert "message 1 skipped: SiteWise rejected entry late: TimestampOutOfRangeException: too old" in status.error_message
    time.sleep(1.5)
    assert len(aws_capture.requests) == 1, "rejected entries must not be retried"
    c.close()


def test_iot_analytics_export_resumes_from_its_checkpoint_after_sigkill(mooring_factory, aws_capture):
    aws_capture.respond = lambda path, body: (200, {"batchPutMessageErrorEntries": []})
    aws_capture.delay = 0.3
    m = mooring_factory(extra_args=iot_args(aws_capture))
    c = client_for(m)
    c.create_message_stream(definition("crash-ita", flush_on_write=True, export_definition=ExportDefinition(
        iot_analytics=[IoTAnalyticsConfig(identifier="ita", iot_channel="ch", batch_size=5)])))
    for i in range(60):
        c.append_message("crash-ita", f"m{i}".encode())
    wait_for(lambda: len(aws_capture.requests) >= 3, what="a few batches")
    c.close()
    m.kill()
    before = len(aws_capture.requests)
    assert before < 12, "the export finished before the kill; slow the capture server down"
    aws_capture.delay = 0
    m.start()
    c = client_for(m)
    wait_for(lambda: c.describe_message_stream("crash-ita").export_statuses[0]
             .last_exported_sequence_number == 59, what="the export to finish after restart")
    for r in aws_capture.requests:
        check_batch_put_message(r)
    ids = [msg["messageId"] for r in aws_capture.requests for msg in r["body"]["messages"]]
    # Nothing is missing; what was in flight at the kill may be sent twice, nothing more.
    assert set(ids) == {str(i) for i in range(60)}
    assert len(ids) - 60 <= 10, ids
    after = [msg["messageId"] for r in aws_capture.requests[before:] for msg in r["body"]["messages"]]
    assert int(after[0]) <= int(ids[before * 5 - 1]) + 1  # resumed at or before the first unsent message
    c.close()


def test_export_bandwidth_cap(mooring_factory, capture):
    # 80 kbit/s = 10,000 bytes/s with one second of burst: 40 KB takes about 3 s.
    m = mooring_factory(extra_args=export_args() + ["--set", "streams.max_bandwidth_kbps=80"])
    c = client_for(m)
    uri = f"http://127.0.0.1:{capture.server_address[1]}/in"
    c.create_message_stream(definition("capped", export_definition=ExportDefinition(http=[
        HTTPConfig(identifier="h", uri=uri, batch_size=5, disabled=True)])))
    for i in range(40):
        c.append_message("capped", bytes([i]) * 1000)
    started = time.monotonic()
    c.update_message_stream(definition("capped", export_definition=ExportDefinition(http=[
        HTTPConfig(identifier="h", uri=uri, batch_size=5)])))
    wait_for(lambda: c.describe_message_stream("capped").export_statuses[0]
             .last_exported_sequence_number == 39, what="capped export")
    elapsed = time.monotonic() - started
    assert 2.4 <= elapsed <= 15, elapsed
    assert [b for _, b in capture.bodies] == [bytes([i]) * 1000 for i in range(40)]
    c.close()


# --- the operator CLI ----------------------------------------------------------------


def cli(m, *args, stdin=None, env=None, check=True):
    from conftest import mooring_binary
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MOORING_")}
    run_env.update(env or {})
    p = subprocess.run([mooring_binary(), "streams", *args, "--data-dir", str(m.data_dir)],
                       input=stdin, capture_output=True, env=run_env, timeout=30)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


def test_streams_cli_ls_show_read_append(mooring):
    c = client_for(mooring)
    c.create_message_stream(definition("beta"))
    c.create_message_stream(definition("alpha", export_definition=ExportDefinition(
        kinesis=[KinesisConfig(identifier="k", kinesis_stream_name="ks", disabled=True)])))
    for i in range(5):
        c.append_message("alpha", f"line {i}".encode())
    assert cli(mooring, "ls").stdout.decode().splitlines() == ["alpha", "beta"]

    info = json.loads(cli(mooring, "show", "alpha").stdout)
    assert info["definition"]["name"] == "alpha"
    assert info["definition"]["exportDefinition"]["kinesis"][0]["kinesisStreamName"] == "ks"
    assert info["storageStatus"]["oldestSequenceNumber"] == 0
    assert info["storageStatus"]["newestSequenceNumber"] == 4
    assert info["exportStatuses"][0]["exportConfigIdentifier"] == "k"
    assert json.loads(cli(mooring, "describe", "alpha").stdout) == info

    lines = [json.loads(x) for x in cli(mooring, "read", "alpha").stdout.decode().splitlines()]
    assert [x["sequenceNumber"] for x in lines] == [0, 1, 2, 3, 4]
    assert [base64.b64decode(x["payload"]) for x in lines] == [f"line {i}".encode() for i in range(5)]
    assert all(x["streamName"] == "alpha" and x["ingestTime"] > 0 for x in lines)
    text = cli(mooring, "read", "alpha", "--from", "2", "--count", "2", "--format", "text").stdout
    assert text == b"line 2\nline 3\n"
    assert cli(mooring, "read", "alpha", "--from", "4", "--format", "raw").stdout == b"line 4"
    assert cli(mooring, "read", "alpha", "--from", "5").stdout == b""

    assert cli(mooring, "append", "alpha", "--data", "from the cli").stdout == b"5\n"
    assert cli(mooring, "append", "alpha", stdin=b"\x00binary\xff").stdout == b"6\n"
    tail = c.read_messages("alpha", ReadMessagesOptions(desired_start_sequence_number=5,
                                                        min_message_count=2, max_message_count=2))
    assert [x.payload for x in tail] == [b"from the cli", b"\x00binary\xff"]

    missing = cli(mooring, "show", "nope", check=False)
    assert missing.returncode != 0
    assert b"ResourceNotFound" in missing.stderr and b"nope" in missing.stderr
    bad = cli(mooring, "read", "alpha", "--count", "0", check=False)
    assert bad.returncode != 0 and b"--count" in bad.stderr
    c.close()


def test_streams_cli_follow_and_auth(mooring_factory, monkeypatch):
    m = mooring_factory(extra_args=["--set", "stream_manager.require_auth=true",
                                    "--set", "stream_manager.auth_token=s3cret"])
    monkeypatch.delenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", raising=False)
    refused = cli(m, "ls", check=False)
    assert refused.returncode != 0 and b"Unauthorized" in refused.stderr
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "s3cret")
    c = client_for(m)
    c.create_message_stream(definition("live"))
    from conftest import mooring_binary
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MOORING_")}
    follower = subprocess.Popen([mooring_binary(), "streams", "read", "live", "--follow", "--count", "3",
                                 "--format", "text", "--data-dir", str(m.data_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env)
    time.sleep(0.5)
    for i in range(3):
        c.append_message("live", f"event {i}".encode())
        time.sleep(0.1)
    out, err = follower.communicate(timeout=20)
    assert follower.returncode == 0, err.decode()
    assert out == b"event 0\nevent 1\nevent 2\n"
    # --auth-token works as well as the SDK's environment variable.
    monkeypatch.delenv("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    assert cli(m, "ls", "--auth-token", "s3cret").stdout == b"live\n"
    c.close()


def test_s3_tasks_not_run_are_canceled_when_the_stream_is_deleted(mooring_factory, moto, tmp_path):
    m = mooring_factory(extra_args=export_args(moto, s3=True))
    c = client_for(m)
    c.create_message_stream(definition("st", persistence=Persistence.Memory))
    status_config = StatusConfig(status_level=StatusLevel.WARN, status_stream_name="st")
    c.create_message_stream(definition("later", export_definition=ExportDefinition(
        s3_task_executor=[S3ExportTaskExecutorConfig(identifier="s3", disabled=True,
                                                     status_config=status_config)])))
    f = tmp_path / "f.txt"
    f.write_bytes(b"x")
    # S3 bucket names are 3 to 63 characters; the SDK refuses a shorter one before appending.
    tasks = [S3ExportTaskDefinition(input_url=f"file://{f}", bucket="b-1", key=f"k{i}") for i in range(3)]
    for task in tasks:
        c.append_message("later", Util.validate_and_serialize_to_json_bytes(task))
    c.delete_message_stream("later")
    wait_for(lambda: c.describe_message_stream("st").storage_status.newest_sequence_number == 2,
             what="Canceled statuses")
    messages = [Util.deserialize_json_bytes_to_obj(x.payload, StatusMessage) for x in read_all(c, "st")]
    assert [x.status for x in messages] == [Status.Canceled] * 3
    assert [x.status_level for x in messages] == [StatusLevel.WARN] * 3
    assert [x.status_context.sequence_number for x in messages] == [0, 1, 2]
    assert [x.status_context.s3_export_task_definition.key for x in messages] == ["k0", "k1", "k2"]
    assert all(x.status_context.stream_name == "later" and "deleted" in x.message for x in messages)

    # Removing the export definition cancels its pending tasks too.
    c.create_message_stream(definition("again", export_definition=ExportDefinition(
        s3_task_executor=[S3ExportTaskExecutorConfig(identifier="s3", disabled=True,
                                                     status_config=status_config)])))
    c.append_message("again", Util.validate_and_serialize_to_json_bytes(tasks[0]))
    c.update_message_stream(definition("again"))
    wait_for(lambda: c.describe_message_stream("st").storage_status.newest_sequence_number == 3,
             what="a Canceled status")
    last = Util.deserialize_json_bytes_to_obj(read_all(c, "st", start=3)[0].payload, StatusMessage)
    assert last.status == Status.Canceled and "export s3 was removed" in last.message
    c.close()
