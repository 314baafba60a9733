//! Files that hold secrets, readable by their owner only: the SQLite database (which
//! holds endpoint secrets and header values in plain text) with its `-wal`, `-shm` and
//! `-journal` files and its lock, the generated token key and the checkpoint key.
//!
//! Invariants, on Unix:
//! - a data directory `serve` creates is `0700`, a file it creates is `0600`, whatever
//!   the umask. The database file is created (empty) before SQLite opens it, because
//!   SQLite gives the files it makes beside a database the database's own mode.
//! - an existing file of these that others may read or write is tightened to `0600` at
//!   start-up, with a warning naming it: it is Hookwarden's own.
//! - an existing data directory is never changed (it may be a directory the operator chose
//!   for more than Hookwarden); one that others may enter is named in a warning.

use std::io;
use std::path::{Path, PathBuf};

/// The mode of the files (owner read and write).
#[cfg(unix)]
const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and its missing parents) as `0700`; an existing one is left as it is.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Warns when others may enter or read the existing directory `dir`.
pub fn warn_if_open(dir: &Path) {
    #[cfg(unix)]
    if let Some(mode) = mode_of(dir).filter(|mode| mode & 0o077 != 0) {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:04o}"),
            "the data directory is open to other users; its files are not, but consider `chmod 700` on it"
        );
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Creates the file `path` empty as `0600` unless it exists; then [`tighten`]s it.
pub fn create_file(path: &Path) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    options.open(path)?;
    tighten(path)
}

/// Sets an existing file that others may read or write to `0600`, with a warning; a
/// missing file is no error.
pub fn tighten(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    if let Some(mode) = mode_of(path).filter(|mode| mode & 0o077 != 0) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))?;
        tracing::warn!(
            file = %path.display(),
            was = format!("{mode:04o}"),
            "the file holds secrets and was open to other users; its mode is now 0600"
        );
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Creates the SQLite database file `database` as `0600` before SQLite opens it, and
/// tightens it and the files SQLite keeps beside it.
pub fn secure_database(database: &Path) -> io::Result<()> {
    create_file(database)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        tighten(&beside(database, suffix))?;
    }
    Ok(())
}

/// The permission bits of `path`, `None` when it does not exist.
#[cfg(unix)]
fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o7777)
}

/// `database` with `suffix` appended to its name (`x.db` → `x.db-wal`).
fn beside(database: &Path, suffix: &str) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn new_files_and_directories_are_private_and_open_files_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("data");
        create_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), Some(0o700));
        assert_eq!(mode_of(&root.path().join("a")), Some(0o700), "parents it creates too");

        let database = dir.join("hookwarden.db");
        secure_database(&database).unwrap();
        assert_eq!((mode_of(&database), std::fs::metadata(&database).unwrap().len()), (Some(0o600), 0));

        use std::os::unix::fs::PermissionsExt as _;
        let wal = dir.join("hookwarden.db-wal");
        std::fs::write(&wal, b"log").unwrap();
        for path in [&database, &wal] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        secure_database(&database).unwrap();
        assert_eq!((mode_of(&database), mode_of(&wal)), (Some(0o600), Some(0o600)));
        assert_eq!(std::fs::read(&wal).unwrap(), b"log", "contents are kept");

        // An existing directory is left as it is.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), Some(0o755));
    }
}
