//! Alarm notifications (CONTRACT §7): per company, the raises and clears no one has been told
//! of go out together once the oldest is `alarms.group_secs` old — one email to each of the
//! company's active customers and the providers who registered its affected devices (through
//! the mail queue, so outbox or SMTP with its retries), and, when a webhook is configured,
//! one signed JSON POST, retried with backoff.
//!
//! Each channel keeps its own state in the alarm rows, so a failing webhook never holds up
//! or loses an email. The email is queued in the same transaction that marks its events
//! mailed; a webhook delivery first claims its rows with a conditional UPDATE (with a lease,
//! so a node that dies mid-delivery does not hold them for ever). Two nodes never send the
//! same notice. Nothing here runs in ingest's path.
//! Not here: when an alarm is raised or cleared (ingest, the offline sweep).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tms_model::SharedClock;
use tms_store::{Channel, NoticeGroup, OutgoingMail, PendingNotice, Store, StoreError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::mail::{Composer, MailError};
use crate::views;

/// Where and how webhooks go.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    /// HMAC-SHA256 key of `X-TMS-Signature`; unsigned without one.
    pub secret: Option<String>,
}

/// The notification worker.
pub struct Notifier {
    store: Store,
    composer: Composer,
    group: Duration,
    webhook: Option<(Webhook, reqwest::Client)>,
    /// Woken when mail is queued (the mailer).
    mail_queued: Arc<Notify>,
    /// This process's claims on webhook rows: `<node>-<random>-<n>`.
    claim_prefix: String,
    /// First retry of a failed webhook after this long, doubling up to [`MAX_WEBHOOK_RETRY`].
    retry_base: Duration,
    /// Decides when a group is old enough and stamps the rows.
    clock: SharedClock,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing an alarm email")]
    Mail(#[from] MailError),
}

/// How often the worker looks for due notices.
const TICK: Duration = Duration::from_millis(500);
/// A webhook delivery holds its rows this long; a node that dies mid-delivery lets go then.
const CLAIM_LEASE: Duration = Duration::from_secs(60);
/// One webhook POST may take this long.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_WEBHOOK_RETRY: Duration = Duration::from_secs(3600);

impl Notifier {
    pub fn new(
        store: Store,
        composer: Composer,
        group: Duration,
        webhook: Option<Webhook>,
        mail_queued: Arc<Notify>,
        node_id: &str,
        clock: SharedClock,
    ) -> Self {
        let mut boot = [0u8; 6];
        rand::fill(&mut boot);
        let webhook = webhook.map(|w| {
            let client = reqwest::Client::builder()
                .timeout(WEBHOOK_TIMEOUT)
                .build()
                .unwrap_or_default();
            (w, client)
        });
        Notifier {
            store,
            composer,
            group,
            webhook,
            mail_queued,
            claim_prefix: format!("{node_id}-{}", hex::encode(boot)),
            retry_base: Duration::from_secs(1),
            clock,
        }
    }

    /// First retry of a failed webhook after `base` (doubling).
    pub fn with_webhook_retry(mut self, base: Duration) -> Self {
        self.retry_base = base;
        self
    }

    /// Runs until `stop`: email and webhook each in a loop of their own, so a slow webhook
    /// never delays an email.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let mail = {
            let this = this.clone();
            let stop = stop.clone();
            async move {
                while !stop.is_cancelled() {
                    if let Err(e) = this.mail_due().await {
                        tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "alarm emails not queued; retrying");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(TICK) => {}
                    }
                }
            }
        };
        let hooks = {
            let this = this.clone();
            let stop = stop.clone();
            async move {
                if this.webhook.is_none() {
                    return;
                }
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    if let Err(e) = this.hooks_due(&mut n, &stop).await {
                        tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "alarm webhooks not sent; retrying");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(TICK) => {}
                    }
                }
            }
        };
        tokio::join!(mail, hooks);
    }

    fn due(&self, now: i64) -> i64 {
        now - self.group.as_millis() as i64
    }

    /// Queues one email per recipient for every company whose notice is due; how many
    /// companies were notified.
    pub async fn mail_due(&self) -> Result<usize, NotifyError> {
        let now = self.clock.now_ms();
        let mut sent = 0;
        for company in self
            .store
            .notice_due_companies(Channel::Email, self.due(now), now)
            .await?
        {
            let group = self
                .store
                .notice_group(Channel::Email, company, None)
                .await?;
            if group.events.is_empty() {
                continue;
            }
            let subject = subject(&group);
            let text = email_text(&group, &self.composer.public_url);
            let mails: Vec<OutgoingMail> = group
                .recipients
                .iter()
                .map(|to| self.composer.message("alarm", to, &subject, text.clone()))
                .collect::<Result<_, _>>()?;
            if self
                .store
                .queue_alarm_mail(&group, &mails, self.webhook.is_none(), self.clock.now_ms())
                .await?
            {
                sent += 1;
                let outcome = if mails.is_empty() {
                    tracing::warn!(company = %group.company, "alarm notice has no recipient (no active customer or provider)");
                    "no_recipient"
                } else {
                    "queued"
                };
                metrics::counter!("tms_alarm_notifications_total", "channel" => "email", "outcome" => outcome).increment(1);
                tracing::info!(company = %group.company, events = group.events.len(), recipients = mails.len(), %subject, "alarm email queued");
                self.mail_queued.notify_one();
            }
        }
        Ok(sent)
    }

    /// Sends one webhook per company whose notice is due and that no one else is sending.
    async fn hooks_due(&self, n: &mut u64, stop: &CancellationToken) -> Result<(), NotifyError> {
        let Some((hook, client)) = &self.webhook else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        for company in self
            .store
            .notice_due_companies(Channel::Webhook, self.due(now), now)
            .await?
        {
            if stop.is_cancelled() {
                break;
            }
            *n += 1;
            let claim = format!("{}-{n}", self.claim_prefix);
            let now = self.clock.now_ms();
            let held = self
                .store
                .claim_webhook(company, &claim, now, now + CLAIM_LEASE.as_millis() as i64)
                .await?;
            if held == 0 {
                continue;
            }
            let group = self
                .store
                .notice_group(Channel::Webhook, company, Some(&claim))
                .await?;
            let body = webhook_body(&group).to_string();
            let mut request = client
                .post(&hook.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json");
            if let Some(secret) = &hook.secret {
                request = request.header("X-TMS-Signature", signature(secret, body.as_bytes()));
            }
            let result = request.body(body).send().await;
            let failure = match result {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("answered {}", r.status())),
                Err(e) => Some(e.to_string()),
            };
            let attempts = self.store.webhook_attempts(&claim).await?;
            let wait = self
                .retry_base
                .saturating_mul(1 << attempts.clamp(0, 16) as u32)
                .min(MAX_WEBHOOK_RETRY);
            let outcome = if failure.is_none() {
                "delivered"
            } else {
                "failed"
            };
            metrics::counter!("tms_alarm_notifications_total", "channel" => "webhook", "outcome" => outcome).increment(1);
            match &failure {
                None => {
                    tracing::info!(company = %group.company, events = group.events.len(), "alarm webhook delivered")
                }
                Some(error) => {
                    tracing::warn!(company = %group.company, %error, retry_in = ?wait, "alarm webhook failed; kept for retry")
                }
            }
            self.store
                .finish_webhook(
                    &claim,
                    &group.events,
                    failure.is_none(),
                    self.clock.now_ms(),
                    self.clock.now_ms() + wait.as_millis() as i64,
                )
                .await?;
        }
        Ok(())
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of every length (longer ones are hashed): this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How a code reads after "N of M UPS …" (raised) and after "N UPS …" (cleared).
fn phrases(code: &str) -> (String, String) {
    let (raised, cleared) = match code {
        "on_battery" => ("on battery", "back on mains"),
        "on_bypass" => ("on bypass", "off bypass"),
        "ups_fault" => ("in fault", "out of fault"),
        "low_battery" => ("with low battery", "with battery recovered"),
        "overload" => ("overloaded", "no longer overloaded"),
        "device_offline" => ("offline", "back online"),
        other => {
            let name = other.replace('_', " ");
            return (format!("with {name}"), format!("with {name} cleared"));
        }
    };
    (raised.to_owned(), cleared.to_owned())
}

/// Distinct devices per code among the events that are (or are not) clears: most devices
/// first, then the more severe.
fn by_code(group: &NoticeGroup, cleared: bool) -> Vec<(String, usize)> {
    let mut devices: BTreeMap<&str, (u8, Vec<&str>)> = BTreeMap::new();
    for e in group.events.iter().filter(|e| e.cleared == cleared) {
        let rank = match e.alarm.severity.as_str() {
            "critical" => 0,
            "warning" => 1,
            _ => 2,
        };
        let (_, list) = devices.entry(&e.alarm.code).or_insert((rank, Vec::new()));
        if !list.contains(&e.alarm.serial.as_str()) {
            list.push(&e.alarm.serial);
        }
    }
    let mut out: Vec<(String, u8, usize)> = devices
        .into_iter()
        .map(|(code, (rank, list))| (code.to_owned(), rank, list.len()))
        .collect();
    out.sort_by(|a, b| {
        b.2.cmp(&a.2)
            .then(a.1.cmp(&b.1))
            .then_with(|| a.0.cmp(&b.0))
    });
    out.into_iter().map(|(code, _, n)| (code, n)).collect()
}

/// "Acme Hospital: 8 of 20 UPS on battery", "Acme Hospital: 8 UPS back on mains".
pub fn subject(group: &NoticeGroup) -> String {
    let raised = by_code(group, false);
    let cleared = by_code(group, true);
    let more = |rest: usize, what: &str| {
        if rest == 0 {
            String::new()
        } else {
            format!(" (and {rest} more {what})")
        }
    };
    match (raised.first(), cleared.first()) {
        (Some((code, n)), _) => format!(
            "{}: {n} of {} UPS {}{}",
            group.company,
            group.devices,
            phrases(code).0,
            more(raised.len() - 1 + cleared.len(), "alarm changes")
        ),
        (None, Some((code, n))) => format!(
            "{}: {n} UPS {}{}",
            group.company,
            phrases(code).1,
            more(cleared.len() - 1, "alarms cleared")
        ),
        (None, None) => format!("{}: alarm update", group.company),
    }
}

fn label(code: &str) -> String {
    code.replace('_', " ")
}

/// The email text: one line per event, and the link to the alarms page.
pub fn email_text(group: &NoticeGroup, public_url: &str) -> String {
    let mut text = String::new();
    let raised = by_code(group, false);
    for (code, n) in &raised {
        text.push_str(&format!(
            "{n} of {} UPS of {} {}.\r\n",
            group.devices,
            group.company,
            phrases(code).0
        ));
    }
    for (code, n) in by_code(group, true) {
        text.push_str(&format!("{n} UPS {}.\r\n", phrases(&code).1));
    }
    text.push_str("\r\n");
    for e in &group.events {
        let a = &e.alarm;
        let (what, at) = if e.cleared {
            ("cleared", a.cleared_at)
        } else {
            ("raised", Some(a.raised_at))
        };
        let at = views::time(at);
        text.push_str(&format!(
            "  {}  {} ({})  {what} {}\r\n",
            a.serial,
            label(&a.code),
            a.severity,
            at.as_str().unwrap_or("-")
        ));
    }
    text.push_str(&format!(
        "\r\nSee and acknowledge them at {public_url}/alarms\r\n"
    ));
    text
}

/// The webhook JSON: `{"company", "devices", "alarms": [...]}`.
pub fn webhook_body(group: &NoticeGroup) -> Value {
    let alarms: Vec<Value> = group.events.iter().map(event_json).collect();
    json!({
        "company": group.company,
        "devices": group.devices,
        "alarms": alarms,
    })
}

fn event_json(e: &PendingNotice) -> Value {
    let a = &e.alarm;
    json!({
        "id": a.id,
        "serial": a.serial,
        "code": a.code,
        "severity": a.severity,
        "event": if e.cleared { "cleared" } else { "raised" },
        "raised_at": views::time(Some(a.raised_at)),
        "cleared_at": views::time(a.cleared_at),
        "detail": serde_json::from_str::<Value>(&a.detail).unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use tms_model::ManualClock;
    use tms_store::{AlarmChange, AlarmRecord, WriteBatch};

    fn event(serial: &str, code: &str, cleared: bool) -> PendingNotice {
        PendingNotice {
            alarm: AlarmRecord {
                id: 1,
                serial: serial.into(),
                code: code.into(),
                severity: "critical".into(),
                raised_at: 1_800_000_000_000,
                cleared_at: cleared.then_some(1_800_000_060_000),
                acknowledged_at: None,
                acknowledged_by: None,
                detail: "{}".into(),
                company_id: 1,
                company: "Acme Hospital".into(),
            },
            cleared,
        }
    }

    fn group(events: Vec<PendingNotice>) -> NoticeGroup {
        NoticeGroup {
            company_id: 1,
            company: "Acme Hospital".into(),
            devices: 20,
            events,
            recipients: vec![],
        }
    }

    #[test]
    fn subjects_count_devices_of_the_company() {
        let raised: Vec<_> = (0..8)
            .map(|i| event(&format!("RE4A{i}"), "on_battery", false))
            .collect();
        assert_eq!(
            subject(&group(raised)),
            "Acme Hospital: 8 of 20 UPS on battery"
        );
        let cleared: Vec<_> = (0..8)
            .map(|i| event(&format!("RE4A{i}"), "on_battery", true))
            .collect();
        assert_eq!(
            subject(&group(cleared)),
            "Acme Hospital: 8 UPS back on mains"
        );
        let mixed = vec![
            event("A", "on_battery", false),
            event("B", "on_battery", false),
            event("A", "battery_bad", false),
        ];
        assert_eq!(
            subject(&group(mixed)),
            "Acme Hospital: 2 of 20 UPS on battery (and 1 more alarm changes)"
        );
    }

    #[test]
    fn the_signature_is_the_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    const T0: i64 = 1_800_000_000_000;

    /// What ingest writes when telemetry raises `code` on `serial` at `at`.
    async fn raise(store: &Store, serial: &str, code: &str, at: i64) {
        let batch = WriteBatch {
            alarms: vec![AlarmChange::Raise {
                serial: serial.into(),
                code: code.into(),
                severity: "critical",
                at,
                detail: "{}".into(),
            }],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
    }

    /// Alarm emails queued so far, as (recipient, subject, message).
    async fn alarm_mails(store: &Store) -> Vec<(String, String, String)> {
        fixtures::queued_mails(store, "alarm").await
    }

    /// With `alarms.group_secs` = 60, by the notifier's clock: two alarms raised 30 s apart
    /// go out together once the first is 60 s old, not a millisecond sooner; an alarm
    /// raised after that notice waits its own 60 s and goes out alone.
    #[tokio::test]
    async fn alarms_raised_within_the_window_are_one_notice_and_a_later_one_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = fixtures::store(dir.path()).await;
        let to = "provider@example.com";
        let provider = store
            .add_user(&fixtures::user(to, "provider", None, true), T0)
            .await
            .unwrap();
        for (serial, mac) in [
            ("RE4A000041", "00:1B:2C:3D:4E:41"),
            ("RE4A000042", "00:1B:2C:3D:4E:42"),
        ] {
            let device = fixtures::device(serial, mac, T0 + 365 * 86_400_000, Some(provider));
            store.add_device(&device, T0).await.unwrap();
        }
        let clock = ManualClock::shared(T0);
        let notifier = Notifier::new(
            store.clone(),
            fixtures::composer(),
            Duration::from_secs(60),
            None,
            Arc::new(Notify::new()),
            "node-a",
            clock.clone(),
        );

        raise(&store, "RE4A000041", "on_battery", T0).await;
        clock.set(T0 + 30_000);
        raise(&store, "RE4A000042", "on_battery", T0 + 30_000).await;
        assert_eq!(notifier.mail_due().await.unwrap(), 0);
        clock.set(T0 + 59_999);
        assert_eq!(
            notifier.mail_due().await.unwrap(),
            0,
            "sent before the window"
        );
        assert!(alarm_mails(&store).await.is_empty());
        clock.set(T0 + 60_000);
        assert_eq!(notifier.mail_due().await.unwrap(), 1);
        let mails = alarm_mails(&store).await;
        assert_eq!(mails.len(), 1, "one email for both alarms: {mails:?}");
        let (recipient, subject, message) = &mails[0];
        assert_eq!(recipient, to);
        assert_eq!(subject, "Acme: 2 of 2 UPS on battery");
        assert!(message.contains("RE4A000041") && message.contains("RE4A000042"));
        assert_eq!(notifier.mail_due().await.unwrap(), 0, "sent twice");

        clock.set(T0 + 61_000);
        raise(&store, "RE4A000041", "overload", T0 + 61_000).await;
        clock.set(T0 + 120_999);
        assert_eq!(
            notifier.mail_due().await.unwrap(),
            0,
            "sent before its window"
        );
        clock.set(T0 + 121_000);
        assert_eq!(notifier.mail_due().await.unwrap(), 1);
        let mails = alarm_mails(&store).await;
        assert_eq!(mails.len(), 2, "{mails:?}");
        let (_, subject, message) = &mails[1];
        assert_eq!(subject, "Acme: 1 of 2 UPS overloaded");
        assert!(
            !message.contains("RE4A000042"),
            "the earlier alarms are not repeated: {message}"
        );
        store.close().await;
    }
}
