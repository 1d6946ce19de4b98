//! Over real loopback sockets: a hyper client behind `RetryLayer` against a
//! local axum server. These use real time, so waits are kept to 1–2 s.
#![cfg(not(loom))]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use apiguard_core::{BoxError, RetriesExhausted};
use apiguard_retry::{Jitter, ReplayBody, RetryLayer, RetryPolicy};
use axum::Router;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

/// What the server answers to its `n`-th request.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
}

fn reply(status: u16) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
    }
}

fn reply_with(status: u16, name: &'static str, value: String) -> Reply {
    Reply {
        status,
        headers: vec![(name, value)],
    }
}

struct Arrival {
    at: SystemTime,
    body: Bytes,
    headers: Vec<(&'static str, String)>,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Arrival>>>);

impl Log {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Starts a server that reads each request's body, logs it, and answers by
/// `script`.
async fn serve(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> (SocketAddr, Log) {
    let log = Log::default();
    let script = Arc::new(script);
    let app = Router::new().fallback({
        let log = log.clone();
        move |req: axum::extract::Request| {
            let (log, script) = (log.clone(), script.clone());
            async move {
                let at = SystemTime::now();
                let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                    .await
                    .unwrap();
                let mut log = log.0.lock().unwrap();
                let reply = script(log.len());
                let mut res = Response::builder().status(reply.status);
                for (name, value) in &reply.headers {
                    res = res.header(*name, value);
                }
                log.push(Arrival {
                    at,
                    body,
                    headers: reply.headers,
                });
                res.body(axum::body::Body::empty()).unwrap()
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, log)
}

fn policy() -> apiguard_retry::RetryPolicyBuilder {
    RetryPolicy::builder()
        .jitter(Jitter::None)
        .no_budget()
        .base_delay(Duration::from_millis(10))
}

fn full_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(
    addr: SocketAddr,
    policy: RetryPolicy,
) -> Result<Response<hyper::body::Incoming>, BoxError> {
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .service(full_client());
    let req = Request::get(format!("http://{addr}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    svc.oneshot(req).await
}

#[tokio::test]
async fn http_date_retry_after_is_honoured() {
    let (addr, log) = serve(|n| match n {
        0 => reply_with(
            503,
            "retry-after",
            httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2)),
        ),
        _ => reply(200),
    })
    .await;
    let res = get(addr, policy().build().unwrap()).await.unwrap();
    assert_eq!(res.status(), 200);
    let log = log.0.lock().unwrap();
    assert_eq!(log.len(), 2);
    let date = httpdate::parse_http_date(&log[0].headers[0].1).unwrap();
    assert!(log[1].at >= date, "second attempt came before the date");
    assert!(
        log[1].at < date + Duration::from_millis(1500),
        "and not much later"
    );
}

#[tokio::test]
async fn delay_seconds_retry_after_is_honoured_on_503_and_429() {
    for status in [503, 429] {
        let (addr, log) = serve(move |n| match n {
            0 => reply_with(status, "retry-after", "1".into()),
            _ => reply(200),
        })
        .await;
        let res = get(addr, policy().build().unwrap()).await.unwrap();
        assert_eq!(res.status(), 200);
        let log = log.0.lock().unwrap();
        let gap = log[1].at.duration_since(log[0].at).unwrap();
        assert!(
            gap >= Duration::from_secs(1),
            "{status}: retried after {gap:?}"
        );
        assert!(gap < Duration::from_millis(1800), "{status}: {gap:?}");
    }
}

#[tokio::test]
async fn hour_long_retry_after_over_the_cap_returns_the_503_at_once() {
    let (addr, log) = serve(|_| reply_with(503, "retry-after", "3600".into())).await;
    let start = Instant::now();
    let p = policy()
        .max_retry_after(Duration::from_secs(10))
        .build()
        .unwrap();
    let res = get(addr, p).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "3600");
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(log.len(), 1);
}

/// A streaming body without a size hint, sent in chunks.
struct Chunks(std::vec::IntoIter<Bytes>);

impl futures_core::Stream for Chunks {
    type Item = Result<Frame<Bytes>, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.next().map(|b| Ok(Frame::data(b))))
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn streaming(data: &[u8], chunk: usize) -> StreamBody<Chunks> {
    let parts: Vec<Bytes> = data.chunks(chunk).map(Bytes::copy_from_slice).collect();
    StreamBody::new(Chunks(parts.into_iter()))
}

async fn put_streaming(
    addr: SocketAddr,
    data: &[u8],
    chunk: usize,
) -> Result<Response<hyper::body::Incoming>, BoxError> {
    let client: Client<_, ReplayBody<StreamBody<Chunks>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(policy().build().unwrap()).replay_bodies())
        .service(client);
    let req = Request::put(format!("http://{addr}/upload"))
        .body(streaming(data, chunk))
        .unwrap();
    svc.oneshot(req).await
}

#[tokio::test]
async fn streaming_body_of_10_kib_is_replayed_byte_identical() {
    let (addr, log) = serve(|n| reply(if n == 0 { 503 } else { 200 })).await;
    let data = pattern(10 * 1024);
    let res = put_streaming(addr, &data, 1000).await.unwrap();
    assert_eq!(res.status(), 200);
    let log = log.0.lock().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].body, data);
    assert_eq!(log[1].body, data);
}

#[tokio::test]
async fn streaming_body_over_the_cap_is_sent_once_intact_and_not_retried() {
    let (addr, log) = serve(|_| reply(503)).await;
    let data = pattern(1024 * 1024);
    let res = put_streaming(addr, &data, 16 * 1024).await.unwrap();
    assert_eq!(res.status(), 503);
    let log = log.0.lock().unwrap();
    assert_eq!(log.len(), 1, "not retried");
    assert_eq!(log[0].body.len(), data.len());
    assert_eq!(log[0].body, data, "intact");
}

#[tokio::test]
async fn refused_connection_is_recognised_through_hyper_and_retried_for_post() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let attempts = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(policy().max_retries(2).build().unwrap()))
        .map_request({
            let attempts = attempts.clone();
            move |req: Request<Full<Bytes>>| {
                attempts.fetch_add(1, Ordering::SeqCst);
                req
            }
        })
        .service(full_client());
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://127.0.0.1:{port}/"))
        .body(Full::new(Bytes::from_static(b"order")))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let exhausted = err.downcast_ref::<RetriesExhausted>().expect("exhausted");
    assert_eq!(exhausted.attempts(), 3);
    let mut source = std::error::Error::source(exhausted);
    let mut refused = false;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = e.source();
    }
    assert!(refused, "the last error is kept: {err}");
}

#[tokio::test]
async fn response_body_of_the_final_attempt_is_readable() {
    let (addr, _log) = serve(|n| reply(if n == 0 { 502 } else { 200 })).await;
    let res = get(addr, policy().build().unwrap()).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
}
