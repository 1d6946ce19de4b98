//! The server stack on a plain hyper server (no axum).
//!
//! ```text
//! cargo run --example hyper_server [-- --addr 127.0.0.1:3001]
//! ```
//!
//! Each connection's service is the same stack — a per-client-address
//! limit (`PeerIp`, fed by a `SocketAddr` request extension the accept loop
//! inserts) under `RejectionResponseLayer` — and every clone draws from one
//! `KeyedLimiter`.

use std::convert::Infallible;
use std::net::SocketAddr;

use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::PeerIp;
use apiguard::server::server_layer;
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::{Layer, ServiceExt, service_fn};

/// The apiguard server stack on plain hyper.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3001")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> Result<(), apiguard::BoxError> {
    let args = Args::parse();
    let limiter = KeyedLimiter::from_rate(5, 1.0)?.with_max_keys(100_000);
    let stack = server_layer(limiter, PeerIp);
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, peer) = listener.accept().await?;
        let app = stack.layer(service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello\n"))))
        }));
        // Give the limiter the peer address the way axum's ConnectInfo would.
        let svc = tower::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(peer);
            app.clone().oneshot(req)
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await;
        });
    }
}
