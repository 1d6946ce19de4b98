//! Per-shard health on a Redis Cluster.
//!
//! A background task reads `CLUSTER SLOTS` every [`SLOTS_REFRESH_EVERY`]
//! and maps every slot to its master's [`Monitor`]: the round trip, the
//! offset to that node's `TIME`, and the small breaker that sends the
//! decisions of that master's slots to the failure policy when it stops
//! answering. When a replica is promoted, its slots map to a new master,
//! with a fresh monitor in Redis mode: decisions go back to Redis without
//! waiting for a probe of the lost node.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::Value;

use crate::conn::{Conn, SLOTS, slot};
use crate::health::{Monitor, TimeoutRule};

/// How often the limiter reads the cluster's slot map (`CLUSTER SLOTS`).
pub const SLOTS_REFRESH_EVERY: Duration = Duration::from_secs(1);

/// No master is known for this slot.
const NONE: u16 = u16::MAX;

/// Every master's monitor, and which master serves each slot.
pub(crate) struct Shards {
    rule: TimeoutRule,
    probe_every: Duration,
    hint_instances: u32,
    table: RwLock<Option<Arc<Table>>>,
}

struct Table {
    /// Index into `masters` per slot ([`NONE`] when no master serves it).
    slots: Box<[u16]>,
    masters: Vec<(String, Arc<Monitor>)>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (shards, away) = self.summary();
        f.debug_struct("Shards")
            .field("shards", &shards)
            .field("away", &away)
            .finish()
    }
}

impl Shards {
    pub(crate) fn new(rule: TimeoutRule, probe_every: Duration, hint_instances: u32) -> Self {
        Self {
            rule,
            probe_every,
            hint_instances,
            table: RwLock::new(None),
        }
    }

    fn read(&self) -> Option<Arc<Table>> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The monitor of the master serving `key`'s slot; `None` while the
    /// slot map is not known (the limiter's own monitor stands in).
    pub(crate) fn monitor_for(&self, key: &str) -> Option<Arc<Monitor>> {
        let table = self.read()?;
        let i = table.slots[usize::from(slot(key.as_bytes()))];
        table
            .masters
            .get(usize::from(i))
            .map(|(_, m)| Arc::clone(m))
    }

    /// (masters known, masters whose slots the failure policy decides).
    pub(crate) fn summary(&self) -> (u32, u32) {
        let Some(table) = self.read() else {
            return (0, 0);
        };
        let away = table.masters.iter().filter(|(_, m)| m.is_away()).count();
        (table.masters.len() as u32, away as u32)
    }

    /// The monitor of the first master that has answered, for
    /// [`Health`](crate::Health)'s round trip and timeout.
    pub(crate) fn first_answered(&self) -> Option<Arc<Monitor>> {
        let table = self.read()?;
        table
            .masters
            .iter()
            .find(|(_, m)| m.has_rtt())
            .map(|(_, m)| Arc::clone(m))
    }

    /// Installs a new slot map: `(first slot, last slot, master address)`.
    /// A master already known keeps its monitor; a new one (a promoted
    /// replica) starts in Redis mode.
    pub(crate) fn update(&self, ranges: &[(u16, u16, String)]) {
        let old = self.read();
        let mut known: HashMap<&str, &Arc<Monitor>> = HashMap::new();
        if let Some(old) = &old {
            for (addr, m) in &old.masters {
                known.insert(addr.as_str(), m);
            }
        }
        let mut slots = vec![NONE; SLOTS].into_boxed_slice();
        let mut masters: Vec<(String, Arc<Monitor>)> = Vec::new();
        for (first, last, addr) in ranges {
            let i = match masters.iter().position(|(a, _)| a == addr) {
                Some(i) => i,
                None => {
                    let m = known.get(addr.as_str()).map_or_else(
                        || {
                            Arc::new(Monitor::new(
                                self.rule,
                                self.probe_every,
                                self.hint_instances,
                            ))
                        },
                        |m| Arc::clone(m),
                    );
                    masters.push((addr.clone(), m));
                    masters.len() - 1
                }
            };
            let (first, last) = (usize::from(*first), usize::from(*last).min(SLOTS - 1));
            if first <= last {
                slots[first..=last].fill(i as u16);
            }
        }
        let changed = old.as_ref().is_none_or(|o| {
            o.slots != slots
                || o.masters
                    .iter()
                    .map(|m| &m.0)
                    .ne(masters.iter().map(|m| &m.0))
        });
        if changed {
            tracing::info!(
                masters = ?masters.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
                "redis cluster: slot map changed"
            );
        }
        *self.table.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(Table { slots, masters }));
    }
}

/// Parses a `CLUSTER SLOTS` reply into `(first, last, master host:port)`.
pub(crate) fn parse_slots(reply: &Value) -> Option<Vec<(u16, u16, String)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let Value::Array(r) = r else { return None };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (r.first(), r.get(1), r.get(2))
        else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return None;
        };
        out.push((
            u16::try_from(*first).ok()?,
            u16::try_from(*last).ok()?,
            format!("{host}:{port}"),
        ));
    }
    Some(out)
}

/// Reads the slot map every [`SLOTS_REFRESH_EVERY`] until `shards` is
/// dropped. A failed read keeps the last map.
pub(crate) async fn refresh(mut con: Conn, shards: Weak<Shards>) {
    let mut tick = tokio::time::interval(SLOTS_REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shards.strong_count() == 0 {
            return;
        }
        let read = tokio::time::timeout(
            SLOTS_REFRESH_EVERY,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut con),
        )
        .await;
        let Some(shards) = shards.upgrade() else {
            return;
        };
        match read {
            Ok(Ok(v)) => match parse_slots(&v) {
                Some(ranges) if !ranges.is_empty() => shards.update(&ranges),
                _ => tracing::debug!("redis cluster: CLUSTER SLOTS gave no slot map"),
            },
            Ok(Err(err)) => tracing::debug!(error = %err, "redis cluster: CLUSTER SLOTS failed"),
            Err(_) => tracing::debug!("redis cluster: CLUSTER SLOTS timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::DEFAULT_PROBE_EVERY;

    fn shards() -> Shards {
        Shards::new(TimeoutRule::Fixed(1_000_000), DEFAULT_PROBE_EVERY, 0)
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_slots_reply_is_parsed() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id2")]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7001)]),
            ]),
        ]);
        assert_eq!(
            parse_slots(&reply).unwrap(),
            vec![
                (0, 5460, "127.0.0.1:7000".to_owned()),
                (5461, 16383, "127.0.0.1:7001".to_owned())
            ]
        );
        assert_eq!(parse_slots(&Value::Int(1)), None);
    }

    #[test]
    fn known_masters_keep_their_monitor_and_promoted_ones_start_in_redis_mode() {
        let s = shards();
        assert!(s.monitor_for("k").is_none(), "no map yet");
        s.update(&[(0, 8191, "a:1".into()), (8192, 16383, "b:1".into())]);
        assert_eq!(s.summary(), (2, 0));
        let k = "k"; // slot 7629: master a
        let a = s.monitor_for(k).unwrap();
        for t in [0, 1_000_000, 2_000_000] {
            a.missed(t);
        }
        assert!(a.is_away());
        assert_eq!(s.summary(), (2, 1));
        // The same map again: a stays away.
        s.update(&[(0, 8191, "a:1".into()), (8192, 16383, "b:1".into())]);
        assert!(s.monitor_for(k).unwrap().is_away());
        // a's replica c is promoted.
        s.update(&[(0, 8191, "c:1".into()), (8192, 16383, "b:1".into())]);
        assert!(!s.monitor_for(k).unwrap().is_away());
        assert_eq!(s.summary(), (2, 0));
    }
}
