//! The export bandwidth cap (`STREAM_MANAGER_EXPORTER_MAX_BANDWIDTH`): a token bucket shared
//! by every export, refilled at the configured kilobits per second and holding at most one
//! second's worth. A batch takes its payload bytes before it is sent; when the bucket runs
//! into debt the sender sleeps until the debt is repaid, so the average rate over any window
//! longer than a second stays at the cap while a single large batch is never refused.

use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    /// Bytes that may be sent now; negative while in debt.
    tokens: f64,
    refilled_at: Instant,
}

pub struct BandwidthLimit {
    /// Bytes per second; `None` is unlimited.
    rate: Option<f64>,
    bucket: Mutex<Bucket>,
}

impl BandwidthLimit {
    /// `kbps` in kilobits (1000 bits) per second; 0 is unlimited.
    pub fn new(kbps: u64) -> BandwidthLimit {
        let rate = (kbps > 0).then(|| kbps as f64 * 1000.0 / 8.0);
        BandwidthLimit {
            rate,
            bucket: Mutex::new(Bucket {
                tokens: rate.unwrap_or(0.0),
                refilled_at: Instant::now(),
            }),
        }
    }

    /// How long a sender of `bytes` must wait at `now` (and books the bytes).
    fn book(&self, bytes: usize, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let mut bucket = self.bucket.lock().unwrap();
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.refilled_at = now;
        bucket.tokens -= bytes as f64;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / rate)
        }
    }

    /// Waits until `bytes` fit under the cap.
    pub async fn take(&self, bytes: usize) {
        let wait = self.book(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let limit = BandwidthLimit::new(0);
        assert_eq!(limit.book(usize::MAX / 2, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn one_second_of_burst_then_the_rate() {
        // 80 kbit/s = 10,000 bytes/s.
        let limit = BandwidthLimit::new(80);
        let start = Instant::now();
        limit.bucket.lock().unwrap().refilled_at = start;
        assert_eq!(limit.book(10_000, start), Duration::ZERO);
        let wait = limit.book(5_000, start);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Half a second later the debt is repaid and another 5,000 bytes cost another 0.5 s.
        let wait = limit.book(5_000, start + Duration::from_millis(500));
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // A long idle period refills only one second's worth.
        let later = start + Duration::from_secs(60);
        assert_eq!(limit.book(10_000, later), Duration::ZERO);
        assert!(limit.book(1, later) > Duration::ZERO);
    }
}
