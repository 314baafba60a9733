//! A PostgreSQL cluster of a test's own, for fault tests that stop and start the database:
//! a fresh data directory in a temporary directory, on a free loopback port, trust auth,
//! `fsync` on. The shared cluster (port 5432) is never touched.
//!
//! PostgreSQL refuses to run as root, so as root every `initdb`/`pg_ctl` runs as the
//! `postgres` user (`runuser`) on a data directory it owns. The cluster is stopped
//! (`immediate`) and its directory removed when the [`PgCluster`] is dropped, also when the
//! test fails.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sqlx::Connection as _;

use super::{TestDb, SKIP_MARKER};

pub struct PgCluster {
    bin: PathBuf,
    /// Removed on drop (after the server is stopped).
    dir: tempfile::TempDir,
    data: PathBuf,
    pub port: u16,
    /// Run the binaries as `postgres` (we are root).
    as_postgres: bool,
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `pg_ctl`.
fn binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().unwrap().port()
}

impl PgCluster {
    /// Creates and starts a cluster, or `None` (after saying so, like the other PostgreSQL
    /// tests) where PostgreSQL is not installed.
    pub fn start() -> Option<PgCluster> {
        let Some(bin) = binaries() else {
            if std::env::var("HOOKWARDEN_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!("HOOKWARDEN_TEST_REQUIRE_POSTGRES=1 but no /usr/lib/postgresql/*/bin/initdb");
            }
            eprintln!("{SKIP_MARKER}: no PostgreSQL binaries under /usr/lib/postgresql; fault test skipped");
            return None;
        };
        let as_postgres = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let dir = tempfile::Builder::new().prefix("hw-pg-").tempdir().expect("temporary directory");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("create the data directory");
        if as_postgres {
            // The postgres user must reach and own its directories.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            run(Command::new("chown").args(["postgres:postgres"]).arg(&data), "chown the data directory");
        }
        let cluster = PgCluster { bin, dir, data, port: free_port(), as_postgres };
        cluster
            .run_pg("initdb", &["-D", path(&cluster.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]);
        let socket_dir = cluster.data.display().to_string();
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{socket_dir}'\n\
             fsync = on\nsynchronous_commit = on\nmax_connections = 100\n",
            cluster.port
        );
        let conf = cluster.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&settings);
        std::fs::write(&conf, text).expect("write postgresql.conf");
        cluster.start_again();
        Some(cluster)
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// A fresh database on this cluster, as a [`TestDb`] (dropped before the cluster).
    pub async fn database(&self) -> TestDb {
        let name = format!("hw_fault_{}", ulid::Ulid::new().to_string().to_lowercase());
        let admin_url = self.url("postgres");
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.expect("connect to the test's own cluster");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
        admin.close().await.ok();
        TestDb::Postgres { url: self.url(&name), admin_url, name }
    }

    /// Stops the server (`fast`: clients are disconnected, like an operator's restart).
    pub fn stop(&self) {
        self.run_pg("pg_ctl", &["stop", "-D", path(&self.data), "-m", "fast", "-w", "-t", "30"]);
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let log = self.dir.path().join("postgres.log");
        if self.as_postgres && !log.exists() {
            std::fs::write(&log, "").unwrap();
            run(Command::new("chown").args(["postgres:postgres"]).arg(&log), "chown the log");
        }
        self.run_pg("pg_ctl", &["start", "-D", path(&self.data), "-l", path(&log), "-w", "-t", "30"]);
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn run_pg(&self, program: &str, args: &[&str]) {
        run(self.command(program).args(args).current_dir(self.dir.path()), program);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn run(command: &mut Command, what: &str) {
    let output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Whatever state the test left it in; an already stopped server is fine.
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-D", path(&self.data), "-m", "immediate", "-w", "-t", "30"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
