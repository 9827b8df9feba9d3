//! The client address: the TCP peer, or, when the peer is a trusted proxy, the right-most
//! `X-Forwarded-For` entry that is not itself trusted. Every `X-Forwarded-For` line counts (in
//! order), entries may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`), and an entry that
//! does not parse stops the walk at the last trusted hop: a client can prepend whatever it
//! likes, but only hops appended by trusted proxies are believed.

use std::net::{IpAddr, SocketAddr};

use crate::config::Cidr;

/// The client address for `peer`, given the `X-Forwarded-For` header lines in order.
pub fn client_ip<'a>(
    peer: Option<IpAddr>,
    xff: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let mut ip = peer;
    for line in xff.rev() {
        for part in line.rsplit(|b| *b == b',') {
            match std::str::from_utf8(part).ok().and_then(entry) {
                Some(a) => {
                    ip = a;
                    if !is_trusted(a) {
                        return Some(ip);
                    }
                }
                None => return Some(ip),
            }
        }
    }
    Some(ip)
}

/// One `X-Forwarded-For` entry: an address, with or without a port.
fn entry(text: &str) -> Option<IpAddr> {
    let t = text.trim();
    t.parse::<IpAddr>()
        .ok()
        .or_else(|| t.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            t.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|v6| v6.parse().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    fn run(peer: &str, lines: &[&str], trusted: &[&str]) -> Option<IpAddr> {
        let trusted: Vec<Cidr> = trusted.iter().filter_map(|c| Cidr::parse(c)).collect();
        client_ip(Some(ip(peer)), lines.iter().map(|l| l.as_bytes()), &trusted)
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        assert_eq!(
            run("1.2.3.4", &["9.9.9.9"], &["10.0.0.0/8"]),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            run("10.0.0.5", &["9.9.9.9, 10.0.0.7"], &["10.0.0.0/8"]),
            Some(ip("9.9.9.9"))
        );
        assert_eq!(
            run("10.0.0.5", &["garbage, 8.8.8.8"], &["10.0.0.0/8"]),
            Some(ip("8.8.8.8"))
        );
        assert_eq!(run("10.0.0.5", &[], &["10.0.0.0/8"]), Some(ip("10.0.0.5")));
        assert_eq!(run("10.0.0.5", &["9.9.9.9"], &[]), Some(ip("10.0.0.5")));
    }

    #[test]
    fn every_line_counts_and_ports_are_accepted() {
        let t = ["10.0.0.0/8"];
        // A forged first line cannot win over what the trusted proxy appended last.
        assert_eq!(
            run("10.0.0.5", &["6.6.6.6", "7.7.7.7:5555"], &t),
            Some(ip("7.7.7.7"))
        );
        assert_eq!(
            run("10.0.0.5", &["[2001:db8::1]:443, 10.0.0.9:80"], &t),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            run("10.0.0.5", &["[2001:db8::2]"], &t),
            Some(ip("2001:db8::2"))
        );
        // Only trusted hops, then junk: the last trusted hop is the client.
        assert_eq!(
            run("10.0.0.5", &["x, 10.0.0.8, 10.0.0.9"], &t),
            Some(ip("10.0.0.8"))
        );
        // Spoofing through an untrusted peer never works.
        assert_eq!(run("8.8.4.4", &["10.0.0.1"], &t), Some(ip("8.8.4.4")));
    }

    proptest! {
        #[test]
        fn never_panics_and_an_untrusted_peer_always_wins(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
        ) {
            let trusted = vec![Cidr::parse("10.0.0.0/8").unwrap_or_else(|| panic!())];
            let got = client_ip(Some(ip("8.8.8.8")), lines.iter().map(|l| l.as_slice()), &trusted);
            prop_assert_eq!(got, Some(ip("8.8.8.8")));
            let _ = client_ip(Some(ip("10.1.1.1")), lines.iter().map(|l| l.as_slice()), &trusted);
        }
    }
}
