//! Bounded request bookkeeping: the replay cache of nonces and per-caller rate limits.
//! Both are plain structures with time passed in, so their bounds are unit-tested.
use std::collections::{HashMap, HashSet, VecDeque};

/// Nonces seen within the signature window. Entries are 16-byte hashes of key and
/// nonce (a caller cannot grow one by sending long strings), expire in arrival order
/// (O(1) amortised per request), and are capped: past `cap` live entries new requests
/// are refused as busy rather than remembered.
#[derive(Debug)]
pub struct NonceCache {
    seen: HashSet<[u8; 16]>,
    order: VecDeque<(u64, [u8; 16])>,
    window_ms: u64,
    cap: usize,
}

/// What [`NonceCache::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Nonce {
    /// First use: remembered.
    Fresh,
    /// Seen within the window: a replay.
    Replayed,
    /// The cache is full of live entries: try again shortly.
    Full,
}

impl NonceCache {
    /// A cache that remembers nonces for `window_ms` (twice the allowed clock skew: a
    /// request's time may be off by the skew either way), at most `cap` at once.
    pub fn new(window_ms: u64, cap: usize) -> Self {
        NonceCache {
            seen: HashSet::new(),
            order: VecDeque::new(),
            window_ms,
            cap,
        }
    }

    /// Live entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Checks and remembers `key`'s `nonce` at time `now`.
    pub fn admit(&mut self, key: &str, nonce: &str, now: u64) -> Nonce {
        while let Some(&(t, id)) = self.order.front() {
            if now.saturating_sub(t) < self.window_ms {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&id);
        }
        let mut h = blake3::Hasher::new();
        h.update(key.as_bytes())
            .update(b"/")
            .update(nonce.as_bytes());
        let id: [u8; 16] = h.finalize().as_bytes()[..16].try_into().expect("16 bytes");
        if self.seen.contains(&id) {
            return Nonce::Replayed;
        }
        if self.seen.len() >= self.cap {
            return Nonce::Full;
        }
        self.seen.insert(id);
        self.order.push_back((now, id));
        Nonce::Fresh
    }
}

/// Token buckets per caller (a key or an address): `rate` requests per second on
/// average, bursts of `burst`. At most `cap` callers are tracked; when full, callers
/// whose bucket has refilled (idle ones) are forgotten, and if none is, a new caller is
/// refused until one is.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: HashMap<String, (f64, u64)>,
    rate: f64,
    burst: f64,
    cap: usize,
}

impl RateLimiter {
    /// `rate` per second, bursts of `burst`, at most `cap` callers tracked.
    pub fn new(rate: f64, burst: f64, cap: usize) -> Self {
        RateLimiter {
            buckets: HashMap::new(),
            rate,
            burst,
            cap,
        }
    }

    fn refill(&self, (tokens, last): (f64, u64), now: u64) -> f64 {
        (tokens + now.saturating_sub(last) as f64 / 1000.0 * self.rate).min(self.burst)
    }

    /// Takes one token for `caller` at `now`; false: over its rate.
    pub fn allow(&mut self, caller: &str, now: u64) -> bool {
        if !self.buckets.contains_key(caller) && self.buckets.len() >= self.cap {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, &mut (tokens, last)| {
                (tokens + now.saturating_sub(last) as f64 / 1000.0 * rate).min(burst) < burst
            });
            if self.buckets.len() >= self.cap {
                return false;
            }
        }
        let bucket = self
            .buckets
            .get(caller)
            .copied()
            .unwrap_or((self.burst, now));
        let tokens = self.refill(bucket, now);
        if tokens < 1.0 {
            self.buckets.insert(caller.to_string(), (tokens, now));
            return false;
        }
        self.buckets.insert(caller.to_string(), (tokens - 1.0, now));
        true
    }

    /// Callers tracked now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_remembered_for_their_window_only() {
        let mut c = NonceCache::new(1000, 100);
        assert_eq!(c.admit("k", "n1", 0), Nonce::Fresh);
        assert_eq!(c.admit("k", "n1", 999), Nonce::Replayed);
        assert_eq!(c.admit("other", "n1", 999), Nonce::Fresh, "per key");
        // Past the window the entry is gone (the signature's age check refuses it).
        assert_eq!(c.admit("k", "n1", 1000), Nonce::Fresh);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn nonce_cache_is_capped_and_expires_in_order() {
        let mut c = NonceCache::new(1000, 3);
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(c.admit("k", n, i as u64), Nonce::Fresh);
        }
        assert_eq!(c.admit("k", "d", 10), Nonce::Full);
        assert_eq!(c.len(), 3);
        // The oldest expires first and makes room.
        assert_eq!(c.admit("k", "d", 1000), Nonce::Fresh);
        assert_eq!(c.admit("k", "e", 1000), Nonce::Full);
        // A long nonce costs the same 16 bytes.
        let mut big = NonceCache::new(1000, 10);
        assert_eq!(big.admit("k", &"x".repeat(1 << 16), 0), Nonce::Fresh);
        assert_eq!(big.len(), 1);
    }

    #[test]
    fn rate_limit_allows_bursts_then_the_rate() {
        let mut r = RateLimiter::new(10.0, 5.0, 100);
        let allowed = (0..20).filter(|_| r.allow("k", 0)).count();
        assert_eq!(allowed, 5, "the burst");
        assert!(!r.allow("k", 50), "half a token after 50 ms");
        assert!(r.allow("k", 100), "one token after 100 ms at 10/s");
        assert!(r.allow("other", 100), "callers are apart");
    }

    #[test]
    fn rate_limiter_tracks_a_bounded_number_of_callers() {
        let mut r = RateLimiter::new(1.0, 2.0, 3);
        for k in ["a", "b", "c"] {
            assert!(r.allow(k, 0));
        }
        assert!(!r.allow("d", 0), "full of busy callers: refused");
        assert_eq!(r.len(), 3);
        // After a refill the idle ones are forgotten and the newcomer gets in.
        assert!(r.allow("d", 5000));
        assert!(r.len() <= 3);
    }
}
