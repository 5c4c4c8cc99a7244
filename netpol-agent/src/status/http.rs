//! The agent's one HTTP port: `/healthz`, `/readyz`, `/status` (JSON) and
//! `/metrics` (Prometheus text).
use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};

use crate::status::{Metrics, StatusHandle};

/// Connections served at once; more are closed as they come. A kubelet
/// probe and a scrape need a few.
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection lives at most this long, keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_mins(1);
/// How long the accept loop rests after a failed accept, doubling to
/// [`ACCEPT_BACKOFF_MAX`]: out of descriptors (`EMFILE`), accepting again
/// at once fails again at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this long about failed accepts.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    status: StatusHandle,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF;
    let mut failed = 0u64;
    let mut logged: Option<Instant> = None;
    loop {
        let (stream, _) = tokio::select! {
            () = crate::shutdown::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(c) => {
                    backoff = ACCEPT_BACKOFF;
                    c
                }
                Err(e) => {
                    failed += 1;
                    if logged.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
                        tracing::warn!(error = %e, failed, "accepting HTTP connections");
                        logged = Some(Instant::now());
                        failed = 0;
                    }
                    tokio::select! {
                        () = crate::shutdown::stopped(&mut stop) => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        // Over the cap the connection is closed at once: idle connections
        // cannot starve the probes for long (each lives at most
        // CONNECTION_LIFETIME), and never the agent's descriptors.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let status = status.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let r = respond(&req, &status, &metrics);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // Past its lifetime the connection is dropped, closing it.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(error = %e, "HTTP connection");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, status: &StatusHandle, metrics: &Metrics) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let text = |code: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        r
    };
    match req.uri().path() {
        "/healthz" => match metrics.unhealthy() {
            None => text(StatusCode::OK, "ok\n".into(), PLAIN),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not healthy: {why}\n"),
                PLAIN,
            ),
        },
        "/readyz" => {
            let st = status.get();
            if st.ready {
                text(StatusCode::OK, "ready\n".into(), PLAIN)
            } else {
                // Say why: an outage keeps the last state enforced, which an
                // operator must be able to tell from a first start.
                let why = match (&st.source.unreachable, st.generation) {
                    (Some(e), 0) => {
                        format!("not ready: API server unreachable ({e}); no state applied yet\n")
                    }
                    (Some(e), _) => format!(
                        "not ready: API server unreachable ({e}); the last applied state stays enforced\n"
                    ),
                    (None, _) => "not ready: no state applied yet\n".to_owned(),
                };
                text(StatusCode::SERVICE_UNAVAILABLE, why, PLAIN)
            }
        }
        "/status" => match serde_json::to_string_pretty(&status.get()) {
            Ok(body) => text(StatusCode::OK, body, "application/json"),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), PLAIN),
        },
        "/metrics" => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        time::Duration,
    };

    use super::*;
    use crate::status::{Status, Task};

    fn handle() -> StatusHandle {
        let (tx, rx) = watch::channel(Status::default());
        std::mem::forget(tx);
        StatusHandle(rx)
    }

    /// GET `path` with a blocking client (off the runtime).
    async fn get(addr: std::net::SocketAddr, path: &'static str) -> Option<String> {
        tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .ok()?;
            let mut body = String::new();
            c.read_to_string(&mut body).ok()?;
            Some(body)
        })
        .await
        .ok()
        .flatten()
    }

    #[test]
    fn healthz_fails_when_a_watched_task_stops_beating() {
        let metrics = Metrics::new();
        let req = Request::get("/healthz").body(()).expect("request");
        // Nothing watched yet (a task beats from its first turn on).
        assert_eq!(respond(&req, &handle(), &metrics).status(), StatusCode::OK);
        metrics.alive(Task::Loop);
        metrics.alive(Task::Source);
        assert_eq!(respond(&req, &handle(), &metrics).status(), StatusCode::OK);
        std::thread::sleep(Duration::from_millis(20));
        let why = metrics.stuck(Duration::from_millis(10)).expect("stuck");
        assert!(why.contains("reconcile loop"), "{why}");
        metrics.alive(Task::Loop);
        let why = metrics.stuck(Duration::from_millis(10)).expect("stuck");
        assert!(why.contains("source"), "{why}");
        assert!(
            metrics
                .encode()
                .contains("netpol_seconds_since_alive{task=\"loop\"}")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_neither_pile_up_nor_starve_the_probes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(listener, handle(), Arc::new(Metrics::new()), stop));
        assert!(
            get(addr, "/healthz")
                .await
                .is_some_and(|b| b.contains("ok"))
        );
        // Three times the cap, silent: past the cap a connection is closed
        // at once; within the header timeout every silent one is.
        let all_closed = tokio::task::spawn_blocking(move || {
            let idle: Vec<std::net::TcpStream> = (0..3 * MAX_CONNECTIONS)
                .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
                .collect();
            idle.into_iter().all(|mut c| {
                c.set_read_timeout(Some(HEADER_TIMEOUT * 4))
                    .expect("timeout");
                let mut b = [0u8; 64];
                // EOF (0) or a reset: closed by the server; a timeout: not.
                match c.read(&mut b) {
                    Ok(n) => n == 0 || b.starts_with(b"HTTP/1.1 408"),
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            })
        })
        .await
        .expect("joined");
        assert!(all_closed, "silent connections were left open");
        // And the probe is answered.
        let answered = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if get(addr, "/healthz")
                    .await
                    .is_some_and(|b| b.contains("ok"))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(answered.is_ok());
    }
}
