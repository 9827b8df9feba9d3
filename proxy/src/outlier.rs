//! Outlier detection on live traffic, beside the active health checks.
//!
//! A backend that answers `consecutive_errors` requests in a row with a 5xx, or fails them at
//! the gateway (reset, timeout), is ejected: no new requests for `base_ejection_ms`, doubled at
//! each ejection up to `max_ejection_ms` (the count starts again once it has stayed in for
//! `max_ejection_ms`). Its health check may well pass meanwhile (a server that answers its
//! `/health` but fails every call). Never more than `max_ejected_percent` of a pool is ejected at
//! once: past that, a failing backend stays in (the panic threshold: a pool where most backends
//! fail serves with all of them rather than answer 503 to everyone). A backend back from an
//! ejection, or from a failed health check, takes new round-robin traffic gradually over
//! `slow_start_ms`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::LazyLock;

/// The process's clock origin, so instants fit in atomics as milliseconds.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds since [`EPOCH`].
pub fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// A pool's `outlier_detection` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// 0: off.
    pub consecutive_errors: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
    pub slow_start: Duration,
}

/// One backend's outlier state (lives with its `BackendState`, across reloads).
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: AtomicU32,
    /// Ejections in a row (reset after a calm `max_ejection`).
    ejections: AtomicU32,
    /// End of the current ejection, ms since the epoch (0: none yet).
    ejected_until: AtomicU64,
    /// When the backend last came back (from an ejection or a failed check), ms.
    returned_at: AtomicU64,
    /// Slow start's admission sequence.
    ticks: AtomicU64,
    total: AtomicU64,
}

impl Outlier {
    pub fn ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    pub fn ejections_total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// A success: the streak of errors ends.
    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// An error; returns whether the streak reached `threshold` (the caller decides on
    /// ejection, which needs the whole pool).
    pub fn error(&self, threshold: u32) -> bool {
        threshold > 0 && self.consecutive.fetch_add(1, Ordering::Relaxed) + 1 >= threshold
    }

    /// Ejects the backend from `now`; returns for how long.
    pub fn eject(&self, now: u64, config: &OutlierConfig) -> Duration {
        let max = config.max_ejection.as_millis() as u64;
        let until = self.ejected_until.load(Ordering::Relaxed);
        // Calm for a whole max interval since the last ejection ended: start over.
        if until > 0 && now.saturating_sub(until) > max {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(20);
        let ms = (config.base_ejection.as_millis() as u64)
            .saturating_mul(1 << n)
            .min(max.max(1));
        self.ejected_until.store(now + ms, Ordering::Relaxed);
        self.returned_at.store(now + ms, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        Duration::from_millis(ms)
    }

    /// The backend passed its health checks again after failing them (a restart, say): it is
    /// verified alive, so an ejection from its dying moments ends; slow start from now.
    pub fn came_back(&self, now: u64) {
        self.ejected_until.fetch_min(now, Ordering::Relaxed);
        self.returned_at.store(now, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// Whether slow start lets this request through: the share of requests admitted grows
    /// linearly from 0 to all over `slow_start` after the backend came back.
    pub fn admits(&self, now: u64, slow_start: Duration) -> bool {
        let window = slow_start.as_millis() as u64;
        let since = now.saturating_sub(self.returned_at.load(Ordering::Relaxed));
        if window == 0 || since >= window || self.returned_at.load(Ordering::Relaxed) == 0 {
            return true;
        }
        // A spread, not random, sequence: tick * golden ratio mod 1000 against the ramp.
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed);
        let spread = tick.wrapping_mul(618) % 1000;
        spread < since * 1000 / window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_errors: 3,
            base_ejection: Duration::from_millis(100),
            max_ejection: Duration::from_millis(350),
            max_ejected_percent: 50,
            slow_start: Duration::from_millis(1000),
        }
    }

    #[test]
    fn a_streak_of_errors_ejects_for_a_growing_interval() {
        let o = Outlier::default();
        let c = config();
        assert!(!o.error(3) && !o.error(3), "two errors: not yet");
        o.success();
        assert!(!o.error(3) && !o.error(3), "a success ended the streak");
        assert!(o.error(3), "three in a row");
        assert_eq!(o.eject(1_000, &c), Duration::from_millis(100));
        assert!(o.ejected(1_050) && !o.ejected(1_100));
        assert_eq!(o.eject(1_200, &c), Duration::from_millis(200), "doubled");
        assert_eq!(o.eject(1_500, &c), Duration::from_millis(350), "capped");
        assert_eq!(
            o.eject(10_000, &c),
            Duration::from_millis(100),
            "calm for longer than the max: back to the base"
        );
        assert_eq!(o.ejections_total(), 4);
    }

    #[test]
    fn slow_start_admits_a_growing_share() {
        let o = Outlier::default();
        let c = config();
        o.came_back(1_000);
        let share = |now: u64| (0..1000).filter(|_| o.admits(now, c.slow_start)).count();
        assert!(share(1_000) < 10, "none at once");
        let half = share(1_500);
        assert!((400..=600).contains(&half), "about half midway: {half}");
        assert_eq!(share(2_000), 1000, "all after the window");
        assert!(
            Outlier::default().admits(5, c.slow_start),
            "never came back: no ramp"
        );
    }

    #[test]
    fn a_backend_back_from_failed_checks_is_not_ejected_any_more() {
        let o = Outlier::default();
        o.eject(1_000, &config());
        assert!(o.ejected(1_010));
        o.came_back(1_020);
        assert!(
            !o.ejected(1_030),
            "a restart ends the ejection of its dying moments"
        );
    }
}
