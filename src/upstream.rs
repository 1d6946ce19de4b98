//! A local HTTP upstream that misbehaves on command.
//!
//! [`Upstream::start`] binds a real hyper HTTP/1 server on a free loopback
//! port. What it answers is set at any time with [`Upstream::set`]: healthy,
//! slow, a status storm, `429`/`503` with `Retry-After` in either form, its
//! own rate limit, dropped connections, hanging forever, or a response that
//! drips out slowly. It counts every request it sees and checksums every
//! body it receives, so tests can prove what reached it.
//!
//! Three faults happen below HTTP, on the raw socket, for connections
//! accepted while they are set: [`Behavior::AcceptClose`],
//! [`Behavior::Reset`] and [`Behavior::CloseMidBody`]. A connection already
//! kept alive when one of them is set is closed at its next request.
//! [`Upstream::set_for`] makes any fault last a given number of requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::RETRY_AFTER};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// What the upstream does with each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// `200 OK` with body `ok`.
    Ok,
    /// Waits, then `200 OK`.
    Slow(Duration),
    /// Answers this status, with no `Retry-After`.
    Status(u16),
    /// Answers `status` with `Retry-After` asking for `wait`, as
    /// delay-seconds or as an HTTP-date.
    RetryAfter {
        /// The status (`429` or `503`).
        status: u16,
        /// The wait asked for (rounded up to whole seconds).
        wait: Duration,
        /// Whether to write it as an HTTP-date rather than seconds.
        http_date: bool,
    },
    /// `503` with this raw `Retry-After` value (malformed on purpose).
    RawRetryAfter(String),
    /// Admits `per_sec` requests in each one-second window and answers `429`
    /// with `Retry-After` (seconds to the next window, or an HTTP-date) past that.
    Limit {
        /// Requests admitted per one-second window.
        per_sec: u32,
        /// Whether `Retry-After` is an HTTP-date rather than seconds.
        http_date: bool,
    },
    /// Closes the connection without answering.
    Drop,
    /// Never answers.
    Hang,
    /// `200 OK` whose body comes in `chunks` pieces, `delay` apart.
    Drip {
        /// Pause between pieces.
        delay: Duration,
        /// Number of pieces.
        chunks: usize,
    },
    /// Accepts the connection and closes it at once, reading nothing.
    AcceptClose,
    /// Reads the start of the request, then resets the connection (RST)
    /// without answering.
    Reset,
    /// Reads the request head and half of its body (by `Content-Length`),
    /// then closes the connection.
    CloseMidBody,
}

impl Behavior {
    /// Whether this fault is played on the raw socket, below HTTP.
    fn is_raw(&self) -> bool {
        matches!(
            self,
            Behavior::AcceptClose | Behavior::Reset | Behavior::CloseMidBody
        )
    }
}

/// What the upstream saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests that reached the handler.
    pub requests: AtomicU64,
    /// `2xx` answers.
    pub ok: AtomicU64,
    /// `429` answers.
    pub too_many: AtomicU64,
    /// `5xx` answers.
    pub errors: AtomicU64,
    /// Connections dropped on purpose.
    pub dropped: AtomicU64,
    arrivals: Mutex<Vec<Duration>>,
    bodies: Mutex<Vec<(usize, u64)>>,
}

impl Stats {
    /// When each request arrived, relative to the upstream's start.
    pub fn arrivals(&self) -> Vec<Duration> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Length and FNV-1a checksum of each request body received in full.
    pub fn bodies(&self) -> Vec<(usize, u64)> {
        self.bodies.lock().unwrap().clone()
    }

    /// The most requests that arrived within any window of length `window`.
    pub fn peak(&self, window: Duration) -> usize {
        let arrivals = self.arrivals();
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..arrivals.len() {
            while arrivals[hi] - arrivals[lo] >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }
}

/// FNV-1a, 64 bits: a checksum to prove bodies arrive intact.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Shared {
    behavior: Mutex<Behavior>,
    /// `(requests left, behaviour after)` set by [`Upstream::set_for`].
    countdown: Mutex<Option<(u64, Behavior)>>,
    stats: Stats,
    started: Instant,
    window: Mutex<(u64, u32)>,
}

/// A running local upstream. Stops when dropped.
#[derive(Clone)]
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Upstream {
    /// Starts an upstream on `127.0.0.1:0` behaving as `behavior`.
    pub async fn start(behavior: Behavior) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            behavior: Mutex::new(behavior),
            countdown: Mutex::new(None),
            stats: Stats::default(),
            started: Instant::now(),
            window: Mutex::new((0, 0)),
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept_shared.clone();
                tokio::spawn(async move {
                    if shared.behavior.lock().unwrap().is_raw() {
                        let behavior = shared.take();
                        if behavior.is_raw() {
                            shared.count_arrival();
                            shared.stats.dropped.fetch_add(1, Ordering::SeqCst);
                            raw_fault(stream, &behavior).await;
                            return;
                        }
                    }
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// Changes what the upstream does from the next request on.
    pub fn set(&self, behavior: Behavior) {
        *self.shared.countdown.lock().unwrap() = None;
        *self.shared.behavior.lock().unwrap() = behavior;
    }

    /// Behaves as `behavior` for the next `times` requests (or connections,
    /// for the faults below HTTP), then as `then`.
    pub fn set_for(&self, behavior: Behavior, times: u64, then: Behavior) {
        let mut countdown = self.shared.countdown.lock().unwrap();
        let mut current = self.shared.behavior.lock().unwrap();
        if times == 0 {
            *countdown = None;
            *current = then;
        } else {
            *countdown = Some((times, then));
            *current = behavior;
        }
    }

    /// What it does now.
    pub fn behavior(&self) -> Behavior {
        self.shared.behavior.lock().unwrap().clone()
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it saw so far.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Requests that reached the handler so far.
    pub fn requests(&self) -> u64 {
        self.shared.stats.requests.load(Ordering::SeqCst)
    }

    /// Stops accepting connections.
    pub fn stop(&self) {
        self.task.0.abort();
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(body: &'static str) -> Body {
    Full::new(Bytes::from_static(body.as_bytes())).boxed()
}

fn status(code: u16) -> Response<Body> {
    let mut res = Response::new(full(""));
    *res.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    res
}

fn retry_after_value(wait: Duration, http_date: bool) -> String {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if http_date {
        // HTTP-dates have whole-second precision: one more second so the
        // date is never earlier than the wait asked for.
        httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs + 1))
    } else {
        secs.to_string()
    }
}

impl Shared {
    /// The behaviour for one request, counting down a [`Upstream::set_for`].
    fn take(&self) -> Behavior {
        let mut countdown = self.countdown.lock().unwrap();
        let mut current = self.behavior.lock().unwrap();
        let behavior = current.clone();
        if let Some((left, then)) = countdown.as_mut() {
            *left -= 1;
            if *left == 0 {
                *current = then.clone();
                *countdown = None;
            }
        }
        behavior
    }

    fn count_arrival(&self) {
        self.stats.requests.fetch_add(1, Ordering::SeqCst);
        self.stats
            .arrivals
            .lock()
            .unwrap()
            .push(self.started.elapsed());
    }
}

/// Plays a fault below HTTP on a freshly accepted connection.
async fn raw_fault(mut stream: tokio::net::TcpStream, behavior: &Behavior) {
    use tokio::io::AsyncReadExt;
    match behavior {
        Behavior::Reset => {
            // Closing a socket with unread bytes in its receive buffer makes
            // the kernel answer with RST rather than FIN: read a little,
            // let the rest of the request arrive, and drop it unread.
            let mut start = [0u8; 8];
            let _ = stream.read_exact(&mut start).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Behavior::CloseMidBody => {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let head_end = loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut read = buf.len() - head_end;
            while read < length / 2 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read += n,
                }
            }
        }
        _ => {}
    }
    drop(stream);
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let stats = &shared.stats;
    shared.count_arrival();
    let behavior = shared.take();
    if behavior == Behavior::Drop || behavior.is_raw() {
        stats.dropped.fetch_add(1, Ordering::SeqCst);
        return Err(std::io::Error::other("dropped on purpose"));
    }
    match req.into_body().collect().await {
        Ok(body) => {
            let bytes = body.to_bytes();
            stats
                .bodies
                .lock()
                .unwrap()
                .push((bytes.len(), checksum(&bytes)));
        }
        Err(e) => return Err(std::io::Error::other(e)),
    }
    let res = match behavior {
        Behavior::Ok
        | Behavior::Drop
        | Behavior::AcceptClose
        | Behavior::Reset
        | Behavior::CloseMidBody => Response::new(full("ok")),
        Behavior::Slow(d) => {
            tokio::time::sleep(d).await;
            Response::new(full("ok"))
        }
        Behavior::Status(code) => status(code),
        Behavior::RetryAfter {
            status: code,
            wait,
            http_date,
        } => {
            let mut res = status(code);
            let value = retry_after_value(wait, http_date);
            res.headers_mut()
                .insert(RETRY_AFTER, value.parse().expect("ascii"));
            res
        }
        Behavior::RawRetryAfter(raw) => {
            let mut res = status(503);
            if let Ok(v) = http::HeaderValue::from_str(&raw) {
                res.headers_mut().insert(RETRY_AFTER, v);
            }
            res
        }
        Behavior::Limit { per_sec, http_date } => {
            let elapsed = shared.started.elapsed();
            let second = elapsed.as_secs();
            let admitted = {
                let mut w = shared.window.lock().unwrap();
                if w.0 != second {
                    *w = (second, 0);
                }
                w.1 += 1;
                w.1 <= per_sec
            };
            if admitted {
                Response::new(full("ok"))
            } else {
                let wait = Duration::from_secs(second + 1).saturating_sub(elapsed);
                let mut res = status(429);
                let value = retry_after_value(wait, http_date);
                res.headers_mut()
                    .insert(RETRY_AFTER, value.parse().expect("ascii"));
                res
            }
        }
        Behavior::Hang => std::future::pending().await,
        Behavior::Drip { delay, chunks } => {
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i >= chunks {
                    return None;
                }
                tokio::time::sleep(delay).await;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"."))),
                    i + 1,
                ))
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
    };
    let code = res.status().as_u16();
    let counter = match code {
        200..=299 => &stats.ok,
        429 => &stats.too_many,
        500..=599 => &stats.errors,
        _ => return Ok(res),
    };
    counter.fetch_add(1, Ordering::SeqCst);
    Ok(res)
}
