//! The one source of wall-clock time, injected like rustls' `TimeProvider`.
//!
//! Every part that stamps a row, decides an expiry or signs a certificate asks a [`Clock`]
//! instead of reading the system time, so tests can hand it a [`ManualClock`] and move time
//! forward without waiting. Durations and timeouts measured with `Instant` are not its business.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

use crate::unix_ms;

/// Wall-clock time in the two shapes the gateway uses.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in Unix milliseconds: the time unit of the store and the event stream.
    fn now_ms(&self) -> i64;

    /// Now, as a UTC date-time (certificate validity, dates shown to people).
    fn now_utc(&self) -> OffsetDateTime {
        let nanos = i128::from(self.now_ms()) * 1_000_000;
        // Every i64 millisecond count fits the i128 nanoseconds; only the year range can
        // fail, and then the epoch is a safer answer than a panic.
        OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// The clock handed from the binary down to every part.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock: what the gateway runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// A [`SharedClock`] reading the system time.
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        unix_ms(SystemTime::now())
    }

    fn now_utc(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that moves only when told to: for tests of expiries, grouping and pruning.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `ms` Unix milliseconds.
    pub fn new(ms: i64) -> Self {
        Self {
            ms: AtomicI64::new(ms),
        }
    }

    /// A clock standing at `ms`, already shared, and the handle to move it.
    pub fn shared(ms: i64) -> Arc<Self> {
        Arc::new(Self::new(ms))
    }

    /// Jumps to `ms` Unix milliseconds (backwards too: clocks do that).
    pub fn set(&self, ms: i64) {
        self.ms.store(ms, Ordering::SeqCst);
    }

    /// Moves forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        // fetch_update never fails when the closure always returns Some.
        let _ = self
            .ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |ms| {
                Some(ms.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.now_ms(), 3_000);
        clock.set(500);
        assert_eq!(clock.now_ms(), 500);
        clock.set(i64::MAX - 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now_ms(), i64::MAX, "advance saturates");
    }

    #[test]
    fn now_utc_follows_now_ms() {
        let clock = ManualClock::new(1_767_225_600_123); // 2026-01-01T00:00:00.123Z
        let t = clock.now_utc();
        assert_eq!(t.unix_timestamp(), 1_767_225_600);
        assert_eq!(t.millisecond(), 123);
        assert_eq!(t.offset(), time::UtcOffset::UTC);
    }

    #[test]
    fn system_clock_agrees_with_itself() {
        let clock = SystemClock::shared();
        let ms = clock.now_ms();
        let utc = clock.now_utc();
        let diff = (i128::from(ms) - utc.unix_timestamp_nanos() / 1_000_000).abs();
        assert!(diff < 60_000, "{ms} vs {utc}");
        assert!(ms > 1_700_000_000_000, "system time before 2023: {ms}");
    }
}
