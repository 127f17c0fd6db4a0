"""Kinesis Video Streams seen from real clients: the control plane through boto3
`kinesisvideo`; PutMedia as a SigV4-signed (botocore SigV4Auth, empty-body hash) chunked
streaming request carrying ffmpeg-made and real producer MKV, with the ack stream read line by
line; GetMedia through boto3 `kinesis-video-media`, checked with mkvinfo and an EBML walk;
ListFragments and GetMediaForFragmentList through `kinesis-video-archived-media`; an ERROR ack
for every rule; and a SIGKILL after PERSISTED acks."""

import json
import queue
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
from botocore.exceptions import ClientError

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "kvs-mkv"
if not TESTDATA.exists():
    TESTDATA = Path("/work/shared/testdata/kvs-mkv")

# ---------------------------------------------------------------- EBML helpers (test side)

ID_EBML, ID_SEGMENT, ID_CLUSTER, ID_TAGS = 0x1A45DFA3, 0x18538067, 0x1F43B675, 0x1254C367
ID_INFO, ID_TRACKS, ID_SIMPLE_BLOCK, ID_TIMECODE = 0x1549A966, 0x1654AE6B, 0xA3, 0xE7
MASTER_IDS = {0x7373, 0x67C8, 0x63C0, 0xAE, 0xA0}
LEVEL1_IDS = {ID_CLUSTER, ID_TAGS, ID_INFO, ID_TRACKS, ID_EBML, 0x114D9B74, 0x1C53BB6B, 0x1043A770, 0x1941A469}


def read_vint(data, pos, keep_marker):
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    value = first if keep_marker else first & (0xFF >> length)
    for b in data[pos + 1:pos + length]:
        value = (value << 8) | b
    unknown = not keep_marker and value == (1 << (7 * length)) - 1
    return (None if unknown else value), length


def elements(data, pos=0, end=None):
    """Yields (id, payload_start, payload_end) of the elements in data[pos:end]."""
    end = len(data) if end is None else end
    while pos < end:
        eid, n = read_vint(data, pos, True)
        size, m = read_vint(data, pos + n, False)
        start = pos + n + m
        stop = end if size is None else start + size
        yield eid, start, stop
        pos = stop


def level1_element(data, pos):
    """(id, payload_start, payload_end) of the segment child at pos; an unknown-size one (a
    Cluster as producers write it) ends at the next level-1 element or EBML header."""
    eid, n = read_vint(data, pos, True)
    size, m = read_vint(data, pos + n, False)
    start = pos + n + m
    if size is not None:
        return eid, start, start + size
    stop = start
    while stop < len(data):
        child, k = read_vint(data, stop, True)
        if child in LEVEL1_IDS:
            break
        csize, j = read_vint(data, stop + k, False)
        stop += k + j + csize
    return eid, start, stop


def documents(data):
    """Splits GetMedia output into documents: for each, the list of (id, start, end) of its
    level-1 elements (segments are unknown-size; a new EBML header ends a segment)."""
    docs, pos = [], 0
    while pos < len(data):
        eid, start, stop = next(elements(data, pos))
        assert eid == ID_EBML, hex(eid)
        seg_id, seg_start, _ = next(elements(data, stop))
        assert seg_id == ID_SEGMENT
        level1, p = [], seg_start
        while p < len(data):
            cid, cstart, cstop = level1_element(data, p)
            if cid == ID_EBML:
                break
            level1.append((cid, cstart, cstop))
            p = cstop
        docs.append(level1)
        pos = p
    return docs


def document_bytes(data):
    """The bytes of each EBML document (chunk) of a GetMedia response."""
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        _, _, stop = next(elements(data, pos))
        _, p, _ = next(elements(data, stop))
        while p < len(data):
            cid, _, cstop = level1_element(data, p)
            if cid == ID_EBML:
                break
            p = cstop
        pos = p
    return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]


def simple_tags(data, start, stop):
    out = []
    for tid, ts, te in elements(data, start, stop):
        for sid, ss, se in elements(data, ts, te):
            if sid == 0x67C8:
                name = value = None
                for nid, ns, ne in elements(data, ss, se):
                    if nid == 0x45A3:
                        name = data[ns:ne].decode()
                    elif nid == 0x4487:
                        value = data[ns:ne].decode()
                out.append((name, value))
    return out


def cluster_frames(data, start, stop):
    """(timecode, [(track, frame bytes)]) of a cluster payload."""
    timecode, frames = None, []
    for cid, cs, ce in elements(data, start, stop):
        if cid == ID_TIMECODE:
            timecode = int.from_bytes(data[cs:ce], "big")
        elif cid == ID_SIMPLE_BLOCK:
            track, n = read_vint(data, cs, False)
            frames.append((track, bytes(data[cs + n + 3:ce])))
    return timecode, frames


def producer_clusters(data):
    """Every cluster of a producer MKV file (several documents; clusters of known or unknown
    size, an unknown-size cluster ending at the next level-1 element)."""
    return [cluster_frames(data, s, e) for doc in documents(data) for i, s, e in doc if i == ID_CLUSTER]


def ebml_element(eid, payload, size_width=None):
    idb = eid.to_bytes((eid.bit_length() + 7) // 8, "big")
    n = len(payload)
    width = size_width or next(w for w in range(1, 9) if n < (1 << (7 * w)) - 1)
    return idb + ((1 << (7 * width)) | n).to_bytes(width, "big") + payload


def uint(v):
    return v.to_bytes(max(1, (v.bit_length() + 7) // 8), "big")


def mkv_header(tracks=(1,), scale=1_000_000):
    head = ebml_element(ID_EBML, ebml_element(0x4282, b"matroska"))
    seg = bytes.fromhex("18538067") + bytes.fromhex("01ffffffffffffff")
    info = ebml_element(ID_INFO, ebml_element(0x2AD7B1, uint(scale)))
    entries = b"".join(
        ebml_element(0xAE, ebml_element(0xD7, uint(t)) + ebml_element(0x83, uint(1))
                     + ebml_element(0x86, b"V_MPEG4/ISO/AVC")
                     + ebml_element(0x23E383, uint(40_000_000)))
        for t in tracks)
    return head + seg + info + ebml_element(ID_TRACKS, entries)


def mkv_cluster(timecode, blocks=((1, 0),), unknown_size=False, frame=b"frame-bytes"):
    body = ebml_element(ID_TIMECODE, uint(timecode))
    for i, (track, offset) in enumerate(blocks):
        body += ebml_element(ID_SIMPLE_BLOCK, bytes([0x80 | track]) + struct.pack(">h", offset)
                             + bytes([0x80 if i == 0 else 0]) + frame)
    if unknown_size:
        return bytes.fromhex("1f43b675") + b"\xff" + body
    return ebml_element(ID_CLUSTER, body)


def mkv_tags(pairs):
    simple = b"".join(ebml_element(0x67C8, ebml_element(0x45A3, k.encode()) + ebml_element(0x4487, v.encode()))
                      for k, v in pairs)
    return ebml_element(ID_TAGS, ebml_element(0x7373, simple))


# ---------------------------------------------------------------- PutMedia client

class PutMedia:
    """A chunked, SigV4-signed PutMedia upload whose acks are read on a background thread."""

    def __init__(self, m, stream, timecode_type="ABSOLUTE", start_timestamp="0", headers=None,
                 unsigned_payload=False, presigned=False):
        url = urlparse(m.url)
        key, secret = m.credentials()
        hdrs = {"x-amzn-fragment-acknowledgment-required": "1"}
        if stream is not None:
            hdrs["x-amzn-stream-name"] = stream
        if timecode_type is not None:
            hdrs["x-amzn-fragment-timecode-type"] = timecode_type
        if start_timestamp is not None:
            hdrs["x-amzn-producer-start-timestamp"] = start_timestamp
        if unsigned_payload:
            hdrs["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
        hdrs.update(headers or {})
        req = botocore.awsrequest.AWSRequest(method="POST", url=m.url + "/putMedia", data=b"", headers=hdrs)
        creds = botocore.credentials.Credentials(key, secret)
        if presigned:
            # Signature in the query string, as some third-party PutMedia clients send it.
            botocore.auth.SigV4QueryAuth(creds, "kinesisvideo", m.endpoints["region"], expires=300).add_auth(req)
        else:
            botocore.auth.SigV4Auth(creds, "kinesisvideo", m.endpoints["region"]).add_auth(req)
        target = urlparse(req.url)
        path = target.path + (f"?{target.query}" if target.query else "")
        lines = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Transfer-Encoding: chunked",
                 "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() != "host"]
        self.sock = socket.create_connection((url.hostname, url.port), timeout=60)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.acks = queue.Queue()
        self.status = None
        self.body = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        f = self.sock.makefile("rb")
        try:
            status = f.readline()
            self.status = int(status.split()[1])
            headers = {}
            while True:
                line = f.readline()
                if line in (b"\r\n", b""):
                    break
                k, v = line.decode().split(":", 1)
                headers[k.strip().lower()] = v.strip()
            self.headers = headers
            if headers.get("transfer-encoding") != "chunked":
                self.body = f.read(int(headers.get("content-length", 0)))
                return
            pending = b""
            while True:
                size = int(f.readline().strip(), 16)
                if size == 0:
                    break
                chunk = f.read(size)
                f.readline()
                assert len(chunk) <= 1024, "an ack write over 1024 bytes"
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        self.acks.put(json.loads(line))
        except (OSError, ValueError):
            pass
        finally:
            self.acks.put(None)

    def send(self, data, piece=4096):
        for i in range(0, len(data), piece):
            part = data[i:i + piece]
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))

    def end(self):
        try:
            self.sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    def next_ack(self, timeout=20):
        return self.acks.get(timeout=timeout)

    def wait_for(self, predicate, timeout=30):
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ack = self.next_ack(timeout=max(0.1, deadline - time.monotonic()))
            if ack is None:
                break
            seen.append(ack)
            if predicate(ack):
                return seen
        raise AssertionError(f"no matching ack; saw {seen}")

    def all_acks(self, timeout=60):
        out = []
        while True:
            ack = self.next_ack(timeout=timeout)
            if ack is None:
                return out
            out.append(ack)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def put_file(m, stream, data, **kw):
    pm = PutMedia(m, stream, **kw)
    pm.send(data)
    pm.end()
    acks = pm.all_acks()
    pm.close()
    return pm, acks


def non_idle(acks):
    return [a for a in acks if a["EventType"] != "IDLE"]


@pytest.fixture(scope="module")
def ffmpeg_mkv(tmp_path_factory):
    """5 s of H.264 (1 s GOPs) + AAC in Matroska, as ffmpeg writes it live."""
    path = tmp_path_factory.mktemp("media") / "av.mkv"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=duration=5:size=320x240:rate=25",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=5", "-c:v", "libx264", "-preset", "ultrafast",
         "-g", "25", "-keyint_min", "25", "-sc_threshold", "0", "-c:a", "aac", "-shortest",
         "-f", "matroska", "-live", "1", "-cluster_size_limit", "50000000", "-cluster_time_limit", "20000",
         str(path)], check=True)
    return path.read_bytes()


def keyframe_count(path):
    out = subprocess.run(["mkvinfo", "-v", str(path)], capture_output=True, text=True).stdout
    return len(re.findall(r"Simple block: key, track number 1,", out))


def create(kv, name, retention=1, **kw):
    return kv.create_stream(StreamName=name, DataRetentionInHours=retention, **kw)["StreamARN"]


def media_client(m, kv, name, api):
    endpoint = kv.get_data_endpoint(StreamName=name, APIName=api)["DataEndpoint"]
    service = "kinesis-video-media" if api == "GET_MEDIA" else "kinesis-video-archived-media"
    return m.client(service) if endpoint == m.url else pytest.fail(f"unexpected endpoint {endpoint}")


def get_media(m, kv, name, selector):
    media = media_client(m, kv, name, "GET_MEDIA")
    r = media.get_media(StreamName=name, StartSelector=selector)
    assert r["ContentType"] == "video/webm"
    return mkvinfo_reads(r["Payload"].read())


def mkvinfo_reads(body):
    """Runs mkvinfo on every chunk of a GetMedia / GetMediaForFragmentList response (mkvinfo
    stops at the end of a file's first Segment, so each document goes on its own): each must
    parse, with the cluster and AWS tags this test's own walk finds in it. Returns body."""
    import tempfile
    for chunk, doc in zip(document_bytes(body), documents(body)):
        with tempfile.NamedTemporaryFile(suffix=".mkv") as f:
            f.write(chunk)
            f.flush()
            p = subprocess.run(["mkvinfo", f.name], capture_output=True, text=True)
        assert p.returncode == 0 and "Error" not in p.stdout, p.stdout + p.stderr
        assert p.stdout.count("+ Cluster") == [i for i, _, _ in doc].count(ID_CLUSTER), p.stdout
        assert "Name: AWS_KINESISVIDEO_FRAGMENT_NUMBER" in p.stdout, p.stdout
    return body


# ---------------------------------------------------------------- control plane

def test_stream_lifecycle_shapes_and_errors(mooring):
    kv = mooring.client("kinesisvideo")
    before = time.time()
    arn = kv.create_stream(StreamName="cam-1", DeviceName="dev-1", MediaType="video/h264",
                           DataRetentionInHours=24, Tags={"team": "a"})["StreamARN"]
    assert re.fullmatch(r"arn:aws:kinesisvideo:[a-z0-9-]+:\d{12}:stream/cam-1/\d{13}", arn)
    info = kv.describe_stream(StreamName="cam-1")["StreamInfo"]
    assert info["StreamName"] == "cam-1" and info["StreamARN"] == arn
    assert info["DeviceName"] == "dev-1" and info["MediaType"] == "video/h264"
    assert info["Status"] == "ACTIVE" and info["DataRetentionInHours"] == 24
    assert info["KmsKeyId"].endswith("alias/aws/kinesisvideo")
    assert re.fullmatch(r"[a-zA-Z0-9]+", info["Version"])
    assert abs(info["CreationTime"].timestamp() - before) < 10
    assert kv.describe_stream(StreamARN=arn)["StreamInfo"] == info

    with pytest.raises(ClientError) as e:
        kv.create_stream(StreamName="cam-1")
    assert e.value.response["Error"]["Code"] == "ResourceInUseException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as e:
        kv.describe_stream(StreamName="nope")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    for bad in ({"StreamName": "cam-1", "StreamARN": arn}, {}):
        with pytest.raises(ClientError) as e:
            kv.describe_stream(**bad)
        assert e.value.response["Error"]["Code"] == "InvalidArgumentException"
    with pytest.raises(ClientError) as e:
        kv.create_stream(StreamName="bad name")
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"
    with pytest.raises(ClientError) as e:
        kv.create_stream(StreamName="many", Tags={f"k{i}": "v" for i in range(51)})
    assert e.value.response["Error"]["Code"] == "TagsPerResourceExceededLimitException"

    # UpdateStream: version checked, new version assigned.
    with pytest.raises(ClientError) as e:
        kv.update_stream(StreamName="cam-1", CurrentVersion="stale", MediaType="video/h265")
    assert e.value.response["Error"]["Code"] == "VersionMismatchException"
    kv.update_stream(StreamName="cam-1", CurrentVersion=info["Version"], MediaType="video/h265")
    info2 = kv.describe_stream(StreamName="cam-1")["StreamInfo"]
    assert info2["MediaType"] == "video/h265" and info2["Version"] != info["Version"]

    # UpdateDataRetention.
    kv.update_data_retention(StreamName="cam-1", CurrentVersion=info2["Version"],
                             Operation="INCREASE_DATA_RETENTION", DataRetentionChangeInHours=6)
    info3 = kv.describe_stream(StreamName="cam-1")["StreamInfo"]
    assert info3["DataRetentionInHours"] == 30
    with pytest.raises(ClientError) as e:
        kv.update_data_retention(StreamName="cam-1", CurrentVersion=info3["Version"],
                                 Operation="DECREASE_DATA_RETENTION", DataRetentionChangeInHours=31)
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"
    with pytest.raises(ClientError) as e:
        kv.update_data_retention(StreamName="cam-1", CurrentVersion=info3["Version"],
                                 Operation="INCREASE_DATA_RETENTION", DataRetentionChangeInHours=87600)
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"
    kv.update_data_retention(StreamARN=arn, CurrentVersion=info3["Version"],
                             Operation="DECREASE_DATA_RETENTION", DataRetentionChangeInHours=29)
    info4 = kv.describe_stream(StreamName="cam-1")["StreamInfo"]
    assert info4["DataRetentionInHours"] == 1

    # DeleteStream: ARN only, version checked, then gone.
    with pytest.raises(ClientError) as e:
        kv.delete_stream(StreamARN=arn, CurrentVersion="stale")
    assert e.value.response["Error"]["Code"] == "VersionMismatchException"
    kv.delete_stream(StreamARN=arn, CurrentVersion=info4["Version"])
    with pytest.raises(ClientError) as e:
        kv.describe_stream(StreamName="cam-1")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    with pytest.raises(ClientError) as e:
        kv.delete_stream(StreamARN=arn)
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    # The name can be reused; the new stream has a new ARN.
    assert create(kv, "cam-1") != arn


def test_list_streams_filters_and_pages(mooring):
    kv = mooring.client("kinesisvideo")
    for i in range(5):
        create(kv, f"lobby-{i}", retention=0)
    create(kv, "garage", retention=0)
    everything = kv.list_streams()["StreamInfoList"]
    assert sorted(s["StreamName"] for s in everything) == ["garage"] + [f"lobby-{i}" for i in range(5)]
    names, token = [], None
    while True:
        kwargs = {"MaxResults": 2, "StreamNameCondition": {"ComparisonOperator": "BEGINS_WITH",
                                                          "ComparisonValue": "lobby"}}
        if token:
            kwargs["NextToken"] = token
        page = kv.list_streams(**kwargs)
        assert len(page["StreamInfoList"]) <= 2
        names += [s["StreamName"] for s in page["StreamInfoList"]]
        token = page.get("NextToken")
        if not token:
            break
    assert sorted(names) == [f"lobby-{i}" for i in range(5)]
    assert set(everything[0]) >= {"StreamName", "StreamARN", "Version", "Status", "CreationTime",
                                  "DataRetentionInHours", "KmsKeyId"}
    with pytest.raises(ClientError) as e:
        kv.list_streams(MaxResults=10001)
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"


def test_stream_and_resource_tags(mooring):
    kv = mooring.client("kinesisvideo")
    arn = create(kv, "tagged", retention=0)
    kv.tag_stream(StreamName="tagged", Tags={"a": "1", "b": "2"})
    kv.tag_stream(StreamARN=arn, Tags={"a": "3"})
    assert kv.list_tags_for_stream(StreamName="tagged")["Tags"] == {"a": "3", "b": "2"}
    kv.untag_stream(StreamARN=arn, TagKeyList=["a", "absent"])
    assert kv.list_tags_for_stream(StreamARN=arn)["Tags"] == {"b": "2"}
    with pytest.raises(ClientError) as e:
        kv.tag_stream(StreamName="tagged", Tags={f"k{i}": "v" for i in range(50)})
    assert e.value.response["Error"]["Code"] == "TagsPerResourceExceededLimitException"
    with pytest.raises(ClientError) as e:
        kv.list_tags_for_stream(StreamARN="arn:aws:kinesisvideo:us-east-1:123456789012:bogus")
    assert e.value.response["Error"]["Code"] == "InvalidResourceFormatException"
    with pytest.raises(ClientError) as e:
        kv.tag_stream(StreamName="missing", Tags={"a": "b"})
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"

    kv.tag_resource(ResourceARN=arn, Tags=[{"Key": "c", "Value": "3"}])
    assert kv.list_tags_for_resource(ResourceARN=arn)["Tags"] == {"b": "2", "c": "3"}
    kv.untag_resource(ResourceARN=arn, TagKeyList=["b"])
    assert kv.list_tags_for_resource(ResourceARN=arn)["Tags"] == {"c": "3"}
    with pytest.raises(ClientError) as e:
        kv.list_tags_for_resource(
            ResourceARN="arn:aws:kinesisvideo:us-east-1:123456789012:channel/none/1")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_get_data_endpoint_answers_every_api_with_mooring(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "ep", retention=0)
    for api in ["PUT_MEDIA", "GET_MEDIA", "LIST_FRAGMENTS", "GET_MEDIA_FOR_FRAGMENT_LIST",
                "GET_HLS_STREAMING_SESSION_URL", "GET_DASH_STREAMING_SESSION_URL", "GET_CLIP",
                "GET_IMAGES"]:
        assert kv.get_data_endpoint(StreamName="ep", APIName=api)["DataEndpoint"] == mooring.url
    with pytest.raises(ClientError) as e:
        kv.get_data_endpoint(StreamName="ep", APIName="NOPE")
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"
    with pytest.raises(ClientError) as e:
        kv.get_data_endpoint(StreamName="missing", APIName="GET_MEDIA")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_wrong_secret_is_rejected(mooring):
    kv = mooring.client("kinesisvideo", secret="x" * 40)
    with pytest.raises(ClientError) as e:
        kv.list_streams()
    assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


# ---------------------------------------------------------------- PutMedia and readers

def test_ffmpeg_ingest_acks_getmedia_and_archive(mooring, ffmpeg_mkv, tmp_path):
    kv = mooring.client("kinesisvideo")
    create(kv, "live", retention=1)
    src = tmp_path / "src.mkv"
    src.write_bytes(ffmpeg_mkv)
    clusters = producer_clusters(ffmpeg_mkv)
    gops = keyframe_count(src)
    assert gops == 5 and len(clusters) == gops

    t0 = time.time()
    pm, acks = put_file(mooring, "live", ffmpeg_mkv)
    assert pm.status == 200
    acks = non_idle(acks)
    numbers = [a["FragmentNumber"] for a in acks if a["EventType"] == "BUFFERING"]
    assert len(numbers) == gops
    for number, (timecode, _) in zip(numbers, clusters):
        group = [a for a in acks if a["FragmentNumber"] == number]
        assert [a["EventType"] for a in group] == ["BUFFERING", "RECEIVED", "PERSISTED"]
        assert {a["FragmentTimecode"] for a in group} == {timecode}
    assert sorted(a["EventType"] for a in acks) == sorted(["BUFFERING", "RECEIVED", "PERSISTED"] * gops)
    for kind in ("BUFFERING", "RECEIVED", "PERSISTED"):  # each kind in cluster order
        assert [a["FragmentTimecode"] for a in acks if a["EventType"] == kind] == [tc for tc, _ in clusters]
    assert all(re.fullmatch(r"[0-9]{47}", n) for n in numbers)
    assert [int(n) for n in numbers] == sorted(int(n) for n in numbers)
    assert len(set(numbers)) == gops

    # GetMedia from the start: one chunk per fragment, readable by mkvinfo, frames intact.
    out = get_media(mooring, kv, "live", {"StartSelectorType": "EARLIEST"})
    got = tmp_path / "out.mkv"
    got.write_bytes(out)
    info = subprocess.run(["mkvinfo", str(got)], capture_output=True, text=True)
    assert info.returncode == 0 and "Cluster" in info.stdout and "V_MPEG4/ISO/AVC" in info.stdout
    assert subprocess.run(["ffprobe", "-v", "error", str(got)]).returncode == 0
    docs = documents(out)
    assert len(docs) == gops
    for doc, number, (timecode, frames) in zip(docs, numbers, clusters):
        cluster = [e for e in doc if e[0] == ID_CLUSTER]
        assert len(cluster) == 1
        assert cluster_frames(out, cluster[0][1], cluster[0][2]) == (timecode, frames)
        tags = [simple_tags(out, s, e) for i, s, e in doc if i == ID_TAGS]
        aws = [t for t in tags if t and t[0][0].startswith("AWS_KINESISVIDEO")]
        assert [n for n, _ in aws[0]] == ["AWS_KINESISVIDEO_FRAGMENT_NUMBER",
                                          "AWS_KINESISVIDEO_SERVER_TIMESTAMP",
                                          "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP"]
        assert aws[0][0][1] == number
        assert abs(float(aws[0][1][1]) - t0) < 30
        assert float(aws[0][2][1]) == pytest.approx(timecode / 1000.0, abs=0.0011)
        assert [n for n, _ in aws[-1]] == ["AWS_KINESISVIDEO_MILLIS_BEHIND_NOW",
                                           "AWS_KINESISVIDEO_CONTINUATION_TOKEN"]
        assert aws[-1][1][1] == number and int(aws[-1][0][1]) >= 0

    # Other selectors.
    after = get_media(mooring, kv, "live", {"StartSelectorType": "FRAGMENT_NUMBER",
                                           "AfterFragmentNumber": numbers[1]})
    assert len(documents(after)) == gops - 2
    token = get_media(mooring, kv, "live", {"StartSelectorType": "CONTINUATION_TOKEN",
                                           "ContinuationToken": numbers[3]})
    assert len(documents(token)) == 1
    now = get_media(mooring, kv, "live", {"StartSelectorType": "NOW"})
    assert len(documents(now)) == 1
    by_producer = get_media(mooring, kv, "live", {"StartSelectorType": "PRODUCER_TIMESTAMP",
                                                 "StartTimestamp": 2.5})
    assert len(documents(by_producer)) == 3  # the fragment containing 2.5 s, then two more
    by_server = get_media(mooring, kv, "live", {"StartSelectorType": "SERVER_TIMESTAMP",
                                               "StartTimestamp": t0 - 60})
    assert len(documents(by_server)) == gops
    media = media_client(mooring, kv, "live", "GET_MEDIA")
    with pytest.raises(ClientError) as e:
        media.get_media(StreamName="live", StartSelector={"StartSelectorType": "FRAGMENT_NUMBER"})
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"
    with pytest.raises(ClientError) as e:
        media.get_media(StreamName="missing", StartSelector={"StartSelectorType": "NOW"})
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"

    # ListFragments: selection by start time, paging, exact member names.
    archive = media_client(mooring, kv, "live", "LIST_FRAGMENTS")
    listed, token = [], None
    while True:
        kwargs = {"StreamName": "live", "MaxResults": 2}
        if token:
            kwargs["NextToken"] = token
        else:
            kwargs["FragmentSelector"] = {"FragmentSelectorType": "SERVER_TIMESTAMP",
                                          "TimestampRange": {"StartTimestamp": t0 - 60,
                                                             "EndTimestamp": time.time() + 1}}
        page = archive.list_fragments(**kwargs)
        listed += page["Fragments"]
        token = page.get("NextToken")
        if not token:
            break
    assert sorted(f["FragmentNumber"] for f in listed) == numbers
    for f in listed:
        assert set(f) == {"FragmentNumber", "FragmentSizeInBytes", "ProducerTimestamp",
                          "ServerTimestamp", "FragmentLengthInMilliseconds"}
        assert 500 <= f["FragmentLengthInMilliseconds"] <= 1500
        assert f["FragmentSizeInBytes"] > 1000
    producer = archive.list_fragments(StreamName="live", FragmentSelector={
        "FragmentSelectorType": "PRODUCER_TIMESTAMP",
        "TimestampRange": {"StartTimestamp": 1.0, "EndTimestamp": 3.5}})["Fragments"]
    assert sorted(f["FragmentNumber"] for f in producer) == numbers[1:4]
    empty = archive.list_fragments(StreamName="live", FragmentSelector={
        "FragmentSelectorType": "PRODUCER_TIMESTAMP",
        "TimestampRange": {"StartTimestamp": 100, "EndTimestamp": 200}})
    assert empty["Fragments"] == [] and "NextToken" not in empty

    # GetMediaForFragmentList: request order, missing fragment reported in tags.
    fl = media_client(mooring, kv, "live", "GET_MEDIA_FOR_FRAGMENT_LIST")
    missing = "9" * 47
    r = fl.get_media_for_fragment_list(StreamName="live", Fragments=[numbers[2], missing, numbers[0]])
    assert r["ContentType"] == "video/webm"
    body = mkvinfo_reads(r["Payload"].read())
    docs = documents(body)
    assert len(docs) == 3
    first_tags = simple_tags(body, *[(s, e) for i, s, e in docs[0] if i == ID_TAGS][-1])
    assert first_tags[0] == ("AWS_KINESISVIDEO_FRAGMENT_NUMBER", numbers[2])
    error_tags = dict(simple_tags(body, *[(s, e) for i, s, e in docs[1] if i == ID_TAGS][0]))
    assert error_tags["AWS_KINESISVIDEO_FRAGMENT_NUMBER"] == missing
    assert "AWS_KINESISVIDEO_EXCEPTION_ERROR_CODE" in error_tags
    assert "AWS_KINESISVIDEO_EXCEPTION_MESSAGE" in error_tags
    c = [(s, e) for i, s, e in docs[2] if i == ID_CLUSTER][0]
    assert cluster_frames(body, *c) == clusters[0]


def test_getmedia_layout_matches_real_kvs_output(mooring, ffmpeg_mkv):
    """Element by element: each chunk is EBML header, unknown-size Segment, the producer's
    segment-level elements, AWS tags (3), one Cluster, AWS tags (2), as in the recorded file."""
    real = (TESTDATA / "output_get_media.mkv").read_bytes()
    real_doc = documents(real[:real.index(bytes.fromhex("1a45dfa3"), 10)])[0]
    ids = [i for i, _, _ in real_doc]
    assert ids[-3:] == [ID_TAGS, ID_CLUSTER, ID_TAGS]
    real_tail = [[n for n, _ in simple_tags(real, s, e)] for i, s, e in real_doc[-3:] if i == ID_TAGS]

    kv = mooring.client("kinesisvideo")
    create(kv, "layout", retention=1)
    put_file(mooring, "layout", ffmpeg_mkv)
    out = get_media(mooring, kv, "layout", {"StartSelectorType": "EARLIEST"})
    producer_prefix = []
    _, _, header_end = next(elements(ffmpeg_mkv))
    _, segment_start, _ = next(elements(ffmpeg_mkv, header_end))
    for i, s, e in elements(ffmpeg_mkv, segment_start):
        if i == ID_CLUSTER:
            break
        producer_prefix.append(i)
    for doc in documents(out):
        mine = [i for i, _, _ in doc]
        assert mine == producer_prefix + [ID_TAGS, ID_CLUSTER, ID_TAGS]
        tail = [[n for n, _ in simple_tags(out, s, e)] for i, s, e in doc[-3:] if i == ID_TAGS]
        assert tail == real_tail
    # The segment header is the 8-byte unknown size KVS writes.
    assert out[out.index(bytes.fromhex("18538067")):][:12] == bytes.fromhex("1853806701ffffffffffffff")
    first_real = real[:real.index(bytes.fromhex("18538067")) + 12]
    assert first_real.endswith(bytes.fromhex("1853806701ffffffffffffff"))


TREE_MASTERS = {ID_EBML, 0x114D9B74, 0x4DBB, ID_INFO, ID_TRACKS, 0xAE, 0xE0, 0xE1, 0x55B0, ID_TAGS, 0x7373,
                0x63C0, 0x67C8, ID_CLUSTER, 0xA0, 0x1C53BB6B, 0xBB, 0xB7}


def size_form(data, pos):
    """How an element at pos encodes its size: its width in bytes, or "unknown"."""
    _, n = read_vint(data, pos, True)
    size, m = read_vint(data, pos + n, False)
    return "unknown" if size is None else m


def element_tree(data, start, stop):
    """[(id, size form, children or payload)] of data[start:stop]; the values of the
    service's own AWS_KINESISVIDEO_* tags become a key for the caller to check."""
    out, pos = [], start
    while pos < stop:
        eid, s, e = next(elements(data, pos, stop))
        if eid == 0x67C8:
            kids = {i: bytes(data[cs:ce]) for i, cs, ce in elements(data, s, e)}
            name = kids.get(0x45A3, b"").decode()
            if name.startswith("AWS_KINESISVIDEO_"):
                out.append((eid, "aws-tag", name))
                pos = e
                continue
        out.append((eid, size_form(data, pos),
                    element_tree(data, s, e) if eid in TREE_MASTERS else bytes(data[s:e])))
        pos = e
    return out


def chunk_layouts(data):
    """Each document as (EBML header tree, Segment size form, [level-1 element trees])."""
    out, pos = [], 0
    while pos < len(data):
        header_pos = pos
        eid, start, stop = next(elements(data, pos))
        assert eid == ID_EBML
        header = element_tree(data, header_pos, stop)
        segment_form = size_form(data, stop)
        _, p, _ = next(elements(data, stop))
        level1 = []
        while p < len(data):
            cid, cstart, cstop = level1_element(data, p)
            if cid == ID_EBML:
                break
            tree = element_tree(data, cstart, cstop) if cid in TREE_MASTERS else bytes(data[cstart:cstop])
            level1.append((cid, size_form(data, p), tree))
            p = cstop
        out.append((header, segment_form, level1))
        pos = p
    return out


def aws_tag_values(data):
    """Per document, the AWS_KINESISVIDEO_* tag values by name."""
    return [dict(kv for i, s, e in doc if i == ID_TAGS for kv in simple_tags(data, s, e)
                 if kv[0].startswith("AWS_KINESISVIDEO_")) for doc in documents(data)]


# Each recorded GetMedia response re-ingested the way it was produced: the PutMedia sessions
# (documents, timecode type, producer start) that give back its PRODUCER_TIMESTAMPs.
REAL_RESPONSES = {
    "output_get_media.mkv": [(slice(0, None), "RELATIVE", "1511852108.513")],
    "output_get_media_sparse_fragments.mkv": [(slice(0, None), "RELATIVE", "1511852108.513")],
    # Producer timestamps 0.000, 5.000, …: timecodes taken as absolute times.
    "test_mixed_tags.mkv": [(slice(0, None), "ABSOLUTE", "0")],
    # Two uploads (the timecodes restart at 0 with the second); the recording's last
    # document is cut short in the middle of its cluster, so it is left out.
    "output-get-media-non-increasing-timecode.mkv": [(slice(0, 1), "RELATIVE", "1517530095.893"),
                                                     (slice(1, 11), "RELATIVE", "1517530112.387")],
}


@pytest.mark.parametrize("name", sorted(REAL_RESPONSES))
def test_getmedia_output_matches_recorded_kvs_responses_element_by_element(mooring, name):
    """Each recorded KVS GetMedia response, sent to Mooring as producer input, comes back
    element for element: the same EBML header, Segment, producer elements (byte for byte,
    including each element's size encoding: an unknown-size Cluster stays unknown-size),
    AWS tags at the same places and Cues kept after their cluster. The AWS tag values are
    checked separately: fragment numbers and tokens from the acks, PRODUCER_TIMESTAMP equal
    to the recorded one, SERVER_TIMESTAMP now, MILLIS_BEHIND_NOW a count of ms."""
    data = (TESTDATA / name).read_bytes()
    real_docs = document_bytes(data)
    kv = mooring.client("kinesisvideo")
    create(kv, "replay", retention=1)
    numbers, expected = [], []
    t0 = time.time()
    for docs, timecode_type, start in REAL_RESPONSES[name]:
        sent = real_docs[docs]
        pm, acks = put_file(mooring, "replay", b"".join(sent), timecode_type=timecode_type,
                            start_timestamp=start, unsigned_payload=True)
        assert pm.status == 200
        acks = non_idle(acks)
        assert "ERROR" not in [a["EventType"] for a in acks], acks
        persisted = [a for a in acks if a["EventType"] == "PERSISTED"]
        assert len(persisted) == len(sent)
        numbers += [a["FragmentNumber"] for a in persisted]
        expected += sent
    out = get_media(mooring, kv, "replay", {"StartSelectorType": "EARLIEST"})
    mine = chunk_layouts(out)
    real = [chunk_layouts(d)[0] for d in expected]
    assert len(mine) == len(real)
    for k, (m, r) in enumerate(zip(mine, real)):
        assert m[0] == r[0], f"chunk {k}: EBML header"
        assert m[1] == r[1], f"chunk {k}: Segment size"
        assert [(i, f) for i, f, _ in m[2]] == [(i, f) for i, f, _ in r[2]], f"chunk {k}: level-1 elements"
        for j, (me, re_) in enumerate(zip(m[2], r[2])):
            assert me == re_, f"chunk {k}, level-1 element {j} ({me[0]:#x})"
    mine_tags = aws_tag_values(out)
    real_tags = [aws_tag_values(d)[0] for d in expected]
    for number, m, r in zip(numbers, mine_tags, real_tags):
        assert set(m) == set(r)
        assert m["AWS_KINESISVIDEO_FRAGMENT_NUMBER"] == m["AWS_KINESISVIDEO_CONTINUATION_TOKEN"] == number
        assert m["AWS_KINESISVIDEO_PRODUCER_TIMESTAMP"] == r["AWS_KINESISVIDEO_PRODUCER_TIMESTAMP"]
        assert re.fullmatch(r"\d+\.\d{3}", m["AWS_KINESISVIDEO_SERVER_TIMESTAMP"])
        assert abs(float(m["AWS_KINESISVIDEO_SERVER_TIMESTAMP"]) - t0) < 60
        assert re.fullmatch(r"\d+", m["AWS_KINESISVIDEO_MILLIS_BEHIND_NOW"])


@pytest.mark.parametrize("name,timecode_type,start", [
    ("test_mixed_tags.mkv", "RELATIVE", "1537574915.281"),
    ("output_get_media.mkv", "RELATIVE", "1511852108.513"),
    ("output_get_media_sparse_fragments.mkv", "RELATIVE", "1511852108.513"),
])
def test_real_producer_files_ingest(mooring, name, timecode_type, start):
    data = (TESTDATA / name).read_bytes()
    clusters = producer_clusters(data)
    kv = mooring.client("kinesisvideo")
    create(kv, "real", retention=1)
    pm, acks = put_file(mooring, "real", data, timecode_type=timecode_type, start_timestamp=start,
                        unsigned_payload=True)
    acks = non_idle(acks)
    assert [a for a in acks if a["EventType"] == "ERROR"] == []
    persisted = [a for a in acks if a["EventType"] == "PERSISTED"]
    assert [a["FragmentTimecode"] for a in persisted] == [tc for tc, _ in clusters]
    out = get_media(mooring, kv, "real", {"StartSelectorType": "EARLIEST"})
    docs = documents(out)
    assert len(docs) == len(clusters)
    for doc, cluster in zip(docs, clusters):
        c = [(s, e) for i, s, e in doc if i == ID_CLUSTER][0]
        assert cluster_frames(out, *c) == cluster
        names = [n for i, s, e in doc if i == ID_TAGS for n, _ in simple_tags(out, s, e)]
        assert names.count("AWS_KINESISVIDEO_FRAGMENT_NUMBER") == 1
    if name == "test_mixed_tags.mkv":
        # Producer tags after a cluster come back in that fragment's chunk.
        names = [n for i, s, e in docs[0] if i == ID_TAGS for n, _ in simple_tags(out, s, e)]
        assert "testTag_0" in names


def test_retention_zero_streams_are_live_only(mooring, ffmpeg_mkv):
    kv = mooring.client("kinesisvideo")
    create(kv, "buffer", retention=0)
    _, acks = put_file(mooring, "buffer", ffmpeg_mkv)
    kinds = [a["EventType"] for a in non_idle(acks)]
    assert kinds == ["BUFFERING", "RECEIVED"] * 5  # no PERSISTED at retention 0
    assert len(documents(get_media(mooring, kv, "buffer", {"StartSelectorType": "EARLIEST"}))) == 5
    archive = media_client(mooring, kv, "buffer", "LIST_FRAGMENTS")
    assert archive.list_fragments(StreamName="buffer", FragmentSelector={
        "FragmentSelectorType": "SERVER_TIMESTAMP",
        "TimestampRange": {"StartTimestamp": 0, "EndTimestamp": time.time() + 5}})["Fragments"] == []


def test_getmedia_tails_live_ingest(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "tail", retention=1)
    media = media_client(mooring, kv, "tail", "GET_MEDIA")
    pm = PutMedia(mooring, "tail")
    pm.send(mkv_header() + mkv_cluster(1000, ((1, 0), (1, 40))))
    pm.wait_for(lambda a: a["EventType"] == "PERSISTED")
    result = {}

    def reader():
        r = media.get_media(StreamName="tail", StartSelector={"StartSelectorType": "NOW"})
        result["body"] = r["Payload"].read()

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(1.0)
    pm.send(mkv_cluster(2000, ((1, 0), (1, 40))))
    pm.wait_for(lambda a: a["EventType"] == "PERSISTED" and a["FragmentTimecode"] == 2000)
    pm.end()
    pm.all_acks()
    t.join(timeout=20)
    docs = documents(mkvinfo_reads(result["body"]))
    timecodes = [cluster_frames(result["body"], s, e)[0] for d in docs for i, s, e in d if i == ID_CLUSTER]
    assert timecodes == [1000, 2000]


# ---------------------------------------------------------------- ERROR acks

def error_of(acks):
    errors = [a for a in acks if a["EventType"] == "ERROR"]
    assert len(errors) == 1, acks
    return errors[0]


def test_putmedia_header_errors(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "hdr", retention=0)
    pm = PutMedia(mooring, "missing-stream")
    pm.end()
    pm.reader.join(10)
    assert pm.status == 404 and pm.headers["x-amzn-errortype"] == "ResourceNotFoundException"
    assert pm.headers["x-amz-errortype"] == "ResourceNotFoundException"
    assert len(pm.headers["x-amzn-requestid"]) == 36 and pm.headers["x-amz-requestid"]
    error = json.loads(pm.body)
    assert error["message"] == error["Message"] and "missing-stream" in error["Message"]
    pm = PutMedia(mooring, "hdr", timecode_type="SIDEWAYS")
    pm.end()
    pm.reader.join(10)
    assert pm.status == 400 and pm.headers["x-amzn-errortype"] == "InvalidArgumentException"
    pm = PutMedia(mooring, "hdr", timecode_type="RELATIVE", start_timestamp=None)
    pm.end()
    pm.reader.join(10)
    assert pm.status == 400


CASES = {
    "invalid_mkv": (b"this is certainly not matroska" * 10, 4006, "INVALID_MKV_DATA"),
    "timecode_backwards": (mkv_header() + mkv_cluster(5000) + mkv_cluster(3000), 4004,
                           "FRAGMENT_TIMECODE_LESSER_THAN_PREVIOUS"),
    "track_number_mismatch": (mkv_header((1,)) + mkv_cluster(0, ((1, 0), (2, 10))), 4010,
                              "TRACK_NUMBER_MISMATCH"),
    "frames_missing_for_track": (mkv_header((1, 2)) + mkv_cluster(0, ((1, 0), (1, 40))), 4011,
                                 "FRAMES_MISSING_FOR_TRACK"),
    "too_many_tracks": (mkv_header((1, 2, 3, 4)) + mkv_cluster(0, ((1, 0), (2, 0), (3, 0), (4, 0))),
                        4012, "MORE_THAN_ALLOWED_TRACKS_FOUND"),
    "reserved_tag_name": (mkv_header() + mkv_cluster(0) + mkv_tags([("AWS_SECRET", "x")]), 4012,
                          "INVALID_FRAGMENT_METADATA"),
    "too_many_tags": (mkv_header() + mkv_cluster(0) + mkv_tags([(f"t{i}", "v") for i in range(11)]),
                      4009, "FRAGMENT_METADATA_LIMIT_REACHED"),
    "tag_value_too_long": (mkv_header() + mkv_cluster(0) + mkv_tags([("t", "v" * 257)]), 4009,
                           "FRAGMENT_METADATA_LIMIT_REACHED"),
    "tag_name_too_long": (mkv_header() + mkv_cluster(0) + mkv_tags([("n" * 129, "v")]), 4009,
                          "FRAGMENT_METADATA_LIMIT_REACHED"),
    "fragment_too_long": (mkv_header() + mkv_cluster(0, ((1, 0), (1, 21000))), 4002,
                          "MAX_FRAGMENT_DURATION_REACHED"),
    # An unknown-size cluster whose block declares 51 MB.
    "fragment_too_large": (mkv_header() + bytes.fromhex("1f43b675ff") + ebml_element(ID_TIMECODE, uint(0))
                           + bytes([ID_SIMPLE_BLOCK]) + (0x0100000000000000 | 51 * 1024 * 1024).to_bytes(8, "big")
                           + b"\x81\x00\x00\x80" + b"x" * 1000, 4001, "MAX_FRAGMENT_SIZE_REACHED"),
    "producer_timestamp_in_future": (mkv_header() + mkv_cluster(int(time.time() * 1000) + 3 * 3600 * 1000),
                                     4007, "INVALID_PRODUCER_TIMESTAMP"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_acks(mooring, case):
    body, error_id, code = CASES[case]
    kv = mooring.client("kinesisvideo")
    create(kv, "errs", retention=1)
    pm, acks = put_file(mooring, "errs", body)
    assert pm.status == 200
    err = error_of(acks)
    assert err["ErrorId"] == error_id and err["ErrorCode"] == code
    if case not in ("invalid_mkv",):
        assert isinstance(err["FragmentTimecode"], int) and re.fullmatch(r"\d{47}", err["FragmentNumber"])
    # The server is still healthy and accepts a good upload afterwards.
    _, acks = put_file(mooring, "errs", mkv_header() + mkv_cluster(int(time.time() * 1000)))
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED", "PERSISTED"]


def test_metadata_limits_are_inclusive(mooring):
    """The limits themselves pass: 10 tags, a 128-byte name, a 256-byte value."""
    kv = mooring.client("kinesisvideo")
    create(kv, "limits", retention=1)
    tags = [(f"t{i}", "v") for i in range(9)] + [("n" * 128, "v" * 256)]
    _, acks = put_file(mooring, "limits", mkv_header() + mkv_cluster(1000) + mkv_tags(tags))
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED", "PERSISTED"]


def test_archival_error_when_the_fragment_cannot_be_written(mooring):
    """5001 ARCHIVAL_ERROR: the stream's segment directory cannot be created (a file is in
    its place). The fragment was received, so RECEIVED precedes the ERROR; once storage works
    again the next upload is PERSISTED."""
    kv = mooring.client("kinesisvideo")
    arn = create(kv, "unwritable", retention=1)
    suffix = arn.rsplit("/", 1)[1]
    blocker = mooring.data_dir / "video" / f"unwritable-{suffix}"
    blocker.write_bytes(b"not a directory")
    pm, acks = put_file(mooring, "unwritable", mkv_header() + mkv_cluster(1000))
    assert pm.status == 200
    acks = non_idle(acks)
    assert [a["EventType"] for a in acks] == ["BUFFERING", "RECEIVED", "ERROR"]
    err = acks[-1]
    assert (err["ErrorId"], err["ErrorCode"], err["FragmentTimecode"]) == (5001, "ARCHIVAL_ERROR", 1000)
    assert err["FragmentNumber"] == acks[0]["FragmentNumber"]
    blocker.unlink()
    _, acks = put_file(mooring, "unwritable", mkv_header() + mkv_cluster(2000))
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED", "PERSISTED"]
    listed = media_client(mooring, kv, "unwritable", "LIST_FRAGMENTS").list_fragments(
        StreamName="unwritable", FragmentSelector={"FragmentSelectorType": "PRODUCER_TIMESTAMP",
                                                   "TimestampRange": {"StartTimestamp": 0, "EndTimestamp": 10}})
    assert [int(f["ProducerTimestamp"].timestamp()) for f in listed["Fragments"]] == [2]


def test_internal_error_when_the_index_refuses_writes(mooring):
    """5000 INTERNAL_ERROR: another process holds the metadata database's write lock, so no
    fragment number can be reserved (after SQLite's 10 s busy timeout). The ERROR carries the
    cluster's timecode; with the lock released the stream takes media again."""
    import sqlite3
    kv = mooring.client("kinesisvideo")
    create(kv, "locked", retention=1)
    lock = sqlite3.connect(mooring.data_dir / "metadata.db", isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        pm, acks = put_file(mooring, "locked", mkv_header() + mkv_cluster(3000))
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert pm.status == 200
    err = error_of(acks)
    assert (err["ErrorId"], err["ErrorCode"], err["FragmentTimecode"]) == (5000, "INTERNAL_ERROR", 3000)
    assert "FragmentNumber" not in err
    _, acks = put_file(mooring, "locked", mkv_header() + mkv_cluster(4000))
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED", "PERSISTED"]


def test_real_non_increasing_timecodes_are_rejected(mooring):
    data = (TESTDATA / "output-get-media-non-increasing-timecode.mkv").read_bytes()
    kv = mooring.client("kinesisvideo")
    create(kv, "nonincr", retention=1)
    _, acks = put_file(mooring, "nonincr", data, timecode_type="RELATIVE", start_timestamp="1517530105.907")
    err = error_of(acks)
    assert err["ErrorId"] == 4004 and err["ErrorCode"] == "FRAGMENT_TIMECODE_LESSER_THAN_PREVIOUS"
    assert any(a["EventType"] == "PERSISTED" for a in acks)


def test_stream_deleted_during_ingest(mooring):
    kv = mooring.client("kinesisvideo")
    arn = create(kv, "doomed", retention=1)
    pm = PutMedia(mooring, "doomed")
    pm.send(mkv_header() + mkv_cluster(1000))
    pm.send(mkv_cluster(2000) + mkv_tags([("AWS_KINESISVIDEO_END_OF_FRAGMENT", "")]))
    # Both fragments stored: the deletion falls between fragments.
    pm.wait_for(lambda a: a["EventType"] == "PERSISTED" and a["FragmentTimecode"] == 2000)
    kv.delete_stream(StreamARN=arn)
    pm.send(mkv_cluster(3000))
    pm.send(mkv_cluster(4000))
    acks = pm.all_acks()
    err = error_of(acks)
    assert err["ErrorId"] == 4008 and err["ErrorCode"] == "STREAM_NOT_ACTIVE"
    # The refused cluster is matched by its timecode; it never got a number (the stream is
    # gone), unlike a fragment caught mid-way (4507, below).
    assert err["FragmentTimecode"] == 3000 and "FragmentNumber" not in err


def test_stream_deleted_mid_fragment_gives_4507(mooring):
    """The fragment being received when its stream is deleted is lost with the stream:
    ERROR 4507 STREAM_DELETED for it (4008 is for fragments starting after the deletion)."""
    kv = mooring.client("kinesisvideo")
    arn = create(kv, "doomed-mid", retention=1)
    pm = PutMedia(mooring, "doomed-mid")
    second = mkv_cluster(2000, frame=b"y" * 64)
    pm.send(mkv_header() + mkv_cluster(1000))
    pm.wait_for(lambda a: a["EventType"] == "PERSISTED" and a["FragmentTimecode"] == 1000)
    pm.send(second[:-32])  # up to the middle of the frame
    pm.wait_for(lambda a: a["EventType"] == "BUFFERING" and a["FragmentTimecode"] == 2000)
    kv.delete_stream(StreamARN=arn)
    pm.send(second[-32:])
    pm.end()
    acks = pm.all_acks()
    err = error_of(acks)
    assert (err["ErrorId"], err["ErrorCode"], err["FragmentTimecode"]) == (4507, "STREAM_DELETED", 2000)
    assert re.fullmatch(r"\d{47}", err["FragmentNumber"])
    assert ("RECEIVED", 2000) not in [(a["EventType"], a.get("FragmentTimecode")) for a in acks]
    with pytest.raises(ClientError) as e:
        kv.describe_stream(StreamName="doomed-mid")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_connection_age_limit_idle_acks_and_idle_close(mooring_factory):
    m = mooring_factory(extra_args=["--set", "video.max_connection_secs=2",
                                    "--set", "video.idle_ack_interval_ms=300",
                                    "--set", "video.idle_timeout_secs=60"])
    kv = m.client("kinesisvideo")
    create(kv, "aged", retention=0)
    pm = PutMedia(m, "aged")
    pm.send(mkv_header() + mkv_cluster(1000))
    acks = pm.all_acks(timeout=20)
    assert "IDLE" in [a["EventType"] for a in acks]
    assert acks[-1]["EventType"] == "ERROR" and acks[-1]["ErrorId"] == 4003
    assert acks[-1]["ErrorCode"] == "MAX_CONNECTION_DURATION_REACHED"

    m2 = mooring_factory(extra_args=["--set", "video.idle_ack_interval_ms=300",
                                     "--set", "video.idle_timeout_secs=2"])
    kv2 = m2.client("kinesisvideo")
    create(kv2, "quiet", retention=0)
    pm = PutMedia(m2, "quiet")
    started = time.monotonic()
    pm.send(mkv_header() + mkv_cluster(1000))
    acks = pm.all_acks(timeout=20)
    elapsed = time.monotonic() - started
    kinds = [a["EventType"] for a in acks]
    assert kinds[:2] == ["BUFFERING", "RECEIVED"] and kinds.count("IDLE") >= 2
    assert "ERROR" not in kinds
    assert 1.5 < elapsed < 10
    idle = [a for a in acks if a["EventType"] == "IDLE"][0]
    assert idle == {"EventType": "IDLE"}


def test_broken_connection_mid_fragment(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "broken", retention=1)
    pm = PutMedia(mooring, "broken")
    pm.send(mkv_header() + mkv_cluster(1000))
    cluster = mkv_cluster(2000, frame=b"x" * 5000)
    pm.send(cluster[:len(cluster) // 2])
    pm.wait_for(lambda a: a["EventType"] == "BUFFERING" and a["FragmentTimecode"] == 2000)
    pm.sock.shutdown(socket.SHUT_WR)  # the body ends mid-chunk
    acks = pm.all_acks()
    err = error_of(acks)
    assert err["ErrorId"] == 4000 and err["FragmentTimecode"] == 2000


# ---------------------------------------------------------------- durability

def test_persisted_fragments_survive_sigkill(mooring, ffmpeg_mkv):
    """SIGKILL while a producer is streaming (clusters go out in halves, paced, the last one
    never completes): every fragment whose PERSISTED ack reached the producer before the kill
    is readable after the restart, frame for frame, and listed; numbering continues above."""
    kv = mooring.client("kinesisvideo")
    create(kv, "durable", retention=1)
    clusters = producer_clusters(ffmpeg_mkv)
    by_timecode = dict(clusters)
    docs = documents(ffmpeg_mkv)
    spans = [(s, e) for i, s, e in docs[0] if i == ID_CLUSTER]
    pm = PutMedia(mooring, "durable")
    stop_sending = threading.Event()

    def produce():
        # Clusters in halves, paced; the last one only half: the upload is never complete.
        try:
            pm.send(ffmpeg_mkv[:spans[0][0] - 8])  # header; the cluster starts within 8 bytes
            pos = spans[0][0] - 8
            for k, (_, end) in enumerate(spans):
                middle = (pos + end) // 2
                pieces = [ffmpeg_mkv[pos:middle]] + ([ffmpeg_mkv[middle:end]] if k < len(spans) - 1 else [])
                for piece in pieces:
                    if stop_sending.is_set():
                        return
                    pm.send(piece)
                    time.sleep(0.25)
                pos = end
        except OSError:
            pass  # the server is gone

    sender = threading.Thread(target=produce)
    sender.start()
    seen = pm.wait_for(lambda a: a["EventType"] == "PERSISTED" and a["FragmentTimecode"] == clusters[2][0])
    mooring.kill()
    stop_sending.set()
    seen += pm.all_acks(timeout=10)  # every ack that reached the producer before the kill
    sender.join()
    pm.close()
    # The last fragment was caught mid-way: nothing beyond BUFFERING for it.
    assert not [a for a in seen if a.get("FragmentTimecode") == clusters[-1][0] and a["EventType"] != "BUFFERING"]
    persisted = [a for a in seen if a["EventType"] == "PERSISTED"]
    assert len(persisted) >= 3

    mooring.start()
    kv = mooring.client("kinesisvideo")
    fl = media_client(mooring, kv, "durable", "GET_MEDIA_FOR_FRAGMENT_LIST")
    body = fl.get_media_for_fragment_list(
        StreamName="durable", Fragments=[a["FragmentNumber"] for a in persisted])["Payload"].read()
    read_back = documents(mkvinfo_reads(body))
    assert len(read_back) == len(persisted)
    for doc, ack in zip(read_back, persisted):
        c = [(s, e) for i, s, e in doc if i == ID_CLUSTER]
        assert c, f"fragment {ack['FragmentNumber']} not readable after restart"
        timecode, frames = cluster_frames(body, *c[0])
        assert timecode == ack["FragmentTimecode"] and frames == by_timecode[timecode]
    listed = media_client(mooring, kv, "durable", "LIST_FRAGMENTS").list_fragments(
        StreamName="durable", FragmentSelector={"FragmentSelectorType": "SERVER_TIMESTAMP", "TimestampRange": {
            "StartTimestamp": time.time() - 300, "EndTimestamp": time.time() + 5}})["Fragments"]
    assert {a["FragmentNumber"] for a in persisted} <= {f["FragmentNumber"] for f in listed}
    # New fragments continue with larger numbers.
    _, acks = put_file(mooring, "durable", mkv_header() + mkv_cluster(int(time.time() * 1000)))
    new = [a for a in acks if a["EventType"] == "PERSISTED"][0]
    assert int(new["FragmentNumber"]) > max(int(f["FragmentNumber"]) for f in listed)


@pytest.mark.parametrize("name", ["empty-mkv-with-tags.mkv", "test_tags_empty_cluster.mkv"])
def test_documents_without_clusters_ingest_as_no_fragments(mooring, name):
    data = (TESTDATA / name).read_bytes()
    assert producer_clusters(data) == []
    kv = mooring.client("kinesisvideo")
    create(kv, "empty", retention=1)
    pm, acks = put_file(mooring, "empty", data, timecode_type="RELATIVE", start_timestamp="1516124526.822")
    assert pm.status == 200
    assert non_idle(acks) == []
    archive = media_client(mooring, kv, "empty", "LIST_FRAGMENTS")
    assert archive.list_fragments(StreamName="empty", FragmentSelector={
        "FragmentSelectorType": "SERVER_TIMESTAMP",
        "TimestampRange": {"StartTimestamp": 0, "EndTimestamp": time.time() + 5}})["Fragments"] == []
    # The stream still takes media afterwards.
    _, acks = put_file(mooring, "empty", mkv_header() + mkv_cluster(1000), timecode_type="RELATIVE",
                       start_timestamp=str(time.time()))
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED", "PERSISTED"]


def test_live_ffmpeg_pipe_gets_acks_while_streaming(mooring):
    """ffmpeg -re writes MKV to a pipe in real time; PERSISTED acks come back while it runs."""
    kv = mooring.client("kinesisvideo")
    create(kv, "pipe", retention=1)
    ff = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "testsrc=duration=4:size=160x120:rate=25",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
         "-f", "matroska", "-live", "1", "-cluster_size_limit", "50000000", "-cluster_time_limit", "20000", "-"],
        stdout=subprocess.PIPE)
    pm = PutMedia(mooring, "pipe", timecode_type="RELATIVE", start_timestamp=f"{time.time():.3f}")
    first_persisted_while_running = None

    def pump():
        while True:
            data = ff.stdout.read1(65536)
            if not data:
                break
            pm.send(data)
        pm.end()

    t = threading.Thread(target=pump)
    t.start()
    acks = []
    while True:
        ack = pm.next_ack(timeout=30)
        if ack is None:
            break
        acks.append(ack)
        if ack["EventType"] == "PERSISTED" and first_persisted_while_running is None:
            first_persisted_while_running = ff.poll() is None
    t.join()
    assert ff.wait() == 0
    assert first_persisted_while_running is True
    persisted = [a for a in acks if a["EventType"] == "PERSISTED"]
    assert len(persisted) == 4 and "ERROR" not in [a["EventType"] for a in acks]
    assert [a["FragmentTimecode"] for a in persisted] == sorted(a["FragmentTimecode"] for a in persisted)


def test_getmedia_connection_limit(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "popular", retention=0)
    media = media_client(mooring, kv, "popular", "GET_MEDIA")
    open_readers = [media.get_media(StreamName="popular", StartSelector={"StartSelectorType": "NOW"})
                    for _ in range(3)]
    with pytest.raises(ClientError) as e:
        media.get_media(StreamName="popular", StartSelector={"StartSelectorType": "NOW"})
    assert e.value.response["Error"]["Code"] == "ConnectionLimitExceededException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    for r in open_readers:
        assert r["Payload"].read() == b""  # nothing ingested: each ends after the idle period
    # Slots are released once the readers end.
    assert media.get_media(StreamName="popular",
                           StartSelector={"StartSelectorType": "NOW"})["Payload"].read() == b""


@pytest.mark.parametrize("variant", ["presigned", "unsigned_payload", "wrong_secret"])
def test_putmedia_signature_variants(mooring, variant):
    kv = mooring.client("kinesisvideo")
    create(kv, "signed", retention=0)
    body = mkv_header() + mkv_cluster(1000)
    if variant == "wrong_secret":
        m = mooring
        real = m.credentials
        m.credentials = lambda: (real()[0], "x" * 40)
        try:
            pm = PutMedia(m, "signed")
        finally:
            m.credentials = real
        pm.send(body)
        pm.end()
        pm.reader.join(10)
        assert pm.status == 403 and pm.headers["x-amzn-errortype"] == "InvalidSignatureException"
        return
    _, acks = put_file(mooring, "signed", body, **{variant: True})
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED"]


# ---------------------------------------------------------------- the producer/consumer CLI

def video_cli(m, *args, stdin=None, check=True, timeout=60):
    from conftest import mooring_binary
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("MOORING_") and k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    p = subprocess.run([mooring_binary(), "video", *args, "--data-dir", str(m.data_dir)],
                       input=stdin, capture_output=True, env=env, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


def test_video_cli_put_file_and_get(mooring, ffmpeg_mkv, tmp_path):
    """The forms the issue gives: `mooring video put --stream NAME FILE` and
    `mooring video get --stream NAME --start …` (standard output unless --out)."""
    kv = mooring.client("kinesisvideo")
    create(kv, "cli-cam", retention=1)
    src = tmp_path / "in.mkv"
    src.write_bytes(ffmpeg_mkv)
    clusters = producer_clusters(ffmpeg_mkv)
    assert len(clusters) == keyframe_count(src) == 5  # one cluster per 1 s GOP
    out = video_cli(mooring, "put", "--stream", "cli-cam", str(src)).stdout.decode()
    acks = non_idle([json.loads(line) for line in out.splitlines()])
    buffering = [a for a in acks if a["EventType"] == "BUFFERING"]
    assert [a["FragmentTimecode"] for a in buffering] == [tc for tc, _ in clusters]
    for a in buffering:
        group = [x for x in acks if x["FragmentNumber"] == a["FragmentNumber"]]
        assert [x["EventType"] for x in group] == ["BUFFERING", "RECEIVED", "PERSISTED"]
        assert {x["FragmentTimecode"] for x in group} == {a["FragmentTimecode"]}
    numbers = [int(a["FragmentNumber"]) for a in buffering]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(clusters)

    # `get --stream NAME --start earliest` writes the GetMedia output to standard output.
    p = video_cli(mooring, "get", "--stream", "cli-cam", "--start", "earliest")
    body = mkvinfo_reads(p.stdout)
    assert p.stderr.decode().strip() == f"wrote {len(body)} bytes"
    docs = documents(body)
    assert len(docs) == len(clusters)
    for doc, cluster in zip(docs, clusters):
        c = [(s, e) for i, s, e in doc if i == ID_CLUSTER]
        assert cluster_frames(body, *c[0]) == cluster
    # --out FILE, the stream as a positional argument; the same bytes as on stdout but for
    # the MILLIS_BEHIND_NOW values.
    got = tmp_path / "got.mkv"
    p = video_cli(mooring, "get", "cli-cam", "--out", str(got), "--start", "EARLIEST")
    assert p.stderr.decode().strip() == f"wrote {got.stat().st_size} bytes"
    assert subprocess.run(["mkvinfo", str(got)], capture_output=True).returncode == 0
    from_file = mkvinfo_reads(got.read_bytes())
    assert [cluster_frames(from_file, s, e) for d in documents(from_file) for i, s, e in d
            if i == ID_CLUSTER] == clusters
    # after:N and token:T selectors.
    after = video_cli(mooring, "get", "--stream", "cli-cam", "--out", "-",
                      "--start", f"after:{buffering[2]['FragmentNumber']}").stdout
    assert len(documents(mkvinfo_reads(after))) == len(clusters) - 3
    token = video_cli(mooring, "get", "--stream", "cli-cam",
                      "--start", f"token:{buffering[3]['FragmentNumber']}").stdout
    assert len(documents(mkvinfo_reads(token))) == 1
    bad = video_cli(mooring, "get", "cli-cam", "--out", "-", "--start", "yesterday", check=False)
    assert bad.returncode != 0 and b"unknown start" in bad.stderr
    # The positional form of put, for a stream that does not exist.
    missing = video_cli(mooring, "put", "no-such-stream", str(src), check=False)
    assert missing.returncode != 0 and b"404" in missing.stderr and b"ResourceNotFoundException" in missing.stderr


def test_video_cli_put_from_a_live_ffmpeg_pipe(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "cli-live", retention=1)
    from conftest import mooring_binary
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MOORING_")}
    ff = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "testsrc=duration=3:size=160x120:rate=25",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
         "-f", "matroska", "-live", "1", "-"], stdout=subprocess.PIPE)
    put = subprocess.Popen([mooring_binary(), "video", "put", "--stream", "cli-live", "-",
                            "--timecode-type", "RELATIVE", "--data-dir", str(mooring.data_dir)],
                           stdin=ff.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ff.stdout.close()
    first_ack_while_running = None
    acks = []
    for line in put.stdout:
        ack = json.loads(line)
        acks.append(ack)
        if ack["EventType"] == "PERSISTED" and first_ack_while_running is None:
            first_ack_while_running = ff.poll() is None
    assert put.wait(30) == 0, put.stderr.read().decode()
    ff.wait(10)
    assert first_ack_while_running is True
    persisted = [a for a in acks if a["EventType"] == "PERSISTED"]
    assert len(persisted) == 3
    listed = media_client(mooring, kv, "cli-live", "LIST_FRAGMENTS").list_fragments(
        StreamName="cli-live", FragmentSelector={"FragmentSelectorType": "SERVER_TIMESTAMP", "TimestampRange": {
            "StartTimestamp": time.time() - 120, "EndTimestamp": time.time() + 5}})["Fragments"]
    assert sorted(f["FragmentNumber"] for f in listed) == sorted(a["FragmentNumber"] for a in persisted)


# ---------------------------------------------------------------- 4005 and the KMS errors

def test_one_track_rule_gives_4005(mooring_factory):
    m = mooring_factory(extra_args=["--set", "video.max_tracks=1"])
    kv = m.client("kinesisvideo")
    create(kv, "one-track", retention=1)
    pm, acks = put_file(m, "one-track", mkv_header(tracks=(1, 2)) + mkv_cluster(5000, blocks=((1, 0), (2, 0))))
    err = error_of(acks)
    assert (err["ErrorId"], err["ErrorCode"], err["FragmentTimecode"]) == (4005, "MORE_THAN_ONE_TRACK_FOUND", 5000)
    _, acks = put_file(m, "one-track", mkv_header() + mkv_cluster(6000))
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED", "PERSISTED"]


KMS_STATES = {
    "AccessDenied": (4500, "KMS_KEY_ACCESS_DENIED"),
    "Disabled": (4501, "KMS_KEY_DISABLED"),
    "ValidationError": (4502, "KMS_KEY_VALIDATION_ERROR"),
    "Unavailable": (4503, "KMS_KEY_UNAVAILABLE"),
    "InvalidUsage": (4504, "KMS_KEY_INVALID_USAGE"),
    "PendingDeletion": (4505, "KMS_KEY_INVALID_STATE"),
    "NotFound": (4506, "KMS_KEY_NOT_FOUND"),
}


def test_kms_key_states_give_the_45xx_acks(mooring_factory, tmp_path):
    args = []
    for state in KMS_STATES:
        args += ["--set", f"video.kms_keys.key-{state.lower()}={state}"]
    m = mooring_factory(extra_args=args)
    kv = m.client("kinesisvideo")
    for state, (error_id, code) in KMS_STATES.items():
        name = f"kms-{state.lower()}"
        create(kv, name, retention=1, KmsKeyId=f"arn:aws:kms:us-east-1:000000000000:key/key-{state.lower()}")
        pm, acks = put_file(m, name, mkv_header() + mkv_cluster(7000))
        assert pm.status == 200
        assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "ERROR"], acks
        err = error_of(acks)
        assert (err["ErrorId"], err["ErrorCode"], err["FragmentTimecode"]) == (error_id, code, 7000)
    # A key the configuration does not list is usable.
    create(kv, "kms-fine", retention=1, KmsKeyId="alias/my-own-key")
    _, acks = put_file(m, "kms-fine", mkv_header() + mkv_cluster(8000))
    assert [a["EventType"] for a in non_idle(acks)] == ["BUFFERING", "RECEIVED", "PERSISTED"]
    # The CLI reports the ERROR ack and exits 1.
    src = tmp_path / "one.mkv"
    src.write_bytes(mkv_header() + mkv_cluster(9000))
    p = video_cli(m, "put", "kms-disabled", str(src), check=False)
    assert p.returncode == 1
    assert '"ErrorId":4501' in p.stdout.decode()


def test_unknown_kms_state_refuses_to_start(mooring_factory):
    with pytest.raises(RuntimeError) as e:
        mooring_factory(extra_args=["--set", "video.kms_keys.k=Sleepy"])
    assert "Sleepy" in str(e.value)


def error_document_tags(body):
    docs = documents(body)
    assert len(docs) == 1, docs
    tags = [simple_tags(body, s, e) for i, s, e in docs[0] if i == ID_TAGS]
    assert not [1 for i, _, _ in docs[0] if i == ID_CLUSTER]
    return dict(tags[0])


def test_getmedia_error_tags_for_a_failing_kms_key(mooring_factory):
    m = mooring_factory(extra_args=["--set", "video.kms_keys.rotating=Enabled"])
    kv = m.client("kinesisvideo")
    create(kv, "kms-later", retention=1, KmsKeyId="arn:aws:kms:us-east-1:000000000000:alias/rotating")
    _, acks = put_file(m, "kms-later", mkv_header() + mkv_cluster(1000) + mkv_cluster(2000))
    first = [a for a in acks if a["EventType"] == "PERSISTED"][0]["FragmentNumber"]
    m.stop()
    m2 = mooring_factory(data_dir=m.data_dir, extra_args=["--set", "video.kms_keys.rotating=Disabled"])
    kv = m2.client("kinesisvideo")
    body = get_media(m2, kv, "kms-later", {"StartSelectorType": "EARLIEST"})
    assert error_document_tags(body) == {
        "AWS_KINESISVIDEO_FRAGMENT_NUMBER": first,
        "AWS_KINESISVIDEO_ERROR_ID": "4501",
        "AWS_KINESISVIDEO_ERROR_CODE": "KMS_KEY_DISABLED",
    }


def test_getmedia_error_tags_when_fragment_media_is_gone(mooring_factory):
    m = mooring_factory()
    kv = m.client("kinesisvideo")
    create(kv, "lost", retention=1)
    _, acks = put_file(m, "lost", mkv_header() + mkv_cluster(1000) + mkv_cluster(2000))
    first = [a for a in acks if a["EventType"] == "PERSISTED"][0]["FragmentNumber"]
    m.stop()
    # Media removed behind Mooring's back; the index still lists the fragments.
    segments = [p for p in (m.data_dir / "video").rglob("*") if p.is_file()]
    assert segments
    for p in segments:
        p.write_bytes(b"")
    m.start()
    kv = m.client("kinesisvideo")
    body = get_media(m, kv, "lost", {"StartSelectorType": "EARLIEST"})
    assert error_document_tags(body) == {
        "AWS_KINESISVIDEO_FRAGMENT_NUMBER": first,
        "AWS_KINESISVIDEO_ERROR_ID": "4000",
        "AWS_KINESISVIDEO_ERROR_CODE": "FRAGMENT_NOT_FOUND",
    }
    # The server keeps working.
    _, acks = put_file(m, "lost", mkv_header() + mkv_cluster(int(time.time() * 1000)))
    assert "PERSISTED" in [a["EventType"] for a in acks]


def test_getmedia_error_3002_when_fragment_media_is_damaged(mooring_factory):
    """A stored fragment whose segment bytes were damaged behind Mooring's back (one byte
    flipped inside its record) fails its checksum on the way out: GetMedia cannot write it
    into the stream and ends with error 3002 for that fragment; the intact fragment after it
    is still served."""
    m = mooring_factory()
    kv = m.client("kinesisvideo")
    create(kv, "damaged", retention=1)
    _, acks = put_file(m, "damaged", mkv_header() + mkv_cluster(1000) + mkv_cluster(2000))
    first, second = [a["FragmentNumber"] for a in acks if a["EventType"] == "PERSISTED"]
    m.stop()
    segments = [p for p in (m.data_dir / "video").rglob("*.seg")]
    assert len(segments) == 1
    data = bytearray(segments[0].read_bytes())
    data[len(data) // 4] ^= 0xFF  # the middle of the first of two similar records
    segments[0].write_bytes(bytes(data))
    m.start()
    kv = m.client("kinesisvideo")
    body = get_media(m, kv, "damaged", {"StartSelectorType": "EARLIEST"})
    assert error_document_tags(body) == {
        "AWS_KINESISVIDEO_FRAGMENT_NUMBER": first,
        "AWS_KINESISVIDEO_ERROR_ID": "3002",
        "AWS_KINESISVIDEO_ERROR_CODE": "ERROR_WRITING_TO_STREAM",
    }
    body = get_media(m, kv, "damaged", {"StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": first})
    docs = documents(body)
    assert len(docs) == 1 and [1 for i, _, _ in docs[0] if i == ID_CLUSTER]
    tags = dict(t for i, s, e in docs[0] if i == ID_TAGS for t in simple_tags(body, s, e))
    assert tags["AWS_KINESISVIDEO_FRAGMENT_NUMBER"] == second
    assert "AWS_KINESISVIDEO_ERROR_ID" not in tags


# ---------------------------------------------------------------- quotas

def test_tps_limits_and_point_budgets(mooring_factory):
    m = mooring_factory(extra_args=["--set", "video.rate_limits=true"])
    kv = m.client("kinesisvideo")
    create(kv, "busy", retention=0)
    create(kv, "quiet", retention=0)

    def throttled(call):
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] == "ClientLimitExceededException"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert e.value.response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-errortype"].startswith(
            "ClientLimitExceededException")

    time.sleep(1.1)  # refill after the CreateStream calls above
    for _ in range(5):
        kv.describe_stream(StreamName="busy")
    throttled(lambda: kv.describe_stream(StreamName="busy"))
    # The budget is per stream (an ARN counts for its stream) and per operation.
    arn = kv.describe_stream(StreamName="quiet")["StreamInfo"]["StreamARN"]
    kv.describe_stream(StreamARN=arn)
    kv.list_tags_for_stream(StreamName="busy")
    time.sleep(1.1)
    kv.describe_stream(StreamName="busy")

    endpoint = kv.get_data_endpoint(StreamName="busy", APIName="LIST_FRAGMENTS")["DataEndpoint"]
    archived = m.client("kinesis-video-archived-media")
    assert endpoint == m.url
    selector = {"FragmentSelectorType": "SERVER_TIMESTAMP",
                "TimestampRange": {"StartTimestamp": 0, "EndTimestamp": time.time()}}
    for _ in range(10):  # 10 x 1000 points = the 10,000 points/s metadata budget
        archived.list_fragments(StreamName="busy", MaxResults=1000, FragmentSelector=selector)
    throttled(lambda: archived.list_fragments(StreamName="busy", MaxResults=1000, FragmentSelector=selector))
    archived.list_fragments(StreamName="quiet", MaxResults=1000, FragmentSelector=selector)

    numbers = [f"{91343852333181432392682062607743920146 + i}" for i in range(500)]
    archived.get_media_for_fragment_list(StreamName="busy", Fragments=numbers)["Payload"].read()
    throttled(lambda: archived.get_media_for_fragment_list(StreamName="busy", Fragments=numbers[:1]))

    # GetMedia: 5 calls per second per stream, counted before the request is even parsed
    # (these five are refused for their selector, which takes no connection slot).
    media = m.client("kinesis-video-media")
    for _ in range(5):
        with pytest.raises(ClientError) as e:
            media.get_media(StreamName="quiet", StartSelector={"StartSelectorType": "FRAGMENT_NUMBER"})
        assert e.value.response["Error"]["Code"] == "InvalidArgumentException"
    throttled(lambda: media.get_media(StreamName="quiet", StartSelector={"StartSelectorType": "NOW"}))


def test_tps_limits_are_off_by_default(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "free", retention=0)
    for _ in range(20):
        kv.describe_stream(StreamName="free")


def test_putmedia_and_getmedia_bandwidth_caps(mooring_factory, ffmpeg_mkv):
    rate = max(20_000, len(ffmpeg_mkv) // 3)
    m = mooring_factory(extra_args=["--set", f"video.put_media_bytes_per_sec={rate}",
                                    "--set", f"video.get_media_bytes_per_sec={rate}",
                                    "--set", "video.get_media_idle_ms=300"])
    kv = m.client("kinesisvideo")
    create(kv, "paced", retention=1)
    expected = (len(ffmpeg_mkv) - rate) / rate  # one second of burst, then the rate
    started = time.monotonic()
    pm, acks = put_file(m, "paced", ffmpeg_mkv)
    elapsed = time.monotonic() - started
    assert len([a for a in acks if a["EventType"] == "PERSISTED"]) == 5
    assert elapsed >= expected * 0.8, (elapsed, expected)

    started = time.monotonic()
    body = get_media(m, kv, "paced", {"StartSelectorType": "EARLIEST"})
    elapsed = time.monotonic() - started
    assert len(documents(body)) == 5
    # The last chunk goes out when its bytes fit; then the 0.3 s idle end.
    assert elapsed >= ((len(body) - rate - len(body) // 5) / rate) * 0.8, (elapsed, len(body), rate)


# ---------------------------------------------------------------- one PutMedia connection per stream

def test_newer_putmedia_connection_takes_over(mooring):
    kv = mooring.client("kinesisvideo")
    create(kv, "rotate", retention=1)
    base = int(time.time() * 1000) - 60_000
    old = PutMedia(mooring, "rotate")
    second = mkv_cluster(base + 2000)
    # Cut inside the frame, after the cluster's Timecode: BUFFERING carries the timecode, so
    # it can only be sent once the whole Timecode element (bytes 5..13 here) is in.
    cut = len(second) - 8
    old.send(mkv_header() + mkv_cluster(base) + second[:cut])
    old.wait_for(lambda a: a["EventType"] == "BUFFERING" and a["FragmentTimecode"] == base + 2000)

    # The producer rotates its connection in the middle of a fragment.
    new = PutMedia(mooring, "rotate")
    new.send(mkv_header() + mkv_cluster(base + 4000))
    new.wait_for(lambda a: a["EventType"] == "PERSISTED" and a["FragmentTimecode"] == base + 4000)

    # The old connection finishes the fragment it was sending, then its response ends; the
    # cluster it starts afterwards is not taken.
    old.send(second[cut:] + mkv_cluster(base + 6000))
    rest = old.all_acks(timeout=20)
    events = [(a["EventType"], a.get("FragmentTimecode")) for a in non_idle(rest)]
    assert ("PERSISTED", base + 2000) in events
    assert all(tc != base + 6000 for _, tc in events) and "ERROR" not in [e for e, _ in events]
    old.close()

    new.send(mkv_cluster(base + 8000))
    new.end()
    tail = new.all_acks()
    assert ("PERSISTED", base + 8000) in [(a["EventType"], a.get("FragmentTimecode")) for a in tail]
    new.close()
    listed = media_client(mooring, kv, "rotate", "LIST_FRAGMENTS").list_fragments(
        StreamName="rotate", FragmentSelector={"FragmentSelectorType": "PRODUCER_TIMESTAMP", "TimestampRange": {
            "StartTimestamp": (base - 1000) / 1000, "EndTimestamp": (base + 10_000) / 1000}})["Fragments"]
    assert sorted(int(f["ProducerTimestamp"].timestamp() * 1000) for f in listed) == [
        base, base + 2000, base + 4000, base + 8000]
