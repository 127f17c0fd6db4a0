"""A live camera for the browser tests: ffmpeg encodes testsrc2 in real time (1 s GOPs, no
B-frames) with the frame number burned in as a row of black/white blocks, and this module
re-frames its Matroska output the way the KVS producer SDK streams it: one unknown-size
Cluster per GOP (one fragment), each frame written and flushed as soon as it is encoded, into
`mooring video put STREAM -`. The wall-clock time each frame left the encoder is logged, so a
player showing frame N can say how far behind the camera it is (glass-to-glass)."""

import os
import subprocess
import threading
import time

FPS = 25
GOP = 25
BITS = 16
BLOCK = 16
WIDTH, HEIGHT = 320, 240

ID_SEGMENT = 0x18538067
ID_CLUSTER = 0x1F43B675
ID_TIMECODE = 0xE7
ID_SIMPLE_BLOCK = 0xA3
ID_BLOCK_GROUP = 0xA0
UNKNOWN_SIZE = bytes.fromhex("01ffffffffffffff")


def frame_number_filter():
    """geq expressions drawing bit k of the frame number as block k of the top row."""
    bit = f"mod(floor(floor(T*{FPS}+0.5)/pow(2,floor(X/{BLOCK}))),2)"
    top = f"lt(Y,{BLOCK})*lt(X,{BITS * BLOCK})"
    return (f"geq=lum='if({top},if({bit},235,16),lum(X,Y))'"
            f":cb='if({top},128,cb(X,Y))':cr='if({top},128,cr(X,Y))'")


def _read_exact(f, n):
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _read_vint(f, keep_marker):
    first = _read_exact(f, 1)
    length = 1
    while length <= 8 and not first[0] & (0x80 >> (length - 1)):
        length += 1
    if length > 8:
        raise ValueError("bad EBML vint")
    raw = first + _read_exact(f, length - 1)
    value = int.from_bytes(raw, "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            value = None
    return value, raw


def _children(data):
    at = 0
    while at < len(data):
        length = 1
        while not data[at] & (0x80 >> (length - 1)):
            length += 1
        eid = int.from_bytes(data[at:at + length], "big")
        at += length
        slen = 1
        while not data[at] & (0x80 >> (slen - 1)):
            slen += 1
        size = int.from_bytes(data[at:at + slen], "big") & ((1 << (7 * slen)) - 1)
        at += slen
        yield eid, data[at:at + size]
        at += size


def _uint_element(eid, value):
    body = value.to_bytes(8, "big").lstrip(b"\0") or b"\0"
    return eid.to_bytes((eid.bit_length() + 7) // 8, "big") + bytes([0x80 | len(body)]) + body


class LiveCamera:
    """Runs ffmpeg | re-framer | `mooring video put` until stopped."""

    def __init__(self, mooring_bin, data_dir, endpoint, stream, on_ack=None):
        self.on_ack = on_ack  # called with (arrival time, ack line) for every ack
        self.frames = {}  # frame number -> wall-clock seconds it was sent
        self.error = None
        self.acks = []
        self.ffmpeg = subprocess.Popen(
            ["ffmpeg", "-loglevel", "error", "-re", "-f", "lavfi",
             "-i", f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}",
             "-vf", f"format=yuv420p,{frame_number_filter()}",
             "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
             "-g", str(GOP), "-keyint_min", str(GOP), "-sc_threshold", "0", "-bf", "0",
             "-f", "matroska", "-live", "1", "-cluster_time_limit", "1",
             "-cluster_size_limit", "1", "-"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOORING_")}
        self.put = subprocess.Popen(
            [mooring_bin, "video", "put", "--data-dir", str(data_dir), "--endpoint-url", endpoint,
             "--timecode-type", "ABSOLUTE", stream, "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.reframer = threading.Thread(target=self._reframe, daemon=True)
        self.reframer.start()
        self.ack_reader = threading.Thread(target=self._read_acks, daemon=True)
        self.ack_reader.start()

    def _read_acks(self):
        for line in self.put.stdout:
            now = time.time()
            self.acks.append(line.decode().strip())
            if self.on_ack:
                self.on_ack(now, self.acks[-1])

    def _write(self, data):
        self.put.stdin.write(data)
        self.put.stdin.flush()

    def _reframe(self):
        src = self.ffmpeg.stdout
        # Wall-clock producer timestamps: cluster timecodes are absolute milliseconds.
        epoch_ms = None
        try:
            header = b""
            while True:
                eid, raw_id = _read_vint(src, keep_marker=True)
                size, raw_size = _read_vint(src, keep_marker=False)
                if eid == ID_SEGMENT:
                    header += raw_id + UNKNOWN_SIZE
                    continue
                if eid != ID_CLUSTER:
                    header += raw_id + raw_size + _read_exact(src, size)
                    continue
                body = _read_exact(src, size)
                if header:
                    self._write(header)
                    header = b""
                cluster_tc = 0
                for cid, data in _children(body):
                    if cid == ID_TIMECODE:
                        cluster_tc = int.from_bytes(data, "big")
                    elif cid == ID_SIMPLE_BLOCK:
                        relative = int.from_bytes(data[1:3], "big", signed=True)
                        pts = cluster_tc + relative
                        keyframe = bool(data[3] & 0x80)
                        now = time.time()
                        if epoch_ms is None:
                            epoch_ms = int(now * 1000) - pts
                        if keyframe:
                            self._gop_tc = epoch_ms + pts
                            self._write(ID_CLUSTER.to_bytes(4, "big") + UNKNOWN_SIZE
                                        + _uint_element(ID_TIMECODE, self._gop_tc))
                        offset = epoch_ms + pts - self._gop_tc
                        block = bytes([data[0]]) + offset.to_bytes(2, "big", signed=True) + data[3:]
                        self._write(ID_SIMPLE_BLOCK.to_bytes(1, "big")
                                    + (len(block) | (1 << 56)).to_bytes(8, "big") + block)
                        self.frames[round(pts * FPS / 1000)] = now
        except (EOFError, BrokenPipeError, ValueError, OSError) as e:
            self.error = e

    def stop(self):
        for p in (self.ffmpeg, self.put):
            if p.poll() is None:
                p.terminate()
        for p in (self.ffmpeg, self.put):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
