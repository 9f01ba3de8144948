//! Store faults through the real binary while devices publish QoS 1 (issue #12, "store faults
//! are survived, told and recovered"): a SQLite database locked by an outside process and a
//! PostgreSQL cut off mid-flood. While the fault lasts no PUBACK leaves, `/readyz` answers 503
//! naming it and `tms_store_write_failing` is 1; when it ends writes resume by themselves and
//! every PUBACKed message is stored. And quarantined payloads do not stay past the retention.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::flood::*;
use support::proxy::Proxy;
use support::*;

/// The sum of PUBACKed messages over `floods`.
fn total_acked(floods: &[(Arc<std::sync::Mutex<Tracker>>, tokio::task::JoinHandle<()>)]) -> usize {
    floods.iter().map(|(t, _)| acked(t).len()).sum()
}

/// One device publishing QoS 1 every 2 ms until `stop`, once its first 100 are PUBACKed.
async fn flooding(
    gw: &TestGateway,
    files: &DeviceFiles,
    stop: &Arc<AtomicBool>,
) -> Vec<(Arc<std::sync::Mutex<Tracker>>, tokio::task::JoinHandle<()>)> {
    let floods = vec![flood(
        gw,
        files,
        stop.clone(),
        1_000_000,
        Duration::from_millis(2),
    )];
    wait_for("first PUBACKs", Duration::from_secs(20), || {
        let n = total_acked(&floods);
        async move { (n >= 100).then_some(()) }
    })
    .await;
    floods
}

async fn write_failing(gw: &TestGateway) -> Option<f64> {
    scrape(gw).await.get("tms_store_write_failing").copied()
}

/// Another process (python3's sqlite3, as an operator's script or a backup tool would) holds
/// the write lock of `tms.db` for longer than ingest waits for it (its connection's busy
/// timeout is 1 s, `store/src/lite.rs` BUSY_TIMEOUT), while a device publishes QoS 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_locked_from_outside_withholds_pubacks_and_writes_resume_after() {
    const HOLD_SECS: u64 = 5;
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4X000001", "00:1B:2C:3D:7E:01");
    let stop = Arc::new(AtomicBool::new(false));
    let floods = flooding(&gw, &files, &stop).await;

    let script = "import sqlite3, sys, time\n\
        c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)\n\
        c.execute('BEGIN EXCLUSIVE')\n\
        print('locked', flush=True)\n\
        time.sleep(float(sys.argv[2]))\n\
        c.execute('ROLLBACK')\n\
        print('released', flush=True)\n";
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(gw.data_dir().join("tms.db"))
        .arg(HOLD_SECS.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is needed (scripts/test installs it): {e}"));
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let locked_at = Instant::now();

    // Told: /readyz names the fault, the metric says so.
    let (_, body) = wait_for("/readyz 503 locked", Duration::from_secs(4), || async {
        let (status, body) = readyz(&gw).await;
        (status == 503 && body["store_fault"] == "locked").then_some((status, body))
    })
    .await;
    assert_eq!(body["store"], false);
    assert_eq!(write_failing(&gw).await, Some(1.0));
    // And nothing is acknowledged while the lock is held.
    let at_fault = total_acked(&floods);
    while locked_at.elapsed() < Duration::from_secs(HOLD_SECS - 1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = total_acked(&floods);
    assert!(
        during <= at_fault + 10,
        "PUBACKs went on with the database locked: {at_fault} -> {during}"
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "released", "the lock was held throughout");
    assert!(holder.wait().unwrap().success());

    // Released: writes resume by themselves, no "database is locked" left behind.
    wait_for("/readyz 200 again", Duration::from_secs(15), || async {
        (readyz(&gw).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(write_failing(&gw).await, Some(0.0));
    wait_for("PUBACKs again", Duration::from_secs(15), || {
        let n = total_acked(&floods);
        async move { (n >= during + 200).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("the store cannot take writes") && l.contains("locked")),
        "the fault is logged once with its cause:\n{log}"
    );
    assert!(log.contains("the store takes writes again"), "{log}");
    let store = gw.store().await;
    let acked = acked(&floods[0].0);
    assert_all_stored(
        &acked,
        &stored_seqs_in(&store, &files.serial).await,
        "locked",
    );
}

/// PostgreSQL cut off for 5 s in the middle of a QoS 1 flood from three devices, then back:
/// `/readyz` is 503 during the cut, PUBACKs stop, and afterwards every message that was
/// PUBACKed (tracked per packet id) is in the database. Needs `TMS_TEST_DATABASE_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_during_a_qos1_flood_loses_nothing_acknowledged() {
    const CUT: Duration = Duration::from_secs(5);
    let Some(url) = fresh_postgres_url("cut_flood").await else {
        return;
    };
    // postgres://user@HOST:PORT/db?… -> the same through the proxy.
    let at = url.find('@').unwrap() + 1;
    let end = at + url[at..].find('/').unwrap();
    let upstream = url[at..end].to_owned();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream.clone()).await;
    let proxied = format!("{}{}{}", &url[..at], proxy.addr, &url[end..]);
    let gw = TestGateway::start_with(&[("TMS_DATABASE_URL", &proxied)]).await;
    let devices: Vec<_> = (0..3)
        .map(|i| gw.provision(&format!("RE4Y00000{i}"), &format!("00:1B:2C:3D:7F:0{i}")))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let floods: Vec<_> = devices
        .iter()
        .map(|d| flood(&gw, d, stop.clone(), 1_000_000, Duration::from_millis(1)))
        .collect();
    wait_for(
        "300 PUBACKs before the cut",
        Duration::from_secs(30),
        || {
            let n = total_acked(&floods);
            async move { (n >= 300).then_some(()) }
        },
    )
    .await;

    proxy.cut.cancel();
    let cut_at = Instant::now();
    let (_, body) = wait_for("/readyz 503 with the store cut", CUT, || async {
        let (status, body) = readyz(&gw).await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(body["store"], false, "{body}");
    // The PUBACKs of commits that were under way at the cut may still arrive; then none.
    let settled = total_acked(&floods);
    while cut_at.elapsed() < CUT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = total_acked(&floods);
    assert!(
        during <= settled + 10,
        "PUBACKs went on with PostgreSQL cut off: {settled} -> {during}"
    );
    assert_eq!(write_failing(&gw).await, Some(1.0), "{body}");

    let _back = Proxy::start(proxy.addr, upstream).await;
    wait_for("/readyz 200 again", Duration::from_secs(30), || async {
        (readyz(&gw).await.0 == 200).then_some(())
    })
    .await;
    wait_for("PUBACKs again", Duration::from_secs(30), || {
        let n = total_acked(&floods);
        async move { (n >= during + 300).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let store = tms_store::Store::open(&url).await.unwrap();
    let mut total = 0;
    for (d, (t, _)) in devices.iter().zip(&floods) {
        let acked = acked(t);
        total += acked.len();
        let stored = stored_seqs_in(&store, &d.serial).await;
        assert_all_stored(&acked, &stored, &format!("PostgreSQL cut, {}", d.serial));
    }
    eprintln!("PostgreSQL cut for {CUT:?}: {total} PUBACKed, all stored");
}

/// Quarantined payloads are kept for inspection, not for ever: those received before
/// `presence.history_retention_days` are deleted by the gateway's housekeeping (at start,
/// then hourly); newer ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_payloads_past_the_retention_are_pruned() {
    let mut gw = TestGateway::start_with(&[("TMS_PRESENCE_HISTORY_RETENTION_DAYS", "1")]).await;
    let files = gw.provision("RE4Q000009", "00:1B:2C:3D:7D:09");
    let (client, mut el) = device_client(&gw, &files);
    connack(&mut el).await.unwrap();
    let events = drive(el);
    for i in 0..3 {
        publish(
            &client,
            &files.serial,
            "telemetry",
            &format!("not json {i}"),
        )
        .await;
    }
    let store = gw.store().await;
    wait_for(
        "3 quarantined payloads",
        Duration::from_secs(15),
        || async { (store.quarantined(&files.serial, 10).await.unwrap().len() == 3).then_some(()) },
    )
    .await;
    events.abort();
    drop(client);
    assert_eq!(gw.stop(), Some(0), "{}", gw.log());

    // Two of them came two days ago.
    let day = 86_400_000;
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        gw.data_dir().join("tms.db").display()
    ))
    .await
    .unwrap();
    let aged = sqlx::query(
        "UPDATE quarantine SET received_at = received_at - ? \
         WHERE serial = ? AND CAST(payload AS TEXT) <> 'not json 2'",
    )
    .bind(2 * day)
    .bind(&files.serial)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(aged.rows_affected(), 2);
    pool.close().await;

    gw.restart().await;
    let store = gw.store().await;
    let left = wait_for(
        "the old quarantine rows pruned",
        Duration::from_secs(15),
        || async {
            let q = store.quarantined(&files.serial, 10).await.unwrap();
            (q.len() == 1).then_some(q)
        },
    )
    .await;
    assert_eq!(left[0].2, b"not json 2", "the recent one stays");
    assert!(
        gw.log()
            .lines()
            .any(|l| l.contains("pruned quarantined payloads") && l.contains("payloads=2")),
        "{}",
        gw.log()
    );
}

/// Runs `sql` on PostgreSQL as the test's own superuser connection.
async fn pg(base: &str, sql: &str) {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::AnyConnection::connect(base).await.unwrap();
    conn.execute(sql).await.unwrap();
}

/// PostgreSQL turned read-only under the gateway, as after a failover to a standby: the role
/// the gateway logs in as gets `default_transaction_read_only` and its sessions are ended, so
/// every new one refuses writes (SQLSTATE 25006). While that lasts no PUBACK leaves, `/readyz`
/// answers 503 with `store_fault` `read_only`, and the metric is 1; when writes are allowed
/// again (and the sessions renewed) they resume by themselves and every PUBACKed message is
/// stored. Needs `TMS_TEST_DATABASE_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_turned_read_only_withholds_pubacks_and_writes_resume_after() {
    let Some(url) = fresh_postgres_url("read_only").await else {
        return;
    };
    let base = std::env::var("TMS_TEST_DATABASE_URL").unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let role = format!("tms_ro_{}_{nanos}", std::process::id());
    pg(&base, &format!("CREATE ROLE {role} LOGIN SUPERUSER")).await;
    // postgres://USER@… -> postgres://ROLE@…
    let scheme = url.find("://").unwrap() + 3;
    let at = url.find('@').unwrap();
    let as_role = format!("{}{role}{}", &url[..scheme], &url[at..]);
    let end_sessions =
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'");
    let gw = TestGateway::start_with(&[("TMS_DATABASE_URL", &as_role)]).await;
    let files = gw.provision("RE4R000001", "00:1B:2C:3D:7D:01");
    let stop = Arc::new(AtomicBool::new(false));
    let floods = flooding(&gw, &files, &stop).await;

    pg(
        &base,
        &format!("ALTER ROLE {role} SET default_transaction_read_only = on"),
    )
    .await;
    pg(&base, &end_sessions).await;
    let (_, body) = wait_for("/readyz 503 read_only", Duration::from_secs(15), || async {
        let (status, body) = readyz(&gw).await;
        (status == 503 && body["store_fault"] == "read_only").then_some((status, body))
    })
    .await;
    assert_eq!(body["store"], false, "{body}");
    assert_eq!(write_failing(&gw).await, Some(1.0));
    let at_fault = total_acked(&floods);
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = total_acked(&floods);
    assert!(
        during <= at_fault + 10,
        "PUBACKs went on with PostgreSQL read-only: {at_fault} -> {during}"
    );

    pg(
        &base,
        &format!("ALTER ROLE {role} RESET default_transaction_read_only"),
    )
    .await;
    pg(&base, &end_sessions).await;
    wait_for("/readyz 200 again", Duration::from_secs(30), || async {
        (readyz(&gw).await.0 == 200).then_some(())
    })
    .await;
    wait_for("PUBACKs again", Duration::from_secs(30), || {
        let n = total_acked(&floods);
        async move { (n >= during + 200).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot take writes") && l.contains("read_only")),
        "the fault is logged with its cause:\n{log}"
    );
    let store = tms_store::Store::open(&url).await.unwrap();
    let acked = acked(&floods[0].0);
    assert_all_stored(
        &acked,
        &stored_seqs_in(&store, &files.serial).await,
        "read-only",
    );
    eprintln!("PostgreSQL read-only: {} PUBACKed, all stored", acked.len());
    drop(store);
    drop(gw);
    pg(&base, &format!("DROP OWNED BY {role}")).await;
    pg(&base, &format!("DROP ROLE {role}")).await;
}
