//! A throwaway Redis Cluster per test: three masters and three replicas
//! (`redis-server --cluster-enabled yes` on free loopback ports, joined by
//! `redis-cli --cluster create --cluster-replicas 1`), killed on drop.
//!
//! The nodes fail over fast (`cluster-node-timeout 1000`) and keep serving
//! the slots they have while another shard is down
//! (`cluster-require-full-coverage no`). Without `redis-server` or
//! `redis-cli` on `PATH` the tests print why and pass without running,
//! except under `CI`, where a missing binary fails them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{ask, connect, free_port, pid_on};

/// Wall-clock microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The node timeout the cluster runs with: a master that stops answering
/// is failed over after about twice this.
pub const NODE_TIMEOUT_MS: u64 = 1000;

pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

/// Starts a cluster, or returns from the calling test when there is none to
/// start (outside CI).
#[macro_export]
macro_rules! cluster_or_skip {
    () => {
        match common::cluster::RedisCluster::start() {
            Some(cluster) => cluster,
            None => return,
        }
    };
}

fn present(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl RedisCluster {
    pub fn start() -> Option<Self> {
        for bin in ["redis-server", "redis-cli"] {
            if !present(bin) {
                if std::env::var_os("CI").is_some() {
                    panic!(
                        "{bin} is not on PATH, and CI is set: Redis Cluster tests must run in CI"
                    );
                }
                eprintln!(
                    "skipping: {bin} is not on PATH (install it to run the Redis Cluster tests)"
                );
                return None;
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "apiguard-cluster-{}-{}",
            std::process::id(),
            unix_us()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        // A port found free can still be taken (by another program) before
        // its redis-server binds it; that node then exits, and whatever
        // holds the port must not answer for it (a test once joined another
        // test's node into its cluster that way, and the two clusters
        // merged). Each port must answer from the process started for it;
        // start the six again on other ports otherwise.
        let mut ports = Vec::new();
        for attempt in 1..=3 {
            ports = (0..6).map(|_| free_port(true)).collect();
            cluster.spawn(&ports);
            let ours = cluster.nodes.iter().all(|n| {
                let pid = n.child.as_ref().map(Child::id);
                until(Duration::from_secs(15), || {
                    pid.is_some() && pid_on(n.port) == pid
                })
            });
            if ours {
                break;
            }
            assert!(
                attempt < 3,
                "redis cluster: a node never answered from its own process"
            );
            cluster.stop_all();
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for &port in &ports {
            cluster.wait_for(
                Duration::from_secs(30),
                || ask(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"),
                "cluster_state:ok",
            );
        }
        // Every node knows exactly the six nodes started here (no other
        // cluster's node joined this one), and sees the same three masters,
        // each at the address of one of them, before tests start: a node still
        // learning the others through gossip can already list the slot
        // ranges while naming a master it has no address for yet (seen as a
        // port no node has: a test that picked that master to kill found
        // no node on it).
        let mut sorted_ports = ports.clone();
        sorted_ports.sort_unstable();
        cluster.wait_for(
            Duration::from_secs(30),
            || {
                let view = |p: u16| {
                    let mut m: Vec<u16> = masters_seen_by(p).iter().map(|r| r.2).collect();
                    m.sort_unstable();
                    m
                };
                let knows_only_ours = |p: u16| {
                    let mut known = nodes_known_by(p);
                    known.sort_unstable();
                    known == sorted_ports
                };
                let first = view(ports[0]);
                ports.iter().all(|&p| knows_only_ours(p))
                    && first.len() == 3
                    && first.iter().all(|m| ports.contains(m))
                    && ports.iter().all(|&p| view(p) == first)
            },
            "the same three masters, at known ports, on every node",
        );
        // And every master has its replica in sync, so a killed master can
        // fail over.
        cluster.wait_for(
            Duration::from_secs(30),
            || {
                let masters: Vec<u16> = masters_seen_by(ports[0]).iter().map(|r| r.2).collect();
                !masters.is_empty()
                    && masters
                        .iter()
                        .all(|&m| ask(m, &["INFO", "replication"]).contains("state=online"))
            },
            "replicas in sync",
        );
        Some(cluster)
    }

    /// Starts a `redis-server` in cluster mode on each of `ports`.
    fn spawn(&mut self, ports: &[u16]) {
        for &port in ports {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                .args(["--cluster-require-full-coverage", "no"])
                // A replica may stand for election however long it has
                // been apart from its master, and syncs at once.
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--logfile")
                .arg(self.dir.join(format!("node-{port}.log")))
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            self.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
    }

    /// Kills every node and forgets it.
    fn stop_all(&mut self) {
        for mut n in self.nodes.drain(..) {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// The seed nodes, as `redis://127.0.0.1:port/`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    fn alive_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
            .port
    }

    /// The slot ranges and their master's port, as a live node sees them.
    pub fn slot_map(&self) -> Vec<(u16, u16, u16)> {
        masters_seen_by(self.alive_port())
    }

    /// The ports of the masters.
    pub fn master_ports(&self) -> Vec<u16> {
        let mut m: Vec<u16> = self.slot_map().iter().map(|r| r.2).collect();
        m.sort_unstable();
        m.dedup();
        m
    }

    /// The slot of `key`, from the cluster itself.
    pub fn keyslot(&self, key: &str) -> u16 {
        let mut con = self.client(self.alive_port());
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the master serving `key`.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot = self.keyslot(key);
        self.slot_map()
            .iter()
            .find(|(a, b, _)| *a <= slot && slot <= *b)
            .expect("a master for the slot")
            .2
    }

    /// A plain connection to one node.
    pub fn client(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
            .expect("connects")
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        let known: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) else {
            panic!("no node on port {port}; the nodes are on {known:?}");
        };
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until a live node names another master than `old` for the
    /// slot `slot` (its replica was promoted), and returns when it saw it
    /// (unix µs) and the new master's port.
    pub fn wait_promoted(&self, slot: u16, old: u16, within: Duration) -> (u64, u16) {
        let mut seen = None;
        self.wait_for(
            within,
            || {
                let m = self
                    .slot_map()
                    .into_iter()
                    .find(|(a, b, _)| *a <= slot && slot <= *b)
                    .map(|r| r.2);
                if let Some(m) = m.filter(|&m| m != old) {
                    seen = Some((unix_us(), m));
                    true
                } else {
                    false
                }
            },
            &format!("replica of {old} promoted"),
        );
        seen.unwrap()
    }

    /// Waits until `ok` holds; past `within`, prints what each node sees
    /// and its log, and fails the test.
    fn wait_for(&self, within: Duration, ok: impl FnMut() -> bool, what: &str) {
        if !until(within, ok) {
            self.dump();
            panic!("redis cluster: no {what} within {within:?}");
        }
    }

    /// Prints every live node's `CLUSTER NODES` and every node's log tail.
    fn dump(&self) {
        for n in &self.nodes {
            if n.child.is_some() {
                let nodes = ask(n.port, &["CLUSTER", "NODES"]);
                eprintln!("--- CLUSTER NODES on {}:\n{nodes}", n.port);
            }
            let log = std::fs::read_to_string(self.dir.join(format!("node-{}.log", n.port)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- log of {} (last 40 lines, newest first):", n.port);
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `ok` held within `within`, asked every 20 ms.
fn until(within: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let end = unix_us() + within.as_micros() as u64;
    while unix_us() < end {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The ports of every node `port` knows, itself included, from
/// `CLUSTER NODES` (`id ip:port@bus flags ...` per line).
fn nodes_known_by(port: u16) -> Vec<u16> {
    ask(port, &["CLUSTER", "NODES"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|addr| addr.split('@').next()?.rsplit(':').next()?.parse().ok())
        .collect()
}

/// `(first slot, last slot, master port)` from `CLUSTER SLOTS` on `port`.
fn masters_seen_by(port: u16) -> Vec<(u16, u16, u16)> {
    let Some(mut c) = connect(port) else {
        return Vec::new();
    };
    let Ok(reply) = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query::<redis::Value>(&mut c)
    else {
        return Vec::new();
    };
    let redis::Value::Array(ranges) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for r in ranges {
        let redis::Value::Array(r) = r else { continue };
        if let (
            Some(redis::Value::Int(a)),
            Some(redis::Value::Int(b)),
            Some(redis::Value::Array(m)),
        ) = (r.first(), r.get(1), r.get(2))
            && let Some(redis::Value::Int(p)) = m.get(1)
        {
            out.push((*a as u16, *b as u16, *p as u16));
        }
    }
    out.sort_unstable();
    let mut masters: Vec<u16> = out.iter().map(|r| r.2).collect();
    masters.sort_unstable();
    masters.dedup();
    if masters.len() < 3 { Vec::new() } else { out }
}
