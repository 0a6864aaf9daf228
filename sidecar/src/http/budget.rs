//! One memory budget for request bodies being read, HTTP/1.1 and HTTP/2
//! together: every byte read into a request's buffer is a permit taken from
//! its connection's share, its client address's share and the process's
//! budget, held until the body has been parsed. The client's share keeps one
//! address with many connections from taking the whole budget from others. Past either a request waits briefly, then is refused (503 +
//! Retry-After), so no number of slow or unfinished bodies can hold more
//! than the budget. HTTP/2's flow-control windows are sized from the
//! per-connection budget (http/mod.rs), so what a peer may send before we
//! read it is bounded by the same figure.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::problem::Problem;

#[derive(Clone, Debug)]
pub struct BodyLimits {
    /// Bytes of bodies being read, across every connection.
    pub global_bytes: usize,
    /// Bytes of bodies being read on one connection (all its HTTP/2 streams).
    pub connection_bytes: usize,
    /// Bytes of bodies being read for one client address, all its connections.
    pub client_bytes: usize,
    /// Longest wait for budget before a 503.
    pub wait: Duration,
}

/// The process's budget; cloned into every connection.
#[derive(Clone)]
pub struct Budget {
    global: Arc<Semaphore>,
    /// Each client address's share while it has a connection open.
    clients: Arc<Mutex<HashMap<IpAddr, Weak<Semaphore>>>>,
    limits: BodyLimits,
}

/// One connection's share, carried to its requests as a request extension.
#[derive(Clone)]
pub struct ConnectionBudget {
    global: Arc<Semaphore>,
    client: Option<Arc<Semaphore>>,
    connection: Arc<Semaphore>,
    wait: Duration,
}

/// Budget held by one body while it is read and parsed.
#[derive(Default)]
pub struct Held {
    permits: Vec<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(limits: BodyLimits) -> Self {
        Budget {
            global: Arc::new(Semaphore::new(limits.global_bytes.max(1))),
            clients: Arc::default(),
            limits,
        }
    }

    /// A new connection's share; `client` is None for a trusted proxy's
    /// connections (they carry many clients).
    pub fn connection(&self, client: Option<IpAddr>) -> ConnectionBudget {
        let client = client.map(|ip| {
            let mut clients = self.clients.lock().unwrap();
            if let Some(s) = clients.get(&ip).and_then(Weak::upgrade) {
                return s;
            }
            clients.retain(|_, w| w.strong_count() > 0);
            let s = Arc::new(Semaphore::new(self.limits.client_bytes.max(1)));
            clients.insert(ip, Arc::downgrade(&s));
            s
        });
        ConnectionBudget {
            global: self.global.clone(),
            client,
            connection: Arc::new(Semaphore::new(self.limits.connection_bytes.max(1))),
            wait: self.limits.wait,
        }
    }

    /// Bytes of bodies held now (for /metrics).
    pub fn in_use(&self) -> usize {
        self.limits
            .global_bytes
            .max(1)
            .saturating_sub(self.global.available_permits())
    }

    pub fn limits(&self) -> &BodyLimits {
        &self.limits
    }
}

impl ConnectionBudget {
    /// Takes `n` bytes for `held`: from the connection's share, then the
    /// client's (so neither one connection nor one address can drain the
    /// process's budget), then the process's.
    pub async fn take(&self, held: &mut Held, n: usize) -> Result<(), Problem> {
        if n == 0 {
            return Ok(());
        }
        let n32 = u32::try_from(n).map_err(|_| budget_exhausted())?;
        let shares = [
            Some(&self.connection),
            self.client.as_ref(),
            Some(&self.global),
        ];
        for sem in shares.into_iter().flatten() {
            let permit = match sem.clone().try_acquire_many_owned(n32) {
                Ok(p) => p,
                Err(_) => tokio::time::timeout(self.wait, sem.clone().acquire_many_owned(n32))
                    .await
                    .map_err(|_| budget_exhausted())?
                    .map_err(|_| budget_exhausted())?,
            };
            held.permits.push(permit);
        }
        Ok(())
    }
}

fn budget_exhausted() -> Problem {
    let mut p = Problem::overloaded();
    p.detail =
        "too many request bodies are being read; nothing was recorded, send it again as it is"
            .into();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(global: usize, connection: usize) -> Budget {
        Budget::new(BodyLimits {
            global_bytes: global,
            connection_bytes: connection,
            client_bytes: global,
            wait: Duration::from_millis(20),
        })
    }

    #[tokio::test]
    async fn a_connection_cannot_take_more_than_its_share() {
        let b = budget(1000, 100);
        let c = b.connection(None);
        let mut held = Held::default();
        c.take(&mut held, 60).await.unwrap();
        let refused = c.take(&mut held, 60).await.unwrap_err();
        assert_eq!(refused.slug, "overloaded");
        assert_eq!(b.in_use(), 60);
        // Another connection has its own share of what is left.
        let mut other = Held::default();
        b.connection(None).take(&mut other, 100).await.unwrap();
        assert_eq!(b.in_use(), 160);
        drop(held);
        drop(other);
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn connections_together_cannot_take_more_than_the_budget() {
        let b = budget(250, 100);
        let conns: Vec<_> = (0..3).map(|_| b.connection(None)).collect();
        let mut held: Vec<Held> = (0..3).map(|_| Held::default()).collect();
        conns[0].take(&mut held[0], 100).await.unwrap();
        conns[1].take(&mut held[1], 100).await.unwrap();
        assert!(conns[2].take(&mut held[2], 100).await.is_err());
        assert!(b.in_use() <= 250, "{}", b.in_use());
        // Budget freed by one body is there for the next.
        held.truncate(2);
        held.remove(0);
        conns[2].take(&mut Held::default(), 100).await.unwrap();
    }

    #[tokio::test]
    async fn one_client_address_cannot_take_more_than_its_share() {
        let b = Budget::new(BodyLimits {
            global_bytes: 1000,
            connection_bytes: 100,
            client_bytes: 250,
            wait: Duration::from_millis(20),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let conns: Vec<_> = (0..4).map(|_| b.connection(Some(a))).collect();
        let mut held = Held::default();
        conns[0].take(&mut held, 100).await.unwrap();
        conns[1].take(&mut held, 100).await.unwrap();
        assert!(
            conns[2].take(&mut held, 100).await.is_err(),
            "past 250 for one address"
        );
        let other = b.connection(Some("10.0.0.2".parse().unwrap()));
        other.take(&mut Held::default(), 100).await.unwrap();
        // Shares of addresses with no connection left are forgotten.
        drop(conns);
        drop(held);
        let _fresh = b.connection(Some("10.0.0.3".parse().unwrap()));
        assert!(b.clients.lock().unwrap().len() <= 2);
    }

    #[tokio::test]
    async fn a_brief_wait_is_served_when_budget_frees_in_time() {
        let b = Budget::new(BodyLimits {
            global_bytes: 100,
            connection_bytes: 100,
            client_bytes: 100,
            wait: Duration::from_secs(5),
        });
        let (c1, c2) = (b.connection(None), b.connection(None));
        let mut h1 = Held::default();
        c1.take(&mut h1, 100).await.unwrap();
        let waiter = tokio::spawn(async move {
            let mut h2 = Held::default();
            c2.take(&mut h2, 50).await.map(|_| ())
        });
        tokio::task::yield_now().await;
        drop(h1);
        waiter.await.unwrap().unwrap();
    }
}
