//! Emails: the activation and password messages (CONTRACT §3), queued in the store with the
//! registration, and the mailer that delivers the queue — to `.eml` files in the outbox, or
//! over SMTP when `mail.smtp_url` is set. A failed delivery stays queued and is retried with
//! backoff; nothing is dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox, Message};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use tms_model::SharedClock;
use tms_store::{OutgoingMail, QueuedMail, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("email address {0:?} is not usable")]
    Address(String),
    #[error("building the message")]
    Build(#[source] lettre::error::Error),
    #[error("mail.smtp_url is not usable")]
    SmtpUrl(#[source] lettre::transport::smtp::Error),
    #[error("the outbox {} cannot be used as a directory", .path.display())]
    Outbox {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who mails come from and where their links point.
#[derive(Debug, Clone)]
pub struct Composer {
    pub from: String,
    /// Base of links, without a trailing slash.
    pub public_url: String,
}

impl Composer {
    pub(crate) fn message(
        &self,
        kind: &str,
        to: &str,
        subject: &str,
        text: String,
    ) -> Result<OutgoingMail, MailError> {
        let from: Mailbox = self
            .from
            .parse()
            .map_err(|_| MailError::Address(self.from.clone()))?;
        let to_box: Mailbox = to.parse().map_err(|_| MailError::Address(to.to_owned()))?;
        let builder = Message::builder()
            .from(from)
            .to(to_box)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN);
        // Plain 7-bit text whenever possible, so the link and the password stand in the
        // message exactly as written (a long link would otherwise be quoted-printable
        // encoded, and `=` in it become `=3D`). Our texts are ASCII with short lines.
        let message = if text.is_ascii() && text.lines().all(|l| l.len() < 990) {
            builder.body(Body::dangerous_pre_encoded(
                text.into_bytes(),
                ContentTransferEncoding::SevenBit,
            ))
        } else {
            builder.body(text)
        }
        .map_err(MailError::Build)?;
        Ok(OutgoingMail {
            kind: kind.to_owned(),
            recipient: to.to_owned(),
            subject: subject.to_owned(),
            message: String::from_utf8_lossy(&message.formatted()).into_owned(),
        })
    }

    /// The activation email: a single-use link `<public_url>/activate?token=TOKEN`.
    pub fn activation(
        &self,
        to: &str,
        token: &str,
        valid_hours: u64,
    ) -> Result<OutgoingMail, MailError> {
        let link = format!("{}/activate?token={token}", self.public_url);
        let text = format!(
            "Welcome to the Toshiba UPS monitoring service.\r\n\r\n\
             Activate your account with this link (valid for {valid_hours} hours, usable once):\r\n\r\n\
             {link}\r\n\r\n\
             Your temporary password comes in a separate email. After activating, log in and \
             change it (My Profile > Actions).\r\n"
        );
        self.message(
            "activation",
            to,
            "Activate your UPS monitoring account",
            text,
        )
    }

    /// The password email: the initial, temporary password on a line of its own.
    pub fn temporary_password(&self, to: &str, password: &str) -> Result<OutgoingMail, MailError> {
        let text = format!(
            "Your account for the Toshiba UPS monitoring service has been created.\r\n\r\n\
             Temporary password: {password}\r\n\r\n\
             Log in at {}/ after activating the account; you will be asked to choose a new \
             password before anything else.\r\n",
            self.public_url
        );
        self.message("password", to, "Your temporary password", text)
    }
}

impl Composer {
    /// The notice that a device's lease ends soon (sent once, 30 days before).
    pub fn lease_ending(
        &self,
        to: &str,
        serial: &str,
        ends: &str,
    ) -> Result<OutgoingMail, MailError> {
        let text = format!(
            "The monitoring lease of your RemotEye 4 device {serial} ends on {ends}.\r\n\r\n\
             After that day the device can no longer connect and its UPS is no longer \
             monitored. Contact your service provider to renew the lease; the device then \
             needs a new certificate (Asset Management > Device Certificate).\r\n\r\n\
             {}/\r\n",
            self.public_url
        );
        self.message(
            "lease_ending",
            to,
            &format!("The lease of device {serial} ends on {ends}"),
            text,
        )
    }
}

/// Leases ending within this long get their one notice.
const LEASE_NOTICE_HORIZON_MS: i64 = 30 * 86_400_000;

/// Delivers the mail queue.
pub struct Mailer {
    store: Store,
    outbox_dir: PathBuf,
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
    from: String,
    wake: Arc<Notify>,
    retry_base: Duration,
    composer: Option<Composer>,
    /// Decides what is due and stamps sent and failed mails.
    clock: SharedClock,
}

/// Longest wait between retries of one mail.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// How often the queue is looked at even when nobody wakes the mailer.
const POLL: Duration = Duration::from_secs(5);

impl Mailer {
    pub fn new(
        store: Store,
        outbox_dir: PathBuf,
        smtp_url: Option<&str>,
        from: String,
        retry_base: Duration,
        wake: Arc<Notify>,
        clock: SharedClock,
    ) -> Result<Self, MailError> {
        let smtp = match smtp_url {
            Some(url) => Some(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(MailError::SmtpUrl)?
                    .timeout(Some(Duration::from_secs(20)))
                    .build(),
            ),
            None => None,
        };
        Ok(Mailer {
            store,
            outbox_dir,
            smtp,
            from,
            wake,
            retry_base,
            composer: None,
            clock,
        })
    }

    /// Also sends lease-ending notices, written by `composer`.
    pub fn with_lease_notices(mut self, composer: Composer) -> Self {
        self.composer = Some(composer);
        self
    }

    /// Queues one notice per device whose lease ends within 30 days, to its customers.
    pub async fn queue_lease_notices(&self) {
        let Some(composer) = &self.composer else {
            return;
        };
        let due = match self
            .store
            .lease_notices_due(self.clock.now_ms(), LEASE_NOTICE_HORIZON_MS)
            .await
        {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for leases that end soon");
                return;
            }
        };
        for (serial, ends_at, recipients) in due {
            let ends = crate::views::time(Some(ends_at));
            let ends = ends.as_str().map(|t| &t[..10]).unwrap_or("soon");
            let mails: Result<Vec<_>, _> = recipients
                .iter()
                .map(|to| composer.lease_ending(to, &serial, ends))
                .collect();
            match mails {
                Ok(mails) => {
                    if let Err(e) = self
                        .store
                        .queue_lease_notice(&serial, &mails, self.clock.now_ms())
                        .await
                    {
                        tracing::warn!(error = %e, device.serial = %serial, "cannot queue the lease notice");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, device.serial = %serial, "cannot write the lease notice")
                }
            }
        }
    }

    /// Delivers until `stop`, then returns once the mail being sent is sent (or has failed
    /// and been kept for retry): a mail is never cut off mid-delivery. Fails at once when
    /// the outbox (no SMTP configured) cannot be a directory: no mail could ever leave.
    pub async fn run(self, stop: CancellationToken) -> Result<(), MailError> {
        if self.smtp.is_none() {
            self.prepare_outbox().await?;
        }
        while !stop.is_cancelled() {
            self.queue_lease_notices().await;
            self.deliver(&stop).await;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL.min(self.retry_base)) => {}
            }
        }
        Ok(())
    }

    /// Creates the outbox directory if needed and makes it private.
    async fn prepare_outbox(&self) -> Result<(), MailError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = &self.outbox_dir;
        let outbox = |source| MailError::Outbox {
            path: dir.clone(),
            source,
        };
        tokio::fs::create_dir_all(dir).await.map_err(outbox)?;
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(outbox)
    }

    /// Tries every mail that is due; returns how many were delivered. A failed mail waits
    /// `retry_base` × 2^attempts (at most an hour) before its next try.
    pub async fn deliver_due(&self) -> usize {
        self.deliver(&CancellationToken::new()).await
    }

    /// [`Mailer::deliver_due`], stopping before the next mail once `stop` is cancelled.
    async fn deliver(&self, stop: &CancellationToken) -> usize {
        let due = match self.store.due_mails(self.clock.now_ms(), 100).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the mail queue");
                return 0;
            }
        };
        let mut delivered = 0;
        for mail in due {
            if stop.is_cancelled() {
                break;
            }
            let result = match &self.smtp {
                Some(smtp) => self.send_smtp(smtp, &mail).await,
                None => self.write_outbox(&mail).await,
            };
            let recorded = match result {
                Ok(()) => {
                    delivered += 1;
                    metrics::counter!("tms_mail_sent_total").increment(1);
                    self.store.mail_sent(mail.id, self.clock.now_ms()).await
                }
                Err(error) => {
                    metrics::counter!("tms_mail_failed_total").increment(1);
                    let wait = self
                        .retry_base
                        .saturating_mul(1 << mail.attempts.clamp(0, 16) as u32)
                        .min(MAX_RETRY);
                    tracing::warn!(mail.id = mail.id, mail.kind = %mail.kind, %error, retry_in = ?wait, "mail not delivered; kept for retry");
                    self.store
                        .mail_failed(
                            mail.id,
                            &error,
                            self.clock.now_ms() + wait.as_millis() as i64,
                        )
                        .await
                }
            };
            if let Err(e) = recorded {
                tracing::warn!(error = %e, mail.id = mail.id, "cannot record the mail outcome");
            }
        }
        if let Ok((queued, _)) = self.store.mail_counts().await {
            metrics::gauge!("tms_mail_queued").set(queued as f64);
        }
        delivered
    }

    /// Writes one `.eml` readable by the gateway's user only (it may hold a temporary
    /// password), durably before the mail is marked sent: the queue drops the text then, so
    /// this file is the only copy.
    async fn write_outbox(&self, mail: &QueuedMail) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::AsyncWriteExt;

        let dir = &self.outbox_dir;
        // Again for each mail: the directory may have been removed since the start.
        self.prepare_outbox().await.map_err(|e| {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            format!("{e}: {}", cause.unwrap_or_default())
        })?;
        let name = format!("{:08}-{}.eml", mail.id, mail.kind);
        let tmp = dir.join(format!(".{name}.tmp"));
        let write = async {
            let _ = tokio::fs::remove_file(&tmp).await;
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .await?;
            // `mode` is filtered by the umask; say it once more whatever the umask is.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .await?;
            file.write_all(mail.message.as_bytes()).await?;
            file.sync_all().await
        };
        write
            .await
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        tokio::fs::rename(&tmp, dir.join(&name))
            .await
            .map_err(|e| format!("writing {name}: {e}"))?;
        // The rename itself must survive a crash too.
        let sync = async { tokio::fs::File::open(dir).await?.sync_all().await };
        sync.await
            .map_err(|e| format!("syncing {}: {e}", dir.display()))
    }

    async fn send_smtp(
        &self,
        smtp: &AsyncSmtpTransport<Tokio1Executor>,
        mail: &QueuedMail,
    ) -> Result<(), String> {
        let from = self
            .from
            .parse::<Mailbox>()
            .map_err(|e| e.to_string())?
            .email;
        let to = mail
            .recipient
            .parse::<Mailbox>()
            .map_err(|e| e.to_string())?
            .email;
        let envelope = Envelope::new(Some(from), vec![to]).map_err(|e| e.to_string())?;
        smtp.send_raw(&envelope, mail.message.as_bytes())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use tms_model::{Clock, ManualClock};

    const T0: i64 = 1_800_000_000_000;

    /// A store in `dir` with one customer awaiting activation, whose activation email is
    /// queued at `T0`.
    async fn store_with_one_queued_mail(dir: &std::path::Path) -> Store {
        let store = fixtures::store(dir).await;
        let to = "customer@example.com";
        let id = store
            .add_user(&fixtures::user(to, "customer", None, false), T0)
            .await
            .unwrap();
        let mail = fixtures::composer().activation(to, "token", 48).unwrap();
        store
            .add_activation(id, "hash-of-token", T0 + 48 * 3_600_000, &mail, T0)
            .await
            .unwrap();
        store
    }

    /// A mail that failed waits its back-off by the mailer's clock: not retried before the
    /// wait has passed, delivered once it has, with no real time spent waiting.
    #[tokio::test]
    async fn a_failed_mail_is_retried_when_the_clock_has_passed_its_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_one_queued_mail(dir.path()).await;
        // The outbox cannot be created while a plain file stands where its parent should be.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "not a directory").unwrap();
        let outbox = blocker.join("outbox");
        let clock = ManualClock::shared(T0);
        let mailer = Mailer::new(
            store.clone(),
            outbox.clone(),
            None,
            "tms@example.com".into(),
            Duration::from_secs(60),
            Arc::new(Notify::new()),
            clock.clone(),
        )
        .unwrap();

        assert_eq!(
            mailer.deliver_due().await,
            0,
            "the outbox cannot be written"
        );
        std::fs::remove_file(&blocker).unwrap();
        // The outbox could be written now, but the mail waits out its minute.
        clock.advance(Duration::from_secs(59));
        assert_eq!(mailer.deliver_due().await, 0, "retried before its back-off");
        assert!(!outbox.exists(), "nothing was written before the back-off");
        assert_eq!(store.mail_counts().await.unwrap(), (1, 0));

        clock.advance(Duration::from_secs(1));
        assert_eq!(mailer.deliver_due().await, 1);
        assert_eq!(store.mail_counts().await.unwrap(), (0, 1));
        let written: Vec<_> = std::fs::read_dir(&outbox).unwrap().collect();
        assert_eq!(written.len(), 1, "{written:?}");
        store.close().await;
    }

    /// 2027-06-01T00:00:00Z, Unix ms.
    const LEASE_END: i64 = 1_811_808_000_000;
    const DAY_MS: i64 = 86_400_000;

    /// Lease-ending mails queued so far, as (recipient, subject).
    async fn lease_mails(store: &Store) -> Vec<(String, String)> {
        fixtures::queued_mails(store, "lease_ending")
            .await
            .into_iter()
            .map(|(to, subject, _)| (to, subject))
            .collect()
    }

    /// The lease notice goes out by the mailer's clock: not a millisecond before the lease is
    /// 30 days from its end, once when it is, and again 30 days before the end a renewal set.
    #[tokio::test]
    async fn a_lease_end_is_noticed_30_days_before_by_the_clock_and_again_after_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let store = fixtures::store(dir.path()).await;
        let serial = tms_model::DeviceSerial::parse("RE4A000031").unwrap();
        store
            .add_device(
                &fixtures::device(serial.as_str(), "00:1B:2C:3D:4E:31", LEASE_END, None),
                T0,
            )
            .await
            .unwrap();
        let company = store
            .device(serial.as_str())
            .await
            .unwrap()
            .unwrap()
            .device
            .company_id;
        let to = "ana@example.com";
        store
            .add_user(&fixtures::user(to, "customer", Some(company), true), T0)
            .await
            .unwrap();
        let clock = ManualClock::shared(LEASE_END - 30 * DAY_MS - 1);
        let mailer = Mailer::new(
            store.clone(),
            dir.path().join("outbox"),
            None,
            "tms@example.com".into(),
            Duration::from_secs(60),
            Arc::new(Notify::new()),
            clock.clone(),
        )
        .unwrap()
        .with_lease_notices(fixtures::composer());

        mailer.queue_lease_notices().await;
        assert_eq!(lease_mails(&store).await, vec![], "noticed before 30 days");
        clock.advance(Duration::from_millis(1));
        mailer.queue_lease_notices().await;
        let first = (
            to.to_owned(),
            "The lease of device RE4A000031 ends on 2027-06-01".to_owned(),
        );
        assert_eq!(lease_mails(&store).await, vec![first.clone()]);
        clock.advance(Duration::from_secs(86_400));
        mailer.queue_lease_notices().await;
        assert_eq!(lease_mails(&store).await.len(), 1, "told only once");

        // Renewed while it runs: the new end counts from the old end, and is noticed anew
        // 30 days before it.
        let ends = crate::provisioning::renew_lease(&store, &serial, 12, clock.now_ms())
            .await
            .unwrap();
        assert_eq!(ends, 1_843_430_400_000, "2028-06-01T00:00:00Z");
        clock.set(ends - 30 * DAY_MS - 1);
        mailer.queue_lease_notices().await;
        assert_eq!(lease_mails(&store).await.len(), 1);
        clock.advance(Duration::from_millis(1));
        mailer.queue_lease_notices().await;
        let second = (
            to.to_owned(),
            "The lease of device RE4A000031 ends on 2028-06-01".to_owned(),
        );
        assert_eq!(lease_mails(&store).await, vec![first, second]);

        // Renewed after it ended: the new month counts from the clock, not the old end.
        let later = ends + 10 * DAY_MS + 3_600_000;
        clock.set(later);
        let renewed = crate::provisioning::renew_lease(&store, &serial, 1, clock.now_ms())
            .await
            .unwrap();
        assert_eq!(renewed, crate::provisioning::add_months_ms(later, 1));
        assert_eq!(renewed, later + 30 * DAY_MS, "June has 30 days");
        store.close().await;
    }
}
