//! KVS quotas: who may call, how often, and how fast.
//!
//! - **TPS** (spec 6.1 and 6.2): a sliding one-second window per (operation, account) and
//!   per (operation, stream); a call that would exceed it answers 400
//!   `ClientLimitExceededException`. ListFragments draws `MaxResults` points from the
//!   stream's 10,000/s fragment-metadata budget, GetMediaForFragmentList one point per
//!   fragment from its 500/s fragment-media budget; GetClip and the HLS/DASH session
//!   resources draw from the same budgets, and the session resources have per-session TPS.
//! - **Bandwidth**: PutMedia reads at most `put_media_bytes_per_sec` per stream (12.5 MB/s)
//!   and GetMedia writes at most `get_media_bytes_per_sec` per session (25 MB/s); both pace
//!   the connection rather than fail it, which is what a producer or consumer over quota
//!   sees from KVS (its throughput levels off).
//! - **PutMedia ownership**: a stream has one PutMedia connection; the newest is accepted
//!   and the older one is told to stop (it finishes the fragment it is receiving, then ends
//!   its response), which keeps the producers' connection rotation working.
//!
//! The TPS limits apply with `rate_limits = true` in `[video]` (off by default); the
//! bandwidth caps, connection limits and PutMedia ownership always apply.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::model::{ErrorKind, VideoError, VideoResult};

/// What one scope spent in the current window: each admitted call's cost and when it
/// stops counting.
#[derive(Default)]
struct Window {
    spent: VecDeque<(Instant, f64)>,
    total: f64,
}

impl Window {
    fn expire(&mut self, now: Instant) {
        while let Some(&(until, cost)) = self.spent.front() {
            if until > now {
                break;
            }
            self.total -= cost;
            self.spent.pop_front();
        }
        if self.spent.is_empty() {
            self.total = 0.0;
        }
    }
}

/// Above this many scopes, the empty windows are dropped.
const PRUNE_ABOVE: usize = 4096;

/// The sliding one-second windows of every scope.
///
/// A limit of N per second means at most N calls (or points) in any one-second span, which
/// is what a client counting its calls expects: six DescribeStream calls inside a second
/// are refused however quickly or slowly the first five came. (A refilling token bucket
/// would let a slow client's sixth call through.) A single call costing more than a whole
/// second's budget (GetMediaForFragmentList of 1,000 fragments against 500 points/s) is
/// admitted when nothing else is counted, and counts for as many seconds as it costs.
#[derive(Default)]
pub struct RateLimits {
    windows: Mutex<HashMap<(String, &'static str), Window>>,
}

impl RateLimits {
    /// Spends `cost` from `scope`'s window of `rate` per second; false (and nothing spent)
    /// when that would exceed the rate.
    pub fn take(
        &self,
        scope: &str,
        kind: &'static str,
        rate: f64,
        cost: f64,
        now: Instant,
    ) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() > PRUNE_ABOVE {
            windows.retain(|_, w| {
                w.expire(now);
                !w.spent.is_empty()
            });
        }
        let window = windows.entry((scope.to_string(), kind)).or_default();
        window.expire(now);
        if !window.spent.is_empty() && window.total + cost > rate + 1e-9 {
            return false;
        }
        let counts_for = Duration::from_secs_f64((cost / rate).max(1.0));
        window.spent.push_back((now + counts_for, cost));
        window.total += cost;
        true
    }
}

/// Account TPS and per-stream TPS of an operation (spec 6.1, 6.2); `None` is unlimited.
pub fn tps_of(path: &str) -> (Option<f64>, Option<f64>) {
    match path {
        "/createStream" => (Some(50.0), None),
        "/describeStream" | "/getDataEndpoint" => (Some(300.0), Some(5.0)),
        "/deleteStream"
        | "/listTagsForStream"
        | "/tagStream"
        | "/untagStream"
        | "/updateDataRetention"
        | "/updateStream" => (Some(50.0), Some(5.0)),
        "/listStreams" => (Some(50.0), None),
        "/putMedia" | "/getMedia" => (None, Some(5.0)),
        "/getHLSStreamingSessionURL" | "/getDASHStreamingSessionURL" => (None, Some(25.0)),
        _ => (None, None),
    }
}

/// The stream a request names, by name (an ARN is reduced to its name part so both
/// spellings share one budget).
pub fn stream_scope(name: Option<&str>, arn: Option<&str>) -> Option<String> {
    if let Some(n) = name.filter(|n| !n.is_empty()) {
        return Some(n.to_string());
    }
    let arn = arn.filter(|a| !a.is_empty())?;
    let resource = arn.split(':').nth(5).unwrap_or(arn);
    Some(resource.split('/').nth(1).unwrap_or(resource).to_string())
}

fn throttled(what: &str) -> VideoError {
    VideoError::new(
        ErrorKind::ClientLimitExceeded,
        format!("Rate exceeded for {what}; the request was throttled"),
    )
}

/// The quota state of the service.
pub struct Admission {
    pub rate_limits_enabled: bool,
    rates: RateLimits,
    put_sessions: Mutex<HashMap<String, watch::Sender<u64>>>,
}

/// Points per second of the archived-media budgets (spec 6.3).
const METADATA_POINTS: f64 = 10_000.0;
const MEDIA_POINTS: f64 = 500.0;

impl Admission {
    pub fn new(rate_limits_enabled: bool) -> Admission {
        Admission {
            rate_limits_enabled,
            rates: RateLimits::default(),
            put_sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Checks the TPS limits of one call to `path` on `stream` (if it names one).
    pub fn admit(&self, path: &str, stream: Option<&str>) -> VideoResult<()> {
        if !self.rate_limits_enabled {
            return Ok(());
        }
        let now = Instant::now();
        let (account, per_stream) = tps_of(path);
        // The stream's window first: refused there (the usual case), the call does not
        // count against the account. (Stream names are never empty, the account's scope.)
        if let (Some(rate), Some(stream)) = (per_stream, stream) {
            if !self.rates.take(stream, kind_of(path), rate, 1.0, now) {
                return Err(throttled(&format!("{path} on stream {stream}")));
            }
        }
        if let Some(rate) = account {
            if !self.rates.take("", kind_of(path), rate, 1.0, now) {
                return Err(throttled(&format!("{path} on this account")));
            }
        }
        Ok(())
    }

    /// Checks every quota of one incoming request before it runs: the TPS of its
    /// operation, and the point budgets of ListFragments and GetMediaForFragmentList.
    pub fn admit_request(&self, path: &str, request: &mooring_aws::AwsRequest) -> VideoResult<()> {
        if !self.rate_limits_enabled {
            return Ok(());
        }
        let body: serde_json::Value = if path == "/putMedia" {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&request.body).unwrap_or_default()
        };
        let scope = if path == "/putMedia" {
            stream_scope(
                request.header("x-amzn-stream-name"),
                request.header("x-amzn-stream-arn"),
            )
        } else {
            stream_scope(body["StreamName"].as_str(), body["StreamARN"].as_str())
        };
        self.admit(path, scope.as_deref())?;
        if let Some(stream) = scope.as_deref() {
            match path {
                "/listFragments" => {
                    let cost = body["MaxResults"]
                        .as_f64()
                        .unwrap_or(100.0)
                        .clamp(1.0, 1000.0);
                    self.metadata_points(stream, cost)?;
                }
                "/getMediaForFragmentList" => {
                    let cost = body["Fragments"].as_array().map_or(1, |f| f.len().max(1));
                    self.media_points(stream, cost as f64)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Draws `points` from the stream's fragment-metadata (ListFragments) budget.
    pub fn metadata_points(&self, stream: &str, points: f64) -> VideoResult<()> {
        self.points(stream, "metadata-points", METADATA_POINTS, points)
    }

    /// Draws `points` from the stream's fragment-media (GetMediaForFragmentList) budget.
    pub fn media_points(&self, stream: &str, points: f64) -> VideoResult<()> {
        self.points(stream, "media-points", MEDIA_POINTS, points)
    }

    /// Checks a playback session resource (HLS, DASH): its per-session TPS (spec 6.2: 5
    /// for playlists, manifests and init fragments, 20 for media and TS fragments), then
    /// the stream budget points it costs (spec 6.3): a media playlist or manifest its
    /// fragment limit in metadata points, a media or TS fragment one media point.
    pub fn admit_session_resource(
        &self,
        session_id: &str,
        stream_arn: &str,
        resource: &str,
        max_fragments: usize,
    ) -> VideoResult<()> {
        if !self.rate_limits_enabled {
            return Ok(());
        }
        let (kind, tps, metadata, media) = match resource {
            "getHLSMasterPlaylist.m3u8" => ("GetHLSMasterPlaylist", 5.0, 0, 0),
            "getMP4InitFragment.mp4" => ("GetMP4InitFragment", 5.0, 0, 0),
            "getHLSMediaPlaylist.m3u8" => ("GetHLSMediaPlaylist", 5.0, max_fragments, 0),
            "getDASHManifest.mpd" => ("GetDASHManifest", 5.0, max_fragments, 0),
            "getMP4MediaFragment.mp4" => ("GetMP4MediaFragment", 20.0, 0, 1),
            "getTSFragment.ts" => ("GetTSFragment", 20.0, 0, 1),
            _ => return Ok(()),
        };
        // Session ids never contain ':', stream names neither: the scopes stay apart.
        let scope = format!("session:{session_id}");
        if !self.rates.take(&scope, kind, tps, 1.0, Instant::now()) {
            return Err(throttled(&format!("{kind} in this playback session")));
        }
        let stream = stream_scope(None, Some(stream_arn)).unwrap_or_default();
        if metadata > 0 {
            self.metadata_points(&stream, metadata as f64)?;
        }
        if media > 0 {
            self.media_points(&stream, media as f64)?;
        }
        Ok(())
    }

    /// GetClip: the fragments in the clip, from both of the stream's budgets (spec 6.3).
    pub fn clip_points(&self, stream_arn: &str, fragments: usize) -> VideoResult<()> {
        let stream = stream_scope(None, Some(stream_arn)).unwrap_or_default();
        self.metadata_points(&stream, fragments as f64)?;
        self.media_points(&stream, fragments as f64)
    }

    fn points(&self, stream: &str, kind: &'static str, rate: f64, points: f64) -> VideoResult<()> {
        if !self.rate_limits_enabled {
            return Ok(());
        }
        if self.rates.take(stream, kind, rate, points, Instant::now()) {
            Ok(())
        } else {
            Err(throttled(&format!("the {kind} budget of stream {stream}")))
        }
    }

    /// Registers a new PutMedia session on `arn`; earlier sessions' receivers change and
    /// they stop. The returned receiver changes when a newer session takes over.
    pub fn take_over(&self, arn: &str) -> watch::Receiver<u64> {
        let mut sessions = self.put_sessions.lock().unwrap_or_else(|e| e.into_inner());
        let sender = sessions
            .entry(arn.to_string())
            .or_insert_with(|| watch::channel(0).0);
        sender.send_modify(|generation| *generation += 1);
        let mut receiver = sender.subscribe();
        receiver.borrow_and_update();
        receiver
    }
}

/// The operation name of a path (the bucket kind; "other" for paths without quotas).
pub fn operation_name(path: &str) -> &'static str {
    kind_of(path)
}

fn kind_of(path: &str) -> &'static str {
    match path {
        "/createStream" => "CreateStream",
        "/describeStream" => "DescribeStream",
        "/getDataEndpoint" => "GetDataEndpoint",
        "/deleteStream" => "DeleteStream",
        "/listTagsForStream" => "ListTagsForStream",
        "/tagStream" => "TagStream",
        "/untagStream" => "UntagStream",
        "/updateDataRetention" => "UpdateDataRetention",
        "/updateStream" => "UpdateStream",
        "/listStreams" => "ListStreams",
        "/putMedia" => "PutMedia",
        "/getMedia" => "GetMedia",
        "/listFragments" => "ListFragments",
        "/getMediaForFragmentList" => "GetMediaForFragmentList",
        "/getHLSStreamingSessionURL" => "GetHLSStreamingSessionURL",
        "/getDASHStreamingSessionURL" => "GetDASHStreamingSessionURL",
        "/getImages" => "GetImages",
        _ => "other",
    }
}

/// Paces a byte stream to an average rate with one second of burst.
pub struct Pacer {
    rate: Option<f64>,
    tokens: f64,
    at: Instant,
}

impl Pacer {
    /// `bytes_per_sec` 0 is unlimited.
    pub fn new(bytes_per_sec: u64) -> Pacer {
        let rate = (bytes_per_sec > 0).then_some(bytes_per_sec as f64);
        Pacer {
            rate,
            tokens: rate.unwrap_or(0.0),
            at: Instant::now(),
        }
    }

    /// How long to wait after moving `bytes` at `now`.
    pub fn delay(&mut self, bytes: usize, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate) - bytes as f64;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    /// Waits as long as moving `bytes` requires.
    pub async fn pace(&mut self, bytes: usize) {
        let wait = self.delay(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_per_second_per_stream_then_throttled() {
        let admission = Admission::new(true);
        for _ in 0..5 {
            admission.admit("/describeStream", Some("cam")).unwrap();
        }
        let e = admission.admit("/describeStream", Some("cam")).unwrap_err();
        assert_eq!(e.kind.code(), "ClientLimitExceededException");
        assert_eq!(e.kind.status(), 400);
        // Another stream has its own budget; an unlimited operation is never throttled.
        admission.admit("/describeStream", Some("other")).unwrap();
        for _ in 0..100 {
            admission.admit("/listFragments", Some("cam")).unwrap();
        }
        // Playback session URLs: 25 per second per stream, HLS and DASH counted apart.
        for _ in 0..25 {
            admission
                .admit("/getHLSStreamingSessionURL", Some("cam"))
                .unwrap();
        }
        assert!(admission
            .admit("/getHLSStreamingSessionURL", Some("cam"))
            .is_err());
        admission
            .admit("/getDASHStreamingSessionURL", Some("cam"))
            .unwrap();
        let off = Admission::new(false);
        for _ in 0..100 {
            off.admit("/describeStream", Some("cam")).unwrap();
        }
    }

    #[test]
    fn a_window_counts_the_last_second() {
        let rates = RateLimits::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Five calls spread over 0.8 s fill the window; a sixth inside the second is
        // refused however slowly the first five came.
        for i in 0..5 {
            assert!(rates.take("s", "x", 5.0, 1.0, t0 + ms(200 * i)));
        }
        assert!(!rates.take("s", "x", 5.0, 1.0, t0 + ms(900)));
        // The first call stops counting one second after it was made.
        assert!(rates.take("s", "x", 5.0, 1.0, t0 + ms(1000)));
        assert!(!rates.take("s", "x", 5.0, 1.0, t0 + ms(1100)));
        // Scopes and kinds are separate.
        assert!(rates.take("t", "x", 5.0, 1.0, t0));
        assert!(rates.take("s", "y", 5.0, 1.0, t0));
    }

    #[test]
    fn points_are_spent_by_cost_and_oversized_calls_count_longer() {
        let rates = RateLimits::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for i in 0..10 {
            assert!(rates.take("s", "meta", 10_000.0, 1000.0, t0 + ms(50 * i)));
        }
        assert!(!rates.take("s", "meta", 10_000.0, 1.0, t0 + ms(600)));
        // A refused call spends nothing.
        assert!(rates.take("s", "meta", 10_000.0, 1000.0, t0 + ms(1000)));
        // 1,000 fragments against 500 points/s: admitted alone, then counts for 2 s.
        assert!(rates.take("s", "media", 500.0, 1000.0, t0));
        assert!(!rates.take("s", "media", 500.0, 1.0, t0 + ms(1500)));
        assert!(rates.take("s", "media", 500.0, 1.0, t0 + ms(2000)));
        assert!(!rates.take("s", "media", 500.0, 500.0, t0 + ms(2100)));
    }

    #[test]
    fn session_resources_have_session_tps_and_share_the_stream_budgets() {
        let admission = Admission::new(true);
        let arn = "arn:aws:kinesisvideo:us-east-1:000000000000:stream/cam/1700000000000";
        for _ in 0..20 {
            admission
                .admit_session_resource("s1", arn, "getTSFragment.ts", 5)
                .unwrap();
        }
        assert!(admission
            .admit_session_resource("s1", arn, "getTSFragment.ts", 5)
            .is_err());
        admission
            .admit_session_resource("s2", arn, "getTSFragment.ts", 5)
            .unwrap();
        // 21 media points spent on `cam`; a 480-fragment clip fits, one more does not.
        admission.clip_points(arn, 479).unwrap();
        assert!(admission.clip_points(arn, 1).is_err());
        // Metadata: two 5,000-fragment playlists, then ListFragments is over budget.
        let other = "arn:aws:kinesisvideo:us-east-1:000000000000:stream/cam2/1700000000000";
        for _ in 0..2 {
            admission
                .admit_session_resource("s3", other, "getHLSMediaPlaylist.m3u8", 5000)
                .unwrap();
        }
        assert!(admission.metadata_points("cam2", 1.0).is_err());
        let off = Admission::new(false);
        for _ in 0..50 {
            off.admit_session_resource("s1", arn, "getTSFragment.ts", 5)
                .unwrap();
        }
    }

    #[test]
    fn arns_and_names_share_a_scope() {
        assert_eq!(stream_scope(Some("cam"), None).as_deref(), Some("cam"));
        assert_eq!(
            stream_scope(
                None,
                Some("arn:aws:kinesisvideo:us-east-1:000000000000:stream/cam/1700000000000")
            )
            .as_deref(),
            Some("cam")
        );
        assert_eq!(stream_scope(None, None), None);
    }

    #[test]
    fn a_new_put_session_supersedes_the_old_one() {
        let admission = Admission::new(true);
        let first = admission.take_over("arn1");
        assert!(!first.has_changed().unwrap());
        let second = admission.take_over("arn1");
        assert!(first.has_changed().unwrap());
        assert!(!second.has_changed().unwrap());
        let _other = admission.take_over("arn2");
        assert!(!second.has_changed().unwrap());
    }

    #[test]
    fn pacer_allows_a_second_of_burst() {
        let mut pacer = Pacer::new(1000);
        let t0 = Instant::now();
        pacer.at = t0;
        assert_eq!(pacer.delay(1000, t0), Duration::ZERO);
        assert_eq!(pacer.delay(500, t0), Duration::from_millis(500));
        assert_eq!(Pacer::new(0).delay(usize::MAX, t0), Duration::ZERO);
    }
}
