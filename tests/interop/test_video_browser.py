"""Kinesis Video Streams playback in a real browser: a live camera (ffmpeg testsrc2 in real
time, the frame number burned in) is pushed with `mooring video put`; Debian's chromium,
driven by playwright-core (tests/interop/node/play.js), plays the LIVE session URLs boto3
returns: HLS in hls.js, in KVS's plain HLS and in Mooring's Low-Latency HLS
(`&LowLatency=ON`), and MPEG-DASH (GetDASHStreamingSessionURL) in dash.js. Each live run
asserts that playback starts and advances with no player errors and no dropped frames over
10 s, at least 20 frames a second, and measures the glass-to-glass delay: the page reads the
frame number back from every presented frame and the camera knows when it sent that frame.
An ON_DEMAND DASH session over the recording plays in dash.js from its first frame forward.
Mooring's own player page (/console/video/{stream}, hls.js with liveSyncDuration 1.5 s) is
watched the same way.

The delays are printed (run with -s); tests/interop/bench_video_playback.py reports the HLS
ones as benchmark figures against the targets (HLS <= 3 s, LL-HLS <= 1.5 s with 1 s GOPs).
For debugging, BROWSER_HLS_CONFIG='{"debug": true}' passes hls.js settings to the LL-HLS run,
BROWSER_DASH_CONFIG='{"debug": {"logLevel": 5}}' passes dash.js settings to the DASH runs and
BROWSER_CONSOLE_FILE=path keeps the page's console."""

import json
import os
import re
import statistics
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from live_producer import BITS, BLOCK, FPS, GOP, LiveCamera
from conftest import mooring_binary
from test_video import create

NODE_DIR = Path(__file__).resolve().parent / "node"
CHROMIUM = "/usr/bin/chromium"
SECONDS = 10


def node_ready():
    missing = [p for p in (NODE_DIR / "node_modules" / "hls.js", NODE_DIR / "node_modules" / "dashjs",
                           NODE_DIR / "node_modules" / "playwright-core", Path(CHROMIUM)) if not p.exists()]
    assert not missing, f"scripts/test installs these: {missing}"


@pytest.fixture
def camera(mooring):
    """A stream with a live camera pushing into it; yields (stream name, camera)."""
    name = "browser-cam"
    create(mooring.client("kinesisvideo"), name, retention=1)
    cam = LiveCamera(mooring_binary(), mooring.data_dir, mooring.url, name)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and sum('"PERSISTED"' in a for a in cam.acks) < 2:
            assert cam.put.poll() is None, cam.put.stderr.read().decode()
            time.sleep(0.2)
        assert sum('"PERSISTED"' in a for a in cam.acks) >= 2, cam.acks
        yield name, cam
    finally:
        cam.stop()
    assert cam.error is None or isinstance(cam.error, (EOFError, BrokenPipeError)), cam.error
    assert not [a for a in cam.acks if '"ERROR"' in a], cam.acks


def live_session_url(m, name):
    archived = m.client("kinesis-video-archived-media")
    return archived.get_hls_streaming_session_url(
        StreamName=name, PlaybackMode="LIVE", ContainerFormat="FRAGMENTED_MP4",
        DisplayFragmentTimestamp="ALWAYS")["HLSStreamingSessionURL"]


def play(url, low_latency=False, hls_config=None, player="hls", dash_config=None, seconds=SECONDS):
    node_ready()
    r = subprocess.run(
        ["node", str(NODE_DIR / "play.js"),
         json.dumps({"url": url, "player": player, "lowLatency": low_latency, "seconds": seconds,
                     "chromium": CHROMIUM, "bits": BITS, "block": BLOCK, "hlsConfig": hls_config or {},
                     "dashConfig": dash_config or {},
                     "consoleFile": os.environ.get("BROWSER_CONSOLE_FILE")})],
        capture_output=True, text=True, timeout=2 * seconds + 90, cwd=NODE_DIR)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "exception" not in out, out
    return out


def presented_frames(out, seconds=SECONDS):
    """(wall-clock s, frame number) of every frame chromium presented in the window, at least
    20 a second."""
    frames = [(shown / 1000.0, n) for shown, n in out["report"]["frames"] if shown >= out["start_wall"]]
    assert len(frames) >= seconds * 20, f"only {len(frames)} frames presented"
    return frames


def glass_to_glass(out, cam):
    """Delays (s) from the camera sending a frame to chromium presenting it, in the window."""
    frames = presented_frames(out)
    known = [(shown - cam.frames[n], n) for shown, n in frames if n in cam.frames]
    # The numbers read back are the camera's own: (almost) every one matches a sent frame
    # and they only move forward.
    assert len(known) >= 0.95 * len(frames), (len(known), len(frames), frames[:10])
    numbers = [n for _, n in known]
    assert all(b >= a for a, b in zip(numbers, numbers[1:])), numbers
    return [d for d, _ in known]


def check_playback(out, seconds=SECONDS):
    before, after = out["before"], out["after"]
    assert out["mse_h264"], "this chromium cannot play H.264 through MSE"
    assert out["started"], json.dumps({k: v for k, v in out.items() if k != "report"} | {"errors": out["report"]["errors"]})
    errors = out["report"]["errors"]
    assert not [e for e in errors if e["fatal"]], errors
    assert not [e for e in errors if e["type"] != "play" and e["details"] not in (
        "bufferStalledError", "bufferNudgeOnStall")], errors
    assert after["readyState"] >= 3, after
    assert after["currentTime"] - before["currentTime"] >= seconds * 0.8, (before, after)
    # play.js measures a second window only when the first dropped a frame; that second one
    # must drop none (see play.js: a drop the stream causes recurs every fragment).
    if len(out["windows"]) > 1:
        print(f"{out['player']}: the first window dropped a frame, measured again: {out['windows']}")
    assert after["dropped"] - before["dropped"] == 0, (out["windows"], out["report"]["events"])
    assert after["total"] - before["total"] >= seconds * 20, (before, after)


def report(label, delays, out):
    median = statistics.median(delays)
    p90 = sorted(delays)[int(len(delays) * 0.9)]
    print(f"\n{label}: glass-to-glass median {median:.3f} s, p90 {p90:.3f} s, "
          f"min {min(delays):.3f} s over {len(delays)} frames; {out['version']} latency "
          f"{out['report']['latency']}, fragments {out['report']['fragments']}, parts {out['report']['parts']}")
    return median


def test_live_hls_plays_in_chromium_without_errors_or_dropped_frames(mooring, camera):
    name, cam = camera
    url = live_session_url(mooring, name)
    out = play(url, low_latency=False)
    check_playback(out)
    delays = glass_to_glass(out, cam)
    median = report("HLS", delays, out)
    assert out["report"]["parts"] == 0
    # KVS-style HLS plays a few fragments behind the live edge.
    assert 0.2 < median < 8.0, median


def fetch_text(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def test_low_latency_hls_plays_in_chromium_about_a_second_behind(mooring, camera):
    name, cam = camera
    url = live_session_url(mooring, name) + "&LowLatency=ON"
    out = play(url, low_latency=True, hls_config=json.loads(os.environ.get("BROWSER_HLS_CONFIG", "{}")))
    check_playback(out)
    delays = glass_to_glass(out, cam)
    median = report("LL-HLS", delays, out)
    # hls.js fetched partial segments, and stays much closer to the camera than plain HLS.
    assert out["report"]["parts"] >= SECONDS * 2, out["report"]
    assert 0.05 < median < 4.0, median


def test_low_latency_playlist_blocks_and_its_parts_decode(mooring, camera, tmp_path):
    name, cam = camera
    master_url = live_session_url(mooring, name) + "&LowLatency=ON"
    master = fetch_text(master_url)
    media_uri = [line for line in master.splitlines() if line and not line.startswith("#")][0]
    assert "LowLatency=ON" in media_uri
    base = master_url.rsplit("/", 1)[0] + "/"
    playlist = fetch_text(base + media_uri)
    assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.750" in playlist
    assert "#EXT-X-PART-INF:PART-TARGET=0.250" in playlist
    assert "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=" in playlist
    parts = re.findall(r'#EXT-X-PART:DURATION=([0-9.]+),URI="([^"]+)"', playlist)
    assert parts and all(float(d) <= 0.25 for d, _ in parts), playlist
    sequence = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", playlist).group(1))
    segments = [line for line in playlist.splitlines() if line.startswith("getMP4MediaFragment")]
    last_msn = sequence + len(segments) - 1

    # Blocking reload: asking for the segment after the next one holds the request until
    # it is complete (about two 1 s GOPs), then the playlist lists it.
    started = time.time()
    held = fetch_text(base + media_uri + f"&_HLS_msn={last_msn + 2}")
    waited = time.time() - started
    assert 0.5 < waited < 3.5, waited
    held_sequence = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", held).group(1))
    held_segments = [line for line in held.splitlines() if line.startswith("getMP4MediaFragment")]
    assert held_sequence + len(held_segments) - 1 >= last_msn + 2, held
    # ... and for a part: the first part of the growing segment.
    started = time.time()
    held = fetch_text(base + media_uri + f"&_HLS_msn={last_msn + 3}&_HLS_part=0")
    assert time.time() - started < 3.5
    tail = held.split("#EXT-X-PRELOAD-HINT")[0].splitlines()
    assert tail[-1].startswith("#EXT-X-PART:"), held

    # The parts of a complete segment, concatenated after the init segment, are the same
    # frames as the segment: ffmpeg decodes both without an error.
    lines = held.splitlines()
    init_uri = re.search(r'#EXT-X-MAP:URI="([^"]+)"', held).group(1)
    seg_index = max(i for i, line in enumerate(lines) if line.startswith("getMP4MediaFragment"))
    seg_parts = []
    for line in reversed(lines[:seg_index]):
        if line.startswith("#EXTINF") or line.startswith("#EXT-X-PROGRAM-DATE-TIME"):
            continue
        if not line.startswith("#EXT-X-PART:"):
            break
        seg_parts.insert(0, re.search(r'URI="([^"]+)"', line).group(1))
    assert len(seg_parts) >= 4, held
    with urllib.request.urlopen(base + init_uri) as r:
        init = r.read()
    joined = init + b"".join(urllib.request.urlopen(base + p).read() for p in seg_parts)
    whole = init + urllib.request.urlopen(base + lines[seg_index]).read()
    counts = []
    for label, data in (("parts", joined), ("segment", whole)):
        path = tmp_path / f"{label}.mp4"
        path.write_bytes(data)
        counts.append(decode_frames(str(path)))
    assert counts[0] == counts[1] == 25, counts

    # ffmpeg plays the low-latency playlist itself as a live HLS stream.
    r = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", master_url, "-t", "3", "-map", "0:v",
                        "-f", "framemd5", "-"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    assert len([x for x in r.stdout.splitlines() if x and not x.startswith("#")]) >= 50


def decode_frames(path):
    r = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", path, "-map", "0:v", "-f", "framemd5", "-"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    return len([x for x in r.stdout.splitlines() if x and not x.startswith("#")])


def dash_session_url(m, name, **kw):
    archived = m.client("kinesis-video-archived-media")
    return archived.get_dash_streaming_session_url(StreamName=name, **kw)["DASHStreamingSessionURL"]


def dash_config():
    return json.loads(os.environ.get("BROWSER_DASH_CONFIG", "{}"))


def test_live_dash_plays_in_dashjs_without_errors_or_dropped_frames(mooring, camera):
    name, cam = camera
    url = dash_session_url(mooring, name, PlaybackMode="LIVE", DisplayFragmentTimestamp="ALWAYS")
    out = play(url, player="dash", dash_config=dash_config())
    check_playback(out)
    delays = glass_to_glass(out, cam)
    median = report("DASH", delays, out)
    # The only request the page made off Mooring's origin was dash.js's default clock source
    # (blocked: dash.js then takes the time from the manifest response's Date header).
    assert not [u for u in out["blocked"] if not u.startswith("https://time.akamai.com/")], out["blocked"]
    # dash.js downloaded a segment per 1 s fragment, and played a few fragments behind the camera.
    assert out["report"]["fragments"] >= SECONDS * 0.8, out["report"]
    assert 0.2 < median < 15.0, median


def test_on_demand_dash_plays_a_recording_from_its_start_in_dashjs(mooring, camera):
    name, cam = camera
    seconds = 5
    # A recording a few fragments (1 s GOPs) longer than the measuring window.
    deadline = time.time() + 30
    while time.time() < deadline and sum('"PERSISTED"' in a for a in cam.acks) < seconds + 3:
        time.sleep(0.2)
    end = time.time()
    recorded = {n: t for n, t in cam.frames.items() if t < end - 1}
    assert len(recorded) >= (seconds + 2) * FPS, len(recorded)
    url = dash_session_url(
        mooring, name, PlaybackMode="ON_DEMAND", DisplayFragmentTimestamp="ALWAYS",
        DASHFragmentSelector={"FragmentSelectorType": "PRODUCER_TIMESTAMP", "TimestampRange": {
            "StartTimestamp": datetime.fromtimestamp(min(recorded.values()) - 1, timezone.utc),
            "EndTimestamp": datetime.fromtimestamp(end, timezone.utc)}})
    out = play(url, player="dash", dash_config=dash_config(), seconds=seconds)
    check_playback(out, seconds)
    shown = [n for _, n in out["report"]["frames"]]
    # Played from the recording's first fragment, forward through the camera's own frames
    # (as in glass_to_glass, (almost) every number read back is one the camera sent).
    numbers = [n for n in shown if n in cam.frames]
    assert len(numbers) >= 0.95 * len(shown), (len(numbers), len(shown), shown[:10])
    print(f"\nON_DEMAND DASH: {out['version']} presented frames {numbers[0]}..{numbers[-1]}, "
          f"{out['report']['fragments']} fragments, currentTime {out['after']['currentTime']:.2f}")
    assert numbers[0] < min(recorded) + GOP, numbers[:10]
    assert all(b >= a for a, b in zip(numbers, numbers[1:])), numbers
    assert out["blocked"] == [], out["blocked"]
    window = [n for _, n in presented_frames(out, seconds)]
    assert window[-1] - window[0] >= seconds * 0.8 * FPS, (window[0], window[-1])
    # The presentation starts at zero (presentationTimeOffset): currentTime is the frame's
    # time in the recording.
    assert abs(out["after"]["currentTime"] - (numbers[-1] - min(recorded)) / FPS) < 0.5, (
        out["after"], numbers[-1])


def test_console_player_page_plays_the_live_stream_closer_than_hls_js_defaults(mooring, camera):
    name, cam = camera
    page = f"{mooring.url}/console/video/{name}?hls_js=/__browser_test__/hls.min.js"
    out = play(page, player="page")
    check_playback(out)
    delays = glass_to_glass(out, cam)
    median = report("console player page (HLS)", delays, out)
    assert out["blocked"] == [], out["blocked"]
    assert out["report"]["parts"] == 0 and out["report"]["fragments"] >= SECONDS * 0.8, out["report"]
    # The page plays 1.5 s behind the live edge (hls.js defaults: three target durations,
    # 3 s); hls.js's own target says so, and the camera's frames agree (loosely: the figure
    # against the <= 3 s target is tests/interop/bench_video_playback.py's).
    assert out["report"]["targetLatency"] is not None and out["report"]["targetLatency"] < 2.5, out["report"]
    assert 0.2 < median < 8.0, median
