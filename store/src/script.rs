//! The statements of one write transaction, on the backend's connection.
//!
//! On SQLite ingest writes through a rusqlite connection of its own ([`crate::lite`]): each
//! statement is prepared once (the connection's statement cache), bound and stepped where
//! ingest runs, with no thread in between. On PostgreSQL each statement runs when it is
//! added, inside a transaction (its extended protocol takes one statement per message).
//!
//! Statements are written with numbered `$N` parameters, as everywhere in the store. SQLite
//! takes `$N` as a named parameter, numbered in order of first appearance, so for rusqlite
//! they are written `?N`, which is bound at N (by index: looking a name up is a linear scan,
//! quadratic in a 1,400-parameter insert). A multi-row insert uses
//! [`Writer::execute_positional`]: anonymous `?` on SQLite, numbered `$N` on PostgreSQL, as
//! the caller writes them. Not here: which statements a batch needs (that is `ingest.rs`).

use std::fmt::Write as _;

use sqlx::any::AnyArguments;
use sqlx::error::BoxDynError;
use sqlx::{Any, Arguments, Connection, Encode, Type};

use crate::{Result, SQLITE_BEGIN_WRITE, StoreError, lite, query_err};

/// The connection ingest writes through, kept from batch to batch (see `Store::write_batch`).
pub(crate) enum IngestConn {
    Sqlite(rusqlite::Connection),
    Postgres(sqlx::AnyConnection),
}

/// Arguments of one statement, in the order of its `$1`, `$2`, … (or its `?`s).
pub(crate) struct Binds<'a, 'q> {
    to: To<'a, 'q>,
    added: usize,
    failed: &'a mut Option<BoxDynError>,
}

/// Where a statement's arguments go.
enum To<'a, 'q> {
    /// PostgreSQL: sqlx's arguments, sent with the statement.
    Any(&'a mut AnyArguments<'q>),
    /// SQLite: bound into the prepared statement at once.
    Sqlite(&'a mut (dyn BindAt + 'a)),
}

/// A prepared SQLite statement, whatever the lifetime of its connection's borrow.
trait BindAt {
    fn bind_at(&mut self, index: usize, value: &dyn rusqlite::ToSql) -> rusqlite::Result<()>;
}

impl BindAt for rusqlite::Statement<'_> {
    fn bind_at(&mut self, index: usize, value: &dyn rusqlite::ToSql) -> rusqlite::Result<()> {
        self.raw_bind_parameter(index, value)
    }
}

impl<'q> Binds<'_, 'q> {
    pub(crate) fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any> + rusqlite::ToSql,
    {
        if self.failed.is_none() {
            let bound = match &mut self.to {
                To::Any(args) => args.add(value),
                To::Sqlite(statement) => statement
                    .bind_at(self.added + 1, &value)
                    .map_err(|e| Box::new(e) as BoxDynError),
            };
            if let Err(e) = bound {
                *self.failed = Some(e);
            }
        }
        self.added += 1;
        self
    }
}

enum Conn<'c> {
    /// A `&mut`: ingest's future holds it across awaits, and a connection is `Send`, not
    /// `Sync`.
    Sqlite(&'c mut rusqlite::Connection),
    Postgres(sqlx::Transaction<'c, Any>),
}

/// One write transaction. Dropped without [`Writer::commit`]: on PostgreSQL rolled back; on
/// SQLite the caller closes the connection, which rolls it back (see `Store::write_batch`).
pub(crate) struct Writer<'c> {
    conn: Conn<'c>,
}

impl<'c> Writer<'c> {
    pub(crate) async fn begin(conn: &'c mut IngestConn, op: &'static str) -> Result<Writer<'c>> {
        let conn = match conn {
            IngestConn::Sqlite(conn) => {
                sqlite_run(conn, op, SQLITE_BEGIN_WRITE, |_| {})?;
                Conn::Sqlite(conn)
            }
            IngestConn::Postgres(conn) => {
                Conn::Postgres(conn.begin().await.map_err(query_err(op))?)
            }
        };
        Ok(Writer { conn })
    }

    /// Runs a statement with numbered `$N` parameters.
    pub(crate) async fn execute(
        &mut self,
        op: &'static str,
        sql: &'static str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<()> {
        self.execute_now(op, sql, binds).await.map(drop)
    }

    /// Runs a statement with anonymous `?` parameters (on PostgreSQL give `$N` ones: the
    /// caller writes the SQL for its backend), bound in order.
    pub(crate) async fn execute_positional(
        &mut self,
        op: &'static str,
        sql: &str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<()> {
        match &mut self.conn {
            Conn::Sqlite(conn) => sqlite_run(conn, op, sql, binds).map(drop),
            Conn::Postgres(tx) => postgres_run(tx, op, sql, binds).await.map(drop),
        }
    }

    /// Runs a statement with numbered `$N` parameters and returns the rows it changed.
    pub(crate) async fn execute_now(
        &mut self,
        op: &'static str,
        sql: &'static str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<u64> {
        match &mut self.conn {
            Conn::Sqlite(conn) => sqlite_run(conn, op, numbered_once(sql), binds),
            Conn::Postgres(tx) => postgres_run(tx, op, sql, binds).await,
        }
    }

    /// Runs a query with numbered `$N` parameters: whether it returns a row.
    pub(crate) async fn exists_now(
        &mut self,
        op: &'static str,
        sql: &'static str,
        binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
    ) -> Result<bool> {
        match &mut self.conn {
            Conn::Sqlite(conn) => {
                let mut statement = conn
                    .prepare_cached(numbered_once(sql))
                    .map_err(lite::error(op))?;
                bind_sqlite(&mut statement, op, binds)?;
                let mut rows = statement.raw_query();
                let found = rows.next().map_err(lite::error(op))?.is_some();
                Ok(found)
            }
            Conn::Postgres(tx) => {
                let args = arguments(op, binds)?;
                let row = sqlx::query_with(sql, args)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(query_err(op))?;
                Ok(row.is_some())
            }
        }
    }

    /// Ends the transaction: everything in it is written, or none of it.
    pub(crate) async fn commit(self, op: &'static str) -> Result<()> {
        match self.conn {
            Conn::Sqlite(conn) => sqlite_run(conn, op, "COMMIT", |_| {}).map(drop),
            Conn::Postgres(tx) => tx.commit().await.map_err(query_err(op)),
        }
    }
}

/// Prepares (or finds prepared) `sql`, binds its arguments and steps it to the end: the rows
/// it changed.
fn sqlite_run<'c>(
    conn: &mut rusqlite::Connection,
    op: &'static str,
    sql: &str,
    binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
) -> Result<u64> {
    let mut statement = conn.prepare_cached(sql).map_err(lite::error(op))?;
    bind_sqlite(&mut statement, op, binds)?;
    let changed = statement.raw_execute().map_err(lite::error(op))?;
    Ok(changed as u64)
}

fn bind_sqlite<'c>(
    statement: &mut rusqlite::Statement<'_>,
    op: &'static str,
    binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
) -> Result<()> {
    let mut failed = None;
    binds(&mut Binds {
        to: To::Sqlite(statement),
        added: 0,
        failed: &mut failed,
    });
    bind_failed(op, failed)
}

async fn postgres_run<'c>(
    tx: &mut sqlx::Transaction<'c, Any>,
    op: &'static str,
    sql: &str,
    binds: impl for<'a> FnOnce(&mut Binds<'a, 'c>),
) -> Result<u64> {
    let args = arguments(op, binds)?;
    let done = sqlx::query_with(sql, args)
        .execute(&mut **tx)
        .await
        .map_err(query_err(op))?;
    Ok(done.rows_affected())
}

/// The arguments of one statement for sqlx.
fn arguments<'q>(
    op: &'static str,
    binds: impl for<'a> FnOnce(&mut Binds<'a, 'q>),
) -> Result<AnyArguments<'q>> {
    let mut args = AnyArguments::default();
    let mut failed = None;
    binds(&mut Binds {
        to: To::Any(&mut args),
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

/// [`numbered`], worked out once per statement: a batch runs the same few statements each
/// commit, and rewriting one (a scan and a `write!` per parameter) cost as much as stepping it.
/// Statements are `'static` text, so the cache holds one entry per statement in the program.
fn numbered_once(sql: &'static str) -> &'static str {
    static CACHE: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<(usize, usize), &'static str>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cache
        .entry((sql.as_ptr() as usize, sql.len()))
        .or_insert_with(|| Box::leak(numbered(sql).into_boxed_str()))
}

/// `sql` with each `$N` written as `?N`: SQLite binds `?N` at N, a `$N` at the place of its
/// first appearance.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => {
                let _ = write!(out, "?{n}");
            }
            Err(_) => out.push('$'),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn numbered_parameters_are_bound_by_number_on_sqlite() {
        assert_eq!(
            numbered("UPDATE t SET a = $2 WHERE b = $1 AND a < $2"),
            "UPDATE t SET a = ?2 WHERE b = ?1 AND a < ?2"
        );
        assert_eq!(numbered("SELECT '$' || $10"), "SELECT '$' || ?10");
    }
}
