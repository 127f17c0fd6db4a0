"""Kinesis Video Streams playback of H.265 and live DASH, seen from real clients: ffmpeg's
libx265 + AAC is ingested through PutMedia, then boto3's session URLs are read by ffprobe and
decoded frame by frame with `ffmpeg -xerror` (HLS fMP4, DASH, GetClip); MPEG-TS refuses H.265
as KVS does (no H.265 over TS); a LIVE DASH manifest is decoded while it is still dynamic."""

import re
import subprocess

import pytest
from botocore.exceptions import ClientError

from test_video_playback import (DURATION, archived, decode, fetch, fetch_text, hls_url,
                                 ingest, media_playlist_url, on_demand, probe)


@pytest.fixture(scope="module")
def hevc_mkv(tmp_path_factory):
    """6 s of H.265 (1 s GOPs, 320x240, 25 fps) + AAC, as a live Matroska stream."""
    path = tmp_path_factory.mktemp("media") / "hevc.mkv"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         f"testsrc=duration={DURATION}:size=320x240:rate=25",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={DURATION}", "-c:v", "libx265",
         "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-x265-params", "keyint=25:min-keyint=25:scenecut=0:log-level=error",
         "-c:a", "aac", "-shortest", "-f", "matroska", "-live", "1",
         "-cluster_size_limit", "50000000", "-cluster_time_limit", "20000", str(path)], check=True)
    data = path.read_bytes()
    assert b"V_MPEGH/ISO/HEVC" in data
    return data


def test_h265_hls_fmp4_on_demand_probes_and_decodes(mooring, hevc_mkv):
    _, start, end = ingest(mooring, "hevc-hls", hevc_mkv)
    url = hls_url(mooring, "hevc-hls", PlaybackMode="ON_DEMAND",
                  HLSFragmentSelector=on_demand(start, end))
    ctype, master = fetch_text(url)
    assert ctype == "application/vnd.apple.mpegurl"
    # RFC 6381 codec string of an HEVC sample entry, taken from the stream's hvcC: Main profile
    # (1), its compatibility flags bit-reversed in hex (6), main tier and level.
    assert re.search(r'CODECS="hvc1\.1\.6\.L\d+(\.[0-9A-F]{1,2})*,mp4a\.40\.2"', master), master
    assert "RESOLUTION=320x240" in master
    _, playlist = fetch_text(media_playlist_url(url, master))
    assert playlist.count("#EXTINF") == DURATION and "#EXT-X-ENDLIST" in playlist
    init = re.search(r'#EXT-X-MAP:URI="([^"]+)"', playlist).group(1)
    status, ctype, body = fetch(url.rsplit("/", 1)[0] + "/" + init)
    assert status == 200 and ctype == "video/mp4"
    # The video rendition's init segment; AAC is its own rendition (EXT-X-MEDIA above).
    assert b"hvc1" in body and b"hvcC" in body and b"mp4a" not in body
    info = probe(url)
    assert "codec_name=hevc" in info and "codec_name=aac" in info
    assert "width=320" in info and "height=240" in info
    assert decode(url) == DURATION * 25


def test_h265_over_mpeg_ts_is_refused_as_kvs_does(mooring, hevc_mkv):
    ingest(mooring, "hevc-ts", hevc_mkv)
    with pytest.raises(ClientError) as e:
        archived(mooring).get_hls_streaming_session_url(StreamName="hevc-ts", ContainerFormat="MPEG_TS")
    err = e.value.response
    assert err["Error"]["Code"] == "UnsupportedStreamMediaTypeException", err
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "H.265" in err["Error"]["Message"]


def test_h265_dash_and_clip_decode(mooring, hevc_mkv, tmp_path):
    am = archived(mooring)
    # ffmpeg's DASH demuxer sizes its segment-URL buffer from the manifest URL's length
    # rounded up to 64; before the manifest had a BaseURL (see dash.rs) names such as
    # "hevc-dash" gave tokens whose segment URLs it truncated. Names of 1-8 more characters
    # cover every rounding.
    for name in ["hevc-dash"] + ["x" * n for n in range(1, 9)]:
        _, start, end = ingest(mooring, name, hevc_mkv)
        url = am.get_dash_streaming_session_url(
            StreamName=name, PlaybackMode="ON_DEMAND",
            DASHFragmentSelector=on_demand(start, end))["DASHStreamingSessionURL"]
        assert decode(url) == DURATION * 25, name
    name = "x" * 8
    _, mpd = fetch_text(url)
    assert f"<BaseURL>{mooring.url}/dash/v1/./" in mpd
    assert re.search(r'codecs="hvc1\.[^"]+"', mpd) and 'codecs="mp4a.40.2"' in mpd
    # B-frames: a fragment's last frame may be presented after the next fragment starts; the
    # timeline still tiles without overlap (each S ends where the next begins).
    for timeline in re.findall(r"<SegmentTimeline>(.*?)</SegmentTimeline>", mpd, re.S):
        s = [(int(t), int(d)) for t, d in re.findall(r'<S t="(\d+)" d="(\d+)"', timeline)]
        assert len(s) == DURATION
        assert all(t + d == s[i + 1][0] for i, (t, d) in enumerate(s[:-1])), s
    info = probe(url)
    assert "codec_name=hevc" in info and "codec_name=aac" in info
    clip = am.get_clip(StreamName=name, ClipFragmentSelector=on_demand(start, end))
    assert clip["ContentType"] == "video/mp4"
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip["Payload"].read())
    info = probe(str(path))
    assert "codec_name=hevc" in info and "codec_name=aac" in info
    duration = float(re.search(r"duration=([\d.]+)", info).group(1))
    assert abs(duration - DURATION) < 0.2, info
    assert decode(str(path)) == DURATION * 25


def test_live_dash_manifest_decodes_while_dynamic(mooring, hevc_mkv):
    """ffmpeg's DASH demuxer follows a dynamic manifest from its live edge: it reads the
    newest fragments of both adaptation sets, in order, with nothing it cannot decode."""
    ingest(mooring, "dash-live", hevc_mkv)
    url = archived(mooring).get_dash_streaming_session_url(StreamName="dash-live")["DASHStreamingSessionURL"]
    _, mpd = fetch_text(url)
    assert 'type="dynamic"' in mpd and "minimumUpdatePeriod=" in mpd
    frames = decode(url, "-t", "2")
    # Two seconds of 25 fps video from the live edge (ffmpeg stops at -t).
    assert 40 <= frames <= 50, frames

