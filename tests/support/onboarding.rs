//! Onboarding over the HTTP API as a provider does it: register a customer with a device, read
//! the two emails from the outbox, activate, change the temporary password.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{TestGateway, wait_for};

pub const PROVIDER: &str = "provider@example.com";
pub const PROVIDER_PASSWORD: &str = "provider-password-1";

pub fn registration(serial: &str, mac: &str, email: &str, company: &str) -> Value {
    json!({
        "user": {"new": {"first_name": "Ana", "last_name": "Ruiz", "email": email, "phone": "+1 713 555 0100"}},
        "company": {"new": {"name": company}},
        "sales_order": "SO-1234",
        "device": {"type": "RemotEye 4", "serial": serial, "mac": mac, "lease_months": 12},
        "ups": {"model": "1600XP", "model_number": "1600XP-18K", "serial": "160300007", "ship_date": "2025-01-15"},
        "start_date": "2026-11-01",
        "service_contract_sales_order": "SC-77"
    })
}

pub struct Api {
    pub http: reqwest::Client,
}

impl Api {
    pub fn new() -> Self {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        url: String,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.parse().unwrap(), url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn login(
        &self,
        gw: &TestGateway,
        email: &str,
        password: &str,
    ) -> (StatusCode, Value) {
        self.call(
            "POST",
            gw.url("/api/v1/auth/login"),
            None,
            Some(json!({"email": email, "password": password})),
        )
        .await
    }

    /// `POST /api/v1/registrations` with `body`.
    pub async fn register(
        &self,
        gw: &TestGateway,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        self.call("POST", gw.url("/api/v1/registrations"), token, Some(body))
            .await
    }

    /// Activates an account with the token from its activation email.
    pub async fn activate(&self, gw: &TestGateway, token: &str) -> (StatusCode, Value) {
        self.call(
            "POST",
            gw.url("/api/v1/auth/activate"),
            None,
            Some(json!({"token": token})),
        )
        .await
    }

    pub async fn token(&self, gw: &TestGateway, email: &str, password: &str) -> String {
        let (status, body) = self.login(gw, email, password).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }
}

/// A fresh gateway with the provider account, an API client and the provider's token.
pub async fn provider_gateway() -> (TestGateway, Api, String) {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    (gw, api, token)
}

pub fn provider(gw: &TestGateway) {
    gw.cli_stdin(
        &[
            "user",
            "add",
            "--email",
            PROVIDER,
            "--role",
            "provider",
            "--password-stdin",
        ],
        &format!("{PROVIDER_PASSWORD}\n"),
    );
}

/// The two emails of a registration: (activation token, temporary password).
pub async fn emails_for(gw: &TestGateway, email: &str) -> (String, String) {
    let mails: Vec<String> = wait_for(
        "activation and password emails",
        Duration::from_secs(10),
        || {
            let mails: Vec<String> = gw
                .outbox()
                .into_iter()
                .filter(|m| m.contains(&format!("To: {email}")))
                .collect();
            async move { (mails.len() == 2).then_some(mails) }
        },
    )
    .await;
    let link_prefix = format!("http://{}/activate?token=", gw.ports.http);
    let token = mails
        .iter()
        .flat_map(|m| m.lines())
        .find_map(|l| l.trim().strip_prefix(&link_prefix))
        .expect("activation link")
        .to_owned();
    let password = mails
        .iter()
        .flat_map(|m| m.lines())
        .find_map(|l| l.trim().strip_prefix("Temporary password: "))
        .expect("temporary password line")
        .to_owned();
    (token, password)
}

/// Registers a customer with one device and takes the account through activation and the
/// password change; returns the customer's token.
pub async fn onboard(
    api: &Api,
    gw: &TestGateway,
    provider_token: &str,
    serial: &str,
    mac: &str,
    email: &str,
    company: &str,
) -> String {
    onboard_with(
        api,
        gw,
        provider_token,
        registration(serial, mac, email, company),
        email,
    )
    .await
}

pub async fn onboard_with(
    api: &Api,
    gw: &TestGateway,
    provider_token: &str,
    body: Value,
    email: &str,
) -> String {
    let (status, body) = api.register(gw, Some(provider_token), body).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (activation, temporary) = emails_for(gw, email).await;
    let (status, _) = api.activate(gw, &activation).await;
    assert_eq!(status, StatusCode::OK);
    let token = api.token(gw, email, &temporary).await;
    let (status, _) = api
        .call(
            "POST",
            gw.url("/api/v1/me/password"),
            Some(&token),
            Some(json!({"current_password": temporary, "new_password": "a-new-password-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    token
}

/// Two customers of different companies, onboarded by the provider: Ana owns RE4A000001
/// (Acme Hospital), Bob RE4A000002 (Globex). Returns their tokens.
pub async fn ana_and_bob(api: &Api, gw: &TestGateway) -> (String, String) {
    let provider_token = api.token(gw, PROVIDER, PROVIDER_PASSWORD).await;
    let ana = onboard(
        api,
        gw,
        &provider_token,
        "RE4A000001",
        "00:1B:2C:3D:4E:01",
        "ana@example.com",
        "Acme Hospital",
    )
    .await;
    let bob = onboard(
        api,
        gw,
        &provider_token,
        "RE4A000002",
        "00:1B:2C:3D:4E:02",
        "bob@example.com",
        "Globex",
    )
    .await;
    (ana, bob)
}
