//! One connection type for one Redis node or a Redis Cluster.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ErrorKind, FromRedisValue, Pipeline, RedisFuture, RedisResult, Script, ServerErrorKind,
    Value,
};

/// The number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;

/// How long the cluster client waits to connect to a node, and for a
/// node's answer, before it counts the attempt as failed.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(1);

/// How many times the cluster client retries a command (following `MOVED`,
/// `ASK`, `TRYAGAIN` or a lost connection) before it fails.
pub const CLUSTER_RETRIES: u32 = 3;

/// The cluster client [`RedisLimiterBuilder::connect_cluster`] and
/// [`SharedBreakerSignalBuilder::connect_cluster`] use: the seed nodes
/// `seeds` (`redis://host:port/`), [`CLUSTER_TIMEOUT`] to connect and to
/// answer, [`CLUSTER_RETRIES`] retries. A dead master then fails commands
/// within seconds instead of the client's default of 16 retries, and
/// decisions never wait for it beyond their own timeout anyway.
///
/// [`RedisLimiterBuilder::connect_cluster`]: crate::RedisLimiterBuilder::connect_cluster
/// [`SharedBreakerSignalBuilder::connect_cluster`]: crate::SharedBreakerSignalBuilder::connect_cluster
pub fn cluster_client<S: AsRef<str>>(seeds: &[S]) -> RedisResult<ClusterClient> {
    ClusterClient::builder(seeds.iter().map(|s| s.as_ref().to_owned()))
        .connection_timeout(CLUSTER_TIMEOUT)
        .response_timeout(CLUSTER_TIMEOUT)
        .retries(CLUSTER_RETRIES)
        .max_retry_wait(200)
        .min_retry_wait(10)
        .build()
}

/// A connection to one node (reconnecting in the background) or to a
/// cluster (routing by slot, following `MOVED` and `ASK`, refreshing its
/// slot map when a node fails).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Runs `cmd`, an `EVALSHA` of `script` (whose source is `source`), and
/// handles `NOSCRIPT`: on one node by loading the script and asking again
/// (what `Script::invoke_async` does); on a cluster by sending the same call
/// as `EVAL` with the source, which reaches the node serving the key (a
/// `SCRIPT LOAD` goes to every node and fails while one is down, and a
/// promoted replica does not have the scripts its master had loaded).
pub(crate) async fn eval<T: FromRedisValue>(
    con: &mut Conn,
    script: &Script,
    source: &str,
    cmd: &Cmd,
) -> RedisResult<T> {
    match cmd.query_async(con).await {
        Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            if con.is_cluster() {
                let mut eval = Cmd::with_capacity(cmd.args_iter().len(), 64 + source.len());
                eval.arg("EVAL").arg(source);
                for a in cmd.args_iter().skip(2) {
                    if let redis::Arg::Simple(a) = a {
                        eval.arg(a);
                    }
                }
                eval.query_async(con).await
            } else {
                script.load_async(con).await?;
                cmd.query_async(con).await
            }
        }
        reply => reply,
    }
}

/// An `EVALSHA` of `script` with `keys`; add the arguments.
pub(crate) fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = Cmd::new();
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for k in keys {
        cmd.arg(*k);
    }
    cmd
}

/// The hash slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of
/// the key, or of its hash tag (the text between the first `{` and the
/// next `}`, when not empty), modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from `CLUSTER KEYSLOT` of Redis 7.0.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"p:{k}"), slot(b"k"));
        assert_eq!(
            slot(b"foo{}{bar}"),
            slot(b"foo{}{bar}"),
            "an empty tag hashes the whole key"
        );
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }
}
