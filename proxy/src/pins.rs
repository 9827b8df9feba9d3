//! Session -> backend pins (the `persistence` policy, and 2024-11-05 streams), bounded.
//!
//! A pin is learned from an `initialize` response (or an `endpoint` event) and dropped when its
//! session is deleted or 404s, when it idles past its TTL (swept by the health loop), or, at
//! `limits.max_session_pins`, when it is the least recently used: the map never holds more
//! pins than that, whatever clients do. An evicted pin costs its session one request routed by
//! the other policies (and a 404 if the session lived only on its backend).

use std::{
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lru::LruCache;

/// Pins keyed by session (with the principal's hash when authenticated); the value names the
/// pool and backend so that pins survive reloads that keep the backend.
#[derive(Debug)]
pub struct Pins {
    map: Mutex<LruCache<String, Pin>>,
}

#[derive(Debug, Clone)]
pub struct Pin {
    pub pool: String,
    pub backend: String,
    last_used: Instant,
    ttl: Duration,
}

impl Pins {
    /// At most `capacity` pins (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            map: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, LruCache<String, Pin>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the capacity (a reload), evicting the least recently used pins beyond it.
    pub fn resize(&self, capacity: usize) {
        self.map()
            .resize(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN));
    }

    pub fn insert(&self, session: &str, pool: &str, backend: &str, ttl: Duration) {
        self.map().put(
            session.to_owned(),
            Pin {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                last_used: Instant::now(),
                ttl,
            },
        );
    }

    /// The pin for `session`, refreshed.
    pub fn get(&self, session: &str) -> Option<Pin> {
        let mut m = self.map();
        let pin = m.get_mut(session)?;
        if pin.last_used.elapsed() > pin.ttl {
            m.pop(session);
            return None;
        }
        pin.last_used = Instant::now();
        Some(pin.clone())
    }

    /// Every pin of session `id`, whoever's (`principal-hash:id` keys included), for the
    /// admin explainer.
    pub fn find_session(&self, id: &str) -> Vec<Pin> {
        self.map()
            .iter()
            .filter(|(k, _)| {
                k.as_str() == id
                    || k.strip_suffix(id)
                        .is_some_and(|rest| rest.ends_with(':') && rest.len() == 65)
            })
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn remove(&self, session: &str) {
        self.map().pop(session);
    }

    /// Drops expired pins; the health loop calls this.
    pub fn sweep(&self) {
        let mut m = self.map();
        let expired: Vec<String> = m
            .iter()
            .filter(|(_, p)| p.last_used.elapsed() > p.ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            m.pop(&k);
        }
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_expire_when_idle() {
        let pins = Pins::new(10);
        pins.insert("s1", "p", "b", Duration::from_secs(60));
        pins.insert("s2", "p", "b", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(pins.get("s1").map(|p| p.backend), Some("b".into()));
        assert!(pins.get("s2").is_none());
        pins.sweep();
        assert_eq!(pins.len(), 1);
    }

    #[test]
    fn pins_are_capped_and_the_least_recently_used_goes_first() {
        let pins = Pins::new(2);
        let ttl = Duration::from_secs(60);
        pins.insert("a", "p", "b1", ttl);
        pins.insert("b", "p", "b2", ttl);
        assert!(pins.get("a").is_some(), "a is now the most recently used");
        pins.insert("c", "p", "b3", ttl);
        assert_eq!(pins.len(), 2, "never more than the capacity");
        assert!(pins.get("b").is_none(), "b was the least recently used");
        assert!(pins.get("a").is_some() && pins.get("c").is_some());
        pins.resize(1);
        assert_eq!(pins.len(), 1, "a smaller capacity after a reload evicts");
    }
}
