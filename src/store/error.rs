//! The store's one error type, and how callers tell its kinds apart (by kind, never by
//! message text): worth retrying later, the database unreachable, a leadership term over.

use std::path::PathBuf;

/// Infrastructure failures of the store. Bad input never reaches here.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database schema is not up to date ({}; this build needs version {needed})", match .found {
        Some(version) => format!("at version {version}"),
        None => "no migration applied".to_owned(),
    })]
    NotMigrated { found: Option<i64>, needed: i64 },
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
    #[error("writes to the database fail: {reason}")]
    WritesFailing { reason: String },
    #[error("no database at {}", .0.display())]
    NoDatabase(PathBuf),
    #[error("cannot read {} without writing to it: {reason}; start `hookwarden serve` on it once to recover it", path.display())]
    NeedsWriter { path: PathBuf, reason: &'static str },
    /// A leader-only write of a term that is over: another process leads now.
    #[error("leadership term {term} is over (the current term is {current}); the write was refused")]
    Fenced { term: i64, current: i64 },
}

impl StoreError {
    /// Whether retrying later may succeed (connection trouble, a busy database).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Io(_)
                        | sqlx::Error::WorkerCrashed
                ) || e.as_database_error().is_some()
            }
            StoreError::WritesFailing { .. } => true,
            _ => false,
        }
    }

    /// Whether the database could not be reached, or is going away: nothing about the
    /// request itself was refused, so trying it again alone now would fail the same way.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Database(e) = self else { return false };
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => true,
            // SQLSTATE class 08 (connection exception), 53300 (too many connections),
            // 57P01-57P03 (the server shuts down, crashed, or is not accepting connections yet).
            _ => e.as_database_error().and_then(|d| d.code()).is_some_and(|code| {
                code.starts_with("08") || matches!(code.as_ref(), "53300" | "57P01" | "57P02" | "57P03")
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_database_is_told_apart_from_a_refused_request() {
        let unreachable = [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ];
        for e in unreachable {
            assert!(StoreError::Database(e).is_unavailable());
        }
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_unavailable());
        assert!(!StoreError::Fenced { term: 1, current: 2 }.is_unavailable());
        assert!(!StoreError::Fenced { term: 1, current: 2 }.is_transient(), "a stale leader does not retry");
    }
}
