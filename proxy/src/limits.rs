//! Limits so that one client cannot starve the others: a token bucket of requests per principal
//! (or client address, without auth), concurrent requests and open SSE streams per principal,
//! and the header deadline that closes slowloris connections.
//!
//! Every map here is bounded: the bucket map is swept of idle keys by the background loop, and
//! the concurrency map holds only keys with something in flight (an entry leaves with its last
//! request).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

use crate::config::PoolLimits;

/// Why a request was refused by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the request rate; retry after this many seconds.
    Rate(u64),
    /// Too many failed authentications from this address; retry after this many seconds.
    AuthFailures(u64),
    Concurrency,
    Streams,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rate(_) => "rate",
            Refusal::AuthFailures(_) => "auth_failures",
            Refusal::Concurrency => "concurrency",
            Refusal::Streams => "streams",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct InFlight {
    requests: u32,
    streams: u32,
}

/// One pool's limiter; it lives with the pool's snapshot.
pub struct Limiter {
    limits: PoolLimits,
    rate: Option<DefaultKeyedRateLimiter<String>>,
    /// Failed authentications per client address: always on, so guessing keys is slow.
    failures: Option<DefaultKeyedRateLimiter<String>>,
    in_flight: Mutex<HashMap<String, InFlight>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Held by a request that counts against its principal's concurrency; released once.
#[derive(Debug)]
pub struct Ticket {
    key: String,
    stream: bool,
}

impl Limiter {
    pub fn new(limits: PoolLimits) -> Self {
        let rate = NonZeroU32::new(limits.requests_per_second).map(|rps| {
            let burst = NonZeroU32::new(limits.burst).unwrap_or(rps);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rps).allow_burst(burst))
        });
        let failures = NonZeroU32::new(limits.auth_failures_per_second).map(|rps| {
            let burst = NonZeroU32::new(rps.get().saturating_mul(2)).unwrap_or(rps);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rps).allow_burst(burst))
        });
        Self {
            limits,
            rate,
            failures,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    /// Counts a failed authentication of the client address `key`; past its bucket the
    /// answer is 429 instead of 401, so guessing keys is slow.
    pub fn charge_failure(&self, key: &String) -> Result<(), Refusal> {
        match &self.failures {
            Some(f) => f
                .check_key(key)
                .map_err(|n| Refusal::AuthFailures(retry_after(&n))),
            None => Ok(()),
        }
    }

    /// Takes one request of `key` through the rate and concurrency limits; a stream (a GET
    /// that opens SSE) also counts against the stream limit.
    pub fn admit(&self, key: String, stream: bool) -> Result<Ticket, Refusal> {
        if let Some(rate) = &self.rate
            && let Err(n) = rate.check_key(&key)
        {
            return Err(Refusal::Rate(retry_after(&n)));
        }
        let l = &self.limits;
        if l.max_concurrent_requests == 0 && l.max_streams == 0 {
            // Nothing to count: no entry, and `release` has nothing to find.
            return Ok(Ticket {
                key: String::new(),
                stream,
            });
        }
        let mut map = self.in_flight.lock().map_err(|_| Refusal::Concurrency)?;
        let entry = map.entry(key.clone()).or_default();
        if l.max_concurrent_requests > 0 && entry.requests >= l.max_concurrent_requests {
            return Err(Refusal::Concurrency);
        }
        if stream && l.max_streams > 0 && entry.streams >= l.max_streams {
            return Err(Refusal::Streams);
        }
        entry.requests += 1;
        entry.streams += u32::from(stream);
        Ok(Ticket { key, stream })
    }

    pub fn release(&self, ticket: Ticket) {
        if ticket.key.is_empty() {
            return;
        }
        if let Ok(mut map) = self.in_flight.lock()
            && let Some(e) = map.get_mut(&ticket.key)
        {
            e.requests = e.requests.saturating_sub(1);
            e.streams = e.streams.saturating_sub(u32::from(ticket.stream));
            if e.requests == 0 {
                map.remove(&ticket.key);
            }
        }
    }

    /// Drops the buckets of keys that are back to full (the background loop calls this).
    pub fn sweep(&self) {
        for r in [&self.rate, &self.failures].into_iter().flatten() {
            r.retain_recent();
            r.shrink_to_fit();
        }
    }

    /// Keys with a request in flight (for tests and the admin view).
    pub fn tracked(&self) -> usize {
        self.in_flight.lock().map_or(0, |m| m.len())
    }
}

/// Whole seconds until a refused bucket has a token again (at least 1, for `Retry-After`).
fn retry_after(not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> u64 {
    not_until
        .wait_time_from(DefaultClock::default().now())
        .as_secs()
        .max(1)
}

tokio::task_local! {
    /// Set once the request head of the current connection task has been read.
    static HEAD_READ: Arc<AtomicBool>;
}

/// Marks the current request's head as read (the proxy calls this as soon as it sees the
/// request); outside a [`HeaderDeadline`] it does nothing.
pub fn head_read() {
    let _ = HEAD_READ.try_with(|f| f.store(true, Ordering::Release));
}

/// Wraps an HTTP app so that a connection must deliver each request head within `timeout`
/// of being ready for it: a slowloris client (or an idle keep-alive connection) is closed
/// then. Pingora's own timeouts are per read, which a client sending a byte at a time defeats.
pub struct HeaderDeadline<A> {
    pub inner: Arc<A>,
    pub timeout: Duration,
}

#[async_trait]
impl<A> HttpServerApp for HeaderDeadline<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let flag = Arc::new(AtomicBool::new(false));
        let work = HEAD_READ.scope(flag.clone(), self.inner.process_new_http(session, shutdown));
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            () = tokio::time::sleep(self.timeout) => {
                if flag.load(Ordering::Acquire) {
                    work.await
                } else {
                    // Dropping the request closes the connection.
                    tracing::debug!(timeout_ms = self.timeout.as_millis() as u64, "request head not received in time; connection closed");
                    None
                }
            }
        }
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: u32, burst: u32, conc: u32, streams: u32) -> PoolLimits {
        PoolLimits {
            requests_per_second: rps,
            burst,
            max_concurrent_requests: conc,
            max_streams: streams,
            backend_max_in_flight: 0,
            auth_failures_per_second: 1,
        }
    }

    #[test]
    fn a_burst_over_the_rate_is_refused_for_that_key_only() {
        let l = Limiter::new(limits(1, 3, 0, 0));
        for _ in 0..3 {
            let t = l
                .admit("a".into(), false)
                .unwrap_or_else(|e| panic!("{e:?}"));
            l.release(t);
        }
        assert!(matches!(l.admit("a".into(), false), Err(Refusal::Rate(s)) if s >= 1));
        assert!(
            l.admit("b".into(), false).is_ok(),
            "another key has its own bucket"
        );
    }

    #[test]
    fn concurrency_and_streams_are_counted_and_released() {
        let l = Limiter::new(limits(0, 1, 2, 1));
        let a = l
            .admit("p".into(), true)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(l.admit("p".into(), true).err(), Some(Refusal::Streams));
        let b = l
            .admit("p".into(), false)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(l.admit("p".into(), false).err(), Some(Refusal::Concurrency));
        l.release(a);
        l.release(b);
        assert_eq!(l.tracked(), 0, "an idle key leaves the map");
        assert!(l.admit("p".into(), true).is_ok());
    }
}
