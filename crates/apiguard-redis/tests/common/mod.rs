//! A throwaway `redis-server` per test: a child process on a free loopback
//! port, killed on drop.
//!
//! When `redis-server` is not on `PATH` the tests that need it print why and
//! pass without running, except under the `CI` environment variable, where
//! a missing server fails them.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

/// Starts a server, or returns from the calling test when there is none to
/// start (outside CI).
#[macro_export]
macro_rules! redis_or_skip {
    () => {
        match common::RedisServer::start() {
            Some(server) => server,
            None => return,
        }
    };
}

impl RedisServer {
    pub fn start() -> Option<Self> {
        let present = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !present {
            if std::env::var_os("CI").is_some() {
                panic!("redis-server is not on PATH, and CI is set: Redis tests must run in CI");
            }
            eprintln!("skipping: redis-server is not on PATH (install it to run the Redis tests)");
            return None;
        }
        let port = free_port(false);
        let mut server = Self { port, child: None };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        // The port must answer from the process just started: another
        // program can take a port found free before redis-server binds it.
        let pid = self.pid();
        for _ in 0..500 {
            if pid_on(self.port) == Some(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "redis-server (pid {pid}) did not answer on port {}",
            self.port
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh, empty server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends a signal (`STOP`, `CONT`) to the server.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// A plain synchronous connection, to look at what the limiter wrote.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connects")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped server ignores SIGKILL until continued on some kernels.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
        self.kill();
    }
}

/// Redis `TIME` in microseconds.
pub fn redis_time_us(con: &mut redis::Connection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(con).expect("TIME");
    s * 1_000_000 + us
}
pub mod cluster;

/// Every port handed out in this process (with a cluster node's bus port),
/// so that two tests starting servers at once never pick the same one.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free loopback port not handed out before in this process. With `bus`,
/// the port 10000 above it (a cluster node's bus port) is free and handed
/// out too.
pub fn free_port(bus: bool) -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = l.local_addr().unwrap().port();
        if handed_out.contains(&port) {
            continue;
        }
        if !bus {
            handed_out.insert(port);
            return port;
        }
        let bus_port = port + 10_000;
        if port < 55_000
            && !handed_out.contains(&bus_port)
            && TcpListener::bind(("127.0.0.1", bus_port)).is_ok()
        {
            handed_out.insert(port);
            handed_out.insert(bus_port);
            return port;
        }
    }
}

/// A connection to the server on `port`, with 500 ms timeouts.
pub fn connect(port: u16) -> Option<redis::Connection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let con = c
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    con.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    Some(con)
}

/// The text reply to the command `args` from the server on `port`, empty
/// when it does not answer.
pub fn ask(port: u16, args: &[&str]) -> String {
    let Some(mut c) = connect(port) else {
        return String::new();
    };
    redis::cmd(args[0])
        .arg(&args[1..])
        .query(&mut c)
        .unwrap_or_default()
}

/// The process id of the `redis-server` answering on `port`.
pub fn pid_on(port: u16) -> Option<u32> {
    ask(port, &["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}
