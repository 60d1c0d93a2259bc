//! Alert emails (issue 18): named SMTP channels in the config file (`[[email]]`) that
//! `[rules] alert_emails` tells of every rule alert's changes. A message is a job on the work
//! queue (`crate::jobs`, action `email`), so it is durable, retried with backoff when the
//! server cannot take it, `dead` after `[jobs] attempts_max` tries, and deleted once sent.
//!
//! SMTP through lettre: `smtp://host:port` (plain, for a relay on the same host or network),
//! `smtp://host:587?tls=required` (STARTTLS) or `smtps://host:465` (TLS), with rustls (ring)
//! and the system's roots; optional login with a password from an owner-only file.

use crate::error::{ErrorKind, ServiceError, ServiceResult};
use anyhow::Context;
use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The job action of an alert email.
pub const EMAIL_ACTION: &str = "email";
/// `[[email]]` entries a config names at most.
pub const EMAILS_MAX: usize = 16;
/// Recipients one channel names at most.
pub const RECIPIENTS_MAX: usize = 50;

/// `[[email]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// What `[rules] alert_emails` calls it: letters, digits, `.`, `_`, `-` (at most 64).
    pub name: String,
    /// `smtp://host:port`, `smtp://host:587?tls=required` or `smtps://host:465` (no
    /// credentials in it: `username` and `password_file`).
    pub smtp_url: String,
    /// The sender, e.g. `Mooring <mooring@example.com>`.
    pub from: String,
    /// The recipients.
    pub to: Vec<String>,
    pub username: Option<String>,
    /// The SMTP password, in an owner-only (0600) file.
    pub password_file: Option<PathBuf>,
    /// How long one try may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Checks `[[email]]` entries (the password files are read at start).
pub fn validate(emails: &[EmailConfig]) -> anyhow::Result<()> {
    anyhow::ensure!(
        emails.len() <= EMAILS_MAX,
        "at most {EMAILS_MAX} [[email]] entries"
    );
    let mut names = std::collections::BTreeSet::new();
    for e in emails {
        anyhow::ensure!(
            crate::webhooks::is_valid_name(&e.name),
            "[[email]] name {:?}: letters, digits, '.', '_', '-' (at most 64)",
            e.name
        );
        anyhow::ensure!(
            names.insert(e.name.as_str()),
            "[[email]] name {:?} is used twice",
            e.name
        );
        anyhow::ensure!(
            e.smtp_url.starts_with("smtp://") || e.smtp_url.starts_with("smtps://"),
            "[[email]] {}: smtp_url {:?} is not smtp:// or smtps://",
            e.name,
            e.smtp_url
        );
        anyhow::ensure!(
            !e.smtp_url.contains('@'),
            "[[email]] {}: put the login in username and password_file, not in smtp_url",
            e.name
        );
        e.from
            .parse::<Mailbox>()
            .with_context(|| format!("[[email]] {}: from {:?}", e.name, e.from))?;
        anyhow::ensure!(
            !e.to.is_empty() && e.to.len() <= RECIPIENTS_MAX,
            "[[email]] {}: to must name 1 to {RECIPIENTS_MAX} recipients",
            e.name
        );
        for to in &e.to {
            to.parse::<Mailbox>()
                .with_context(|| format!("[[email]] {}: to {to:?}", e.name))?;
        }
        anyhow::ensure!(
            e.username.is_some() == e.password_file.is_some(),
            "[[email]] {}: username and password_file go together",
            e.name
        );
        // A password never crosses the network in the clear (nor after a stripped STARTTLS).
        anyhow::ensure!(
            e.username.is_none()
                || e.smtp_url.starts_with("smtps://")
                || e.smtp_url.contains("tls=required"),
            "[[email]] {}: a login needs TLS: smtps://host:465 or smtp://host:587?tls=required",
            e.name
        );
        anyhow::ensure!(
            (100..=120_000).contains(&e.timeout_ms),
            "[[email]] {}: timeout_ms must be between 100 and 120000",
            e.name
        );
    }
    Ok(())
}

/// One email, as stored with its job.
#[derive(Debug, Clone, PartialEq)]
pub struct EmailNote {
    /// The `[[email]]` channel.
    pub email: String,
    pub subject: String,
    pub text: String,
}

impl EmailNote {
    pub fn params(&self) -> Value {
        serde_json::json!({"email": self.email, "subject": self.subject, "text": self.text})
    }

    pub fn from_params(v: &Value) -> Result<Self, String> {
        let s = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("no {k}"))
        };
        Ok(EmailNote {
            email: s("email")?,
            subject: s("subject")?,
            text: s("text")?,
        })
    }
}

struct Channel {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// The whole send (lettre bounds only the connect).
    timeout: Duration,
}

/// Emails by outcome, for `/metrics`.
#[derive(Default)]
pub struct EmailCounters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// Not queued: the channel had 1,000 unfinished.
    pub dropped: AtomicU64,
}

/// The configured channels.
pub struct Emails {
    channels: BTreeMap<String, Channel>,
    pub counters: EmailCounters,
}

impl Emails {
    /// Builds every channel; a bad URL or address, or a password file others may read, stops
    /// the start with the reason.
    pub fn load(configs: &[EmailConfig]) -> anyhow::Result<Self> {
        validate(configs)?;
        let mut channels = BTreeMap::new();
        for e in configs {
            let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&e.smtp_url)
                .with_context(|| format!("[[email]] {}: smtp_url", e.name))?
                .timeout(Some(Duration::from_millis(e.timeout_ms)));
            if let (Some(user), Some(file)) = (&e.username, &e.password_file) {
                let password = crate::webhooks::read_secret(file, 1)
                    .with_context(|| format!("[[email]] {}: password_file", e.name))?;
                let password = String::from_utf8(password)
                    .with_context(|| format!("[[email]] {}: password_file", e.name))?;
                builder = builder.credentials(Credentials::new(user.clone(), password));
            }
            let to =
                e.to.iter()
                    .map(|t| t.parse::<Mailbox>())
                    .collect::<Result<Vec<_>, _>>()?;
            channels.insert(
                e.name.clone(),
                Channel {
                    transport: builder.build(),
                    from: e.from.parse()?,
                    to,
                    timeout: Duration::from_millis(e.timeout_ms),
                },
            );
        }
        Ok(Emails {
            channels,
            counters: EmailCounters::default(),
        })
    }

    /// Whether a channel of this name is configured.
    pub fn has(&self, name: &str) -> bool {
        self.channels.contains_key(name)
    }

    /// One try, within the channel's `timeout_ms`: `Ok` once the server took the message. Its
    /// `Message-ID` is `<delivery_id@mooring>` on every try, so a mail system can tell a
    /// repeat (a try that timed out after the server took it) from a new message.
    pub async fn send(&self, delivery_id: &str, note: &EmailNote) -> ServiceResult<()> {
        let Some(ch) = self.channels.get(&note.email) else {
            return Err(ServiceError::new(
                ErrorKind::Unavailable,
                "unknown_email",
                format!(
                    "email channel {:?} is not in the config ([[email]]); it may have been removed",
                    note.email
                ),
            ));
        };
        let mut builder = Message::builder()
            .message_id(Some(format!("<{delivery_id}@mooring>")))
            .from(ch.from.clone())
            .subject(note.subject.clone())
            .header(ContentType::TEXT_PLAIN);
        for to in &ch.to {
            builder = builder.to(to.clone());
        }
        let message = builder
            .body(note.text.clone())
            .map_err(|e| ServiceError::internal(format!("building an email: {e}")))?;
        let failed = |why: String| {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            Err(ServiceError::new(
                ErrorKind::Unavailable,
                "email_failed",
                format!("email channel {}: {why}", note.email),
            ))
        };
        match tokio::time::timeout(ch.timeout, ch.transport.send(message)).await {
            Ok(Ok(_)) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => failed(e.to_string()),
            Err(_) => failed(format!("no answer within {} ms", ch.timeout.as_millis())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(url: &str, from: &str, to: &[&str]) -> EmailConfig {
        EmailConfig {
            name: "oncall".into(),
            smtp_url: url.into(),
            from: from.into(),
            to: to.iter().map(|t| (*t).to_owned()).collect(),
            username: None,
            password_file: None,
            timeout_ms: 10_000,
        }
    }

    #[test]
    fn email_entries_are_checked() {
        let ok = channel(
            "smtp://127.0.0.1:2525",
            "Mooring <m@example.com>",
            &["ops@example.com"],
        );
        assert!(validate(std::slice::from_ref(&ok)).is_ok());
        for bad in [
            channel("http://h", "m@example.com", &["a@example.com"]),
            channel("smtps://u:p@h", "m@example.com", &["a@example.com"]),
            channel("smtp://h", "not an address", &["a@example.com"]),
            channel("smtp://h", "m@example.com", &[]),
        ] {
            assert!(validate(std::slice::from_ref(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn notes_round_trip_through_storage() {
        let n = EmailNote {
            email: "oncall".into(),
            subject: "s".into(),
            text: "t".into(),
        };
        assert_eq!(EmailNote::from_params(&n.params()), Ok(n));
    }
}
