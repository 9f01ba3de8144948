//! Commands to devices (CONTRACT §9): queued by the API or the CLI, claimed and delivered by
//! the node that holds the device's session, answered by the device through ingest.
//!
//! Every state change is one conditional UPDATE that names the state it starts from, so two
//! nodes racing for a command cannot both deliver it and a late report cannot undo a later
//! state. The internal state `sending` (claimed by a node, not yet PUBACKed) is shown to
//! people as `queued`. Not here: validation of names and arguments (the registry) or MQTT.

use crate::wakeup::{Wake, notify};
use crate::{Backend, Result, Store, query_err, unique_err};

/// The states of CONTRACT §9, plus `sending`.
pub const COMMAND_STATES: [&str; 6] = [
    "queued",
    "sending",
    "delivered",
    "succeeded",
    "failed",
    "expired",
];

/// A command to insert: already validated.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: String,
    pub serial: String,
    pub name: String,
    /// A JSON object, as text.
    pub args: String,
    pub created_at: i64,
    /// Who sent it: the user's email, or `cli`.
    pub created_by: String,
    pub expires_at: i64,
}

/// One command as stored; times in Unix ms.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CommandRecord {
    pub id: String,
    pub serial: String,
    pub name: String,
    pub args: String,
    pub state: String,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: i64,
    pub node_id: Option<String>,
    pub delivered_at: Option<i64>,
    pub replied_at: Option<i64>,
    pub reply: Option<String>,
}

/// A device's answer on `tms/<serial>/reply`, as ingest writes it (in its batch).
#[derive(Debug, Clone)]
pub struct ReplyRow {
    pub serial: String,
    pub command_id: String,
    pub ok: bool,
    /// The reply object exactly as the device sent it.
    pub payload: String,
    pub at: i64,
}

const COLUMNS: &str = "id, serial, name, args, state, created_at, created_by, expires_at, node_id, \
                       delivered_at, replied_at, reply";

/// Serials per `IN (...)` list when looking for pending commands.
const SERIALS_PER_QUERY: usize = 500;

/// How the reply's UPDATE reads (also used inside ingest's transaction): only the device the
/// command was sent to, and only a command that went out and has no answer yet.
pub(crate) const RECORD_REPLY: &str = "UPDATE device_commands SET state = $1, replied_at = $2, reply = $3, \
     delivered_at = COALESCE(delivered_at, $2) \
     WHERE id = $4 AND serial = $5 AND state IN ('sending', 'delivered')";

impl Store {
    /// Queues a command; `Conflict` if its id exists (ids are random: practically never).
    pub async fn insert_command(&self, c: &NewCommand) -> Result<()> {
        const OP: &str = "queuing a command";
        let insert = sqlx::query(
            "INSERT INTO device_commands (id, serial, name, args, state, created_at, created_by, expires_at) \
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7)",
        )
        .bind(&c.id)
        .bind(&c.serial)
        .bind(&c.name)
        .bind(&c.args)
        .bind(c.created_at)
        .bind(&c.created_by)
        .bind(c.expires_at);
        if self.backend() != Backend::Postgres {
            insert
                .execute(self.pool())
                .await
                .map_err(unique_err(OP, "command"))?;
            return Ok(());
        }
        // The node holding the device's session is woken when the command commits.
        let mut tx = self.pool().begin().await.map_err(query_err(OP))?;
        insert
            .execute(&mut *tx)
            .await
            .map_err(unique_err(OP, "command"))?;
        notify(self.backend(), &mut *tx, Wake::Commands).await?;
        tx.commit().await.map_err(query_err(OP))
    }

    /// A device's commands, newest first (ids sort by creation time).
    pub async fn commands_of(&self, serial: &str, limit: i64) -> Result<Vec<CommandRecord>> {
        sqlx::query_as::<_, CommandRecord>(&format!(
            "SELECT {COLUMNS} FROM device_commands WHERE serial = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(serial)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading commands"))
    }

    pub async fn command(&self, id: &str) -> Result<Option<CommandRecord>> {
        sqlx::query_as::<_, CommandRecord>(&format!(
            "SELECT {COLUMNS} FROM device_commands WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(query_err("reading a command"))
    }

    /// Queued, unexpired commands of these devices, oldest first, at most `limit`.
    pub async fn pending_commands(
        &self,
        serials: &[String],
        now: i64,
        limit: i64,
    ) -> Result<Vec<CommandRecord>> {
        let mut out = Vec::new();
        for chunk in serials.chunks(SERIALS_PER_QUERY) {
            let list = (0..chunk.len())
                .map(|i| format!("${}", i + 3))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT {COLUMNS} FROM device_commands WHERE state = 'queued' AND expires_at > $1 \
                 AND serial IN ({list}) ORDER BY created_at, id LIMIT $2"
            );
            let mut q = sqlx::query_as::<_, CommandRecord>(&sql)
                .bind(now)
                .bind(limit);
            for s in chunk {
                q = q.bind(s);
            }
            out.extend(
                q.fetch_all(self.pool())
                    .await
                    .map_err(query_err("reading pending commands"))?,
            );
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(out)
    }

    /// Claims a queued, unexpired command for delivery by `node`: true for exactly one caller.
    pub async fn claim_command(&self, id: &str, node: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE device_commands SET state = 'sending', node_id = $2, claimed_at = $3 \
             WHERE id = $1 AND state = 'queued' AND expires_at > $3",
        )
        .bind(id)
        .bind(node)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(query_err("claiming a command"))?;
        Ok(done.rows_affected() == 1)
    }

    /// The device PUBACKed a command `node` sent it.
    pub async fn command_delivered(&self, id: &str, node: &str, at: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE device_commands SET state = 'delivered', delivered_at = $3 \
             WHERE id = $1 AND node_id = $2 AND state = 'sending'",
        )
        .bind(id)
        .bind(node)
        .bind(at)
        .execute(self.pool())
        .await
        .map_err(query_err("recording a delivered command"))?;
        Ok(done.rows_affected() == 1)
    }

    /// A command `node` claimed did not reach the device (the session ended first): queued
    /// again for the device's next session.
    pub async fn release_command(&self, id: &str, node: &str) -> Result<bool> {
        let release = sqlx::query(
            "UPDATE device_commands SET state = 'queued', node_id = NULL, claimed_at = NULL \
             WHERE id = $1 AND node_id = $2 AND state = 'sending'",
        )
        .bind(id)
        .bind(node);
        Ok(self.requeue("releasing a command", release).await? == 1)
    }

    /// Commands claimed by `node` (an earlier run of it), or claimed by any node before
    /// `claimed_before` (a node that died holding them), queued again. Returns how many.
    pub async fn release_stale_commands(&self, node: &str, claimed_before: i64) -> Result<u64> {
        let release = sqlx::query(
            "UPDATE device_commands SET state = 'queued', node_id = NULL, claimed_at = NULL \
             WHERE state = 'sending' AND (node_id = $1 OR claimed_at < $2)",
        )
        .bind(node)
        .bind(claimed_before);
        self.requeue("releasing stale command claims", release)
            .await
    }

    /// Runs an UPDATE that queues commands again; on PostgreSQL, when it queued any, in one
    /// transaction with a wake-up: the device may be connected to another node by now.
    async fn requeue<'q>(
        &self,
        op: &'static str,
        update: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<u64> {
        if self.backend() != Backend::Postgres {
            let done = update.execute(self.pool()).await.map_err(query_err(op))?;
            return Ok(done.rows_affected());
        }
        let mut tx = self.pool().begin().await.map_err(query_err(op))?;
        let done = update.execute(&mut *tx).await.map_err(query_err(op))?;
        if done.rows_affected() > 0 {
            notify(self.backend(), &mut *tx, Wake::Commands).await?;
        }
        tx.commit().await.map_err(query_err(op))?;
        Ok(done.rows_affected())
    }

    /// Queued commands whose time to live has passed become `expired`. Returns how many.
    pub async fn expire_commands(&self, now: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE device_commands SET state = 'expired' WHERE state = 'queued' AND expires_at <= $1",
        )
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(query_err("expiring commands"))?;
        Ok(done.rows_affected())
    }
}
