//! The files of a real `hookwarden serve` that hold secrets are its owner's alone: the
//! SQLite database (endpoint secrets in plain text) with its `-wal` and `-shm`, its lock,
//! and the generated keys are `0600`, a data directory it creates `0700`, whatever the
//! umask; an existing data directory's files that others could read are tightened, and the
//! directory itself is named in a warning.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use common::{Process, TestDb, JWT_SECRET};

/// The files `serve` keeps in an embedded data directory while it runs.
const SQLITE_FILES: [&str; 6] =
    ["hookwarden.db", "hookwarden.db-wal", "hookwarden.db-shm", "hookwarden.lock", "jwt-secret", "audit-ed25519.key"];

/// `hookwarden serve ARGS` under the common umask 022 (so that modes come from the code,
/// not from the test's environment), with no key from the environment unless `jwt`.
fn serve(args: &[&str], jwt: bool) -> Command {
    let mut command = Command::new("sh");
    command
        .args(["-c", "umask 022; exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_hookwarden"), "serve"])
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .env_remove("HOOKWARDEN_AUDIT_KEY")
        .stdout(std::process::Stdio::null());
    match jwt {
        true => command.env("HOOKWARDEN_JWT_SECRET", JWT_SECRET),
        false => command.env_remove("HOOKWARDEN_JWT_SECRET"),
    };
    command
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn modes(dir: &Path) -> Vec<(String, String)> {
    SQLITE_FILES.iter().map(|name| (name.to_string(), format!("{:o}", mode(&dir.join(name))))).collect()
}

fn all(mode: &str) -> Vec<(String, String)> {
    SQLITE_FILES.iter().map(|name| (name.to_string(), mode.to_owned())).collect()
}

#[tokio::test]
async fn an_embedded_data_directory_and_its_files_are_private_to_their_owner() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let data_arg = data.to_str().unwrap();

    // A fresh data directory.
    let first = Process::try_start(serve(&["--data-dir", data_arg], false)).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(format!("{:o}", mode(&data)), "700");
    assert_eq!(modes(&data), all("600"));
    assert!(first.logged("the file holds secrets and was open to other users; its mode is now 0600").is_empty());
    // Killed, so that the log and its index stay, as after a crash of an older build.
    first.kill();

    // The same directory as an older build (or a umask) left it: everything 0644, 0755.
    for name in SQLITE_FILES {
        set_mode(&data.join(name), 0o644);
    }
    set_mode(&data, 0o755);
    let second = Process::try_start(serve(&["--data-dir", data_arg], false)).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(modes(&data), all("600"), "tightened at start-up");
    let mut tightened: Vec<String> = second
        .logged("the file holds secrets and was open to other users; its mode is now 0600")
        .iter()
        .map(|l| {
            assert_eq!(l["was"], "0644", "{l}");
            Path::new(l["file"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    tightened.sort();
    let mut expected: Vec<String> = SQLITE_FILES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(tightened, expected, "each file is named once");
    assert_eq!(format!("{:o}", mode(&data)), "755", "an existing directory is left as it is");
    let warned =
        second.logged("the data directory is open to other users; its files are not, but consider `chmod 700` on it");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0]["mode"], "0755");
    let ready = reqwest::get(format!("{}/readyz", second.base)).await.unwrap();
    assert_eq!(ready.status(), 200, "it runs on the tightened files");
    second.kill();
}

#[test]
fn a_sqlite_url_names_files_that_are_made_private_in_a_directory_left_alone() {
    // A `sqlite:` URL names a file in a directory of the operator's: the files are made
    // private, the directory is not touched.
    let root = tempfile::tempdir().unwrap();
    set_mode(root.path(), 0o755);
    let url = format!("sqlite://{}", root.path().join("hooks.db").display());
    let server = Process::try_start(serve(
        &["--database-url", &url, "--data-dir", root.path().join("keys").to_str().unwrap()],
        true,
    ))
    .unwrap_or_else(|f| panic!("{f}"));
    for name in ["hooks.db", "hooks.db-wal", "hooks.db-shm", "hooks.lock"] {
        assert_eq!(format!("{:o}", mode(&root.path().join(name))), "600", "{name}");
    }
    assert_eq!(format!("{:o}", mode(&root.path().join("keys"))), "700");
    assert_eq!(format!("{:o}", mode(&root.path().join("keys").join("audit-ed25519.key"))), "600");
    assert_eq!(format!("{:o}", mode(root.path())), "755");
    server.kill();
}

#[tokio::test]
async fn a_postgres_servers_data_directory_holds_its_checkpoint_key_privately() {
    let Some(db) = TestDb::postgres().await else { return };
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = Process::try_start(serve(&["--database-url", &db.url(), "--data-dir", data.to_str().unwrap()], true))
        .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(format!("{:o}", mode(&data)), "700");
    assert_eq!(format!("{:o}", mode(&data.join("audit-ed25519.key"))), "600");
    server.kill();
}
