//! The statements of one write transaction, sent with as few round trips as the backend allows.
//!
//! sqlx runs each SQLite connection on a worker thread of its own, so every statement is a
//! round trip to that thread and back (two thread wake-ups). A durable PUBACK commits small
//! batches — a few messages of a few devices — and there those trips cost more than SQLite's
//! own work. So on SQLite the statements of a transaction are gathered into one script
//! (`BEGIN IMMEDIATE; …; COMMIT`) that sqlx prepares and runs in one trip; a statement whose
//! result decides what follows ([`Writer::execute_now`], [`Writer::fetch_now`]) first sends
//! what has gathered. On PostgreSQL each statement runs when it is added, inside a
//! transaction (its extended protocol takes one statement per message).
//!
//! Statements are written with numbered `$N` parameters, as everywhere in the store. In a
//! SQLite script they become `$M`, M numbered from the start of the script: SQLite takes
//! `$M` as a named parameter (no unused slots before it, as `?M` would make), and sqlx binds
//! it to the script's M-th argument. Statements with
//! many parameters (a multi-row insert) use [`Writer::execute_positional`] instead: anonymous
//! `?`, bound in order — SQLite looks a numbered parameter's name up by a linear scan, which
//! is quadratic in a 1,400-parameter insert. sqlx binds anonymous parameters from an offset
//! that counts only anonymous ones, so they must come before any numbered one of the same
//! script; the writer sends what has gathered first when that order would break.
//! Not here: which statements a batch needs (that is `ingest.rs`).

use std::fmt::Write as _;

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::{Any, Arguments, Connection, Encode, Type};

use crate::{Backend, Result, SQLITE_BEGIN_WRITE, StoreError, query_err};

/// Scripts of at most this many statements stay prepared in ingest's statement cache (sqlx
/// keeps 100 per connection): the shapes that repeat under steady traffic, a few statements
/// per device in a batch. Larger shapes rarely repeat; at 256 the cache could hold 25,600
/// statements (about 6 MB) for good, at 32 it holds at most 3,200 (under 1 MB).
const CACHED_SCRIPT_STATEMENTS: usize = 32;

/// A script is sent once it holds this many statements. sqlx prepares every statement of a
/// script and keeps them until it has run: one batch of 3,000 connects was a script of 33,000
/// statements, 10 MB of SQLite memory at once (heaptrack), and the process kept the pages
/// after it was freed. A round trip per 256 statements costs nothing next to their work.
const SCRIPT_STATEMENTS_MAX: usize = 256;

/// Arguments of one statement, in the order of its `$1`, `$2`, … (or its `?`s).
pub(crate) struct Binds<'a, 'q> {
    args: &'a mut AnyArguments<'q>,
    added: usize,
    failed: &'a mut Option<BoxDynError>,
}

impl<'q> Binds<'_, 'q> {
    pub(crate) fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        if self.failed.is_none()
            && let Err(e) = self.args.add(value)
        {
            *self.failed = Some(e);
        }
        self.added += 1;
        self
    }
}

enum Conn<'c> {
    /// SQLite: the script gathered so far, its arguments, and what it does (for errors).
    Sqlite {
        conn: &'c mut sqlx::AnyConnection,
        sql: String,
        args: AnyArguments<'c>,
        used: usize,
        /// A numbered statement is in the script: positional ones must wait for the next.
        numbered: bool,
        /// Statements in the script (see [`SCRIPT_STATEMENTS_MAX`]).
        statements: usize,
        op: Option<&'static str>,
    },
    Postgres(sqlx::Transaction<'c, Any>),
}

/// One write transaction. Dropped without [`Writer::commit`]: on PostgreSQL rolled back; on
/// SQLite the caller closes the connection (see `Store::write_batch`).
pub(crate) struct Writer<'c> {
    conn: Conn<'c>,
}

impl<'c> Writer<'c> {
    pub(crate) async fn begin(
        conn: &'c mut sqlx::AnyConnection,
        backend: Backend,
        op: &'static str,
    ) -> Result<Writer<'c>> {
        let conn = match backend {
            Backend::Sqlite => {
                let mut sql = String::with_capacity(512);
                sql.push_str(SQLITE_BEGIN_WRITE);
                sql.push(';');
                Conn::Sqlite {
                    conn,
                    sql,
                    args: AnyArguments::default(),
                    used: 0,
                    numbered: false,
                    statements: 1,
                    op: None,
                }
            }
            Backend::Postgres => Conn::Postgres(conn.begin().await.map_err(query_err(op))?),
        };
        Ok(Writer { conn })
    }

    /// Adds a statement with numbered `$N` parameters; on PostgreSQL it runs now.
    pub(crate) async fn execute(
        &mut self,
        op: &'static str,
        sql: &str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<()> {
        self.add(op, sql, false, binds).await
    }

    /// Adds a statement with anonymous `?` parameters (on PostgreSQL give `$N` ones: the
    /// caller writes the SQL for its backend), bound in order.
    pub(crate) async fn execute_positional(
        &mut self,
        op: &'static str,
        sql: &str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<()> {
        self.add(op, sql, true, binds).await
    }

    async fn add(
        &mut self,
        op: &'static str,
        sql: &str,
        positional: bool,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<()> {
        match &mut self.conn {
            Conn::Sqlite { numbered, .. } if positional && *numbered => {
                self.send().await?;
            }
            Conn::Sqlite { .. } => {}
            Conn::Postgres(tx) => {
                let args = arguments(op, binds)?;
                sqlx::query_with(sql, args)
                    .execute(&mut **tx)
                    .await
                    .map_err(query_err(op))?;
                return Ok(());
            }
        }
        let Conn::Sqlite {
            sql: script,
            args,
            used,
            numbered,
            statements,
            op: first_op,
            ..
        } = &mut self.conn
        else {
            return Ok(());
        };
        let mut failed = None;
        let mut b = Binds {
            args,
            added: 0,
            failed: &mut failed,
        };
        binds(&mut b);
        let added = b.added;
        bind_failed(op, failed)?;
        if positional {
            script.push_str(sql);
        } else {
            renumber(sql, *used, script);
            *numbered = true;
        }
        script.push(';');
        *used += added;
        *statements += 1;
        first_op.get_or_insert(op);
        if *statements >= SCRIPT_STATEMENTS_MAX {
            self.send().await?;
        }
        Ok(())
    }

    /// Sends what has gathered, then runs this statement and returns the rows it changed.
    pub(crate) async fn execute_now(
        &mut self,
        op: &'static str,
        sql: &str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<u64> {
        let (conn, args) = self.alone(op, binds).await?;
        let done = match conn {
            Conn::Sqlite { conn, .. } => sqlx::query_with(sql, args).execute(&mut **conn).await,
            Conn::Postgres(tx) => sqlx::query_with(sql, args).execute(&mut **tx).await,
        }
        .map_err(query_err(op))?;
        Ok(done.rows_affected())
    }

    /// Sends what has gathered, then runs this query and returns its first row.
    pub(crate) async fn fetch_now(
        &mut self,
        op: &'static str,
        sql: &str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<Option<AnyRow>> {
        let (conn, args) = self.alone(op, binds).await?;
        match conn {
            Conn::Sqlite { conn, .. } => {
                sqlx::query_with(sql, args)
                    .fetch_optional(&mut **conn)
                    .await
            }
            Conn::Postgres(tx) => sqlx::query_with(sql, args).fetch_optional(&mut **tx).await,
        }
        .map_err(query_err(op))
    }

    /// What a statement that runs on its own needs: nothing gathered before it, its arguments.
    async fn alone(
        &mut self,
        op: &'static str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<(&mut Conn<'c>, AnyArguments<'c>)> {
        self.send().await?;
        let args = arguments(op, binds)?;
        Ok((&mut self.conn, args))
    }

    /// SQLite: runs the gathered script and starts an empty one (the transaction goes on).
    async fn send(&mut self) -> Result<()> {
        let Conn::Sqlite {
            conn,
            sql,
            args,
            used,
            numbered,
            statements,
            op,
        } = &mut self.conn
        else {
            return Ok(());
        };
        if sql.is_empty() {
            return Ok(());
        }
        let count = std::mem::take(statements);
        let script = std::mem::take(sql);
        let script_args = std::mem::take(args);
        let op = op.take().unwrap_or("starting an ingest transaction");
        *used = 0;
        *numbered = false;
        // Prepared once per shape of batch and kept in the connection's statement cache
        // (ingest has a connection of its own, so they push out no one else's) — but only
        // the small shapes of steady traffic. A connect storm makes scripts of thousands of
        // statements, each shape once; cached, a hundred of them held tens of MB of SQLite
        // memory for good (heaptrack: 2,000 idle devices, 85 MB of prepared statements).
        let result = sqlx::query_with(&script, script_args)
            .persistent(count <= CACHED_SCRIPT_STATEMENTS)
            .execute(&mut **conn)
            .await;
        *sql = script;
        sql.clear();
        result.map(drop).map_err(query_err(op))
    }

    /// Ends the transaction: everything in it is written, or none of it.
    pub(crate) async fn commit(mut self, op: &'static str) -> Result<()> {
        if let Conn::Sqlite { sql, op: first, .. } = &mut self.conn {
            sql.push_str("COMMIT;");
            first.get_or_insert(op);
        }
        self.send().await?;
        match self.conn {
            Conn::Sqlite { .. } => Ok(()),
            Conn::Postgres(tx) => tx.commit().await.map_err(query_err(op)),
        }
    }
}

/// The arguments of one statement on its own.
fn arguments<'q>(
    op: &'static str,
    binds: impl for<'a> FnOnce(&mut Binds<'a, 'q>),
) -> Result<AnyArguments<'q>> {
    let mut args = AnyArguments::default();
    let mut failed = None;
    binds(&mut Binds {
        args: &mut args,
        added: 0,
        failed: &mut failed,
    });
    bind_failed(op, failed)?;
    Ok(args)
}

fn bind_failed(op: &'static str, failed: Option<BoxDynError>) -> Result<()> {
    match failed {
        None => Ok(()),
        Some(e) => Err(StoreError::Query {
            op,
            source: sqlx::Error::Encode(e),
        }),
    }
}

/// Appends `sql` to `out` with each `$N` written as `$M`, M = N + `offset`.
fn renumber(sql: &str, offset: usize, out: &mut String) {
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => {
                let _ = write!(out, "${}", n + offset);
            }
            Err(_) => out.push('$'),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::renumber;

    #[test]
    fn parameters_are_numbered_from_the_start_of_the_script() {
        let mut out = String::new();
        renumber("UPDATE t SET a = $1 WHERE b = $2 AND a < $1", 7, &mut out);
        assert_eq!(out, "UPDATE t SET a = $8 WHERE b = $9 AND a < $8");
        out.clear();
        renumber("SELECT '$' || $10", 0, &mut out);
        assert_eq!(out, "SELECT '$' || $10");
    }
}
