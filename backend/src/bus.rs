//! The message bus between replicas.
//!
//! Topics (each is the Redis channel `<prefix>bus:<topic>`):
//! - `ev:<session>`: events of a session's standalone stream (`GET /mcp`), published by the
//!   replica whose worker produced them, delivered by whichever replica holds the stream;
//! - `reply:<session>`: the client's answers to server-initiated requests (elicitation,
//!   sampling), delivered to the replica whose request waits for them;
//! - `del`: a session id that was deleted; every replica drops its in-memory worker;
//! - `legacy:<session>`: messages POSTed for a 2024-11-05 SSE session held elsewhere.
//!
//! Each replica holds one pattern subscription and fans messages out to local subscribers.
//! Delivery is best effort (Redis pub/sub): what must not be lost is also in the event log.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::broadcast;

/// Capacity of one topic's local fan-out channel.
const TOPIC_CAPACITY: usize = 256;

/// Local fan-out of bus topics.
#[derive(Default)]
pub struct Bus {
    topics: Mutex<HashMap<String, broadcast::Sender<Arc<str>>>>,
}

impl Bus {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<Arc<str>>>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Receives every later message of `topic` on this replica.
    pub fn subscribe(&self, topic: &str) -> broadcast::Receiver<Arc<str>> {
        self.topics()
            .entry(topic.to_owned())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .subscribe()
    }

    /// Hands a message to the local subscribers of `topic`, if any.
    pub fn dispatch(&self, topic: &str, payload: Arc<str>) {
        let mut topics = self.topics();
        if let Some(tx) = topics.get(topic) {
            if tx.receiver_count() == 0 {
                topics.remove(topic);
            } else {
                let _ = tx.send(payload);
            }
        }
    }

    /// Reads `<prefix>bus:*` from Redis and dispatches locally, reconnecting until `stop`.
    pub async fn run_redis(
        self: Arc<Self>,
        client: redis::Client,
        prefix: String,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let pattern = format!("{prefix}bus:*");
        let strip = format!("{prefix}bus:");
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.psubscribe(&pattern).await?;
                tracing::info!(pattern = %pattern, "bus subscribed");
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                r = attempt => r,
                () = stop.cancelled() => return,
            };
            match pubsub {
                Ok(pubsub) => {
                    delay = Duration::from_millis(100);
                    let mut messages = pubsub.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            m = messages.next() => m,
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
    async fn topic_without_subscribers_is_dropped() {
        let bus = Bus::new();
        drop(bus.subscribe("t"));
        bus.dispatch("t", "x".into());
        assert!(bus.topics().is_empty(), "unused topic entries are removed");
    }
}
