//! The agent's one HTTP port: `/healthz`, `/readyz`, `/status` (JSON) and
//! `/metrics` (Prometheus text).
use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use crate::telemetry::{Metrics, StatusHandle};

/// Serves until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    status: StatusHandle,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            () = crate::sync::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    continue;
                }
            },
        };
        let status = status.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let r = respond(&req, &status, &metrics);
                async move { Ok::<_, Infallible>(r) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "HTTP connection");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, status: &StatusHandle, metrics: &Metrics) -> Response<Full<Bytes>> {
    let text = |code: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        r
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
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
