//! The kubelet's plain-HTTP health endpoint on loopback (`--healthz-port`, 10248), as upstream's: `GET /healthz`
//! answers `ok` while the kubelet runs, for local supervisors (systemd, scripts) that have no client certificate.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (code, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok"),
        _ => (StatusCode::NOT_FOUND, "404 page not found\n"),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    Ok(r)
}

/// Binds 127.0.0.1:`port` (failing fast, like a port already in use) and returns the serving task.
pub(crate) async fn bind(port: u16) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    Ok(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(answer))
                    .await;
            });
        }
    })
}
