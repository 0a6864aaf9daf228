//! The HTTP server: HTTP/1.1 and HTTP/2 (h2c, or ALPN over TLS) with every
//! wait bounded against a hostile client:
//!   - connections served at once (a semaphore; more wait in the kernel's backlog),
//!     and per client address (clients.rs): POLAR_METER_MAX_CONNECTIONS_PER_CLIENT;
//!   - the TLS handshake and each request's headers, the first from accept:
//!     POLAR_METER_HEADER_TIMEOUT_SECS;
//!   - an idle keep-alive connection: POLAR_METER_IDLE_TIMEOUT_SECS;
//!   - HTTP/2 streams per connection: POLAR_METER_MAX_H2_STREAMS, and its
//!     flow-control window: an eighth of the per-connection body budget;
//!   - bodies being read: one byte budget, for the process, per client address
//!     and per connection (budget.rs);
//!   - the body: POLAR_METER_BODY_TIMEOUT_SECS (routes/extract.rs), and the SQL a
//!     request runs: the request pool's statement timeout and bounded wait.
//!
//! Headers and idleness are watched per connection (hyper's own header timer
//! would also cut idle keep-alive connections at the header timeout).
//! Graceful shutdown stops accepting, lets in-flight requests finish, then returns.
pub mod budget;
pub mod clients;
pub mod tls;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::problem::Problem;
use crate::routes::{self, App, Surface};

#[derive(Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_h2_streams: u32,
    pub clients: clients::Clients,
    pub bodies: budget::Budget,
}

/// Where a request came from, for its handler and its log line: the
/// socket's peer, and the client behind it when the peer is a trusted proxy.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub socket: std::net::SocketAddr,
    pub client: std::net::IpAddr,
}

/// HTTP/2 lets a peer send this much per stream before we read it.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// ... and, all streams together, this share of the connection's body
/// budget: bytes sent but not yet read (streams waiting for budget, or for
/// their key's admission) sit in hyper's buffers, outside the budget, so they
/// are kept to an eighth of it (256 KiB by default). A large body still flows,
/// at a window update per read.
const H2_WINDOW_SHARE: usize = 8;

/// What a connection's watchdog needs to know, updated by its I/O and its requests.
struct Activity {
    born: Instant,
    /// Milliseconds since `born` of the last request's end (or the start).
    quiet_since_ms: AtomicU64,
    /// Milliseconds since `born` of the first byte read while no request
    /// was in progress (0: none): a request's headers are arriving.
    head_since_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64 + 1
    }
}

/// The stream, noting when bytes arrive between requests.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let a = &self.activity;
        if buf.filled().len() > before && a.in_flight.load(Ordering::Acquire) == 0 {
            let _ = a.head_since_ms.compare_exchange(
                0,
                a.now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.head_since_ms.store(0, Ordering::Release);
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0
                .quiet_since_ms
                .store(self.0.now_ms(), Ordering::Release);
        }
    }
}

/// Why a connection should be closed now, if it should.
fn overdue(a: &Activity, limits: &Limits) -> Option<&'static str> {
    if a.in_flight.load(Ordering::Acquire) > 0 {
        return None;
    }
    let now = a.now_ms();
    let head = a.head_since_ms.load(Ordering::Acquire);
    if head > 0 {
        return (now - head > limits.header_timeout.as_millis() as u64)
            .then_some("headers too slow");
    }
    let quiet = a.quiet_since_ms.load(Ordering::Acquire);
    (now.saturating_sub(quiet) > limits.idle_timeout.as_millis() as u64).then_some("idle")
}

pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    surface: Surface,
    tls: Option<Arc<tls::Reloadable>>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Headers are timed by the watchdog below (hyper's timer would start on
    // an idle keep-alive connection too).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    let connection_window =
        u32::try_from(limits.bodies.limits().connection_bytes / H2_WINDOW_SHARE)
            .unwrap_or(u32::MAX)
            .clamp(H2_STREAM_WINDOW, (1 << 31) - 1);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_h2_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(connection_window)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let via_proxy = limits.clients.is_trusted_proxy(peer.ip());
        // A proxy's connections are many clients': those are counted per
        // request below, by the address the proxy forwards.
        let client_slot = if via_proxy {
            None
        } else {
            match limits.clients.enter(peer.ip()) {
                Some(s) => Some(s),
                None => {
                    app.metrics
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %peer.ip(), "connection refused: the client has its limit");
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, tls, limits, mut stop) = (
            app.clone(),
            builder.clone(),
            tls.clone(),
            limits.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            let (_permit, _client_slot) = (permit, client_slot);
            let activity = Arc::new(Activity {
                born: Instant::now(),
                quiet_since_ms: AtomicU64::new(1),
                // The first request's headers are due from accept: a socket
                // that never speaks is closed like one that speaks slowly.
                head_since_ms: AtomicU64::new(1),
                in_flight: AtomicUsize::new(0),
            });
            let watched = Watched {
                inner: stream,
                activity: activity.clone(),
            };
            let a = activity.clone();
            let conn_budget = limits.bodies.connection((!via_proxy).then(|| peer.ip()));
            let clients = limits.clients.clone();
            let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let (app, guard) = (app.clone(), InFlight::new(a.clone()));
                let client = if via_proxy {
                    clients.forwarded_client(peer.ip(), req.headers())
                } else {
                    peer.ip()
                };
                let proxied_slot = via_proxy.then(|| clients.enter(client));
                req.extensions_mut().insert(conn_budget.clone());
                req.extensions_mut().insert(Peer {
                    socket: peer,
                    client,
                });
                async move {
                    let resp = match proxied_slot {
                        Some(None) => {
                            app.metrics
                                .connections_refused
                                .fetch_add(1, Ordering::Relaxed);
                            Problem::overloaded()
                                .into_response(&uuid::Uuid::new_v4().simple().to_string())
                        }
                        Some(Some(slot)) => {
                            let r = routes::handle(app, surface, req).await;
                            drop(slot);
                            r
                        }
                        None => routes::handle(app, surface, req).await,
                    };
                    drop(guard);
                    Ok::<_, Infallible>(resp)
                }
            });
            match tls {
                None => {
                    drive(
                        builder,
                        TokioIo::new(watched),
                        svc,
                        &activity,
                        &limits,
                        &mut stop,
                    )
                    .await
                }
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(watched))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            drive(
                                builder,
                                TokioIo::new(stream),
                                svc,
                                &activity,
                                &limits,
                                &mut stop,
                            )
                            .await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake too slow"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    let all = slots
        .clone()
        .acquire_many_owned(limits.max_connections.max(1) as u32);
    tokio::select! {
        _ = all => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

async fn drive<I, S>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    svc: S,
    activity: &Activity,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<http_body_util::Full<bytes::Bytes>>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection closed with an error");
                }
                return;
            }
            _ = tick.tick() => {
                if let Some(why) = overdue(activity, limits) {
                    // No request is in flight, so nothing is owed: drop the
                    // connection (hyper's graceful shutdown would wait for
                    // headers that may never come).
                    tracing::debug!(why, "closing a connection");
                    return;
                }
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            max_connections: 1,
            max_h2_streams: 1,
            clients: clients::Clients::new(1, vec![]),
            bodies: budget::Budget::new(budget::BodyLimits {
                global_bytes: 1,
                connection_bytes: 1,
                client_bytes: 1,
                wait: Duration::from_millis(1),
            }),
        }
    }

    fn activity() -> Activity {
        Activity {
            born: Instant::now() - Duration::from_secs(10),
            quiet_since_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    #[test]
    fn a_connection_that_never_speaks_is_due_its_headers_from_accept() {
        let l = limits();
        let a = activity();
        a.head_since_ms.store(1, Ordering::Release);
        assert_eq!(overdue(&a, &l), Some("headers too slow"));
    }

    #[test]
    fn slow_headers_idle_connections_and_busy_ones() {
        let l = limits();
        let a = activity();
        a.quiet_since_ms.store(a.now_ms(), Ordering::Release);
        assert_eq!(overdue(&a, &l), None, "just quiet");
        a.quiet_since_ms.store(a.now_ms() - 1000, Ordering::Release);
        assert_eq!(overdue(&a, &l), Some("idle"));
        a.head_since_ms.store(a.now_ms() - 50, Ordering::Release);
        assert_eq!(
            overdue(&a, &l),
            None,
            "headers arriving, within the timeout"
        );
        a.head_since_ms.store(a.now_ms() - 500, Ordering::Release);
        assert_eq!(overdue(&a, &l), Some("headers too slow"));
        a.in_flight.store(1, Ordering::Release);
        assert_eq!(
            overdue(&a, &l),
            None,
            "a request in progress is the body deadline's and the database's to bound"
        );
    }
}
