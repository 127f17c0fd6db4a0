//! A bounded cache of packaged media segments shared by every playback session: the fMP4
//! `moof`+`mdat` of one track of one fragment depends only on the stream, the fragment and the
//! track (its times come from the fragment itself), so N viewers of a live stream need the
//! fragment read from disk, its blocks parsed and the segment built once, not N times.
//! Fragments never change once persisted, so entries need no invalidation; the oldest entries
//! go first when the byte budget is exceeded. A fragment deleted by retention may still be
//! served from here until it is evicted, as a CDN in front of KVS would.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

/// What a cached segment is of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SegmentKey {
    pub stream_arn: String,
    pub seq: i64,
    pub track: u64,
}

#[derive(Default)]
struct Entries {
    segments: HashMap<SegmentKey, Bytes>,
    order: VecDeque<SegmentKey>,
    bytes: usize,
}

/// The cache, at most `budget` bytes of segments.
pub struct PackagedCache {
    budget: usize,
    entries: Mutex<Entries>,
}

impl PackagedCache {
    pub fn new(budget: usize) -> PackagedCache {
        PackagedCache {
            budget,
            entries: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &SegmentKey) -> Option<Bytes> {
        self.entries().segments.get(key).cloned()
    }

    /// Keeps `segment` (unless it alone exceeds the budget), evicting the oldest entries.
    pub fn insert(&self, key: SegmentKey, segment: Bytes) {
        if segment.len() > self.budget {
            return;
        }
        let mut entries = self.entries();
        if entries.segments.contains_key(&key) {
            return;
        }
        while entries.bytes + segment.len() > self.budget {
            let Some(oldest) = entries.order.pop_front() else {
                break;
            };
            if let Some(evicted) = entries.segments.remove(&oldest) {
                entries.bytes -= evicted.len();
            }
        }
        entries.bytes += segment.len();
        entries.order.push_back(key.clone());
        entries.segments.insert(key, segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: i64) -> SegmentKey {
        SegmentKey {
            stream_arn: "arn".into(),
            seq,
            track: 1,
        }
    }

    #[test]
    fn keeps_within_its_budget_evicting_the_oldest() {
        let cache = PackagedCache::new(10);
        cache.insert(key(1), Bytes::from_static(b"aaaa"));
        cache.insert(key(2), Bytes::from_static(b"bbbb"));
        assert_eq!(cache.get(&key(1)).as_deref(), Some(&b"aaaa"[..]));
        cache.insert(key(3), Bytes::from_static(b"cccc"));
        assert_eq!(cache.get(&key(1)), None);
        assert_eq!(cache.get(&key(2)).as_deref(), Some(&b"bbbb"[..]));
        assert_eq!(cache.get(&key(3)).as_deref(), Some(&b"cccc"[..]));
        // Larger than the whole budget: not kept, nothing evicted for it.
        cache.insert(key(4), Bytes::from(vec![0u8; 11]));
        assert_eq!(cache.get(&key(4)), None);
        assert!(cache.get(&key(2)).is_some());
        assert_eq!(cache.get(&SegmentKey { track: 2, ..key(2) }), None);
    }
}
