//! Accounts over HTTP: mail over a real SMTP server with retries, the login lockout (raced
//! too), lease-end notices, and a login flood that stays bounded in memory.

mod support;

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::onboarding::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_go_over_smtp_and_a_failed_delivery_is_retried() {
    // An SMTP port with nobody listening yet: the registration must still succeed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let smtp_url = format!("smtp://127.0.0.1:{port}");
    let gw = TestGateway::start_with(&[
        ("TMS_MAIL_SMTP_URL", &smtp_url),
        ("TMS_MAIL_RETRY_BASE_SECS", "1"),
    ])
    .await;
    let api = Api::new();
    provider(&gw);
    let token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    let (status, body) = api
        .register(
            &gw,
            Some(&token),
            registration("RE4A000060", "00:1B:2C:3D:4E:60", "ana@example.com", "Acme"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let maildir = gw.dir.path().join("maildir");
    let mut server = Command::new("python3")
        .args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Mailbox",
        ])
        .arg(&maildir)
        .spawn()
        .expect("python3 with aiosmtpd (scripts/test installs it)");
    let received = wait_for("two emails over SMTP", Duration::from_secs(30), || {
        let files: Vec<String> = std::fs::read_dir(maildir.join("new"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        async move { (files.len() == 2).then_some(files) }
    })
    .await;
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(received.iter().any(|m| m.contains("/activate?token=")));
    assert!(received.iter().any(|m| m.contains("Temporary password: ")));
    assert!(received.iter().all(|m| m.contains("ana@example.com")));
    assert!(
        gw.outbox().is_empty(),
        "with SMTP configured nothing goes to the outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_lock_the_account_and_tokens_end_with_logout() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    for _ in 0..5 {
        let (status, _) = api.login(&gw, PROVIDER, "wrong password").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = api.login(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "locked even with the right password: {body}"
    );
    // An unknown account answers exactly like a wrong password.
    let (status, body) = api.login(&gw, "nobody@example.com", "whatever").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_credentials");

    let admin = "admin@example.com";
    gw.cli_stdin(
        &[
            "user",
            "add",
            "--email",
            admin,
            "--role",
            "admin",
            "--password-stdin",
        ],
        "admin-password-1\n",
    );
    let token = api.token(&gw, admin, "admin-password-1").await;
    let (status, _) = api
        .call("GET", gw.url("/api/v1/me"), Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .call("POST", gw.url("/api/v1/auth/logout"), Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .call("GET", gw.url("/api/v1/me"), Some(&token), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a logged-out token is dead"
    );

    let (status, doc) = api
        .call("GET", gw.url("/api/v1/openapi.json"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/v1/registrations"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_told_once_when_a_lease_ends_within_30_days() {
    let gw = TestGateway::start_with(&[("TMS_MAIL_RETRY_BASE_SECS", "1")]).await;
    let api = Api::new();
    provider(&gw);
    let provider_token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    // A 12-month lease that started 12 months less 10 days ago ends in 10 days.
    let today = time::OffsetDateTime::now_utc().date();
    let start = tms_registry::provisioning::lease_end(today, -12) + time::Duration::days(10);
    let mut body = registration("RE4A000070", "00:1B:2C:3D:4E:70", "ana@example.com", "Acme");
    body["start_date"] = json!(start.to_string());
    let token = onboard_with(&api, &gw, &provider_token, body, "ana@example.com").await;
    let notice = |gw: &TestGateway| {
        gw.outbox()
            .into_iter()
            .filter(|m| m.contains("lease of device RE4A000070"))
            .count()
    };
    wait_for("the lease notice", Duration::from_secs(10), || {
        let n = notice(&gw);
        async move { (n == 1).then_some(()) }
    })
    .await;
    let (_, device) = api
        .call(
            "GET",
            gw.url("/api/v1/devices/RE4A000070"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(device["lease_days_left"], 9, "{device}");
    // The device is marked as told, so no later sweep picks it up again.
    let store = gw.store().await;
    let due = store
        .lease_notices_due(
            tms_model::Clock::now_ms(&tms_model::SystemClock),
            30 * 86_400_000,
        )
        .await
        .unwrap();
    assert!(due.is_empty(), "{due:?}");
    assert_eq!(notice(&gw), 1);
}

/// Issue #12 row 7: a flood of logins for unknown emails costs bounded memory; what the
/// argon2 workers and their line cannot take is answered 429 at once, with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_stays_bounded_in_memory_and_excess_is_turned_away_quickly() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let pid = gw.pid();
    let url = gw.url("/api/v1/auth/login");
    let flood_for = Duration::from_secs(6);
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                // (status, code, has Retry-After, seconds to answer)
                let mut answers = Vec::new();
                while started.elapsed() < flood_for {
                    let sent = std::time::Instant::now();
                    let resp = http
                        .post(&url)
                        .json(&json!({"email": format!("nobody{i}@example.com"), "password": "guess-guess-1"}))
                        .send()
                        .await
                        .unwrap();
                    let status = resp.status();
                    let retry_after = resp.headers().contains_key("retry-after");
                    let body: Value = resp.json().await.unwrap();
                    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
                    answers.push((status, code, retry_after, sent.elapsed().as_secs_f64()));
                }
                answers
            })
        })
        .collect();
    let mut peak_mib = 0;
    while started.elapsed() < flood_for {
        peak_mib = peak_mib.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    peak_mib = peak_mib.max(rss_mib(pid));
    let busy: Vec<_> = answers
        .iter()
        .filter(|a| a.0 == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    let evaluated = answers
        .iter()
        .filter(|a| a.0 == StatusCode::UNAUTHORIZED)
        .count();
    eprintln!(
        "{} answers: {evaluated} evaluated, {} turned away; peak RSS {peak_mib} MiB",
        answers.len(),
        busy.len()
    );
    assert!(peak_mib < 400, "RSS reached {peak_mib} MiB under the flood");
    assert_eq!(
        evaluated + busy.len(),
        answers.len(),
        "only 401 or 429: {answers:?}"
    );
    assert!(evaluated > 0, "some logins were still checked");
    assert!(
        !busy.is_empty(),
        "64 at once exceed the workers and their line"
    );
    for (_, code, retry_after, secs) in &busy {
        assert_eq!(code, "busy");
        assert!(retry_after, "429 without Retry-After");
        assert!(*secs < 1.0, "a turned-away login took {secs:.2} s");
    }
    // The flood over, a real login works at once.
    api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
}

/// Issue #12 row 9: 40 wrong passwords at once for one account: exactly five are checked,
/// every other answer is 429, and the right password is locked out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_passwords_get_exactly_five_checks_then_the_lock() {
    let gw = TestGateway::start().await;
    provider(&gw);
    let url = gw.url("/api/v1/auth/login");
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(url)
                    .json(&json!({"email": PROVIDER, "password": format!("wrong-guess-{i}")}))
                    .send()
                    .await
                    .unwrap();
                resp.status()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for g in guesses {
        statuses.push(g.await.unwrap());
    }
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(checked, 5, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED || *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&json!({"email": PROVIDER, "password": PROVIDER_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (800..=900).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_attempts");
}
