//! Request bodies that can be sent again.
//!
//! A retry resends the request, body included, so the body must be
//! available a second time. Two ways:
//!
//! - **Clonable bodies** (`Full<Bytes>`, `Empty<Bytes>`, `String`, …): every
//!   `Clone` body implements [`TryCloneBody`] and is cloned before each
//!   attempt. This is what [`RetryLayer::new`](crate::RetryLayer::new) does.
//! - **Streaming bodies** are wrapped in a [`ReplayBody`], which keeps the
//!   bytes as they are sent, up to a cap, and replays them on a retry. This
//!   is what [`RetryLayer::replay_bodies`](crate::RetryLayer::replay_bodies)
//!   does, with the policy's
//!   [`max_replay_bytes`](crate::RetryPolicyBuilder::max_replay_bytes).
//!
//! # Partly sent bodies
//!
//! A server may answer (say `503`) before it has read the whole body. The
//! replay then sends what was recorded and goes on reading the original
//! body where the first attempt stopped, so the retry always sends the
//! whole body, byte for byte. The original body is shared by every replay
//! of one request for that reason.
//!
//! # Bodies over the cap
//!
//! Once more than the cap has gone through, the recording is dropped and the
//! attempt in flight carries on streaming the rest: the body is sent once,
//! intact. That request is then not retried. A body whose size hint is
//! known to exceed the cap is never recorded at all.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use apiguard_core::BoxError;
use bytes::{Buf, Bytes};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};

/// A body that can (perhaps) be sent again.
///
/// Every `Clone` type implements it by cloning; [`ReplayBody`] implements
/// it by replaying what it recorded. Implement it for a body type of your
/// own that can be rebuilt cheaply.
///
/// A streaming body (hyper's `Incoming`, axum's `Body`, a boxed body) is
/// neither: give it to [`RetryLayer::replay_bodies`](crate::RetryLayer::replay_bodies),
/// or wrap it in a [`ReplayBody`] yourself. The compiler says so when the
/// bound fails.
#[diagnostic::on_unimplemented(
    message = "the request body `{Self}` cannot be copied for a retry",
    label = "this body is not `Clone`",
    note = "for a streaming body, use `RetryLayer::new(policy).replay_bodies()`, which records \
            it as it is sent and replays it (or wrap it in `apiguard_retry::ReplayBody` yourself)"
)]
pub trait TryCloneBody: Sized {
    /// A body that will send the same bytes again, or `None` if that is no
    /// longer possible.
    fn try_clone_body(&self) -> Option<Self>;

    /// Whether this body (a copy made earlier for a retry) can still be
    /// sent in full. A [`ReplayBody`] whose request outgrew the cap cannot.
    fn can_replay(&self) -> bool {
        true
    }

    /// A copy of a whole request with this body, for a retry: `None` when
    /// the body cannot be copied.
    ///
    /// The provided method copies the head field by field around
    /// [`try_clone_body`](Self::try_clone_body); `Clone` bodies use
    /// `Request::clone`, which is cheaper. There is seldom a reason to
    /// override it.
    fn try_clone_request(req: &Request<Self>) -> Option<Request<Self>> {
        let body = req.body().try_clone_body()?;
        let mut out = Request::new(body);
        *out.method_mut() = req.method().clone();
        *out.uri_mut() = req.uri().clone();
        *out.version_mut() = req.version();
        *out.headers_mut() = req.headers().clone();
        *out.extensions_mut() = req.extensions().clone();
        Some(out)
    }
}

// Not recommended, so that a body that is not `Clone` is reported as not
// `TryCloneBody`, with the note above, rather than as not `Clone`.
#[diagnostic::do_not_recommend]
impl<B: Clone> TryCloneBody for B {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }

    #[inline]
    fn try_clone_request(req: &Request<Self>) -> Option<Request<Self>> {
        Some(req.clone())
    }
}

/// Marker for [`RetryLayer`](crate::RetryLayer): request bodies are cloned
/// (the body type must implement [`TryCloneBody`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneBodies;

/// Marker for [`RetryLayer`](crate::RetryLayer): request bodies are wrapped
/// in a [`ReplayBody`] and replayed on retry.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayBodies;

/// The default cap on the bytes a [`ReplayBody`] keeps: 64 KiB.
pub const DEFAULT_MAX_REPLAY_BYTES: usize = 64 * 1024;

/// A body that records the bytes it sends, up to a cap, so a retry can send
/// them again.
///
/// Copies made with [`TryCloneBody::try_clone_body`] share one recording
/// and the original body; see the [module docs](self). Copies are meant to
/// be read one after another, as retries are; reading two at once works
/// but is not what it is built for.
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Index of the next recorded chunk this copy yields.
    pos: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

struct Shared<B> {
    source: Option<Pin<Box<B>>>,
    chunks: Vec<Bytes>,
    /// Chunks read from the source so far (recorded or not).
    total: usize,
    recorded_bytes: usize,
    max_bytes: usize,
    overflowed: bool,
    failed: bool,
    finished: bool,
    trailers: Option<HeaderMap>,
    wakers: Vec<Waker>,
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body`, keeping up to `max_bytes` of it for replays.
    pub fn new(body: B, max_bytes: usize) -> Self {
        let hint = body.size_hint();
        let overflowed = hint.lower() > max_bytes as u64;
        let finished = body.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(Box::pin(body)),
                chunks: Vec::new(),
                total: 0,
                recorded_bytes: 0,
                max_bytes,
                overflowed,
                failed: false,
                finished,
                trailers: None,
                wakers: Vec::new(),
            })),
            pos: 0,
            trailers_sent: false,
            hint,
        }
    }
}

impl<B> ReplayBody<B> {
    fn lock(&self) -> MutexGuard<'_, Shared<B>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the body went over its cap (or failed) and can no longer be
    /// replayed.
    pub fn is_capped(&self) -> bool {
        let sh = self.lock();
        sh.overflowed || sh.failed
    }
}

impl<B> TryCloneBody for ReplayBody<B> {
    fn try_clone_body(&self) -> Option<Self> {
        if self.is_capped() {
            return None;
        }
        Some(Self {
            shared: Arc::clone(&self.shared),
            pos: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }

    fn can_replay(&self) -> bool {
        !self.is_capped()
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sh = self.lock();
        f.debug_struct("ReplayBody")
            .field("pos", &self.pos)
            .field("recorded_bytes", &sh.recorded_bytes)
            .field("max_bytes", &sh.max_bytes)
            .field("capped", &(sh.overflowed || sh.failed))
            .finish()
    }
}

/// A copy of a [`ReplayBody`] was read after the recording it needed was
/// dropped (the body outgrew its cap) or the original body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request body can no longer be replayed")]
pub struct NotReplayable {
    _priv: (),
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let shared = Arc::clone(&this.shared);
        let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());

        if this.pos < sh.total {
            if sh.overflowed || sh.failed {
                return Poll::Ready(Some(Err(NotReplayable { _priv: () }.into())));
            }
            let chunk = sh.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if sh.finished {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = sh.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = sh.source.as_mut() else {
            // Only a failed source is gone before it finished.
            return Poll::Ready(Some(Err(NotReplayable { _priv: () }.into())));
        };
        let polled = source.as_mut().poll_frame(cx);
        match polled {
            Poll::Pending => {
                if !sh.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    sh.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                sh.finished = true;
                sh.source = None;
                this.trailers_sent = true;
                wake_all(&mut sh);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                sh.failed = true;
                sh.source = None;
                sh.chunks = Vec::new();
                wake_all(&mut sh);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        let bytes = data.copy_to_bytes(data.remaining());
                        sh.total += 1;
                        this.pos = sh.total;
                        if !sh.overflowed {
                            if sh.recorded_bytes + bytes.len() > sh.max_bytes {
                                sh.overflowed = true;
                                sh.chunks = Vec::new();
                            } else {
                                sh.recorded_bytes += bytes.len();
                                sh.chunks.push(bytes.clone());
                            }
                        }
                        Frame::data(bytes)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            // Trailers end the body.
                            sh.trailers = Some(trailers.clone());
                            sh.finished = true;
                            sh.source = None;
                            this.trailers_sent = true;
                            Frame::trailers(trailers)
                        }
                        // http-body 1 has no other frame kinds; pass any
                        // future one through unrecorded and stop replays.
                        Err(other) => {
                            sh.overflowed = true;
                            sh.chunks = Vec::new();
                            other.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                        }
                    },
                };
                wake_all(&mut sh);
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let sh = self.lock();
        sh.finished && self.pos >= sh.total && (self.trailers_sent || sh.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

fn wake_all<B>(sh: &mut Shared<B>) {
    for w in sh.wakers.drain(..) {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn chunks(n: usize, size: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(vec![(i % 251) as u8; size]))
            .collect()
    }

    fn stream(parts: Vec<Bytes>) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.into_iter().map(|b| Ok(Frame::data(b))).collect();
        StreamBody::new(futures_stream(frames))
    }

    // A stream that hides its length (no exact size hint).
    fn futures_stream(
        items: Vec<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, BoxError>> + Unpin {
        struct Iter(std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>);
        impl futures_core::Stream for Iter {
            type Item = Result<Frame<Bytes>, BoxError>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                Poll::Ready(self.0.next())
            }
        }
        Iter(items.into_iter())
    }

    async fn collect<B: Body<Data = Bytes, Error = BoxError>>(b: B) -> Result<Bytes, BoxError> {
        Ok(b.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn replay_is_byte_identical() {
        let parts = chunks(10, 1024);
        let want: Vec<u8> = parts.concat();
        let first = ReplayBody::new(stream(parts), DEFAULT_MAX_REPLAY_BYTES);
        let second = first.try_clone_body().unwrap();
        assert_eq!(collect(first).await.unwrap(), want);
        assert!(second.can_replay());
        assert_eq!(collect(second).await.unwrap(), want);
    }

    #[tokio::test]
    async fn partly_read_body_is_completed_on_replay() {
        let parts = chunks(8, 100);
        let want: Vec<u8> = parts.concat();
        let mut first = ReplayBody::new(stream(parts), 4096);
        let retry = first.try_clone_body().unwrap();
        // The first attempt reads three chunks, then is dropped.
        for _ in 0..3 {
            first.frame().await.unwrap().unwrap();
        }
        drop(first);
        assert_eq!(collect(retry).await.unwrap(), want);
    }

    #[tokio::test]
    async fn over_the_cap_the_body_is_sent_once_intact_and_not_replayable() {
        let parts = chunks(20, 1000);
        let want: Vec<u8> = parts.concat();
        let first = ReplayBody::new(stream(parts), 5000);
        let copy = first.try_clone_body().unwrap();
        assert_eq!(collect(first).await.unwrap(), want);
        assert!(!copy.can_replay());
        assert!(copy.try_clone_body().is_none());
        assert!(collect(copy).await.unwrap_err().is::<NotReplayable>());
    }

    #[tokio::test]
    async fn body_known_to_exceed_the_cap_is_never_recorded() {
        let body = ReplayBody::new(Full::new(Bytes::from(vec![1u8; 100])), 99);
        assert!(body.try_clone_body().is_none());
        assert_eq!(body.size_hint().exact(), Some(100));
        assert_eq!(collect(body).await.unwrap().len(), 100);
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut t = HeaderMap::new();
        t.insert("x-sum", "7".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(t.clone())),
        ];
        let first = ReplayBody::new(StreamBody::new(futures_stream(frames)), 100);
        let second = first.try_clone_body().unwrap();
        let c1 = first.collect().await.unwrap();
        assert_eq!(c1.trailers(), Some(&t));
        let c2 = second.collect().await.unwrap();
        assert_eq!(c2.trailers(), Some(&t));
        assert_eq!(c2.to_bytes(), "ab");
    }

    #[tokio::test]
    async fn a_failed_body_is_not_replayed() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("disk gone".into()),
        ];
        let first = ReplayBody::new(StreamBody::new(futures_stream(frames)), 100);
        let copy = first.try_clone_body().unwrap();
        assert_eq!(collect(first).await.unwrap_err().to_string(), "disk gone");
        assert!(!copy.can_replay());
        assert!(collect(copy).await.unwrap_err().is::<NotReplayable>());
    }

    #[test]
    fn clone_bodies_are_cloned() {
        let b = Full::new(Bytes::from_static(b"x"));
        assert!(b.try_clone_body().is_some());
        assert!(b.can_replay());
    }
}
