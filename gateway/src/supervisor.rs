//! The gateway's long-running parts, supervised by construction: each runs as one task of a
//! [`Parts`] set under a name, and whichever ends first without being told to (an error, a
//! panic, or an early return) is reported by that name, so the caller can stop the rest.
//! What the parts are and in which order they stop is the caller's (`app.rs`); this module
//! only runs, names and waits.

use std::collections::HashMap;
use std::future::Future;

use anyhow::anyhow;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;

/// A set of named, running parts.
pub(crate) struct Parts {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, &'static str>,
}

/// How one part ended.
pub(crate) struct Exit {
    /// `Some` when it ended by failing, panicking or returning unasked; `None` when it
    /// returned after being told to stop.
    pub(crate) failure: Option<anyhow::Error>,
}

impl Parts {
    pub(crate) fn new() -> Self {
        Parts {
            set: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    /// Runs `part` under `name`.
    pub(crate) fn spawn<F>(&mut self, name: &'static str, part: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.set.spawn(part);
        self.names.insert(handle.id(), name);
    }

    /// Waits for the next part to end and reports it (see [`report_exit`]); `None` when no
    /// part is left. `stopping` says whether the parts have been told to stop, so that a
    /// part returning `Ok` is expected rather than a failure.
    pub(crate) async fn next(&mut self, stopping: impl Fn() -> bool) -> Option<Exit> {
        let joined = self.set.join_next_with_id().await?;
        let (id, outcome) = match joined {
            Ok((id, result)) => (id, Ok(result)),
            Err(join) => (join.id(), Err(join)),
        };
        let name = self.names.remove(&id).unwrap_or("a part");
        Some(report_exit(name, outcome, stopping()))
    }

    /// Waits for every part to end, at most until `deadline`; the parts still running then
    /// are named in the log and aborted. Returns the failures of those that ended.
    pub(crate) async fn wait_all(
        &mut self,
        deadline: Instant,
        stopping: impl Fn() -> bool,
    ) -> Vec<Exit> {
        let mut failed = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.next(&stopping)).await {
                Ok(Some(exit)) if exit.failure.is_some() => failed.push(exit),
                Ok(Some(_)) => {}
                Ok(None) => return failed,
                Err(_) => {
                    let mut late: Vec<&str> = self.names.values().copied().collect();
                    late.sort_unstable();
                    tracing::error!(
                        parts = late.join(", "),
                        "parts still running at the shutdown deadline; abandoning them"
                    );
                    self.names.clear();
                    self.set.abort_all();
                    // Aborted tasks end at their next await; none of them is waited for again.
                    self.set.detach_all();
                    return failed;
                }
            }
        }
    }
}

/// Logs how the part `name` ended ("<name> failed: …", "<name> panicked", "<name> stopped
/// unexpectedly"); a part that returned after being told to stop (`stopping`) is no failure.
pub(crate) fn report_exit(
    name: &'static str,
    outcome: Result<anyhow::Result<()>, tokio::task::JoinError>,
    stopping: bool,
) -> Exit {
    let failure = match outcome {
        Ok(Ok(())) if stopping => {
            tracing::debug!(part = name, "stopped");
            None
        }
        Ok(Ok(())) => Some(anyhow!("{name} stopped unexpectedly")),
        Ok(Err(e)) => Some(e.context(format!("{name} failed"))),
        Err(join) if join.is_panic() => Some(anyhow!("{name} panicked: {}", panic_text(join))),
        Err(join) => Some(anyhow!(join).context(format!("{name} was cancelled"))),
    };
    if let Some(e) = &failure {
        tracing::error!(part = name, "{e:#}; shutting down the gateway");
    }
    Exit { failure }
}

/// The message a panic carried, when it was a string.
fn panic_text(join: tokio::task::JoinError) -> String {
    let payload = join.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panic_is_reported_by_the_name_of_its_part() {
        let mut parts = Parts::new();
        parts.spawn("steady", async {
            std::future::pending::<()>().await;
            Ok(())
        });
        parts.spawn("fragile", async {
            tokio::task::yield_now().await;
            panic!("the fragile part broke");
        });
        let exit = parts.next(|| false).await.unwrap();
        let text = format!("{:#}", exit.failure.unwrap());
        assert!(text.contains("fragile panicked"), "{text}");
        assert!(text.contains("the fragile part broke"), "{text}");
    }

    #[tokio::test]
    async fn an_error_is_reported_with_its_cause_and_an_early_return_is_a_failure() {
        let mut parts = Parts::new();
        parts.spawn("failing", async { Err(anyhow!("disk on fire")) });
        let exit = parts.next(|| false).await.unwrap();
        let text = format!("{:#}", exit.failure.unwrap());
        assert_eq!(text, "failing failed: disk on fire");

        parts.spawn("quitter", async { Ok(()) });
        let exit = parts.next(|| false).await.unwrap();
        let text = format!("{:#}", exit.failure.unwrap());
        assert_eq!(text, "quitter stopped unexpectedly");

        parts.spawn("obedient", async { Ok(()) });
        let exit = parts.next(|| true).await.unwrap();
        assert!(exit.failure.is_none(), "a part told to stop has not failed");
        assert!(parts.next(|| true).await.is_none());
    }

    #[tokio::test]
    async fn wait_all_abandons_a_part_that_outlives_the_deadline() {
        let mut parts = Parts::new();
        parts.spawn("prompt", async { Ok(()) });
        parts.spawn("stuck", async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let started = Instant::now();
        let failed = parts
            .wait_all(started + Duration::from_millis(200), || true)
            .await;
        assert!(failed.is_empty());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(
            parts.next(|| true).await.is_none(),
            "nothing left to wait for"
        );
    }
}
