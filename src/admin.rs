//! The admin endpoint, on its own listener: `/healthz`, `/readyz`, `/metrics`, `/ca.crt`.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::{self, text, Body};
use crate::Shared;

/// Serves the admin endpoint on `listener` until shutdown starts.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&req, &shared).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn answer(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" => match ready(shared).await {
            Ok(()) => text(StatusCode::OK, "ready"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        "/metrics" => {
            let mut resp = text(StatusCode::OK, "");
            *resp.body_mut() = body::full(shared.metrics.render(shared.ca.leaves_issued()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/ca.crt" => {
            let mut resp = Response::new(body::full(shared.ca.cert_pem().to_owned()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-pem-file"),
            );
            resp
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!("no {other}; try /healthz, /readyz, /metrics or /ca.crt"),
        ),
    }
}

/// Ready when the CA is loaded (it is, or `run` would not have started) and the cache is writable.
async fn ready(shared: &Shared) -> Result<(), String> {
    let probe = shared.cache.store.new_tmp_path();
    tokio::fs::write(&probe, b"ready?")
        .await
        .map_err(|e| format!("cache not writable: {e}"))?;
    let _ = tokio::fs::remove_file(&probe).await;
    Ok(())
}
