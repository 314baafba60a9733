//! Test support: real databases (a SQLite file, a fresh PostgreSQL database per test),
//! an in-process server bound to `127.0.0.1:0`, and token minting.
//!
//! PostgreSQL tests need `HOOKWARDEN_TEST_POSTGRES_URL` (an admin URL; each test creates
//! and drops its own database). Without it they skip with a message on standard error;
//! with `HOOKWARDEN_TEST_REQUIRE_POSTGRES=1` (set by `.ci/run`) a missing URL fails.
#![allow(dead_code)]

/// Runs each named `async fn case(db: TestDb)` as two tests, `sqlite::case` and
/// `postgres::case` (skipped without a PostgreSQL URL, see [`TestDb::postgres`]), on a
/// two-thread runtime. Test files take it with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_both_databases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $case() { super::$case(super::TestDb::sqlite()).await; } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $case() { let Some(db) = super::TestDb::postgres().await else { return }; super::$case(db).await; } )*
        }
    };
}

pub mod pg_cluster;
pub mod receiver;

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use hookwarden::auth::{Role, TokenKeys};
use hookwarden::config::{Config, Secret};
use hookwarden::server::Server;
use hookwarden::store::Store;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// The marker `.ci/run` looks for to fail a run whose PostgreSQL tests were skipped.
pub const SKIP_MARKER: &str = "HOOKWARDEN-POSTGRES-TESTS-SKIPPED";

/// The admin URL for PostgreSQL tests, or `None` (after saying so) when there is none.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("HOOKWARDEN_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("HOOKWARDEN_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!("HOOKWARDEN_TEST_REQUIRE_POSTGRES=1 but HOOKWARDEN_TEST_POSTGRES_URL is not set");
            }
            static SAID: Once = Once::new();
            SAID.call_once(|| {
                // Written past the test harness's capture, so it shows in a normal run.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "{SKIP_MARKER}: PostgreSQL tests skipped; set HOOKWARDEN_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run them"
                );
            });
            None
        }
    }
}

/// A database for one test, removed when dropped.
pub enum TestDb {
    Sqlite { dir: tempfile::TempDir },
    Postgres { admin_url: String, name: String, url: String },
}

fn with_database(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin_url, String::new()),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[authority_end..].find('/') {
        Some(i) => &base[..authority_end + i],
        None => base,
    };
    format!("{root}/{name}{query}")
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        TestDb::Sqlite { dir: tempfile::tempdir().expect("temporary directory") }
    }

    /// A fresh, empty PostgreSQL database, or `None` when PostgreSQL tests are skipped.
    pub async fn postgres() -> Option<TestDb> {
        let admin_url = postgres_admin_url()?;
        let name = format!("hw_test_{}", ulid::Ulid::new().to_string().to_lowercase());
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.expect("connect to HOOKWARDEN_TEST_POSTGRES_URL");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        Some(TestDb::Postgres { admin_url, name, url })
    }

    /// The `DATABASE_URL` a server process would use.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite { dir } => format!("sqlite://{}", self.sqlite_path_in(dir).display()),
            TestDb::Postgres { url, .. } => url.clone(),
        }
    }

    fn sqlite_path_in(&self, dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("hookwarden.db")
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestDb::Postgres { .. })
    }

    /// A migrated store on this database.
    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.url()).await.expect("connect test store");
        store.migrate().await.expect("migrate test store");
        store
    }

    /// A server configuration on this database, listening on a free loopback port.
    pub fn config(&self) -> Config {
        let data_dir = match self {
            TestDb::Sqlite { dir } => dir.path().to_owned(),
            TestDb::Postgres { .. } => std::env::temp_dir(),
        };
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: Some(Secret::new(self.url())),
            data_dir,
            jwt_secret: Some(Secret::new(JWT_SECRET)),
            ..Config::default()
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { admin_url, name, .. } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside or outside a runtime; a thread of its own works in both.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                runtime.block_on(async {
                    let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await.ok()
                })
            })
            .join();
        }
    }
}

pub fn keys() -> TokenKeys {
    TokenKeys::new(&Secret::new(JWT_SECRET))
}

pub fn token(subject: &str, roles: &[Role], namespaces: &[&str]) -> String {
    let namespaces: Vec<String> = namespaces.iter().map(|n| n.to_string()).collect();
    keys().mint(subject, roles, &namespaces, Duration::from_secs(3600))
}

/// A server running in this test process.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    pub admin: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app(db: &TestDb) -> TestApp {
    spawn_app_with(db.config()).await
}

pub async fn spawn_app_with(config: Config) -> TestApp {
    let server = Server::start(&config).await.expect("server starts");
    let base = format!("http://{}", server.local_addr());
    let store = server.store().clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    TestApp {
        base,
        client: reqwest::Client::new(),
        store,
        admin: token("admin", &[Role::Admin], &["*"]),
        shutdown,
        task: Some(task),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST path` with a JSON body and a bearer token.
    pub async fn post_json(&self, path: &str, token: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    /// `POST path` (`/v1/apply?…`) of multi-document YAML as the admin.
    pub async fn post_yaml(&self, path: &str, yaml: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.admin)
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .expect("request sent")
    }

    /// Applies multi-document YAML as the admin; the apply must succeed.
    pub async fn apply_yaml(&self, yaml: &str) {
        let response = self.post_yaml("/v1/apply", yaml).await;
        let status = response.status();
        assert_eq!(status, 200, "{}", response.text().await.unwrap_or_default());
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client.get(self.url(path)).bearer_auth(token).send().await.expect("request sent")
    }

    /// Stops the server the way SIGTERM does and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server stopped cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads a JSON response, asserting its status.
pub async fn json_with_status(response: reqwest::Response, status: u16) -> serde_json::Value {
    let actual = response.status().as_u16();
    let text = response.text().await.expect("response body");
    assert_eq!(actual, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}

/// A real `hookwarden serve` process.
pub struct Process {
    pub child: Child,
    pub base: String,
    /// Every log line it wrote (JSON), in order, from its start.
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A `hookwarden serve` that exited before it listened: its exit code and its log.
#[derive(Debug)]
pub struct FailedStart {
    pub code: Option<i32>,
    pub stderr: String,
}

impl std::fmt::Display for FailedStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server exited ({:?}) before listening:\n{}", self.code, self.stderr)
    }
}

impl Process {
    /// Applies multi-document YAML to this process as the admin; the apply must succeed.
    pub async fn apply_yaml(&self, yaml: &str) {
        apply_at(&self.base, yaml).await
    }

    /// The command [`Process::start`] runs: `serve` on `db` with `extra` arguments, the
    /// test key in the environment, JSON logs on standard error. Adjust it (environment,
    /// working directory) and pass it to [`Process::try_start`].
    pub fn command(db: &TestDb, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookwarden"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .env("HOOKWARDEN_JWT_SECRET", JWT_SECRET)
            .env("RUST_LOG", "info")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match db {
            // The embedded default: no DATABASE_URL, only a data directory.
            TestDb::Sqlite { dir } => command.arg("--data-dir").arg(dir.path()),
            TestDb::Postgres { url, .. } => command.arg("--database-url").arg(url),
        };
        command
    }

    /// Starts the binary with `extra` arguments and waits for its "listening" log line
    /// to learn the port.
    pub fn start(db: &TestDb, extra: &[&str]) -> Process {
        Process::try_start(Process::command(db, extra)).unwrap_or_else(|failed| panic!("{failed}"))
    }

    /// Runs `command` (a `serve` with `--log-format json`) until it logs that it listens;
    /// a process that exits first comes back as its exit code and everything it logged.
    pub fn try_start(mut command: Command) -> Result<Process, FailedStart> {
        let mut child = command.stderr(Stdio::piped()).spawn().expect("start hookwarden serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut log = String::new();
        let mut early = Vec::new();
        let addr = loop {
            let Some(line) = lines.next() else {
                let status = child.wait().expect("reap");
                return Err(FailedStart { code: status.code(), stderr: log });
            };
            let line = line.expect("read log");
            log.push_str(&line);
            log.push('\n');
            early.push(line.clone());
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if entry["message"] == "hookwarden is listening" {
                break entry["addr"].as_str().expect("addr field").to_owned();
            }
        };
        // Keep draining the logs so the server never blocks on a full pipe.
        let logs = std::sync::Arc::new(std::sync::Mutex::new(early));
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Ok(Process { child, base: format!("http://{addr}"), logs })
    }

    /// The log lines (JSON) whose `message` is `message`.
    pub fn logged(&self, message: &str) -> Vec<serde_json::Value> {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == message)
            .collect()
    }

    /// Runs `command`, which must fail to start; a server that starts anyway is killed
    /// and the test fails with `why`.
    pub fn start_must_fail(command: Command, why: &str) -> FailedStart {
        match Process::try_start(command) {
            Ok(started) => {
                started.kill();
                panic!("the server started: {why}");
            }
            Err(failed) => failed,
        }
    }

    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// Sends SIGTERM and waits (up to 20 s) for the graceful stop.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("send SIGTERM");
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                self.kill();
                panic!("the server did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A test that fails (panics) before it stops its server does not leave it running.
impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` until it holds; fails the test naming `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The value of the series `name` whose labels include every `labels` pair, read from the
/// Prometheus text at `base`/metrics; `None` when there is no such series.
pub async fn metric(base: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let matches = series_name == name
            && labels.iter().all(|(k, v)| series_labels.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// Applies multi-document YAML as an admin to the server at `base` (a [`Process`] or a
/// [`TestApp`]); the apply must succeed.
pub async fn apply_at(base: &str, yaml: &str) {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/apply"))
        .bearer_auth(token("admin", &[Role::Admin], &["*"]))
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .expect("request sent");
    let status = response.status();
    assert_eq!(status, 200, "{}", response.text().await.unwrap_or_default());
}

/// Posts probe events of `event_type` to the server at `base` until one fans out to an
/// endpoint (a second process learns of an endpoint applied through another by its
/// periodic catalog refresh); returns the answer to that probe.
pub async fn wait_until_it_fans_out(base: &str, event_type: &str) -> serde_json::Value {
    let client = reqwest::Client::new();
    let admin = token("admin", &[Role::Admin], &["*"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let probe = serde_json::json!({"source": "probe", "type": event_type, "data": {}});
        let answer: serde_json::Value = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(&admin)
            .json(&probe)
            .send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("a JSON answer");
        if answer["deliveries"].as_array().is_some_and(|d| !d.is_empty()) {
            return answer;
        }
        assert!(std::time::Instant::now() < deadline, "the process at {base} never saw the endpoint");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
