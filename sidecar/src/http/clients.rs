//! A limit per client address, so that one client cannot take every
//! connection slot (2048 silent sockets once made /healthz time out).
//! A direct client's address is its socket's, and the limit counts its
//! connections. Behind a proxy every connection comes from the proxy: for
//! connections from a configured trusted proxy the client's address is the
//! last one X-Forwarded-For names (what that proxy saw), and the limit counts
//! that client's requests in progress instead. A forwarding header from any
//! other peer is ignored: anyone can write one.
use hyper::header::HeaderMap;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Clients {
    per_client: usize,
    trusted_proxies: Arc<Vec<IpAddr>>,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection (or proxied request) counted against its client.
pub struct Slot {
    clients: Clients,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.clients.counts.lock().unwrap();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Clients {
    pub fn new(per_client: usize, trusted_proxies: Vec<IpAddr>) -> Self {
        Clients {
            per_client: per_client.max(1),
            trusted_proxies: Arc::new(trusted_proxies),
            counts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.contains(&canonical(peer))
    }

    /// Counts one more for `ip`, or None when it already has its limit.
    pub fn enter(&self, ip: IpAddr) -> Option<Slot> {
        let ip = canonical(ip);
        let mut counts = self.counts.lock().unwrap();
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(Slot {
            clients: self.clone(),
            ip,
        })
    }

    /// The client behind a trusted proxy: the last X-Forwarded-For address,
    /// or the proxy itself when it sent none.
    pub fn forwarded_client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .next_back()
            .unwrap_or(peer)
    }

    /// Clients counted now.
    pub fn tracked(&self) -> usize {
        self.counts.lock().unwrap().len()
    }
}

/// An IPv4 client seen through an IPv6 socket is the same client.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn a_client_gets_its_limit_and_no_more_and_slots_come_back() {
        let c = Clients::new(2, vec![]);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = c.enter(a).unwrap();
        let _s2 = c.enter(a).unwrap();
        assert!(c.enter(a).is_none());
        assert!(c.enter(b).is_some(), "another client is not affected");
        drop(s1);
        let _s3 = c
            .enter(a)
            .expect("a slot comes back when its connection ends");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(c.enter(mapped).is_none(), "the same client over IPv6");
    }

    #[test]
    fn forwarded_addresses_come_only_from_trusted_proxies() {
        let proxy: IpAddr = "127.0.0.2".parse().unwrap();
        let c = Clients::new(64, vec![proxy]);
        assert!(c.is_trusted_proxy(proxy));
        assert!(!c.is_trusted_proxy("127.0.0.3".parse().unwrap()));
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("3.3.3.3"));
        assert_eq!(
            c.forwarded_client(proxy, &h),
            "3.3.3.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(c.forwarded_client(proxy, &HeaderMap::new()), proxy);
        let mut junk = HeaderMap::new();
        junk.insert("x-forwarded-for", HeaderValue::from_static("not-an-ip"));
        assert_eq!(c.forwarded_client(proxy, &junk), proxy);
    }
}
