//! A throwaway nginx with a `limit_req` zone: a real server's rate limit
//! to learn, started on a free loopback port with a configuration of its
//! own and stopped on drop.
//!
//! When no `nginx` binary is found (on `PATH`, or at `/usr/sbin/nginx`
//! where Debian puts it) [`Nginx::start`] says why and returns `None`, so
//! a test can pass without running — except under the `CI` environment
//! variable, where a missing nginx is a failure.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The limit nginx enforces (`limit_req zone=… burst=… nodelay`, refused
/// with `429` and no `Retry-After`).
#[derive(Debug, Clone, Copy)]
pub struct LimitReq {
    /// Requests per second.
    pub rate: u32,
    /// Requests allowed above the rate at once.
    pub burst: u32,
}

/// A running nginx; killed, and its directory removed, on drop.
#[derive(Debug)]
pub struct Nginx {
    port: u16,
    dir: PathBuf,
    child: Child,
}

fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let debian = Path::new("/usr/sbin/nginx");
        debian.is_file().then(|| debian.to_path_buf())
    })
}

impl Nginx {
    /// Starts nginx serving `GET /` (a one-line file) under `limit`, one
    /// zone for every client. `None` when nginx is not installed (outside
    /// CI).
    pub fn start(limit: LimitReq) -> Option<Self> {
        let Some(bin) = binary() else {
            if std::env::var_os("CI").is_some() {
                panic!("nginx is not installed, and CI is set: the nginx tests must run in CI");
            }
            eprintln!("skipping: nginx is not installed (apt-get install nginx to run this test)");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("apiguard-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("www")).expect("nginx temp dir");
        std::fs::write(dir.join("www/index.html"), "ok\n").expect("nginx page");
        let d = dir.display();
        let LimitReq { rate, burst } = limit;
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    log_format status '$status';
    access_log {d}/access.log status;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    limit_req_zone $server_name zone=paced:1m rate={rate}r/s;
    limit_req_status 429;
    server {{
        listen 127.0.0.1:{port};
        server_name paced;
        root {d}/www;
        location / {{
            limit_req zone=paced burst={burst} nodelay;
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx config");
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let server = Self { port, dir, child };
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "nginx did not listen on port {port}: {}",
            std::fs::read_to_string(server.dir.join("error.log")).unwrap_or_default()
        );
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests nginx answered with each of `200` and `429` so
    /// far, from its access log.
    pub fn statuses(&self) -> (u64, u64) {
        let log = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let mut ok = 0;
        let mut refused = 0;
        for line in log.lines() {
            match line.trim() {
                "200" => ok += 1,
                "429" => refused += 1,
                _ => {}
            }
        }
        (ok, refused)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What [`load`] saw.
#[derive(Debug, Clone, Default)]
pub struct LoadRun {
    /// Requests answered `200`.
    pub ok: u64,
    /// Requests that ended in anything else (an error, or a non-`200`).
    pub lost: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Latency of each successful request, sorted.
    pub latencies: Vec<Duration>,
}

impl LoadRun {
    /// Successful requests per second.
    pub fn ok_per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (0..=1) of successful requests.
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        self.latencies[i]
    }
}

/// Sends `total` `GET /` through `client` from `tasks` tasks at once, each
/// sending its next request when the last one is answered.
pub async fn load(client: &apiguard::GuardedClient, tasks: usize, total: usize) -> LoadRun {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let client = client.clone();
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut run = LoadRun::default();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t0 = tokio::time::Instant::now();
                match client.get("/").await {
                    Ok(res) if res.status() == http::StatusCode::OK => {
                        let _ = http_body_util::BodyExt::collect(res.into_body()).await;
                        run.ok += 1;
                        run.latencies.push(t0.elapsed());
                    }
                    _ => run.lost += 1,
                }
            }
            run
        }));
    }
    let mut all = LoadRun::default();
    for h in handles {
        let run = h.await.expect("a load task does not panic");
        all.ok += run.ok;
        all.lost += run.lost;
        all.latencies.extend(run.latencies);
    }
    all.elapsed = started.elapsed();
    all.latencies.sort();
    all
}
