//! The HTTP edge against careless and hostile clients: a strict page policy, secrets at rest,
//! control characters and multi-byte MACs refused by name, slow clients cut off without
//! crowding out devices, and every error in the JSON error shape.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use rumqttc::ConnectReturnCode;
use serde_json::{Value, json};
use support::onboarding::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_are_served_with_a_strict_policy_and_no_cookie() {
    let gw = TestGateway::start().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let root = http.get(gw.url("/")).send().await.unwrap();
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()["location"], "/devices");
    for page in [
        "/login",
        "/activate?token=x",
        "/profile",
        "/register",
        "/devices",
        "/devices/RE4A000123",
        "/certificates",
        "/map",
    ] {
        let res = http.get(gw.url(page)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{page}");
        let h = res.headers().clone();
        assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert_eq!(h["referrer-policy"], "no-referrer", "{page}");
        assert!(h.get("set-cookie").is_none(), "{page} sets a cookie");
        // A page is a shell: no device data without the API (and its bearer token).
        let body = res.text().await.unwrap();
        assert!(body.contains("<main id=\"main\""), "{page}");
        assert!(body.contains("/assets/app.js?v="), "{page}");
    }
    let js = http.get(gw.url("/assets/app.js")).send().await.unwrap();
    assert_eq!(js.status(), StatusCode::OK);
    let etag = js.headers()["etag"].clone();
    let again = http
        .get(gw.url("/assets/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let map = http
        .get(gw.url("/assets/countries-110m.json"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(map["type"], "Topology");
    let missing = http.get(gw.url("/assets/nope.js")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

/// Permission bits of a file or directory.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_at_rest_are_private_and_delivered_mails_forget_their_text() {
    use sqlx::Row;
    // A umask that leaves new files world-readable, as most shells and services have.
    let gw = TestGateway::start_with_umask("022", &[]).await;
    let api = Api::new();
    provider(&gw);
    let provider_token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    let email = "ana@example.com";
    let (status, body) = api
        .register(
            &gw,
            Some(&provider_token),
            registration("RE4A000070", "00:1B:2C:3D:4E:70", email, "Acme"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (activation, password) = emails_for(&gw, email).await;

    // Delivered: the queue keeps recipient, subject and time, not the text.
    sqlx::any::install_default_drivers();
    let db = gw.data_dir().join("tms.db");
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let rows = wait_for("both mails marked sent", Duration::from_secs(10), || {
        let conn = &pool;
        async move {
            let rows = sqlx::query(
                "SELECT recipient, subject, message, sent_at FROM mail_queue WHERE recipient = $1",
            )
            .bind(email)
            .fetch_all(conn)
            .await
            .unwrap();
            let sent = rows
                .iter()
                .filter(|r| r.get::<Option<i64>, _>("sent_at").is_some())
                .count();
            (rows.len() == 2 && sent == 2).then_some(rows)
        }
    })
    .await;
    let mut subjects: Vec<String> = rows.iter().map(|r| r.get("subject")).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Activate your UPS monitoring account",
            "Your temporary password"
        ]
    );
    for row in &rows {
        let message: String = row.get("message");
        assert_eq!(message, "", "a delivered mail kept its text");
    }
    let anywhere: Vec<String> = sqlx::query("SELECT message FROM mail_queue")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("message"))
        .collect();
    assert!(
        !anywhere
            .iter()
            .any(|m| m.contains(&password) || m.contains(&activation)),
        "the temporary password or the activation token is still in mail_queue"
    );
    pool.close().await;

    // Files: private whatever the umask.
    let data = gw.data_dir();
    for dir in ["", "ca", "server", "outbox"] {
        assert_eq!(mode(&data.join(dir)), 0o700, "{dir:?}");
    }
    for file in [
        "tms.db",
        "tms.db-wal",
        "tms.db-shm",
        "ca/ca.key",
        "server/server.key",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    let mails: Vec<_> = std::fs::read_dir(data.join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(mails.len(), 2, "{mails:?}");
    for mail in &mails {
        assert_eq!(mode(mail), 0o600, "{}", mail.display());
    }
}

/// Issue #12 row 1: a NUL (or another control character) in a registration field, a query or
/// a login email is refused by name before it reaches the store — on PostgreSQL too, which
/// cannot hold a NUL in text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_refused_by_name_before_the_store() {
    let mut backends = vec![None];
    if let Some(url) = fresh_postgres_url("nul").await {
        backends.push(Some(url));
    }
    for url in backends {
        let extra: Vec<(&str, &str)> = url
            .as_deref()
            .map(|u| vec![("TMS_DATABASE_URL", u)])
            .unwrap_or_default();
        let gw = TestGateway::start_with(&extra).await;
        let backend = if url.is_some() { "postgres" } else { "sqlite" };
        let api = Api::new();
        provider(&gw);
        let token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
        for (field, path) in [
            ("user.new.first_name", &["user", "new", "first_name"][..]),
            ("user.new.email", &["user", "new", "email"][..]),
            ("company.new.name", &["company", "new", "name"][..]),
            ("ups.serial", &["ups", "serial"][..]),
            ("sales_order", &["sales_order"][..]),
        ] {
            let mut body =
                registration("RE4ANUL1", "00:1B:2C:3D:4E:70", "nul@example.com", "Nul Co");
            let mut slot = &mut body;
            for key in path {
                slot = &mut slot[*key];
            }
            *slot = json!("Ana\u{0}Ruiz@example.com");
            let (status, answer) = api.register(&gw, Some(&token), body).await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{backend} {field}: {answer}"
            );
            assert_eq!(answer["error"]["code"], "validation_failed", "{answer}");
            assert!(
                answer["error"]["fields"][field].is_string(),
                "{backend}: {field} not named in {answer}"
            );
        }
        // A tab or an escape sequence has no place in a one-line field either.
        let mut body = registration("RE4ANUL1", "00:1B:2C:3D:4E:70", "nul@example.com", "Nul Co");
        body["user"]["new"]["last_name"] = json!("Ruiz\u{1b}[2J");
        let (status, answer) = api.register(&gw, Some(&token), body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert!(
            answer["error"]["fields"]["user.new.last_name"].is_string(),
            "{answer}"
        );

        let (status, answer) = api
            .call(
                "GET",
                gw.url("/api/v1/devices?q=RE4A%00"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{backend}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request");
        assert!(answer["error"]["fields"]["q"].is_string(), "{answer}");

        let (status, answer) = api.login(&gw, "provider\u{0}@example.com", "x").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{backend}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_credentials");

        // Nothing was stored, and the store still answers.
        let (status, devices) = api
            .call("GET", gw.url("/api/v1/devices"), Some(&token), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(devices, json!([]), "{backend}");
        assert!(!gw.log().contains("22021"), "{backend}: {}", gw.log());
    }
}

/// Issue #12 row 11: a MAC holding a multi-byte character is a 422 naming `device.mac`, not a
/// handler panic; the CLI says so and exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mac_with_a_multibyte_character_is_refused_not_a_panic() {
    let (gw, api, token) = provider_gateway().await;
    for mac in ["0é123456789", "00:1B:2C:3D:4E:5é", "é0:1B:2C:3D:4E:5"] {
        let (status, answer) = api
            .register(
                &gw,
                Some(&token),
                registration("RE4AMAC1", mac, "mac@example.com", "Mac Co"),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{mac}: {answer}");
        assert!(
            answer["error"]["fields"]["device.mac"]
                .as_str()
                .is_some_and(|m| m.contains("hex digits")),
            "{answer}"
        );
    }
    let out = gw.cli_output(&[
        "device",
        "add",
        "--serial",
        "RE4AMAC2",
        "--mac",
        "0é123456789",
        "--company",
        "Mac Co",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("MAC address"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Issue #12 row 10: clients that trickle header lines are cut off after
/// `http.header_timeout_secs`; beyond `http.max_connections` connections wait unaccepted, so
/// they hold no descriptor of the gateway and a device still connects over MQTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_cut_off_and_cannot_crowd_out_devices() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start_with(&[
        ("TMS_HTTP_MAX_CONNECTIONS", "8"),
        ("TMS_HTTP_HEADER_TIMEOUT_SECS", "2"),
        ("TMS_HTTP_REQUEST_TIMEOUT_SECS", "2"),
    ])
    .await;
    let files = gw.provision("RE4ASLOW1", "00:1B:2C:3D:4E:71");
    let pid = gw.pid();
    let fds_before = open_fds(pid);
    let started = std::time::Instant::now();
    let slow: Vec<_> = (0..40)
        .map(|_| {
            let addr = gw.ports.http;
            tokio::spawn(async move {
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
                let mut buf = [0u8; 256];
                loop {
                    // One more header line every 300 ms, never the blank line that ends them.
                    match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await
                    {
                        Ok(Ok(0) | Err(_)) => return started.elapsed(),
                        Ok(Ok(_)) => {}
                        Err(_) => {
                            if tcp.write_all(b"X-Slow: 1\r\n").await.is_err() {
                                return started.elapsed();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_during = open_fds(pid);
    assert!(
        fds_during <= fds_before + 8 + 4,
        "40 slow clients took {} descriptors (cap 8)",
        fds_during - fds_before
    );
    let (_client, mut eventloop) = device_client(&gw, &files);
    assert_eq!(
        connack(&mut eventloop).await,
        Ok(ConnectReturnCode::Success),
        "a device connects while HTTP is flooded"
    );
    let mut closed_after = Vec::new();
    for s in slow {
        let after = tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("a slow client was never cut off")
            .unwrap();
        closed_after.push(after);
    }
    closed_after.sort();
    eprintln!(
        "descriptors {fds_before} -> {fds_during} with 40 slow clients; cut off after {:?} .. {:?}",
        closed_after[0],
        closed_after[closed_after.len() - 1]
    );
    assert!(
        closed_after[0] < Duration::from_secs(4),
        "the first slow clients are cut off after the 2 s header timeout: {closed_after:?}"
    );

    // A body that never comes: 408 in the JSON shape after the request timeout.
    let mut tcp = tokio::net::TcpStream::connect(gw.ports.http).await.unwrap();
    tcp.write_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("answered within the request timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");

    let health = reqwest::get(gw.url("/healthz")).await.unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "served again once they are gone"
    );
}

/// Issue #12 row 16: the answers axum makes by itself — 413, 405, 400 for a bad query, 404 —
/// are in the JSON error shape like every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_in_the_json_error_shape() {
    let gw = TestGateway::start().await;
    let token = admin_token(&gw).await;
    let http = reqwest::Client::new();
    let check = |resp: reqwest::Response, status: StatusCode, code: &'static str| async move {
        assert_eq!(resp.status(), status);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    };
    let big = format!(
        r#"{{"email": "a@example.com", "password": "{}"}}"#,
        "x".repeat(100_000)
    );
    let resp = http
        .post(gw.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    check(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let resp = http.delete(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "GET,HEAD", "Allow kept");
    check(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    // The message names the methods the route takes, not only the header.
    let resp = http
        .patch(gw.url("/api/v1/auth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "POST");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("allowed: POST")),
        "{body}"
    );

    let resp = http
        .get(gw.url("/api/v1/devices?q=a&q=b"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    check(resp, StatusCode::BAD_REQUEST, "bad_request").await;

    let resp = http.get(gw.url("/no/such/route")).send().await.unwrap();
    check(resp, StatusCode::NOT_FOUND, "not_found").await;

    let resp = http
        .post(gw.url("/api/v1/auth/login"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    check(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}
