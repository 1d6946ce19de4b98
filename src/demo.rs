//! The main job: one upstream script, two clients, one server under a burst.
//!
//! [`run`] starts two identical local upstreams that go through the same
//! scripted phases — healthy, rate limited (`429` with `Retry-After` as
//! seconds, then as an HTTP-date), outage (`503`s, then dropped
//! connections), slow, recovered — and drives the same open-loop workload
//! through a naive client (a plain hyper loop that retries after a fixed
//! sleep) against one and through [`GuardedClient`] against the other. Then
//! it bursts an axum server protected by the server stack from two client
//! addresses. [`Report`] holds what happened, side by side.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard::breaker::{CircuitBreaker, State, Transition};
use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::ForwardedFor;
use apiguard::server::server_layer;
use apiguard::{GuardedClient, RetryPolicy};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::plot::{Band, RateSeries, draw_timeline};
use crate::upstream::{Behavior, Upstream};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Length of the client run; the five phases share it equally.
    pub duration: Duration,
    /// Requests per second each client offers.
    pub rate: f64,
    /// The upstream's limit (requests per one-second window) while it is
    /// rate limiting.
    pub limit: u32,
    /// Print a progress line every second.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(20),
            rate: 20.0,
            limit: 10,
            progress: true,
        }
    }
}

/// One client's side of the table.
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    /// Requests the workload issued.
    pub issued: u64,
    /// Requests that ended in a 2xx.
    pub succeeded: u64,
    /// Requests that did not: the caller got an error or a failure status.
    pub lost: u64,
    /// Calls that reached the upstream.
    pub upstream_calls: u64,
    /// `429`s the upstream sent this client.
    pub too_many: u64,
    /// Attempts beyond each request's first that went out.
    pub retries: u64,
    /// Time requests spent waiting (sleeps, tokens, backoff), summed.
    pub waiting: Duration,
    /// Most upstream calls within any one second.
    pub peak_per_sec: usize,
    /// When the upstream saw each call.
    pub arrivals: Vec<Duration>,
    /// Median latency of the requests that succeeded (waits included).
    pub p50: Duration,
    /// 99th-percentile latency of the requests that succeeded.
    pub p99: Duration,
}

/// The server burst's outcome for one client address.
#[derive(Debug, Clone, Default)]
pub struct BurstReport {
    /// The client's address (sent as `X-Forwarded-For`).
    pub client: String,
    /// Requests sent at once.
    pub sent: u64,
    /// `200`s.
    pub ok: u64,
    /// `429`s.
    pub too_many: u64,
    /// The `Retry-After` of the first `429`.
    pub retry_after: Option<String>,
    /// The `RateLimit` field of the first `429`.
    pub ratelimit: Option<String>,
}

/// Everything the demo saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The configuration it ran with.
    pub phases: Vec<(String, Duration, Duration)>,
    /// The naive client.
    pub naive: ClientReport,
    /// `GuardedClient`.
    pub guarded: ClientReport,
    /// Why the guarded client's lost requests were lost.
    pub guarded_errors: Vec<(&'static str, u64)>,
    /// The guarded client's breaker transitions: when, from, to.
    pub transitions: Vec<(Duration, State, State)>,
    /// The server burst, one entry per client address.
    pub burst: Vec<BurstReport>,
    /// The server's per-client quota (burst, per second).
    pub server_quota: (u32, f64),
    /// The upstream's limit while rate limiting.
    pub limit: u32,
    /// Total length of the client run, stragglers included.
    pub elapsed: Duration,
}

const PHASES: [&str; 5] = ["healthy", "rate limited", "outage", "slow", "recovered"];

fn behaviors(phase: usize, second_half: bool, limit: u32) -> Behavior {
    match (phase, second_half) {
        (0, _) | (4, _) => Behavior::Ok,
        (1, half) => Behavior::Limit {
            per_sec: limit,
            http_date: half,
        },
        (2, false) => Behavior::Status(503),
        (2, true) => Behavior::Drop,
        _ => Behavior::Slow(Duration::from_millis(150)),
    }
}

#[derive(Default)]
struct Tally {
    issued: AtomicU64,
    ok: AtomicU64,
    lost: AtomicU64,
    attempts: AtomicU64,
    waited_nanos: AtomicU64,
    /// Latency of each request that succeeded.
    latencies: Mutex<Vec<Duration>>,
}

impl Tally {
    fn succeeded(&self, took: Duration) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(took);
    }

    /// The `q` quantile of the successful requests' latencies.
    fn latency(&self, q: f64) -> Duration {
        let mut l = self
            .latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort();
        l[((l.len() - 1) as f64 * q).round() as usize]
    }
}

/// Runs the demo.
pub async fn run(cfg: Config) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    let naive_up = Upstream::start(Behavior::Ok).await?;
    let guarded_up = Upstream::start(Behavior::Ok).await?;
    let started = Instant::now();
    let phase_len = cfg.duration / 5;

    let transitions: Arc<Mutex<Vec<(Duration, State, State)>>> = Arc::default();
    let hook_log = transitions.clone();
    let breaker = CircuitBreaker::builder()
        .failure_threshold(5)
        .recovery_timeout(Duration::from_millis(500))
        // Each failed probe doubles the next wait, up to 2 s: fewer probes
        // into an outage, fewer retries spent waiting on them.
        .backoff_multiplier(2.0)
        .max_recovery_timeout(Duration::from_secs(2))
        .success_threshold(2)
        .on_transition(move |t: &Transition| {
            hook_log
                .lock()
                .unwrap()
                .push((started.elapsed(), t.from, t.to));
        });
    let guarded = GuardedClient::builder()
        .base_url(guarded_up.url())
        // The quota the upstream documents: generous, the surprise is its
        // throttling in phase two.
        .rate_limit(apiguard::Quota::from_rate(
            cfg.rate.ceil() as u32,
            cfg.rate * 1.5,
        ))
        .retry(
            RetryPolicy::builder()
                .max_retries(10)
                .base_delay(Duration::from_millis(100))
                .max_delay(Duration::from_secs(2))
                .deadline(Duration::from_secs(10)),
        )
        .circuit_breaker(breaker)
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(10))
        .build()?;
    let naive = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let naive_tally = Arc::new(Tally::default());
    let guarded_tally = Arc::new(Tally::default());

    let interval = Duration::from_secs_f64(1.0 / cfg.rate.max(0.1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut phase = usize::MAX;
    let mut half = false;
    let mut next_progress = Duration::from_secs(1);
    loop {
        ticker.tick().await;
        let now = started.elapsed();
        if now >= cfg.duration {
            break;
        }
        let p = ((now.as_nanos() / phase_len.as_nanos().max(1)) as usize).min(4);
        let h = now - phase_len * p as u32 >= phase_len / 2;
        if p != phase || h != half {
            phase = p;
            half = h;
            let b = behaviors(p, h, cfg.limit);
            naive_up.set(b.clone());
            guarded_up.set(b);
        }
        if cfg.progress && now >= next_progress {
            next_progress += Duration::from_secs(1);
            println!(
                "[{:>5.1}s] {:<12} naive: {:>4} sent {:>4} ok {:>3} lost {:>5} upstream calls | guarded: {:>4} sent {:>4} ok {:>3} lost {:>5} upstream calls | breaker {:?}",
                now.as_secs_f64(),
                PHASES[p],
                naive_tally.issued.load(Ordering::Relaxed),
                naive_tally.ok.load(Ordering::Relaxed),
                naive_tally.lost.load(Ordering::Relaxed),
                naive_up.requests(),
                guarded_tally.issued.load(Ordering::Relaxed),
                guarded_tally.ok.load(Ordering::Relaxed),
                guarded_tally.lost.load(Ordering::Relaxed),
                guarded_up.requests(),
                transitions
                    .lock()
                    .unwrap()
                    .last()
                    .map_or(State::Closed, |t| t.2),
            );
        }

        let (client, url, tally) = (naive.clone(), naive_up.url(), naive_tally.clone());
        tasks.spawn(async move { naive_request(&client, &url, &tally).await });
        let (client, tally) = (guarded.clone(), guarded_tally.clone());
        tasks.spawn(async move {
            tally.issued.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let ok = match client.get("/work").await {
                Ok(res) => {
                    let ok = res.status().is_success();
                    let _ = res.into_body().collect().await;
                    ok
                }
                Err(_) => false,
            };
            if ok {
                tally.succeeded(sent.elapsed());
            } else {
                tally.lost.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();

    let g = guarded.stats();
    guarded_tally.waited_nanos.store(
        apiguard::core::clock::duration_to_nanos(g.waiting()),
        Ordering::Relaxed,
    );
    guarded_tally.attempts.store(g.attempts, Ordering::Relaxed);

    let mut report = Report {
        phases: PHASES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    name.to_string(),
                    phase_len * i as u32,
                    phase_len * (i as u32 + 1),
                )
            })
            .collect(),
        naive: client_report(&naive_tally, &naive_up),
        guarded: client_report(&guarded_tally, &guarded_up),
        guarded_errors: Vec::new(),
        transitions: transitions.lock().unwrap().clone(),
        burst: Vec::new(),
        server_quota: (10, 1.0),
        limit: cfg.limit,
        elapsed,
    };
    report.guarded.retries = g.retries;
    // One entry per cause (when retries ran out, the last attempt's), so
    // the counts add up to the lost requests.
    report.guarded_errors = vec![
        ("refused: circuit open", g.circuit_open),
        ("refused: no token in time", g.rate_limited),
        ("retry budget spent", g.budget_exhausted),
        ("timed out", g.timeouts),
        ("transport error", g.transport),
        ("answered 429 or 5xx", g.error_status),
    ];
    report.burst = server_burst(report.server_quota).await?;
    Ok(report)
}

async fn naive_request(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
    tally: &Tally,
) {
    tally.issued.fetch_add(1, Ordering::Relaxed);
    let sent = Instant::now();
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tally.waited_nanos.fetch_add(100_000_000, Ordering::Relaxed);
        }
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        let req = Request::get(format!("{url}/work"))
            .body(Empty::new())
            .expect("valid request");
        if let Ok(res) = client.request(req).await {
            let ok = res.status().is_success();
            let _ = res.into_body().collect().await;
            if ok {
                tally.succeeded(sent.elapsed());
                return;
            }
        }
    }
    tally.lost.fetch_add(1, Ordering::Relaxed);
}

fn client_report(tally: &Tally, upstream: &Upstream) -> ClientReport {
    let issued = tally.issued.load(Ordering::Relaxed);
    let attempts = tally.attempts.load(Ordering::Relaxed);
    ClientReport {
        issued,
        succeeded: tally.ok.load(Ordering::Relaxed),
        lost: tally.lost.load(Ordering::Relaxed),
        upstream_calls: upstream.requests(),
        too_many: upstream.stats().too_many.load(Ordering::Relaxed),
        retries: attempts.saturating_sub(issued),
        waiting: Duration::from_nanos(tally.waited_nanos.load(Ordering::Relaxed)),
        peak_per_sec: upstream.stats().peak(Duration::from_secs(1)),
        arrivals: upstream.stats().arrivals(),
        p50: tally.latency(0.5),
        p99: tally.latency(0.99),
    }
}

async fn server_burst(
    quota: (u32, f64),
) -> Result<Vec<BurstReport>, Box<dyn std::error::Error + Send + Sync>> {
    use axum::{Router, routing::get};
    let limiter = KeyedLimiter::from_rate(quota.0, quota.1)?.with_max_keys(10_000);
    // One trusted proxy in front: the client address is the right-most entry.
    let app: Router = Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(server_layer(limiter, ForwardedFor::x_forwarded_for(1)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut out = Vec::new();
    for (ip, n) in [("203.0.113.7", 40u64), ("198.51.100.9", 5)] {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let client = client.clone();
            let req = Request::get(format!("http://{addr}/work"))
                .header("x-forwarded-for", ip)
                .body(Empty::new())?;
            set.spawn(async move { client.request(req).await });
        }
        let mut r = BurstReport {
            client: ip.to_string(),
            sent: n,
            ..BurstReport::default()
        };
        while let Some(res) = set.join_next().await {
            let res = res??;
            match res.status() {
                StatusCode::OK => r.ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    r.too_many += 1;
                    let h = |name: &str| {
                        res.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    r.retry_after = r.retry_after.or_else(|| h("retry-after"));
                    r.ratelimit = r.ratelimit.or_else(|| h("ratelimit"));
                }
                other => return Err(format!("unexpected status {other}").into()),
            }
        }
        out.push(r);
    }
    server.abort();
    Ok(out)
}

impl Report {
    /// The side-by-side table.
    pub fn table(&self) -> String {
        let (n, g) = (&self.naive, &self.guarded);
        let mut s = String::new();
        let _ = writeln!(s, "{:<34} {:>12} {:>14}", "", "naive loop", "GuardedClient");
        let mut row = |label: &str, a: String, b: String| {
            let _ = writeln!(s, "{label:<34} {a:>12} {b:>14}");
        };
        row(
            "requests issued",
            n.issued.to_string(),
            g.issued.to_string(),
        );
        row(
            "requests succeeded",
            n.succeeded.to_string(),
            g.succeeded.to_string(),
        );
        row("requests lost", n.lost.to_string(), g.lost.to_string());
        row(
            "upstream calls",
            n.upstream_calls.to_string(),
            g.upstream_calls.to_string(),
        );
        row(
            "429s received",
            n.too_many.to_string(),
            g.too_many.to_string(),
        );
        row("retries sent", n.retries.to_string(), g.retries.to_string());
        row(
            "latency of successes p50 (ms)",
            format!("{:.0}", n.p50.as_secs_f64() * 1e3),
            format!("{:.0}", g.p50.as_secs_f64() * 1e3),
        );
        row(
            "latency of successes p99 (ms)",
            format!("{:.0}", n.p99.as_secs_f64() * 1e3),
            format!("{:.0}", g.p99.as_secs_f64() * 1e3),
        );
        row(
            "time spent waiting (s, summed)",
            format!("{:.1}", n.waiting.as_secs_f64()),
            format!("{:.1}", g.waiting.as_secs_f64()),
        );
        row(
            &format!("peak upstream calls/s (limit {})", self.limit),
            n.peak_per_sec.to_string(),
            g.peak_per_sec.to_string(),
        );
        let why: Vec<String> = self
            .guarded_errors
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{n} {what}"))
            .collect();
        if !why.is_empty() {
            let _ = writeln!(s, "GuardedClient's lost requests: {}", why.join(", "));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "GuardedClient's breaker:");
        if self.transitions.is_empty() {
            let _ = writeln!(s, "  (no transitions)");
        }
        for (t, from, to) in &self.transitions {
            let _ = writeln!(s, "  {:>6.2}s  {from:?} -> {to:?}", t.as_secs_f64());
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "axum server with the server stack ({} at once, then {}/s per client address):",
            self.server_quota.0, self.server_quota.1
        );
        for b in &self.burst {
            let _ = writeln!(
                s,
                "  {:<14} {:>3} sent at once: {:>3} x 200, {:>3} x 429{}",
                b.client,
                b.sent,
                b.ok,
                b.too_many,
                match (&b.retry_after, &b.ratelimit) {
                    (Some(ra), Some(rl)) => format!("  (Retry-After: {ra}, RateLimit: {rl})"),
                    (Some(ra), None) => format!("  (Retry-After: {ra})"),
                    _ => String::new(),
                }
            );
        }
        s
    }

    /// Writes the timeline chart.
    pub fn plot(&self, path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let series = [
            RateSeries {
                label: "naive loop".into(),
                events: self.naive.arrivals.clone(),
            },
            RateSeries {
                label: "GuardedClient".into(),
                events: self.guarded.arrivals.clone(),
            },
        ];
        let bands: Vec<Band> = self
            .phases
            .iter()
            .map(|(label, start, end)| Band {
                label: label.clone(),
                start: *start,
                end: *end,
            })
            .collect();
        let breaker: Vec<(Duration, u8)> = self
            .transitions
            .iter()
            .map(|(t, _, to)| {
                let level = match to {
                    State::Open | State::ForcedOpen => 2,
                    State::HalfOpen => 1,
                    _ => 0,
                };
                (*t, level)
            })
            .collect();
        let total = self
            .elapsed
            .max(self.phases.last().map_or(Duration::ZERO, |p| p.2));
        draw_timeline(
            path,
            total,
            &series,
            &bands,
            &breaker,
            f64::from(self.limit),
        )
    }
}
