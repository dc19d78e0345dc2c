//! Where the sandbox reads the time that plugins see: the `clock`
//! capability, token-bucket refills (`counters`) and `kv` expiry. A node
//! uses the system's clocks; a test uses a [`ManualClock`] and moves time
//! itself, so that rates and expiries are checked exactly whatever the
//! machine's load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The sandbox's source of time (see [`SandboxConfig::clock`](crate::SandboxConfig::clock)).
#[derive(Debug, Clone)]
pub struct Clock {
    /// Wall-clock time at `started`, in milliseconds since the Unix epoch.
    unix_ms_at_start: u64,
    started: Instant,
    /// Nanoseconds a test advanced a manual clock by; `None` follows the
    /// system's clocks.
    manual: Option<Arc<AtomicU64>>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The system's clocks.
    pub fn system() -> Self {
        Self {
            unix_ms_at_start: system_unix_ms(),
            started: Instant::now(),
            manual: None,
        }
    }

    /// A clock that stands still at the current wall-clock time until the
    /// returned handle advances it.
    pub fn manual() -> (Self, ManualClock) {
        let advanced = Arc::new(AtomicU64::new(0));
        let clock = Self {
            manual: Some(Arc::clone(&advanced)),
            ..Self::system()
        };
        (clock, ManualClock { advanced })
    }

    /// Time since the clock was made: the monotonic clock.
    pub(crate) fn elapsed(&self) -> Duration {
        match &self.manual {
            Some(advanced) => Duration::from_nanos(advanced.load(Ordering::Acquire)),
            None => self.started.elapsed(),
        }
    }

    /// Wall-clock time in milliseconds since the Unix epoch.
    pub(crate) fn unix_ms(&self) -> u64 {
        match &self.manual {
            Some(_) => self
                .unix_ms_at_start
                .saturating_add(u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX)),
            None => system_unix_ms(),
        }
    }
}

/// Moves a [`Clock::manual`] forward.
#[derive(Debug, Clone)]
pub struct ManualClock {
    advanced: Arc<AtomicU64>,
}

impl ManualClock {
    /// Moves the clock `by` forward (both its monotonic and its wall-clock
    /// time).
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.advanced.fetch_add(nanos, Ordering::AcqRel);
    }
}

fn system_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let (clock, hand) = Clock::manual();
        let (monotonic, unix) = (clock.elapsed(), clock.unix_ms());
        assert_eq!(monotonic, Duration::ZERO);
        hand.advance(Duration::from_millis(1500));
        assert_eq!(clock.elapsed(), Duration::from_millis(1500));
        assert_eq!(clock.unix_ms(), unix + 1500);
        assert_eq!(clock.clone().elapsed(), Duration::from_millis(1500));
    }
}
