"""Kinesis Video Streams playback seen from real clients: ffmpeg-made H.264 + AAC is ingested
through PutMedia, then boto3's `kinesis-video-archived-media` asks for HLS and DASH session
URLs and a clip; the session resources are fetched without signatures, probed with ffprobe
and fully decoded with `ffmpeg -xerror`; the documented errors come back with their names."""

import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import ClientError

from test_video import create, mkv_cluster, mkv_header, put_file

DURATION = 6


@pytest.fixture(scope="module")
def av_mkv(tmp_path_factory):
    """6 s of H.264 (1 s GOPs, 320x240, 25 fps) + AAC, as a live Matroska stream."""
    path = tmp_path_factory.mktemp("media") / "av.mkv"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         f"testsrc=duration={DURATION}:size=320x240:rate=25",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={DURATION}", "-c:v", "libx264",
         "-preset", "ultrafast", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
         "-c:a", "aac", "-shortest", "-f", "matroska", "-live", "1",
         "-cluster_size_limit", "50000000", "-cluster_time_limit", "20000", str(path)], check=True)
    return path.read_bytes()


def ingest(m, name, data, retention=1):
    kv = m.client("kinesisvideo")
    create(kv, name, retention=retention)
    before = time.time()
    _, acks = put_file(m, name, data, timecode_type="RELATIVE", start_timestamp=f"{before - 60:.3f}")
    persisted = [a for a in acks if a["EventType"] == "PERSISTED"]
    assert len(persisted) == DURATION, acks
    return kv, before - 1, time.time() + 0.001


def archived(m):
    return m.client("kinesis-video-archived-media")


def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def fetch_text(url):
    status, ctype, body = fetch(url)
    assert status == 200
    return ctype, body.decode()


def media_playlist_url(master_url, master_text):
    uri = [line for line in master_text.splitlines() if line and not line.startswith("#")][0]
    return master_url.rsplit("/", 1)[0] + "/" + uri


def decode(url, *extra):
    """Decodes everything at url with ffmpeg -xerror; returns the decoded video frame count."""
    r = subprocess.run(["ffmpeg", "-v", "error", "-xerror", *extra, "-i", url, "-map", "0:v",
                        "-fps_mode", "passthrough", "-f", "framemd5", "-"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    return len([line for line in r.stdout.splitlines() if line and not line.startswith("#")])


def probe(url):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                          "stream=codec_name,width,height,sample_rate:format=duration",
                          "-of", "default=nw=1", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def hls_url(m, name, **kw):
    url = archived(m).get_hls_streaming_session_url(StreamName=name, **kw)["HLSStreamingSessionURL"]
    assert re.fullmatch(re.escape(m.url) + r"/hls/v1/getHLSMasterPlaylist\.m3u8\?SessionToken=[A-Za-z0-9_\-.]+", url), url
    return url


def on_demand(start, end, clock="SERVER_TIMESTAMP"):
    return {"FragmentSelectorType": clock, "TimestampRange": {"StartTimestamp": start, "EndTimestamp": end}}


def test_hls_fmp4_on_demand_playlists_probe_and_decode(mooring, av_mkv):
    _, start, end = ingest(mooring, "hls-vod", av_mkv)
    url = hls_url(mooring, "hls-vod", PlaybackMode="ON_DEMAND", HLSFragmentSelector=on_demand(start, end),
                  DisplayFragmentTimestamp="ALWAYS")
    ctype, master = fetch_text(url)
    assert ctype == "application/vnd.apple.mpegurl"
    assert master.startswith("#EXTM3U\n#EXT-X-VERSION:7\n")
    inf = re.search(r"#EXT-X-STREAM-INF:(.*)", master).group(1)
    assert re.search(r'CODECS="avc1\.[0-9a-f]{6},mp4a\.40\.2"', inf), inf
    assert "RESOLUTION=320x240" in inf and "FRAME-RATE=25.000" in inf and 'AUDIO="audio"' in inf
    assert int(re.search(r"BANDWIDTH=(\d+)", inf).group(1)) > 10_000
    assert re.search(r'#EXT-X-MEDIA:TYPE=AUDIO,.*URI="getHLSMediaPlaylist\.m3u8\?SessionToken=[^&"]+&TrackNumber=2"', master)
    _, playlist = fetch_text(media_playlist_url(url, master))
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in playlist and playlist.rstrip().endswith("#EXT-X-ENDLIST")
    assert re.search(r'#EXT-X-MAP:URI="getMP4InitFragment\.mp4\?SessionToken=[^&"]+&TrackNumber=1"', playlist)
    assert len(re.findall(r"^#EXTINF:[01]\.\d{3},$", playlist, re.M)) == DURATION, playlist
    # Server-timestamp sessions default to a discontinuity between every pair of fragments.
    assert playlist.count("#EXT-X-DISCONTINUITY\n") == DURATION - 1
    stamps = re.findall(r"#EXT-X-PROGRAM-DATE-TIME:(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)", playlist)
    assert len(stamps) == DURATION and stamps == sorted(stamps)
    segments = re.findall(r"^(getMP4MediaFragment\.mp4\?FragmentNumber=\d{47}&SessionToken=.+&TrackNumber=1)$", playlist, re.M)
    assert len(segments) == DURATION
    status, ctype, body = fetch(url.rsplit("/", 1)[0] + "/" + segments[0])
    assert status == 200 and ctype == "video/mp4" and body[4:8] == b"moof"
    info = probe(url)
    assert "codec_name=h264" in info and "width=320" in info and "height=240" in info
    assert "codec_name=aac" in info
    assert decode(url) == DURATION * 25


def test_hls_mpeg_ts_and_producer_timestamps(mooring, av_mkv):
    _, start, end = ingest(mooring, "hls-ts", av_mkv)
    url = hls_url(mooring, "hls-ts", PlaybackMode="ON_DEMAND", ContainerFormat="MPEG_TS",
                  HLSFragmentSelector=on_demand(start, end))
    _, master = fetch_text(url)
    assert master.startswith("#EXTM3U\n#EXT-X-VERSION:3\n") and "#EXT-X-MEDIA" not in master
    assert re.search(r'CODECS="avc1\.[0-9a-f]{6},mp4a\.40\.2"', master)
    _, playlist = fetch_text(media_playlist_url(url, master))
    ts = re.findall(r"^(getTSFragment\.ts\?FragmentNumber=\d{47}&SessionToken=\S+)$", playlist, re.M)
    assert len(ts) == DURATION and "#EXT-X-MAP" not in playlist
    status, ctype, body = fetch(url.rsplit("/", 1)[0] + "/" + ts[0])
    assert status == 200 and ctype == "video/MP2T" and len(body) % 188 == 0 and body[0] == 0x47
    info = probe(url)
    assert "codec_name=h264" in info and "codec_name=aac" in info
    assert decode(url) == DURATION * 25
    # Producer timestamps (ingested as RELATIVE from now - 60 s): default DiscontinuityMode NEVER.
    p_start = start - 60
    url = hls_url(mooring, "hls-ts", PlaybackMode="ON_DEMAND", ContainerFormat="MPEG_TS",
                  HLSFragmentSelector=on_demand(p_start, p_start + 30, "PRODUCER_TIMESTAMP"),
                  MaxMediaPlaylistFragmentResults=3)
    _, master = fetch_text(url)
    _, playlist = fetch_text(media_playlist_url(url, master))
    assert playlist.count("#EXTINF") == 3 and "#EXT-X-DISCONTINUITY" not in playlist
    assert decode(url) == 3 * 25


def test_hls_live_and_live_replay(mooring, av_mkv):
    _, start, end = ingest(mooring, "hls-live", av_mkv)
    url = hls_url(mooring, "hls-live", DiscontinuityMode="NEVER")
    _, master = fetch_text(url)
    _, playlist = fetch_text(media_playlist_url(url, master))
    assert "#EXT-X-ENDLIST" not in playlist and "#EXT-X-PLAYLIST-TYPE" not in playlist
    assert playlist.count("#EXTINF") == 5 and "#EXT-X-DISCONTINUITY" not in playlist
    assert "#EXT-X-MEDIA-SEQUENCE:0" in playlist
    assert decode(url, "-live_start_index", "0", "-m3u8_hold_counters", "2") == 5 * 25
    # New fragments slide the window; the media sequence grows with it.
    data = av_mkv
    put_file(mooring, "hls-live", data, timecode_type="RELATIVE", start_timestamp=f"{time.time():.3f}")
    _, playlist2 = fetch_text(media_playlist_url(url, master))
    assert playlist2.count("#EXTINF") == 5
    # Five segments left the top of the playlist; the sixth new one never was in it.
    assert int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", playlist2).group(1)) == 5
    assert not set(re.findall(r"FragmentNumber=(\d+)", playlist)) & set(re.findall(r"FragmentNumber=(\d+)", playlist2))
    # LIVE_REPLAY starts at the start time and grows as fragment durations elapse.
    url = hls_url(mooring, "hls-live", PlaybackMode="LIVE_REPLAY",
                  HLSFragmentSelector={"FragmentSelectorType": "SERVER_TIMESTAMP",
                                       "TimestampRange": {"StartTimestamp": start}})
    _, master = fetch_text(url)
    media = media_playlist_url(url, master)
    first = fetch_text(media)[1].count("#EXTINF")
    time.sleep(2.2)
    later = fetch_text(media)[1].count("#EXTINF")
    assert first == 1 and later == 3, (first, later)


def test_live_hls_blocking_reload(mooring, av_mkv):
    """A LIVE playlist offers blocking reload (beyond KVS): a reload with `_HLS_msn` of the
    next segment is held until that fragment is persisted, or answered as is after three
    target durations; ON_DEMAND playlists offer nothing of the kind."""
    ingest(mooring, "hls-block", av_mkv)
    url = hls_url(mooring, "hls-block")
    _, master = fetch_text(url)
    media = media_playlist_url(url, master)
    _, playlist = fetch_text(media)
    assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES\n" in playlist
    assert "#EXT-X-TARGETDURATION:1\n" in playlist
    last = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", playlist).group(1)) + playlist.count("#EXTINF") - 1
    # Nothing new arrives: held for three target durations, then the same segments.
    started = time.monotonic()
    _, held = fetch_text(f"{media}&_HLS_msn={last + 1}")
    assert 2.5 <= time.monotonic() - started < 10
    assert re.findall(r"FragmentNumber=(\d+)", held) == re.findall(r"FragmentNumber=(\d+)", playlist)
    # Fragments persisted while the reload waits answer it at once, listing them.
    producer = threading.Timer(0.5, put_file, (mooring, "hls-block", av_mkv),
                               {"timecode_type": "RELATIVE", "start_timestamp": f"{time.time():.3f}"})
    producer.start()
    started = time.monotonic()
    _, reloaded = fetch_text(f"{media}&_HLS_msn={last + 1}")
    waited = time.monotonic() - started
    producer.join(30)
    assert 0.4 <= waited < 2.5, waited
    newest = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", reloaded).group(1)) + reloaded.count("#EXTINF") - 1
    assert newest >= last + 1, reloaded
    _, start, end = ingest(mooring, "hls-block-vod", av_mkv)
    _, vod_master = fetch_text(vod := hls_url(mooring, "hls-block-vod", PlaybackMode="ON_DEMAND",
                                             HLSFragmentSelector=on_demand(start, end)))
    assert "SERVER-CONTROL" not in fetch_text(media_playlist_url(vod, vod_master))[1]


def audio_frames(path):
    """Decodes the audio of a file with ffmpeg -xerror; returns the decoded frame count."""
    r = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-map", "0:a", "-f", "framemd5", "-"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    return len([line for line in r.stdout.splitlines() if line and not line.startswith("#")])


def test_low_latency_hls_has_audio_parts_that_decode_like_their_segment(mooring, av_mkv, tmp_path):
    """LL-HLS (a Mooring option) for a stream with AAC audio: the audio rendition's playlist is
    low-latency too, its parts of a fragment, after the init segment, decode to the same AAC
    frames as the whole fragment, and ffmpeg plays the low-latency master with both tracks."""
    ingest(mooring, "ll-audio", av_mkv)
    url = hls_url(mooring, "ll-audio", ContainerFormat="FRAGMENTED_MP4") + "&LowLatency=ON"
    base = url.rsplit("/", 1)[0] + "/"
    _, master = fetch_text(url)
    audio_uri = re.search(r'#EXT-X-MEDIA:TYPE=AUDIO,[^\n]*URI="([^"]+)"', master).group(1)
    assert "TrackNumber=2" in audio_uri and "LowLatency=ON" in audio_uri, master
    assert 'CODECS="avc1.' in master and "mp4a.40.2" in master, master
    _, playlist = fetch_text(base + audio_uri)
    assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=" in playlist, playlist
    assert "#EXT-X-PART-INF:PART-TARGET=" in playlist, playlist
    lines = playlist.splitlines()
    init_uri = re.search(r'#EXT-X-MAP:URI="([^"]+)"', playlist).group(1)
    _, _, init = fetch(base + init_uri)
    segments = [i for i, line in enumerate(lines) if line.startswith("getMP4MediaFragment")]
    assert segments, playlist
    seg_index = segments[-1]
    parts = []
    for line in reversed(lines[:seg_index]):
        if line.startswith(("#EXTINF", "#EXT-X-PROGRAM-DATE-TIME")):
            continue
        if not line.startswith("#EXT-X-PART:"):
            break
        assert "TrackNumber=2" in line, line
        parts.insert(0, re.search(r'URI="([^"]+)"', line).group(1))
    # 1 s of audio in parts of at most 0.25 s.
    assert len(parts) >= 4, playlist
    joined = init + b"".join(fetch(base + p)[2] for p in parts)
    whole = init + fetch(base + lines[seg_index])[2]
    counts = []
    for label, data in (("parts", joined), ("segment", whole)):
        path = tmp_path / f"audio-{label}.mp4"
        path.write_bytes(data)
        counts.append(audio_frames(path))
    # AAC at 44.1 or 48 kHz: 1024 samples a frame, about 43-47 frames a second.
    assert counts[0] == counts[1] and 40 <= counts[0] <= 50, counts
    r = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and set(r.stdout.split()) == {"aac", "h264"}, (r.stdout, r.stderr)


def test_hls_errors(mooring, av_mkv):
    am = archived(mooring)
    kv = mooring.client("kinesisvideo")

    def error(**kw):
        with pytest.raises(ClientError) as e:
            am.get_hls_streaming_session_url(**kw)
        return e.value.response["Error"]["Code"], e.value.response["ResponseMetadata"]["HTTPStatusCode"]

    assert error(StreamName="missing") == ("ResourceNotFoundException", 404)
    create(kv, "noretention", retention=0)
    assert error(StreamName="noretention") == ("NoDataRetentionException", 400)
    create(kv, "empty", retention=1)
    assert error(StreamName="empty") == ("ResourceNotFoundException", 404)
    now = time.time()
    assert error(StreamName="empty", PlaybackMode="ON_DEMAND",
                 HLSFragmentSelector=on_demand(now - 60, now - 1)) == ("ResourceNotFoundException", 404)
    assert error(StreamName="empty", PlaybackMode="ON_DEMAND")[0] == "InvalidArgumentException"
    assert error(StreamName="empty", HLSFragmentSelector=on_demand(now - 60, now - 1))[0] == "InvalidArgumentException"
    assert error(StreamName="empty", PlaybackMode="LATER")[0] == "InvalidArgumentException"
    assert error(StreamName="empty", PlaybackMode="ON_DEMAND",
                 HLSFragmentSelector=on_demand(now - 1, now - 60))[0] == "InvalidArgumentException"
    assert error(StreamName="empty", ContainerFormat="MKV")[0] == "InvalidArgumentException"
    # H.264 without codec private data cannot be packaged.
    _, acks = put_file(mooring, "empty", mkv_header() + mkv_cluster(0) + mkv_cluster(1000),
                       timecode_type="RELATIVE", start_timestamp=f"{time.time():.3f}")
    assert "PERSISTED" in [a["EventType"] for a in acks]
    assert error(StreamName="empty") == ("MissingCodecPrivateDataException", 400)
    # Session resources need a genuine token.
    _, start, end = ingest(mooring, "tok", av_mkv)
    url = hls_url(mooring, "tok")
    for bad in (url + "x", url.replace("SessionToken=", "SessionToken=A"), url.split("?")[0]):
        with pytest.raises(urllib.error.HTTPError) as e:
            fetch(bad)
        assert e.value.code == 401
        assert e.value.headers["x-amzn-ErrorType"] == "NotAuthorizedException"
    # A DASH token does not open HLS resources.
    dash = am.get_dash_streaming_session_url(StreamName="tok")["DASHStreamingSessionURL"]
    token = dash.split("SessionToken=")[1]
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(mooring.url + "/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken=" + token)
    assert e.value.code == 401


def test_dash_manifest_with_kvs_attributes_decodes(mooring, av_mkv):
    _, start, end = ingest(mooring, "dash", av_mkv)
    am = archived(mooring)
    url = am.get_dash_streaming_session_url(
        StreamName="dash", PlaybackMode="ON_DEMAND", DisplayFragmentNumber="ALWAYS",
        DisplayFragmentTimestamp="ALWAYS",
        DASHFragmentSelector=on_demand(start, end))["DASHStreamingSessionURL"]
    assert re.fullmatch(re.escape(mooring.url) + r"/dash/v1/getDASHManifest\.mpd\?SessionToken=\S+", url)
    ctype, mpd = fetch_text(url)
    assert ctype == "application/dash+xml"
    assert 'type="static"' in mpd and "xmlns:kvs=" in mpd
    fns = re.findall(r'<S t="\d+" d="\d+" kvs:fn="(\d{47})" kvs:ts="(\d+\.\d{3})"/>', mpd)
    assert len(fns) == 2 * DURATION  # video and audio timelines
    assert re.search(r'codecs="avc1\.[0-9a-f]{6}".*width="320" height="240"', mpd)
    assert 'codecs="mp4a.40.2"' in mpd
    info = probe(url)
    assert "codec_name=h264" in info and "codec_name=aac" in info
    assert decode(url) == DURATION * 25
    live = am.get_dash_streaming_session_url(StreamName="dash")["DASHStreamingSessionURL"]
    _, mpd = fetch_text(live)
    assert 'type="dynamic"' in mpd and mpd.count("<S ") == 2 * 5 and "kvs:fn" not in mpd


def test_get_clip_is_a_progressive_mp4_of_the_range(mooring, av_mkv, tmp_path):
    _, start, end = ingest(mooring, "clip", av_mkv)
    am = archived(mooring)
    r = am.get_clip(StreamName="clip", ClipFragmentSelector=on_demand(start, end))
    assert r["ContentType"] == "video/mp4"
    path = tmp_path / "clip.mp4"
    path.write_bytes(r["Payload"].read())
    assert path.read_bytes()[4:8] == b"ftyp"
    info = probe(str(path))
    duration = float(re.search(r"duration=([\d.]+)", info).group(1))
    assert abs(duration - DURATION) < 0.2, info
    assert decode(str(path)) == DURATION * 25
    # Only fragments starting in the range: the first three by producer time.
    p_start = start - 60
    r = am.get_clip(StreamName="clip", ClipFragmentSelector=on_demand(p_start, p_start + 3.5, "PRODUCER_TIMESTAMP"))
    path.write_bytes(r["Payload"].read())
    assert decode(str(path)) == 3 * 25
    for selector, code in [
        (on_demand(end - 100, end - 50), "ResourceNotFoundException"),
        (on_demand(end, start), "InvalidArgumentException"),
        (on_demand(start, time.time() + 60), "InvalidArgumentException"),
    ]:
        with pytest.raises(ClientError) as e:
            am.get_clip(StreamName="clip", ClipFragmentSelector=selector)
        assert e.value.response["Error"]["Code"] == code


def test_console_player_page_embeds_a_working_live_session(mooring, av_mkv):
    ingest(mooring, "page", av_mkv)
    ctype, html = fetch_text(mooring.url + "/console/video/page?hls_js=/static/hls.min.js")
    assert ctype == "text/html; charset=utf-8"
    assert '<script src="/static/hls.min.js"></script>' in html and "new Hls(" in html
    session = re.search(r'const sessionUrl = "([^"]+)";', html).group(1).replace("&amp;", "&")
    assert session.startswith(mooring.url + "/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken=")
    assert "#EXT-X-STREAM-INF" in fetch_text(session)[1]
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(mooring.url + "/console/video/nosuchstream")
    assert e.value.code == 404


def test_session_tokens_and_archived_media_survive_sigkill(mooring, av_mkv):
    _, start, end = ingest(mooring, "crash", av_mkv)
    url = hls_url(mooring, "crash", PlaybackMode="ON_DEMAND", HLSFragmentSelector=on_demand(start, end))
    old_base = mooring.url
    mooring.kill()
    mooring.start()
    url = url.replace(old_base, mooring.url)
    _, master = fetch_text(url)
    _, playlist = fetch_text(media_playlist_url(url, master))
    assert playlist.count("#EXTINF") == DURATION
    assert decode(url) == DURATION * 25


def test_playback_tps_and_point_budgets(mooring_factory, av_mkv):
    """With video.rate_limits: the session resources' per-session TPS (spec 6.2), and the
    stream's fragment-metadata and fragment-media point budgets (spec 6.3) shared by HLS
    media playlists, ListFragments, GetMediaForFragmentList and GetClip."""
    m = mooring_factory(extra_args=["--set", "video.rate_limits=true"])
    _, start, end = ingest(m, "quota", av_mkv)
    am = archived(m)

    def refused(url):
        with pytest.raises(urllib.error.HTTPError) as e:
            fetch(url)
        assert e.value.code == 400
        assert e.value.headers["x-amzn-ErrorType"] == "ClientLimitExceededException"

    def throttled(call):
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] == "ClientLimitExceededException"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400

    selector = on_demand(start, end)
    url = hls_url(m, "quota", PlaybackMode="ON_DEMAND", HLSFragmentSelector=selector,
                  MaxMediaPlaylistFragmentResults=5000)
    # Five master playlists per second per session; another session has its own five.
    for _ in range(5):
        fetch_text(url)
    refused(url)
    fetch_text(hls_url(m, "quota", PlaybackMode="ON_DEMAND", HLSFragmentSelector=selector))

    time.sleep(1.1)
    # A media playlist costs its MaxMediaPlaylistFragmentResults (5,000) metadata points:
    # the third in a second is refused for points (not TPS, which is 5), and so is a
    # ListFragments on the same stream.
    _, master = fetch_text(url)
    playlist = media_playlist_url(url, master)
    fetch_text(playlist)
    fetch_text(playlist)
    refused(playlist)
    throttled(lambda: am.list_fragments(StreamName="quota", MaxResults=1, FragmentSelector=selector))

    time.sleep(1.1)
    # GetClip costs its fragments (6) in media points, after 495 spent by
    # GetMediaForFragmentList: 501 > 500.
    numbers = [f"{91343852333181432392682062607743920146 + i}" for i in range(495)]
    am.get_media_for_fragment_list(StreamName="quota", Fragments=numbers)["Payload"].read()
    throttled(lambda: am.get_clip(StreamName="quota", ClipFragmentSelector=selector))
    time.sleep(1.1)
    clip = am.get_clip(StreamName="quota", ClipFragmentSelector=selector)
    assert clip["ContentType"] == "video/mp4" and clip["Payload"].read()[4:8] == b"ftyp"
