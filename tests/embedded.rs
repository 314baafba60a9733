//! The embedded SQLite database with real processes: one `serve` per database file (a
//! second is refused while the first lives, and may start once it died), and
//! `audit verify --database-url` reads a database without writing or creating anything.

mod common;

use std::path::Path;
use std::process::Command;

use common::{token, Process, TestDb};
use hookwarden::auth::Role;

/// The names in `dir` with each file's bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap_or_default())
        })
        .collect();
    files.sort();
    files
}

fn names(files: &[(String, Vec<u8>)]) -> Vec<&str> {
    files.iter().map(|(name, _)| name.as_str()).collect()
}

fn sqlite_dir(db: &TestDb) -> &Path {
    match db {
        TestDb::Sqlite { dir } => dir.path(),
        TestDb::Postgres { .. } => unreachable!("an embedded database"),
    }
}

fn second_serve_is_refused_until_the_first_is_gone(extra: &[&str], kill: bool) {
    let db = TestDb::sqlite();
    let first = Process::start(&db, extra);
    let pid = first.child.id();
    let second = Process::try_start(Process::command(&db, extra));
    // The lock is the kernel's: a SIGKILLed holder releases it as surely as a stopped one.
    let stopped = if kill {
        first.kill();
        true
    } else {
        first.terminate().success()
    };
    let failed = match second {
        Ok(second) => {
            second.kill();
            panic!("a second serve on one data directory started");
        }
        Err(failed) => failed,
    };
    assert!(stopped, "the first server stops cleanly");
    assert_ne!(failed.code, Some(0), "{}", failed.stderr);
    let lock = sqlite_dir(&db).join("hookwarden.lock");
    assert!(
        failed.stderr.contains("already running") && failed.stderr.contains(&lock.display().to_string()),
        "{}",
        failed.stderr
    );
    assert!(failed.stderr.contains(&format!("pid {pid}")), "{}", failed.stderr);
    Process::start(&db, extra).kill();
}

#[test]
fn a_second_serve_on_one_data_directory_is_refused_until_the_first_is_killed() {
    second_serve_is_refused_until_the_first_is_gone(&[], true);
}

#[test]
fn a_second_serve_on_one_data_directory_is_refused_until_the_first_stopped() {
    second_serve_is_refused_until_the_first_is_gone(&[], false);
}

#[test]
fn a_second_serve_on_one_sqlite_url_is_refused_until_the_first_is_killed() {
    let db = TestDb::sqlite();
    let url = db.url();
    // Both keep their own data directories; the database file is what they share.
    let (a, b) = (TestDb::sqlite(), TestDb::sqlite());
    let serve = |data_dir: &TestDb| Process::command(data_dir, &["--database-url", &url]);
    let first = Process::try_start(serve(&a)).unwrap_or_else(|failed| panic!("{failed}"));
    let second = Process::try_start(serve(&b));
    first.kill();
    let failed = match second {
        Ok(second) => {
            second.kill();
            panic!("a second serve on one sqlite: URL started");
        }
        Err(failed) => failed,
    };
    assert!(failed.stderr.contains("already running"), "{}", failed.stderr);
    Process::try_start(serve(&b)).unwrap_or_else(|failed| panic!("{failed}")).kill();
}

fn verify(url: &str) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .args(["audit", "verify", "--database-url", url])
        .output()
        .expect("run audit verify");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn audit_verify_of_a_missing_database_fails_clearly_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nothing-here.db");
    let (code, stdout, stderr) = verify(&format!("sqlite://{}", path.display()));
    assert_ne!(code, 0, "{stdout}");
    assert!(stderr.contains(&format!("no database at {}", path.display())), "{stderr}");
    assert_eq!(snapshot(dir.path()), Vec::new(), "verify created files");
}

async fn apply_budgets(server: &Process, names: &[&str]) {
    let admin = token("admin", &[Role::Admin], &["*"]);
    for name in names {
        let yaml = format!("apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: {name}}}\nspec:\n  maxAttempts: 3\n  backoff: {{base: 1s, max: 1m}}\n");
        let response = reqwest::Client::new()
            .post(format!("{}/v1/apply", server.base))
            .bearer_auth(&admin)
            .header("content-type", "application/yaml")
            .body(yaml)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

/// Verifies `db` and checks that the data directory is exactly as it was.
fn verify_leaves_the_directory_alone(db: &TestDb, records: usize, state: &str) {
    let dir = sqlite_dir(db);
    let before = snapshot(dir);
    let (code, stdout, stderr) = verify(&db.url());
    assert_eq!(code, 0, "{state}: {stdout}{stderr}");
    assert!(stdout.contains(&format!("OK: chain `default`: {records} records")), "{state}: {stdout}");
    let after = snapshot(dir);
    assert_eq!(names(&after), names(&before), "{state}: verify changed the directory's file list");
    let main = |files: &[(String, Vec<u8>)]| files.iter().find(|(n, _)| n == "hookwarden.db").cloned();
    assert!(main(&after) == main(&before), "{state}: verify wrote to the database file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_reads_a_server_written_database_without_changing_its_directory() {
    let db = TestDb::sqlite();
    let server = Process::start(&db, &[]);
    apply_budgets(&server, &["a", "b", "c"]).await;
    // While the server runs, the log and its index exist: verify reads through them.
    let running = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        verify_leaves_the_directory_alone(&db, 3, "server running")
    }));
    assert!(server.terminate().success());
    if let Err(panic) = running {
        std::panic::resume_unwind(panic);
    }
    // A clean stop checkpoints and removes the log: verify must not bring it back.
    let files = snapshot(sqlite_dir(&db));
    assert!(!names(&files).contains(&"hookwarden.db-wal"), "{:?}", names(&files));
    verify_leaves_the_directory_alone(&db, 3, "server stopped");

    // A SIGKILL leaves the log behind, records in it that the main file lacks.
    let server = Process::start(&db, &[]);
    apply_budgets(&server, &["d", "e"]).await;
    server.kill();
    let files = snapshot(sqlite_dir(&db));
    assert!(names(&files).contains(&"hookwarden.db-wal"), "{:?}", names(&files));
    verify_leaves_the_directory_alone(&db, 5, "server killed");
}

#[tokio::test]
async fn a_read_only_snapshot_knows_when_a_server_opened_the_database_meanwhile() {
    use sqlx::Connection as _;
    let db = TestDb::sqlite();
    db.store().await.close().await;
    // sqlx closes a SQLite connection on its worker thread, a moment after `close` returns.
    let wal = sqlite_dir(&db).join("hookwarden.db-wal");
    common::eventually(std::time::Duration::from_secs(10), "the log removed", || async { !wal.exists() }).await;
    let reader = hookwarden::store::Store::open_read_only(&db.url()).await.unwrap();
    assert!(reader.audit_heads().await.unwrap().is_empty());
    assert!(!reader.read_snapshot_is_stale(), "nobody else opened the database");

    let mut writer = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
    sqlx::query("CREATE TABLE scratch (x INTEGER)").execute(&mut writer).await.unwrap();
    assert!(reader.read_snapshot_is_stale(), "a writer has the database open");
    writer.close().await.unwrap();
    common::eventually(std::time::Duration::from_secs(10), "the log removed", || async { !wal.exists() }).await;
    assert!(reader.read_snapshot_is_stale(), "the writer is gone, but it changed the main file");
    reader.close().await;
}

#[tokio::test]
async fn audit_verify_refuses_a_log_without_its_index_and_creates_nothing() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let copy = tempfile::tempdir().unwrap();
    for name in ["hookwarden.db", "hookwarden.db-wal"] {
        std::fs::copy(sqlite_dir(&db).join(name), copy.path().join(name)).unwrap();
    }
    store.close().await;
    let before = snapshot(copy.path());
    let (code, stdout, stderr) = verify(&format!("sqlite://{}", copy.path().join("hookwarden.db").display()));
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("without writing to it") && stderr.contains("no index"), "{stderr}");
    assert_eq!(snapshot(copy.path()), before, "verify changed the copy");
}
