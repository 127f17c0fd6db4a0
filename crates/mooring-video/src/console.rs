//! The console's video player: `GET /console/video/{stream}` answers an HTML page that plays
//! a LIVE HLS session of the stream with hls.js. The page gets its session URL from the
//! server (the console is a local tool; a browser cannot SigV4-sign), so opening the page is
//! like calling GetHLSStreamingSessionURL with the defaults. hls.js is loaded from
//! `hls_js` in the query string when given, else from the jsDelivr CDN. It plays 1.5 s behind
//! the live edge (`liveSyncDuration`) rather than hls.js's default three target durations:
//! with 1 s fragments that is 1.7–2.8 s behind the camera instead of 3.5–3.8 s, without
//! stalls, since blocking playlist reload delivers each fragment as it is persisted.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use mooring_aws::{AwsRequest, OperationName};

use crate::api::JsonRequest;
use crate::model::StreamRef;
use crate::{error_response, playback, VideoState};

/// Where the player pages live.
pub const PLAYER_PREFIX: &str = "/console/video/";

const DEFAULT_HLS_JS: &str = "https://cdn.jsdelivr.net/npm/hls.js@1/dist/hls.min.js";

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(stream: &str, session_url: &str, hls_js: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>{title} · Mooring video</title>
<style>body{{font-family:sans-serif;background:#111;color:#eee;margin:2em}}video{{max-width:100%;background:#000}}</style>
<script src="{hls_js}"></script></head>
<body><h1>{title}</h1>
<video id="video" controls autoplay muted playsinline></video>
<pre id="status">loading…</pre>
<script>
const sessionUrl = "{session_url}";
const video = document.getElementById("video");
const status = document.getElementById("status");
window.playerErrors = [];
function show(text) {{ status.textContent = text; }}
if (window.Hls && Hls.isSupported()) {{
  const hls = new Hls({{ liveSyncDuration: 1.5 }});
  window.hls = hls;
  hls.on(Hls.Events.ERROR, (_, data) => {{
    window.playerErrors.push({{ type: data.type, details: data.details, fatal: data.fatal }});
    show("error: " + data.details);
  }});
  hls.on(Hls.Events.MANIFEST_PARSED, () => {{ video.play().catch(() => {{}}); }});
  hls.loadSource(sessionUrl);
  hls.attachMedia(video);
}} else if (video.canPlayType("application/vnd.apple.mpegurl")) {{
  video.src = sessionUrl;
}} else {{
  show("this browser cannot play HLS");
}}
video.addEventListener("playing", () => show("playing"));
</script></body></html>
"#,
        title = html_escape(stream),
        session_url = html_escape(session_url).replace('\\', "\\\\"),
        hls_js = html_escape(hls_js),
    )
}

/// Handles `GET /console/video/{stream}`.
pub async fn player_page(state: Arc<VideoState>, request: AwsRequest) -> Response<Body> {
    const OP: &str = "ConsoleVideoPlayer";
    let stream = request
        .request
        .uri()
        .path()
        .trim_start_matches(PLAYER_PREFIX)
        .to_string();
    let hls_js = request
        .query_param("hls_js")
        .unwrap_or_else(|| DEFAULT_HLS_JS.to_string());
    let host = request.header("host").map(str::to_string);
    let body = serde_json::to_vec(&serde_json::json!({ "StreamName": stream })).unwrap_or_default();
    let name = stream.clone();
    let result = state
        .blocking(move |s| {
            StreamRef::from_parts(Some(name), None)?;
            let req = JsonRequest::parse(&body)?;
            let url = playback::session_url_for_console(s, &req, host.as_deref())?;
            Ok(url)
        })
        .await;
    match result {
        Ok(url) => {
            let mut response = Response::new(Body::from(page(&stream, &url, &hls_js)));
            *response.status_mut() = StatusCode::OK;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
                .extensions_mut()
                .insert(OperationName(OP.to_string()));
            response
        }
        Err(e) => error_response(&e, OP),
    }
}
