//! The HTTP listener: hyper's HTTP/1 connection driver with the bounds `axum::serve` lacks.
//!
//! - at most `max_connections` connections are served at once; the next one is accepted only
//!   when one ends, so the rest wait in the kernel's backlog and hold no file descriptor of
//!   ours (the MQTT listener shares the process's descriptor limit);
//! - a request head must arrive within `header_timeout`, counted from when the connection is
//!   ready for a request, so an idle kept-alive connection is closed after it too;
//! - reading the body and answering take at most `request_timeout` (408 otherwise).
//!
//! On shutdown it stops accepting, lets each connection finish the request in flight (idle
//! ones close at once) for at most [`DRAIN`], then drops what is left.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::ApiError;

/// How long requests in flight at shutdown may take to finish.
pub const DRAIN: Duration = Duration::from_secs(10);

/// The bounds of one listener (`http.*` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
}

/// Serves `app` on `listener` under `limits` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let request_timeout = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| async move {
            match tokio::time::timeout(request_timeout, next.run(req)).await {
                Ok(response) => response,
                Err(_) => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request was not read and answered within {} s",
                        request_timeout.as_secs()
                    ),
                )
                .into_response(),
            }
        },
    ));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        // A slot first, then accept: beyond the cap, connections stay in the backlog.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed; nothing left to serve if it were.
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        let conn =
            http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(DRAIN, conn).await {
                        Ok(ended) => ended,
                        Err(_) => return,
                    }
                }
            };
            // Timeouts, resets and malformed requests: the client's problem, not ours.
            if let Err(e) = ended {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "http connections still open after the drain deadline; dropping them"
        );
    }
}

/// Accept errors are not fatal: a connection reset before accept concerns one client, and
/// running out of descriptors (EMFILE) passes when connections close — until then, back off
/// instead of spinning.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting an http connection failed; retrying shortly");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
