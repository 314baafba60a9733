//! The SQLite database file seen from outside the store: the lock that lets one `serve`
//! at a time use it, and opening it read-only for tools.
//!
//! Invariants:
//! - While a `serve` runs on a database file, it holds an exclusive kernel lock
//!   (`flock`) on the lock file beside it ([`lock_path`]); a second `serve` is refused
//!   instead of both running as the one leader an embedded database assumes. The kernel
//!   drops the lock when the holder exits in any way, SIGKILL included, so a stale lock
//!   file never blocks a restart: the file stays, the lock does not.
//! - [`Store::open_read_only`] writes nothing and creates no file: not the database, and not
//!   the `-wal`/`-shm` files SQLite makes beside a WAL database on any open that finds
//!   them missing (a read-only connection included, which then leaves them behind).
//!   When the log exists, a server has the file open or stopped without cleaning up, and
//!   reading goes through the log; when it does not, every committed page is in the main
//!   file, which is opened `immutable`, and [`Store::read_snapshot_is_stale`] tells
//!   whether a server opened the database while it was being read.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use sqlx::sqlite::SqliteConnectOptions;

use super::{PgStore, SqliteStore, Store, StoreError};

/// The lock file of the database file at `database`: `hookwarden.db` → `hookwarden.lock`
/// (`x.lock` → `x.lock.lock`: never the database itself, which taking the lock truncates).
pub fn lock_path(database: &Path) -> PathBuf {
    let lock = database.with_extension("lock");
    if lock == database {
        beside(database, ".lock")
    } else {
        lock
    }
}

/// The file a `sqlite:` URL names; `None` for an in-memory database.
pub fn sqlite_file_of_url(url: &str) -> Result<Option<PathBuf>, StoreError> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (database, query) = rest.split_once('?').unwrap_or((rest, ""));
    if database == ":memory:" || query.split('&').any(|pair| pair == "mode=memory") {
        return Ok(None);
    }
    Ok(Some(SqliteConnectOptions::from_str(url)?.get_filename().to_owned()))
}

/// Exclusive use of one database file by this process, for as long as this value lives.
#[derive(Debug)]
pub struct DatabaseLock {
    _file: File,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another hookwarden serve is already running on {} ({holder}holds the lock {}); \
         stop it first, or give this process another --data-dir or DATABASE_URL",
        database.display(),
        lock.display()
    )]
    Held { database: PathBuf, lock: PathBuf, holder: String },
    #[error("cannot lock {}", lock.display())]
    Io {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DatabaseLock {
    /// Takes the lock of the database file at `database` without waiting, and writes this
    /// process's id into the lock file for the message a second process shows.
    pub fn acquire(database: &Path) -> Result<DatabaseLock, LockError> {
        let lock = lock_path(database);
        let io = |source| LockError::Io { lock: lock.clone(), source };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&lock).map_err(io)?;
        crate::private_files::tighten(&lock).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock)
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok())
                    .map(|pid| format!("pid {pid} "))
                    .unwrap_or_default();
                return Err(LockError::Held { database: database.to_owned(), lock, holder });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DatabaseLock { _file: file })
    }
}

/// What the main file of a database opened `immutable` looked like before it was read.
#[derive(Debug)]
pub(super) struct Snapshot {
    database: PathBuf,
    wal: PathBuf,
    seen: Option<(u64, std::time::SystemTime)>,
}

impl Snapshot {
    fn take(database: &Path, wal: PathBuf) -> Snapshot {
        Snapshot { database: database.to_owned(), wal, seen: Self::look(database) }
    }

    fn look(database: &Path) -> Option<(u64, std::time::SystemTime)> {
        let meta = std::fs::metadata(database).ok()?;
        Some((meta.len(), meta.modified().ok()?))
    }

    /// A log appeared (a server has the database open) or the main file changed (one
    /// checkpointed into it, perhaps while it was being read).
    pub(super) fn is_stale(&self) -> bool {
        self.wal.exists() || Self::look(&self.database) != self.seen
    }
}

/// `database` with `suffix` appended to its name (`x.db` → `x.db-wal`).
fn beside(database: &Path, suffix: &str) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl Store {
    /// Opens an existing database for tools such as `audit verify`, which must not change
    /// what they inspect. A SQLite file is opened read-only and nothing is created beside
    /// it (see the module docs); a missing one is [`StoreError::NoDatabase`]. PostgreSQL
    /// is connected to as usual: only the caller's statements (reads) decide what it does.
    pub async fn open_read_only(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(PgStore::connect(url).await?));
        }
        let options = SqliteConnectOptions::from_str(url)?.read_only(true).create_if_missing(false);
        let Some(path) = sqlite_file_of_url(url)? else {
            return Ok(Store::Sqlite(SqliteStore::open_read_only(options, None).await?));
        };
        if !path.is_file() {
            return Err(StoreError::NoDatabase(path));
        }
        let (wal, shm, journal) = (beside(&path, "-wal"), beside(&path, "-shm"), beside(&path, "-journal"));
        let unreadable = |reason| StoreError::NeedsWriter { path: path.clone(), reason };
        if journal.exists() {
            return Err(unreadable("a rollback journal is left from an interrupted write"));
        }
        match (wal.exists(), shm.exists()) {
            (true, true) => Ok(Store::Sqlite(SqliteStore::open_read_only(options, None).await?)),
            (true, false) => Err(unreadable("its write-ahead log has no index (-shm) beside it")),
            (false, _) => {
                let snapshot = Snapshot::take(&path, wal);
                let store = SqliteStore::open_read_only(options.immutable(true), Some(snapshot)).await?;
                Ok(Store::Sqlite(store))
            }
        }
    }

    /// Whether a store opened with [`Store::open_read_only`] on a database nobody had open
    /// may have read pages that a server, started meanwhile, was changing; what it read is
    /// then not to be trusted. Always `false` for other stores.
    pub fn read_snapshot_is_stale(&self) -> bool {
        match self {
            Store::Sqlite(s) => s.snapshot_is_stale(),
            Store::Postgres(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_file_and_in_memory_ones_none() {
        assert_eq!(sqlite_file_of_url("sqlite:///var/x/h.db").unwrap(), Some(PathBuf::from("/var/x/h.db")));
        assert_eq!(sqlite_file_of_url("sqlite:h.db?mode=rwc").unwrap(), Some(PathBuf::from("h.db")));
        assert_eq!(sqlite_file_of_url("sqlite::memory:").unwrap(), None);
        assert_eq!(sqlite_file_of_url("sqlite://h.db?mode=memory").unwrap(), None);
        assert_eq!(lock_path(Path::new("/d/hookwarden.db")), PathBuf::from("/d/hookwarden.lock"));
        assert_eq!(lock_path(Path::new("/d/h.lock")), PathBuf::from("/d/h.lock.lock"));
    }

    #[test]
    fn the_lock_is_held_once_and_free_again_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("hookwarden.db");
        let held = DatabaseLock::acquire(&database).unwrap();
        let err = DatabaseLock::acquire(&database).unwrap_err();
        assert!(err.to_string().contains(&format!("pid {} holds", std::process::id())), "{err}");
        drop(held);
        DatabaseLock::acquire(&database).unwrap();
    }
}
