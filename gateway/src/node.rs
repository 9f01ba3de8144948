//! This process as one node of the gateway (CONTRACT §6): its id (`node.id`, else the one kept
//! in `<data_dir>/node-id`), its claim on that id in the shared node table, and the heartbeat
//! that keeps it alive there and declares silent nodes dead (`node_lost`).
//!
//! Not here: the shared CA and the change log (`cluster.rs`), ending this node's own sessions
//! of an earlier run (`app.rs`, once it holds its listeners).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tms_broker::{Broker, DisconnectReason};
use tms_config::Config;
use tms_model::SharedClock;
use tms_store::{Heartbeat, Store};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::data_dir::absolute;

/// Who this process is among the nodes.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub id: String,
    /// Random per process start: tells this process from another one with the same id.
    pub instance: String,
}

/// The id of this node and whether it was made just now (first start on this data dir).
pub fn node_id(config: &Config) -> Result<(String, bool)> {
    if let Some(id) = &config.node.id {
        return Ok((id.clone(), false));
    }
    let path = config.data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if !tms_config::valid_node_id(id) {
                bail!(
                    "{} holds {id:?}, which is not a node id (1-64 of A-Z a-z 0-9 . _ -); \
                     fix it or set node.id (TMS_NODE_ID)",
                    absolute(&path).display()
                );
            }
            Ok((id.to_owned(), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_node_id(crate::data_dir::host_name().as_deref());
            std::fs::write(&path, format!("{id}\n"))
                .with_context(|| format!("writing {}", absolute(&path).display()))?;
            Ok((id, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", absolute(&path).display())),
    }
}

/// `<host name>-<6 hex digits>`: readable in logs, and different for two nodes on one host
/// (or containers sharing a name).
fn new_node_id(host: Option<&str>) -> String {
    let host: String = host
        .unwrap_or("gateway")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "gateway".into()
    } else {
        host
    };
    let mut suffix = [0u8; 3];
    rand::fill(&mut suffix);
    format!("{host}-{}", hex::encode(suffix))
}

/// The instance an earlier run on this data directory held its node id with.
const INSTANCE_FILE: &str = "node-instance";

/// Takes `id` in the node table for a new instance: refused (naming `node.id`) while another
/// live process heartbeats with it. An earlier run on this data directory is not another
/// process: the data-directory lock, held by the caller, proves it has ended.
pub async fn claim(config: &Config, store: &Store, id: &str, now: i64) -> Result<NodeIdentity> {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    let instance = hex::encode(bytes);
    let path = config.data_dir.join(INSTANCE_FILE);
    let previous = std::fs::read_to_string(&path)
        .ok()
        .map(|t| t.trim().to_owned());
    let alive_since = now - millis(config.node.dead_after);
    match store
        .claim_node(id, &instance, previous.as_deref(), now, alive_since)
        .await
        .context("claiming the node id")?
    {
        Ok(()) => {}
        Err(busy) => bail!(
            "node.id {id:?} is in use: another tms-gateway with that node id heartbeats in this \
             database ({} ms ago); every node sharing a database needs its own node.id \
             (TMS_NODE_ID), or stop the other one first",
            (now - busy.last_heartbeat_at).max(0)
        ),
    }
    std::fs::write(&path, format!("{instance}\n"))
        .with_context(|| format!("writing {}", absolute(&path).display()))?;
    Ok(NodeIdentity {
        id: id.to_owned(),
        instance,
    })
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Heartbeats every `node.heartbeat_secs` and, once this node has itself heartbeaten without
/// a gap for `node.dead_after_secs`, declares dead the nodes silent longer than that. The
/// wait matters after a database outage: every heartbeat is old then, and the first node
/// back must not declare all the others dead before they had a chance to write theirs.
pub(crate) async fn run(
    store: Store,
    broker: Arc<Broker>,
    me: NodeIdentity,
    heartbeat: Duration,
    dead_after: Duration,
    clock: SharedClock,
    stop: CancellationToken,
) -> Result<()> {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when the heartbeats have been written without a gap longer than dead_after.
    let mut steady_since: Option<Instant> = None;
    let mut last_written: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = clock.now_ms();
        match store.heartbeat(&me.id, &me.instance, now).await {
            Ok(Heartbeat::Alive) => {}
            Ok(Heartbeat::Revived) => {
                // Our sessions were ended as node_lost while we could not write: the devices
                // must connect again to be shown online.
                let closed = broker.close_all(DisconnectReason::NodeLost);
                tracing::warn!(
                    node = %me.id,
                    sessions = closed,
                    "other nodes declared this node dead (its heartbeat did not reach the database); closed its sessions so their devices reconnect"
                );
                steady_since = None;
            }
            Ok(Heartbeat::Replaced) => bail!(
                "node.id {:?} was taken by another tms-gateway process; two live nodes must not share an id",
                me.id
            ),
            Err(e) => {
                tracing::warn!(node = %me.id, error = %e, "cannot write the node heartbeat");
                continue;
            }
        }
        count_nodes(&store, now - millis(dead_after)).await;
        let written = Instant::now();
        if last_written.is_none_or(|t| written - t > dead_after) {
            steady_since = None;
        }
        last_written = Some(written);
        let steady = *steady_since.get_or_insert(written);
        if written - steady < dead_after {
            continue;
        }
        match store
            .sweep_lost_nodes(&me.id, now - millis(dead_after))
            .await
        {
            Ok(lost) => {
                for node in lost {
                    metrics::counter!("tms_cluster_nodes_lost_total").increment(1);
                    tracing::warn!(
                        lost.node = %node.id,
                        devices = node.devices,
                        silent_ms = now - node.last_heartbeat_at,
                        "node lost: no heartbeat for node.dead_after_secs; its devices are offline (node_lost) until they reconnect"
                    );
                    // Commands the lost node had claimed and no device acknowledged go back to
                    // the queue now, for the node each device reconnects to.
                    match store.release_stale_commands(&node.id, 0).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(lost.node = %node.id, commands = n, "queued again the commands the lost node held")
                        }
                        Err(e) => {
                            tracing::warn!(lost.node = %node.id, error = %e, "cannot queue again the lost node's commands; they are after the stale-claim time")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot check for lost nodes"),
        }
    }
}

/// `tms_cluster_nodes{state}`: the nodes as this one sees them.
async fn count_nodes(store: &Store, dead_before: i64) {
    match store.nodes(dead_before).await {
        Ok(nodes) => {
            let alive = nodes.iter().filter(|n| n.state == "alive").count();
            metrics::gauge!("tms_cluster_nodes", "state" => "alive").set(alive as f64);
            metrics::gauge!("tms_cluster_nodes", "state" => "dead")
                .set((nodes.len() - alive) as f64);
        }
        Err(e) => tracing::debug!(error = %e, "cannot count the nodes"),
    }
}

/// Marks this node stopped in the node table (a clean shutdown), so no other node reports it
/// lost.
pub(crate) async fn leave(store: &Store, me: &NodeIdentity, now: i64) {
    if let Err(e) = store.leave_node(&me.id, &me.instance, now).await {
        tracing::warn!(error = %e, "cannot mark this node stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_id_is_valid_readable_and_differs_between_two_nodes_on_one_host() {
        let a = new_node_id(Some("gw host/1"));
        let b = new_node_id(Some("gw host/1"));
        assert!(
            tms_config::valid_node_id(&a) && tms_config::valid_node_id(&b),
            "{a} {b}"
        );
        assert!(a.starts_with("gwhost1-"), "{a}");
        assert_ne!(a, b);
        assert!(tms_config::valid_node_id(&new_node_id(Some(
            &"x".repeat(300)
        ))));
        assert!(new_node_id(None).starts_with("gateway-"));
    }
}
