//! A DNS server the tests own: answers A queries for the names it holds, from records the test
//! changes while it runs (TTL 1 s), over UDP on loopback.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata::A};

type Records = Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>;

pub struct TestDns {
    pub port: u16,
    records: Records,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestDns {
    pub async fn start() -> Result<Self> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let port = socket.local_addr()?.port();
        let records: Records = Arc::default();
        let held = records.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let Some(reply) = answer(&held, &buf[..n]) else {
                    continue;
                };
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        Ok(Self {
            port,
            records,
            task,
        })
    }

    /// `ip:port` of the server, for the proxy's `dns.servers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Replaces the A records of `name`.
    pub fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        if let Ok(mut r) = self.records.lock() {
            r.insert(
                name.trim_end_matches('.').to_ascii_lowercase(),
                ips.to_vec(),
            );
        }
    }
}

fn answer(records: &Records, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    let held = records.lock().ok()?;
    let mut known = false;
    for q in request.queries() {
        reply.add_query(q.clone());
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let Some(ips) = held.get(&name) else { continue };
        known = true;
        if q.query_type() == RecordType::A {
            for ip in ips {
                reply.add_answer(Record::from_rdata(q.name().clone(), 1, RData::A(A(*ip))));
            }
        }
    }
    if !known {
        reply.set_response_code(ResponseCode::NXDomain);
    }
    reply.to_vec().ok()
}
