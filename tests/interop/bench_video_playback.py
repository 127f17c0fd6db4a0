"""Playback benchmarks (issue 8), against the real binary with a live camera (1 s GOPs, 25 fps):

1. PERSISTED -> LIVE playlist: for every fragment, the time from its PERSISTED ack reaching
   the producer to a LIVE media playlist that lists it (target < 50 ms). The peer figure is
   one playlist round trip on the same connection (the floor any server has).
2. Glass-to-glass delay in chromium + hls.js for HLS and LL-HLS (targets <= 3 s and <= 1.5 s),
   as measured by tests/interop/test_video_browser.py: HLS in Mooring's own player page
   (/console/video/{stream}, which sets hls.js's liveSyncDuration to 1.5 s) and in hls.js
   with its defaults (which keep three target durations, 3 s here, behind the live edge, the
   HOLD-BACK floor RFC 8216 sets for servers), and LL-HLS in hls.js's lowLatencyMode.
3. Concurrent HLS viewers per core: client processes fetch playlist + newest fragment as fast
   as they can (a viewer needs one of each per second with 1 s fragments); viewers per core =
   pairs per second / CPU seconds the server burned per second. The peer is nginx (or, when
   no nginx binary is found, Python's http.server) serving the same playlist and fragment
   bytes as static files, measured the same way.

Run: `TEST_MOORING_BIN=target/debug/mooring .venv/bin/python tests/interop/bench_video_playback.py`
(use a release build for figures worth quoting; BENCH_NGINX=/path/to/nginx picks the peer)."""

import http.client
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import Mooring, mooring_binary  # noqa: E402
from live_producer import LiveCamera  # noqa: E402
from test_video import create  # noqa: E402

FRAGMENTS = int(os.environ.get("BENCH_FRAGMENTS", "20"))
LOAD_SECONDS = float(os.environ.get("BENCH_LOAD_SECONDS", "10"))
CLIENT_PROCESSES = int(os.environ.get("BENCH_CLIENT_PROCESSES", "2"))
CLIENT_THREADS = int(os.environ.get("BENCH_CLIENT_THREADS", "8"))
# BENCH_ONLY=browser runs only the glass-to-glass cases (and BENCH_ONLY=playlist, =viewers).
ONLY = os.environ.get("BENCH_ONLY", "")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session_url(m, name, **kw):
    archived = m.client("kinesis-video-archived-media")
    return archived.get_hls_streaming_session_url(StreamName=name, PlaybackMode="LIVE", **kw)[
        "HLSStreamingSessionURL"]


class Http:
    """One keep-alive connection."""

    def __init__(self, url):
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)

    def get(self, path):
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {body[:200]!r}")
        return body


def media_playlist_path(master_url):
    u = urlparse(master_url)
    master = Http(master_url).get(f"{u.path}?{u.query}").decode()
    uri = [x for x in master.splitlines() if x and not x.startswith("#")][0]
    return u.path.rsplit("/", 1)[0] + "/" + uri


def persisted_to_playlist(m, name, cam_acks):
    """Milliseconds from each PERSISTED ack to a playlist listing its fragment."""
    path = media_playlist_path(session_url(m, name, MaxMediaPlaylistFragmentResults=5))
    conn = Http(m.url)
    latencies, round_trips = [], []
    seen = len(cam_acks)  # only acks that arrive while measuring
    while len(latencies) < FRAGMENTS:
        while seen >= len(cam_acks):
            time.sleep(0.0005)
        arrived, line = cam_acks[seen]
        seen += 1
        if '"PERSISTED"' not in line:
            continue
        number = re.search(r'"FragmentNumber":"(\d+)"', line).group(1)
        while True:
            t0 = time.time()
            body = conn.get(path)
            t1 = time.time()
            round_trips.append(t1 - t0)
            if f"FragmentNumber={number}".encode() in body:
                latencies.append((t1 - arrived) * 1000)
                break
    return latencies, [r * 1000 for r in round_trips]


def viewer_worker(args):
    host_url, playlist_path, fragment_re, seconds, threads = args
    counts = [0] * threads

    def loop(i):
        conn = Http(host_url)
        end = time.time() + seconds
        while time.time() < end:
            playlist = conn.get(playlist_path).decode()
            fragment = re.findall(fragment_re, playlist)[-1]
            conn.get(playlist_path.rsplit("/", 1)[0] + "/" + fragment)
            counts[i] += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


def viewers_per_core(host_url, playlist_paths, fragment_re, server_pids):
    """Runs the load; returns (pairs per second, server CPU cores used, viewers per core)."""
    jobs = [(host_url, playlist_paths[i % len(playlist_paths)], fragment_re, LOAD_SECONDS, CLIENT_THREADS)
            for i in range(CLIENT_PROCESSES)]
    cpu0 = sum(cpu_seconds(p) for p in server_pids)
    t0 = time.time()
    with multiprocessing.Pool(CLIENT_PROCESSES) as pool:
        pairs = sum(pool.map(viewer_worker, jobs))
    elapsed = time.time() - t0
    cores = (sum(cpu_seconds(p) for p in server_pids) - cpu0) / elapsed
    rate = pairs / elapsed
    return rate, cores, rate / max(cores, 1e-9)


def static_peer(m, name, workdir):
    """Starts nginx (or http.server) serving a snapshot of one playlist and its newest
    fragment; returns (process, base url, playlist path, pids to measure)."""
    path = media_playlist_path(session_url(m, name))
    conn = Http(m.url)
    playlist = conn.get(path).decode()
    fragment = re.findall(r"(getMP4MediaFragment\.mp4\?[^\n]+)", playlist)[-1]
    (workdir / "live.m3u8").write_text(playlist.replace(fragment, "fragment.mp4"))
    (workdir / "fragment.mp4").write_bytes(conn.get(path.rsplit("/", 1)[0] + "/" + fragment))
    nginx = os.environ.get("BENCH_NGINX") or shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    port = 18000 + os.getpid() % 1000
    if nginx:
        conf = workdir / "nginx.conf"
        conf.write_text(f"""daemon off; master_process off; worker_processes 1; pid {workdir}/nginx.pid;
error_log {workdir}/error.log; events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {workdir}; proxy_temp_path {workdir};
  fastcgi_temp_path {workdir}; uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
  types {{ application/vnd.apple.mpegurl m3u8; video/mp4 mp4; }}
  server {{ listen 127.0.0.1:{port}; root {workdir}; }} }}""")
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(workdir)])
        label = "nginx (1 worker)"
    else:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(workdir)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        label = "python http.server"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            Http(f"http://127.0.0.1:{port}").get("/live.m3u8")
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}", "/live.m3u8", label


def browser_delays(m, name, cam):
    from test_video_browser import check_playback, glass_to_glass, play
    figures = {}
    # (label, how it is played, target s, hls.js settings): Mooring's player page as served,
    # or the session URL in hls.js, plain or low-latency.
    cases = (("HLS, Mooring's player page /console/video", "page", 3.0, {}),
             ("HLS, hls.js defaults", "hls", 3.0, {}),
             ("HLS, hls.js liveSyncDurationCount=2", "hls", 3.0, {"liveSyncDurationCount": 2}),
             ("LL-HLS, hls.js lowLatencyMode", "ll-hls", 1.5, {}))
    for label, mode, target, config in cases:
        if mode == "page":
            out = play(f"{m.url}/console/video/{name}?hls_js=/__browser_test__/hls.min.js", player="page")
        else:
            ll = mode == "ll-hls"
            url = session_url(m, name, ContainerFormat="FRAGMENTED_MP4", DisplayFragmentTimestamp="ALWAYS")
            out = play(url + ("&LowLatency=ON" if ll else ""), low_latency=ll, hls_config=config)
        check_playback(out)
        delays = glass_to_glass(out, cam)
        figures[label] = (statistics.median(delays), sorted(delays)[int(len(delays) * 0.9)], target)
    return figures


def main():
    work = Path(tempfile.mkdtemp(prefix="bench-video-playback-"))
    m = Mooring(work / "data").start()
    acks = []
    cam = None
    peer = None
    try:
        name = "bench-cam"
        create(m.client("kinesisvideo"), name, retention=1)
        cam = LiveCamera(mooring_binary(), m.data_dir, m.url, name,
                         on_ack=lambda t, line: acks.append((t, line)))
        while sum('"PERSISTED"' in a for _, a in acks) < 3:
            time.sleep(0.1)

        if ONLY in ("", "playlist"):
            latencies, round_trips = persisted_to_playlist(m, name, acks)
            p50, p99 = statistics.median(latencies), sorted(latencies)[int(len(latencies) * 0.99)]
            rt = statistics.median(round_trips)
            print(f"PERSISTED -> LIVE playlist over {len(latencies)} fragments: p50 {p50:.1f} ms, "
                  f"max {max(latencies):.1f} ms, p99 {p99:.1f} ms (target < 50 ms); "
                  f"peer: one playlist round trip p50 {rt:.2f} ms; ratio p50/round trip {p50 / rt:.1f}")

        if ONLY in ("", "browser"):
            figures = browser_delays(m, name, cam)
            for label, (median, p90, target) in figures.items():
                print(f"glass-to-glass {label}: median {median:.2f} s, p90 {p90:.2f} s "
                      f"(target <= {target} s; median/target {median / target:.2f})")

        if ONLY in ("", "viewers"):
            paths = [media_playlist_path(session_url(m, name)) for _ in range(CLIENT_PROCESSES)]
            rate, cores, per_core = viewers_per_core(m.url, paths, r"(getMP4MediaFragment\.mp4\?[^\n]+)",
                                                     [m.proc.pid])
            peer, peer_url, peer_path, label = static_peer(m, name, work)
            peer_rate, peer_cores, peer_per_core = viewers_per_core(
                peer_url, [peer_path], r"(fragment\.mp4)", [peer.pid])
            print(f"HLS viewers per core: Mooring {per_core:.0f} ({rate:.0f} playlist+fragment pairs/s "
                  f"on {cores:.2f} cores); {label} serving the same bytes {peer_per_core:.0f} "
                  f"({peer_rate:.0f}/s on {peer_cores:.2f} cores); ratio {per_core / peer_per_core:.2f}")
    finally:
        if peer:
            peer.terminate()
            peer.wait()
        if cam:
            cam.stop()
        m.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
