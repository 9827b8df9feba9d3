//! The message bus between replicas.
//!
//! Topics (each is the Redis channel `<prefix>bus:<topic>`):
//! - `ev:<session>`: events of a session's standalone stream (`GET /mcp`), published by the
//!   replica whose worker produced them, delivered by whichever replica holds the stream;
//! - `reply`: `<session> <message>`, the client's answers to server-initiated requests
//!   (elicitation, sampling) and its `notifications/cancelled`, delivered to every replica with
//!   a worker for the session (a reply's id names the one worker that waits for it);
//! - `del`: a session id that ended; every replica drops its in-memory worker;
//! - `legacy:<session>`: messages POSTed for a 2024-11-05 SSE session held elsewhere.
//!
//! Each replica holds one pattern subscription and fans messages out to local subscribers.
//! A topic exists locally only while someone listens: the last [`Subscription`] dropped
//! removes it. Delivery is best effort (Redis pub/sub), so what must not be lost is also in
//! the session's event log, and every (re)subscription bumps [`Bus::generation`]: a
//! listener that may have missed messages (lag, reconnect) re-reads the log from the last
//! event it delivered. The subscription is health-checked with a PING every
//! [`HEALTH_EVERY`]; no answer within the Redis timeout means reconnect.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::{broadcast, watch};

use crate::redis_link::Link;

/// Capacity of one topic's local fan-out channel.
const TOPIC_CAPACITY: usize = 256;
/// Interval of the subscription's health check.
pub const HEALTH_EVERY: Duration = Duration::from_secs(5);

type Topics = HashMap<String, broadcast::Sender<Arc<str>>>;

/// Local fan-out of bus topics.
pub struct Bus {
    topics: Mutex<Topics>,
    /// Bumped after every subscription made after the first: messages may have been missed.
    generation: watch::Sender<u64>,
}

/// A listener on one topic; dropping the last one of a topic removes the topic.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<str>>,
    topic: String,
    bus: Weak<Bus>,
}

impl Subscription {
    /// The next message; `Lagged` means messages were skipped (re-read the log).
    pub async fn recv(&mut self) -> Result<Arc<str>, broadcast::error::RecvError> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Result<Arc<str>, broadcast::error::TryRecvError> {
        self.rx.try_recv()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(bus) = self.bus.upgrade() else {
            return;
        };
        let mut topics = bus.topics();
        // This receiver is still alive here: it is the last one when the count is 1.
        if topics
            .get(&self.topic)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            topics.remove(&self.topic);
        }
    }
}

impl Bus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            topics: Mutex::default(),
            generation: watch::Sender::new(0),
        })
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, Topics> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of topics with listeners on this replica.
    pub fn topic_count(&self) -> usize {
        self.topics().len()
    }

    /// Receives every later message of `topic` on this replica.
    pub fn subscribe(self: &Arc<Self>, topic: &str) -> Subscription {
        let rx = self
            .topics()
            .entry(topic.to_owned())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .subscribe();
        Subscription {
            rx,
            topic: topic.to_owned(),
            bus: Arc::downgrade(self),
        }
    }

    /// Changes after each resubscription (messages published meanwhile were not heard).
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Hands a message to the local subscribers of `topic`, if any.
    pub fn dispatch(&self, topic: &str, payload: Arc<str>) {
        if let Some(tx) = self.topics().get(topic) {
            let _ = tx.send(payload);
        }
    }

    /// Reads `<prefix>bus:*` from Redis and dispatches locally, reconnecting until `stop`.
    pub async fn run_redis(
        self: Arc<Self>,
        link: Arc<Link>,
        prefix: String,
        timeout: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let pattern = format!("{prefix}bus:*");
        let strip = format!("{prefix}bus:");
        let mut delay = Duration::from_millis(100);
        let mut subscribed_before = false;
        loop {
            let attempt = async {
                let mut pubsub = tokio::time::timeout(timeout * 2, link.pubsub())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from((redis::ErrorKind::Io, "pubsub connect timeout"))
                    })??;
                pubsub.psubscribe(&pattern).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                r = attempt => r,
                () = stop.cancelled() => return,
            };
            match pubsub {
                Ok(pubsub) => {
                    tracing::info!(pattern = %pattern, "bus subscribed");
                    delay = Duration::from_millis(100);
                    if subscribed_before {
                        self.generation.send_modify(|g| *g += 1);
                        crate::metrics::metrics().bus_reconnects.inc();
                    }
                    subscribed_before = true;
                    let (mut sink, mut messages) = pubsub.split();
                    let mut health = tokio::time::interval(HEALTH_EVERY);
                    health.tick().await;
                    loop {
                        let msg = tokio::select! {
                            m = messages.next() => m,
                            _ = health.tick() => {
                                let ping = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                                if !matches!(ping, Ok(Ok(_))) {
                                    tracing::warn!("bus subscription did not answer its health check");
                                    break;
                                }
                                continue;
                            }
                            () = stop.cancelled() => return,
                        };
                        let Some(msg) = msg else { break };
                        let Some(topic) = msg.get_channel_name().strip_prefix(&strip) else {
                            continue;
                        };
                        match msg.get_payload::<String>() {
                            Ok(p) => self.dispatch(topic, p.into()),
                            Err(e) => tracing::warn!(error = %e, "bus message without text"),
                        }
                    }
                    tracing::warn!("bus connection lost, reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "bus cannot subscribe, retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dispatch_reaches_only_subscribers_of_the_topic() {
        let bus = Bus::new();
        let mut a = bus.subscribe("ev:a");
        let mut b = bus.subscribe("ev:b");
        bus.dispatch("ev:a", "one".into());
        assert_eq!(a.recv().await.ok().as_deref(), Some("one"));
        assert!(
            b.try_recv().is_err(),
            "topic ev:b must not see ev:a's message"
        );
    }

    #[tokio::test]
    async fn a_topic_lives_exactly_as_long_as_its_listeners() {
        let bus = Bus::new();
        let first = bus.subscribe("t");
        let second = bus.subscribe("t");
        drop(first);
        assert_eq!(bus.topic_count(), 1, "one listener left: the topic stays");
        drop(second);
        assert_eq!(bus.topic_count(), 0, "no listener: the topic is gone");
        bus.dispatch("t", "x".into());
        assert_eq!(bus.topic_count(), 0, "dispatch does not create topics");
    }
}
