//! What every bench shares: the server under test as a child process, the receiver the
//! deliveries go to, applying resources, and percentiles.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A `hookwarden serve` child process, killed when dropped.
pub(super) struct ChildServer {
    pub(super) child: tokio::process::Child,
    pub(super) base: String,
    data_dir: tempfile::TempDir,
}

impl ChildServer {
    pub(super) async fn start(
        binary: Option<&std::path::Path>,
        database_url: Option<&str>,
        secret: &str,
        config: Option<&str>,
    ) -> anyhow::Result<ChildServer> {
        let data_dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let binary = match binary {
            Some(path) => path.to_owned(),
            None => std::env::current_exe()?,
        };
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            // A directory `serve` creates (0700), not the temporary one (whose mode
            // follows the umask, which `serve` would warn about).
            .arg("--data-dir")
            .arg(data_dir.path().join("data"))
            .env("HOOKWARDEN_JWT_SECRET", secret)
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = database_url {
            command.arg("--database-url").arg(url);
        }
        if let Some(yaml) = config {
            let path = data_dir.path().join("bench-config.yaml");
            std::fs::write(&path, yaml)?;
            command.arg("--config").arg(path);
        }
        let child = command.spawn().context("cannot start the server")?;
        let server = ChildServer { child, base: format!("http://127.0.0.1:{port}"), data_dir };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = client.get(format!("{}/readyz", server.base)).send().await {
                if response.status().is_success() {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                bail!("the server did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CPU time (user + system) the server has used so far.
    pub(super) fn cpu_time(&self) -> anyhow::Result<Duration> {
        super::procfs::cpu_time(self.pid()?)
    }

    /// The temporary directory that holds the server's data directory and lives as long
    /// as the server: room for the bench's scratch files.
    pub(super) fn data_dir(&self) -> &std::path::Path {
        self.data_dir.path()
    }

    pub(super) fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the server has exited")
    }

    /// `(current, peak)` resident memory in KiB, from `/proc`.
    pub(super) fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What the bench's receiver has seen at `/ok`.
#[derive(Default)]
pub(super) struct Received {
    /// Enqueue→2xx latency of each request whose event carries `data.sent_us`.
    pub(super) latencies: Vec<Duration>,
    /// Distinct `webhook-id`s (event ids): with fan-out 1, one per delivered event.
    ids: HashSet<String>,
    requests: usize,
    /// When the last request arrived.
    pub(super) last: Option<Instant>,
}

impl Received {
    /// Events delivered, each counted once.
    pub(super) fn delivered(&self) -> usize {
        self.ids.len()
    }

    /// Requests beyond the first for an event (retries, or deliveries made twice).
    pub(super) fn duplicates(&self) -> usize {
        self.requests - self.ids.len()
    }
}

pub(super) type Receiver = Arc<std::sync::Mutex<Received>>;

pub(super) fn received(receiver: &Receiver) -> std::sync::MutexGuard<'_, Received> {
    receiver.lock().unwrap_or_else(|p| p.into_inner())
}

/// The bench's receiver: answers `/ok` at once and records each event's id and its
/// enqueue→2xx latency from the event's `sent_us`; `/slow` never answers within the
/// endpoint's timeout; `/ten-seconds` answers after 10 s.
pub(super) async fn start_receiver() -> anyhow::Result<(String, Receiver)> {
    let receiver = Receiver::default();
    let recorded = receiver.clone();
    let app = axum::Router::new()
        .route(
            "/ok",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let recorded = recorded.clone();
                async move {
                    let now = now_us();
                    let sent = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|b| b["data"]["sent_us"].as_u64());
                    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                    let mut received = received(&recorded);
                    if let Some(sent) = sent {
                        received.latencies.push(Duration::from_micros(now.saturating_sub(sent)));
                    }
                    received.ids.insert(id);
                    received.requests += 1;
                    received.last = Some(Instant::now());
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
        .route(
            "/slow",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                axum::http::StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/ten-seconds",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                axum::http::StatusCode::NO_CONTENT
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, receiver))
}

/// A request body of about `size` bytes: `body(padding)` with padding as long as needed.
pub(super) fn padded(size: usize, body: impl Fn(&str) -> String) -> String {
    let unpadded = body("").len();
    body(&"x".repeat(size.saturating_sub(unpadded)))
}

pub(super) fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub(super) async fn apply(client: &reqwest::Client, base: &str, token: &str, yaml: String) -> anyhow::Result<()> {
    let applied = client
        .post(format!("{base}/v1/apply"))
        .bearer_auth(token)
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await?;
    if !applied.status().is_success() {
        bail!("apply failed: {}", applied.text().await?);
    }
    Ok(())
}

/// Polls `/healthz` every 20 ms until cancelled; returns the slowest answer.
pub(super) fn poll_health(base: &str) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<Duration>) {
    let done = tokio_util::sync::CancellationToken::new();
    let (url, stop) = (format!("{base}/healthz"), done.clone());
    let poller = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut slowest = Duration::ZERO;
        while !stop.is_cancelled() {
            let started = Instant::now();
            let _ = client.get(&url).timeout(Duration::from_secs(300)).send().await;
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest
    });
    (done, poller)
}
