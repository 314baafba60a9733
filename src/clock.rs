//! The wall clock, injectable: the server reads "now" through a [`Clock`] where a test must
//! be able to move time (ingest quotas: the token bucket and the UTC day), so tests need no
//! long sleeps.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Where "now" comes from: the system clock, or a [`ManualClock`] a test moves.
#[derive(Clone, Default)]
pub struct Clock(Option<ManualClock>);

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that reads `manual` (shared: moving it moves every copy).
    pub fn manual(manual: &ManualClock) -> Clock {
        Clock(Some(manual.clone()))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.0 {
            None => Utc::now(),
            Some(manual) => manual.now(),
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Clock(system)"),
            Some(manual) => write!(f, "Clock(manual at {})", manual.now()),
        }
    }
}

/// A clock that stands still until it is set or advanced.
///
/// **Warning**: for tests only; a server given one never sees time pass by itself.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock(Arc::new(Mutex::new(start)))
    }

    pub fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }

    pub fn advance(&self, by: std::time::Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
    }
}
