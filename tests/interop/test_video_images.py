"""Kinesis Video Streams GetImages seen from boto3's `kinesis-video-archived-media`: ffmpeg
draws a picture with known colours at known places (a lime and a yellow band on blue, a red
box that moves 8 px per frame within each second and a white box that moves 40 px per
second), encodes it as H.264 with 1 s GOPs and two B-frames between references (with or
without AAC on track 2), or as H.265 likewise, and PutMedia ingests it. The
returned JPEG and PNG images are decoded back to RGB with ffmpeg and the colours checked
where the sampled frame has them, so a wrong frame, a wrong clock or a wrong scale shows.
Gaps give NO_MEDIA, damaged frames and audio-only media MEDIA_ERROR, bad parameters the
documented errors."""

import base64
import struct
import subprocess
import time

import pytest
from botocore.exceptions import ClientError

from test_video import ID_CLUSTER, ID_SIMPLE_BLOCK, create, documents, elements, put_file, read_vint

FPS = 25
WIDTH, HEIGHT = 320, 240
LIME, YELLOW, BLUE, RED, WHITE = (0, 255, 0), (255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255)


class Clip:
    """An ingestible MKV and ffmpeg's own decode of it: the RGB frames in display order and
    the first frame's time (AAC priming delays the video by some milliseconds)."""

    def __init__(self, path):
        self.data = path.read_bytes()
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v", "-fps_mode", "passthrough",
                              "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
        size = WIDTH * HEIGHT * 3
        self.frames = [(WIDTH, HEIGHT, raw[i:i + size]) for i in range(0, len(raw), size)]
        pts = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                              "packet=pts_time", "-of", "csv=p=0", str(path)], capture_output=True, text=True,
                             check=True).stdout.split()
        self.offset_ms = round(min(float(p) for p in pts) * 1000)

    def frame_at(self, offset_ms):
        """The index of the frame on display `offset_ms` after the producer start."""
        return max(0, (round(offset_ms) - self.offset_ms) // (1000 // FPS))


def make_mkv(tmp_path_factory, seconds, name, audio, codec="h264"):
    """The test picture with two B-frames between references, with or without AAC on
    track 2, in H.264 or H.265."""
    path = tmp_path_factory.mktemp("images") / name
    video = [
        "-f", "lavfi", "-i", f"color=c=blue:s={WIDTH}x{HEIGHT}:r={FPS}:d={seconds}",
        "-f", "lavfi", "-i", f"color=c=red:s=40x40:r={FPS}:d={seconds}",
        "-f", "lavfi", "-i", f"color=c=white:s=40x40:r={FPS}:d={seconds}",
        # Busy picture in the free corner: ffmpeg starts a cluster at a keyframe only once
        # the cluster holds 4 KiB.
        "-f", "lavfi", "-i", f"testsrc2=s=64x56:r={FPS}:d={seconds}",
    ]
    audio_in = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"] if audio else []
    graph = ("[0]drawbox=x=0:y=0:w=160:h=80:color=lime:t=fill,"
             "drawbox=x=160:y=0:w=160:h=80:color=yellow:t=fill[bands];"
             "[bands][1]overlay=x='8*mod(n,25)':y=120[moving];"
             "[moving][2]overlay=x='40*floor(n/25)':y=184[seconds];"
             "[seconds][3]overlay=x=256:y=184[v]")
    maps = ["-map", "[v]"] + (["-map", "4:a", "-c:a", "aac"] if audio else [])
    encoder = (["-c:v", "libx264", "-preset", "ultrafast", "-x264-params", "bframes=2", "-crf", "16",
                "-g", "25", "-keyint_min", "25", "-sc_threshold", "0"] if codec == "h264" else
               ["-c:v", "libx265", "-preset", "ultrafast", "-crf", "16", "-x265-params",
                "bframes=2:keyint=25:min-keyint=25:scenecut=0:log-level=error"])
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", *video, *audio_in, "-filter_complex", graph, *maps,
         *encoder, "-pix_fmt", "yuv420p", "-shortest", "-f", "matroska", "-live", "1", "-cluster_size_limit", "50000000",
         "-cluster_time_limit", "20000", str(path)], check=True)
    return Clip(path)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    """6 s of the test picture (H.264 with B-frames, 1 s GOPs)."""
    return make_mkv(tmp_path_factory, 6, "pattern.mkv", audio=False)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """3 s of the test picture (H.264 with B-frames, 1 s GOPs) with AAC on track 2."""
    return make_mkv(tmp_path_factory, 3, "short.mkv", audio=True)


@pytest.fixture(scope="module")
def hevc_pattern(tmp_path_factory):
    """3 s of the test picture in H.265 (B-frames, 1 s GOPs)."""
    clip = make_mkv(tmp_path_factory, 3, "hevc.mkv", audio=False, codec="h265")
    assert b"V_MPEGH/ISO/HEVC" in clip.data
    return clip


def ingest(m, name, data, start, fragments, retention=1, new=True):
    """PutMedia with producer timestamps starting at `start` (whole seconds)."""
    kv = m.client("kinesisvideo")
    if new:
        create(kv, name, retention=retention)
    _, acks = put_file(m, name, data, timecode_type="RELATIVE", start_timestamp=f"{start:.3f}")
    persisted = [a for a in acks if a["EventType"] == "PERSISTED"]
    assert len(persisted) == fragments, acks


def archived(m):
    return m.client("kinesis-video-archived-media")


def images(m, name, start, end, **kw):
    kw.setdefault("Format", "PNG")
    kw.setdefault("ImageSelectorType", "PRODUCER_TIMESTAMP")
    return archived(m).get_images(StreamName=name, StartTimestamp=start, EndTimestamp=end, **kw)


def decode(data):
    """(width, height, rgb bytes) of a PNG or JPEG, decoded by ffmpeg."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=width,height", "-of", "csv=p=0",
                            "-i", "pipe:0"], input=data, capture_output=True, check=True)
    width, height = (int(v) for v in probe.stdout.decode().strip().split(","))
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
                         input=data, capture_output=True, check=True).stdout
    assert len(raw) == width * height * 3
    return width, height, raw


def pixel(img, x, y):
    width, _, raw = img
    at = (y * width + x) * 3
    return tuple(raw[at:at + 3])


def near(got, want, tolerance=48):
    return all(abs(a - b) <= tolerance for a, b in zip(got, want))


def box(img, colour, y, scale_x=1.0, scale_y=1.0, x_limit=WIDTH):
    """First and last x (in unscaled pixels) of `colour` on row y (unscaled)."""
    width = img[0]
    xs = [x for x in range(min(width, int(x_limit * scale_x)))
          if near(pixel(img, x, int(y * scale_y)), colour, 64)]
    assert xs, (colour, y)
    return xs[0] / scale_x, xs[-1] / scale_x


def check_frame(img, clip, index, scale_x=1.0, scale_y=1.0):
    """The picture is frame `index` of the clip: the static bands and background where
    they are drawn, the red and white boxes where ffmpeg's own decode of that frame has
    them (neighbouring frames have them 8 px and 40 px away)."""
    at = lambda x, y: pixel(img, int(x * scale_x), int(y * scale_y))  # noqa: E731
    assert near(at(80, 40), LIME), at(80, 40)
    assert near(at(240, 40), YELLOW), at(240, 40)
    assert near(at(300, 150), BLUE), at(300, 150)
    reference = clip.frames[index]
    tolerance = 2 / scale_x + 1
    for colour, y in ((RED, 140), (WHITE, 204)):
        got = box(img, colour, y, scale_x, scale_y, x_limit=248)
        want = box(reference, colour, y, x_limit=248)
        assert all(abs(g - w) <= tolerance for g, w in zip(got, want)), (index, colour, got, want)
        assert 36 <= want[1] - want[0] <= 40


def test_png_images_every_200ms_show_the_sampled_frames_and_page(mooring, pattern):
    t0 = int(time.time()) - 600
    ingest(mooring, "img-png", pattern.data, t0, 6)
    # 6 s at 200 ms: 30 instants, pages of 25 then 5.
    first = images(mooring, "img-png", t0, t0 + 6, SamplingInterval=200)
    assert set(first) >= {"Images", "NextToken"} and len(first["Images"]) == 25
    second = images(mooring, "img-png", t0, t0 + 6, SamplingInterval=200, NextToken=first["NextToken"])
    assert len(second["Images"]) == 5 and "NextToken" not in second
    entries = first["Images"] + second["Images"]
    for k, entry in enumerate(entries):
        assert set(entry) == {"TimeStamp", "ImageContent"}, entry.get("Error")
        assert abs(entry["TimeStamp"].timestamp() - (t0 + 0.2 * k)) < 0.0005
        data = base64.b64decode(entry["ImageContent"])
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        img = decode(data)
        assert img[:2] == (WIDTH, HEIGHT)
        check_frame(img, pattern, pattern.frame_at(200 * k))
    # An instant between frames shows the frame before it.
    mid = images(mooring, "img-png", t0 + 1.23, t0 + 1.23)["Images"]
    assert len(mid) == 1
    check_frame(decode(base64.b64decode(mid[0]["ImageContent"])), pattern, pattern.frame_at(1230))
    # MaxResults below 25 is the page size; above it pages stay at 25. boto3's paginator
    # follows NextToken to the end.
    pages = archived(mooring).get_paginator("get_images").paginate(
        StreamName="img-png", ImageSelectorType="PRODUCER_TIMESTAMP", StartTimestamp=t0, EndTimestamp=t0 + 6,
        SamplingInterval=200, Format="PNG", MaxResults=10)
    sizes = [len(page["Images"]) for page in pages]
    assert sizes == [10, 10, 10]
    big = images(mooring, "img-png", t0, t0 + 6, SamplingInterval=200, MaxResults=100)
    assert len(big["Images"]) == 25 and big["NextToken"]
    # A token only continues the request it came from.
    with pytest.raises(ClientError) as e:
        images(mooring, "img-png", t0, t0 + 5, SamplingInterval=200, NextToken=first["NextToken"])
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"


def test_h265_images_show_the_sampled_frames(mooring, hevc_pattern):
    """H.265 frames decode too (libde265): every 200 ms of 3 s, in JPEG and scaled PNG."""
    t0 = int(time.time()) - 600
    ingest(mooring, "img-hevc", hevc_pattern.data, t0, 3)
    entries = images(mooring, "img-hevc", t0, t0 + 3, SamplingInterval=200, Format="JPEG",
                     FormatConfig={"JPEGQuality": "90"})["Images"]
    assert len(entries) == 15
    for k, entry in enumerate(entries):
        assert set(entry) == {"TimeStamp", "ImageContent"}, entry.get("Error")
        data = base64.b64decode(entry["ImageContent"])
        assert data.startswith(b"\xff\xd8")
        img = decode(data)
        assert img[:2] == (WIDTH, HEIGHT)
        check_frame(img, hevc_pattern, hevc_pattern.frame_at(200 * k))
    scaled = images(mooring, "img-hevc", t0 + 1.5, t0 + 1.5, WidthPixels=640)["Images"]
    img = decode(base64.b64decode(scaled[0]["ImageContent"]))
    assert img[:2] == (640, 480)
    check_frame(img, hevc_pattern, hevc_pattern.frame_at(1500), 2.0, 2.0)


def test_jpeg_quality_scaling_and_server_timestamps(mooring, pattern):
    t0 = int(time.time()) - 600
    ingest(mooring, "img-jpeg", pattern.data, t0, 6)
    low = images(mooring, "img-jpeg", t0 + 2, t0 + 2, Format="JPEG", FormatConfig={"JPEGQuality": "10"})["Images"]
    high = images(mooring, "img-jpeg", t0 + 2, t0 + 2, Format="JPEG", FormatConfig={"JPEGQuality": "95"})["Images"]
    default = images(mooring, "img-jpeg", t0 + 2, t0 + 2, Format="JPEG")["Images"]
    sizes = []
    for entry in (low, high, default):
        assert len(entry) == 1
        data = base64.b64decode(entry[0]["ImageContent"])
        assert data[:3] == b"\xff\xd8\xff"
        sizes.append(len(data))
    assert sizes[0] < sizes[2] < sizes[1], sizes
    check_frame(decode(base64.b64decode(high[0]["ImageContent"])), pattern, pattern.frame_at(2000))
    # Width alone keeps the aspect ratio, height alone too, both stretch.
    for kw, size in (({"WidthPixels": 160}, (160, 120)), ({"HeightPixels": 60}, (80, 60)),
                     ({"WidthPixels": 640, "HeightPixels": 120}, (640, 120))):
        entry = images(mooring, "img-jpeg", t0 + 3, t0 + 3, **kw)["Images"][0]
        img = decode(base64.b64decode(entry["ImageContent"]))
        assert img[:2] == size, (kw, img[:2])
        check_frame(img, pattern, pattern.frame_at(3000), size[0] / WIDTH, size[1] / HEIGHT)
    # Server timestamps: the fragments' arrival times from ListFragments. They were sent
    # faster than real time, so only the last one's second is its own on the server clock.
    fragments = archived(mooring).list_fragments(
        StreamName="img-jpeg", FragmentSelector={"FragmentSelectorType": "PRODUCER_TIMESTAMP",
                                                 "TimestampRange": {"StartTimestamp": t0, "EndTimestamp": t0 + 10}})
    by_producer = sorted(fragments["Fragments"], key=lambda f: f["ProducerTimestamp"])
    assert len(by_producer) == 6
    last = by_producer[-1]["ServerTimestamp"].timestamp()
    last_offset = round((by_producer[-1]["ProducerTimestamp"].timestamp() - t0) * 1000)
    got = images(mooring, "img-jpeg", last, last + 0.9, ImageSelectorType="SERVER_TIMESTAMP", SamplingInterval=400)
    assert [round(e["TimeStamp"].timestamp() - last, 3) for e in got["Images"]] == [0.0, 0.4, 0.8]
    for k, entry in enumerate(got["Images"]):
        index = pattern.frame_at(last_offset + 400 * k)
        check_frame(decode(base64.b64decode(entry["ImageContent"])), pattern, index)
    after = images(mooring, "img-jpeg", last + 1.5, last + 1.5, ImageSelectorType="SERVER_TIMESTAMP")
    assert [e.get("Error") for e in after["Images"]] == ["NO_MEDIA"]


def test_gaps_are_no_media_and_damaged_frames_media_error(mooring, short, tmp_path_factory):
    t0 = int(time.time()) - 600
    ingest(mooring, "img-gap", short.data, t0, 3)
    ingest(mooring, "img-gap", short.data, t0 + 10, 3, new=False)
    # Instants at t0 - 1.5 s, t0 - 0.5 s, ..., t0 + 12.5 s.
    entries = images(mooring, "img-gap", t0 - 1.5, t0 + 13)["Images"]
    assert len(entries) == 15
    errors = [e.get("Error") for e in entries]
    assert errors == ["NO_MEDIA"] * 2 + [None] * 3 + ["NO_MEDIA"] * 7 + [None] * 3, errors
    for k, entry in enumerate(entries):
        if "Error" in entry:
            assert "ImageContent" not in entry
        else:
            offset = (1000 * k - 1500) % 10_000
            check_frame(decode(base64.b64decode(entry["ImageContent"])), short, short.frame_at(offset))
    # The second fragment's H.264 frames damaged (valid Matroska, garbage slices).
    data = short.data
    damaged = bytearray(data)
    clusters = [(s, e) for doc in documents(data) for i, s, e in doc if i == ID_CLUSTER]
    assert len(clusters) == 3
    start, stop = clusters[1]
    for eid, cs, ce in elements(data, start, stop):
        track, n = read_vint(data, cs, False) if eid == ID_SIMPLE_BLOCK else (None, 0)
        if track == 1:
            frame = cs + n + 3
            size = ce - frame
            damaged[frame:ce] = struct.pack(">I", size - 4) + b"\x65" + b"\xff" * (size - 5)
    ingest(mooring, "img-damaged", bytes(damaged), t0, 3)
    entries = images(mooring, "img-damaged", t0 + 0.25, t0 + 3, SamplingInterval=500)["Images"]
    assert [e.get("Error") for e in entries] == [None, None, "MEDIA_ERROR", "MEDIA_ERROR", None, None]
    check_frame(decode(base64.b64decode(entries[4]["ImageContent"])), short, short.frame_at(2250))
    # Audio on track 1: no picture can be made.
    audio = tmp_path_factory.mktemp("audio") / "audio.mkv"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=3",
                    "-c:a", "aac", "-f", "matroska", "-live", "1", "-cluster_time_limit", "1000", str(audio)],
                   check=True)
    kv = mooring.client("kinesisvideo")
    create(kv, "img-audio", retention=1)
    _, acks = put_file(mooring, "img-audio", audio.read_bytes(), timecode_type="RELATIVE",
                       start_timestamp=f"{t0:.3f}")
    assert any(a["EventType"] == "PERSISTED" for a in acks), acks
    entries = images(mooring, "img-audio", t0 + 0.5, t0 + 1)["Images"]
    assert [e.get("Error") for e in entries] == ["MEDIA_ERROR"]
    # The server is still serving the intact stream (the first fragment starts at the
    # keyframe's PTS, a few ms after t0 with B-frames and AAC, so ask inside it).
    assert "ImageContent" in images(mooring, "img-gap", t0 + 0.5, t0 + 0.5)["Images"][0]


def error_of(call):
    with pytest.raises(ClientError) as e:
        call()
    return e.value.response["Error"]["Code"], e.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_bad_parameters_get_the_documented_errors(mooring, short):
    t0 = int(time.time()) - 600
    ingest(mooring, "img-errors", short.data, t0, 3)
    invalid = ("InvalidArgumentException", 400)
    bad = [
        {"EndTimestamp": t0 + 301},
        {"EndTimestamp": t0 - 1},
        {"SamplingInterval": 100},
        {"Format": "GIF"},
        {"ImageSelectorType": "NOW"},
        {"Format": "JPEG", "FormatConfig": {"JPEGQuality": "0"}},
        {"Format": "JPEG", "FormatConfig": {"JPEGQuality": "101"}},
        {"Format": "JPEG", "FormatConfig": {"JPEGQuality": "high"}},
        {"WidthPixels": 3841},
        {"HeightPixels": 2161},
        {"MaxResults": 101},
        {"NextToken": "bm90IGEgdG9rZW4="},
        {"NextToken": "not a token!"},
    ]
    for override in bad:
        kw = {"StartTimestamp": t0, "EndTimestamp": t0 + 3, "Format": "PNG",
              "ImageSelectorType": "PRODUCER_TIMESTAMP", **override}
        assert error_of(lambda: archived(mooring).get_images(StreamName="img-errors", **kw)) == invalid, override
    # Neither or both of StreamName and StreamARN.
    assert error_of(lambda: archived(mooring).get_images(
        ImageSelectorType="PRODUCER_TIMESTAMP", StartTimestamp=t0, EndTimestamp=t0 + 1, Format="PNG")) == invalid
    assert error_of(lambda: images(mooring, "no-such-stream", t0, t0 + 1)) == ("ResourceNotFoundException", 404)
    kv = mooring.client("kinesisvideo")
    create(kv, "img-no-retention", retention=0)
    assert error_of(lambda: images(mooring, "img-no-retention", t0, t0 + 1)) == ("NoDataRetentionException", 400)
    # By ARN, and the server still answers after the errors.
    arn = kv.describe_stream(StreamName="img-errors")["StreamInfo"]["StreamARN"]
    ok = archived(mooring).get_images(StreamARN=arn, ImageSelectorType="PRODUCER_TIMESTAMP", StartTimestamp=t0 + 0.5,
                                      EndTimestamp=t0 + 1.5, SamplingInterval=500, Format="PNG")
    assert [("ImageContent" in e) for e in ok["Images"]] == [True, True]
