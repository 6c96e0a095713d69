//! Accepting connections, so that slow or idle clients cannot starve the server: a request's
//! head must arrive within [`HEADER_TIMEOUT`] (also the longest a kept-alive connection may sit
//! idle), its body within [`BODY_TIMEOUT`]; at most [`PER_ADDRESS`] open connections per client
//! address and [`MAX_CONNECTIONS`] in all (a connection past either limit is closed at once, so
//! it holds no file descriptor). A live log stream is a response being written, not a client
//! being waited for: it is not cut.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::ServiceExt;

/// The longest wait for a request's head (and for the next request on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait for a request's whole body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections one client address may hold.
pub const PER_ADDRESS: usize = 64;
/// Open connections in all (lowered to half the file descriptors skiff may open).
pub const MAX_CONNECTIONS: usize = 2048;

/// Open connections, per address and in all.
#[derive(Default)]
struct Open {
    by_addr: HashMap<IpAddr, usize>,
    total: usize,
}

/// A connection counted in [`Open`] until dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    addr: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                o.by_addr.remove(&self.addr);
            }
        }
    }
}

fn take_slot(open: &Arc<Mutex<Open>>, addr: IpAddr, cap: usize) -> Option<Slot> {
    let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
    let n = o.by_addr.get(&addr).copied().unwrap_or(0);
    if n >= PER_ADDRESS || o.total >= cap {
        return None;
    }
    o.by_addr.insert(addr, n + 1);
    o.total += 1;
    Some(Slot {
        open: open.clone(),
        addr,
    })
}

/// The most connections this process can hold: [`MAX_CONNECTIONS`], or half its open-file limit.
fn connection_cap() -> usize {
    match open_file_limit() {
        Some(limit) => MAX_CONNECTIONS
            .min(usize::try_from(limit / 2).unwrap_or(MAX_CONNECTIONS))
            .max(16),
        None => MAX_CONNECTIONS,
    }
}

/// This process's soft limit on open files (`Max open files` in /proc/self/limits).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Serves `app` on `listener` until `shutdown` completes, then lets the open requests finish
/// (for at most `drain`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let open = Arc::new(Mutex::new(Open::default()));
    let cap = connection_cap();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // pause a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = take_slot(&open, peer.ip(), cap) else {
            metrics::counter!("skiff_http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = app
            .clone()
            .map_request(move |mut req: axum::extract::Request<_>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            });
        let svc = hyper_util::service::TowerToHyperService::new(svc);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
    Ok(())
}

/// The answer to a body that did not arrive within [`BODY_TIMEOUT`].
pub(crate) fn body_timeout() -> crate::error::ApiError {
    crate::error::ApiError::new(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!(
            "the request's body did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        ),
    )
}

/// A request's body must arrive within [`BODY_TIMEOUT`] (and is at most [`crate::MAX_BODY`]):
/// read here, whole, before the handler runs (a layer of `app`, inside its error pages). A
/// webhook delivery (`/hooks/*`) passes as it comes: its handler reads it under the same
/// deadline and its own limit, hashing each part as it arrives instead of after the whole.
pub(crate) async fn body_deadline(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    if !crate::auth::changes_state(req.method()) || req.uri().path().starts_with("/hooks/") {
        return next.run(req).await;
    }
    let limit = crate::MAX_BODY;
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => body_timeout().into_response(),
        Ok(Err(e)) if e.to_string().contains("length limit") => crate::error::ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is over {} KiB", limit >> 10),
        )
        .into_response(),
        Ok(Err(e)) => crate::error::ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the request's body could not be read: {e}"),
        )
        .into_response(),
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
    }
}
