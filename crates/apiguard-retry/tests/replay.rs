//! Body replay through the layer, without sockets.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use apiguard_core::BoxError;
use apiguard_retry::{Jitter, ReplayBody, RetryLayer, RetryPolicy};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower::{Layer, ServiceBuilder, ServiceExt};

struct Chunks(std::vec::IntoIter<Bytes>);

impl futures_core::Stream for Chunks {
    type Item = Result<Frame<Bytes>, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.next().map(|b| Ok(Frame::data(b))))
    }
}

fn body(parts: usize, size: usize) -> (StreamBody<Chunks>, Vec<u8>) {
    let chunks: Vec<Bytes> = (0..parts)
        .map(|i| Bytes::from(vec![i as u8; size]))
        .collect();
    let all = chunks.concat();
    (StreamBody::new(Chunks(chunks.into_iter())), all)
}

#[tokio::test(start_paused = true)]
async fn body_cut_short_by_an_early_503_is_replayed_whole() {
    // The server reads two of eight chunks, answers 503, then reads the
    // whole body of the retry.
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let inner = tower::service_fn({
        let seen = seen.clone();
        move |req: Request<ReplayBody<StreamBody<Chunks>>>| {
            let seen = seen.clone();
            async move {
                let first = seen.lock().unwrap().is_empty();
                let mut body = req.into_body();
                let mut got = Vec::new();
                if first {
                    for _ in 0..2 {
                        let frame = body.frame().await.unwrap()?;
                        got.extend_from_slice(frame.data_ref().unwrap());
                    }
                } else {
                    got = body.collect().await?.to_bytes().to_vec();
                }
                seen.lock().unwrap().push(got);
                let status = if first { 503 } else { 200 };
                Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
            }
        }
    });
    let policy = RetryPolicy::builder()
        .jitter(Jitter::None)
        .no_budget()
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(policy).replay_bodies())
        .service(inner);
    let (stream, all) = body(8, 100);
    let res = svc
        .oneshot(Request::put("/").body(stream).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], all[..200]);
    assert_eq!(seen[1], all, "the retry sent every byte, in order");
}

#[tokio::test(start_paused = true)]
async fn replay_cap_comes_from_the_policy() {
    let calls: Arc<Mutex<usize>> = Arc::default();
    let inner = tower::service_fn({
        let calls = calls.clone();
        move |req: Request<ReplayBody<StreamBody<Chunks>>>| {
            let calls = calls.clone();
            async move {
                *calls.lock().unwrap() += 1;
                req.into_body().collect().await?;
                Ok::<_, BoxError>(Response::builder().status(503).body(()).unwrap())
            }
        }
    });
    let policy = RetryPolicy::builder()
        .jitter(Jitter::None)
        .no_budget()
        .max_replay_bytes(1000)
        .build()
        .unwrap();
    let layer = RetryLayer::new(policy).replay_bodies();
    // 900 bytes fit: retried three times.
    let (small, _) = body(9, 100);
    layer
        .clone()
        .layer(inner.clone())
        .oneshot(Request::put("/").body(small).unwrap())
        .await
        .unwrap();
    assert_eq!(*calls.lock().unwrap(), 4);
    // 1100 bytes do not: sent once.
    let (large, _) = body(11, 100);
    layer
        .layer(inner)
        .oneshot(Request::put("/").body(large).unwrap())
        .await
        .unwrap();
    assert_eq!(*calls.lock().unwrap(), 5);
}
