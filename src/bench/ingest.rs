//! `hookwarden bench ingest`: throughput and latency of `POST /v1/events`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::json;

use crate::auth::{Role, TokenKeys};
use crate::config::Secret;
use crate::outln;

use super::server::{padded, percentile, ChildServer};

#[derive(Args)]
pub struct IngestArgs {
    /// Database of the server under test (a fresh one: the bench writes to it);
    /// default: an embedded SQLite file in a temporary directory.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Events to send in the measured run.
    #[arg(long, default_value_t = 50_000)]
    pub events: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Approximate size of each request body in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Events sent before measuring (connections, caches).
    #[arg(long, default_value_t = 2_000)]
    pub warmup: usize,
    /// Send realistic order data (10 properties, a nested object, an array) instead of
    /// an id, a total and padding: the control for `--schema`.
    #[arg(long)]
    pub realistic: bool,
    /// Apply an EventType whose schema covers the realistic data, so that every event is
    /// validated (implies `--realistic`).
    #[arg(long)]
    pub schema: bool,
}

/// The EventType `--schema` applies: every property of [`realistic_data`] checked.
const ORDER_TYPE: &str = r#"apiVersion: hookwarden/v1
kind: EventType
metadata: {name: order.created}
spec:
  schema:
    type: object
    required: [order_id, total, currency, status, customer, items]
    additionalProperties: false
    properties:
      order_id: {type: integer, minimum: 1}
      total: {type: integer, minimum: 0}
      currency: {enum: [EUR, USD, GBP]}
      status: {type: string, pattern: "^[a-z_]+$"}
      placed_at: {type: string, maxLength: 40}
      express: {type: boolean}
      coupon: {type: [string, "null"]}
      channel: {enum: [web, app, store]}
      customer:
        type: object
        required: [id, email, country]
        properties:
          id: {type: integer}
          email: {type: string, pattern: "^[^@]+@[^@]+$"}
          country: {type: string, minLength: 2, maxLength: 2}
      items:
        type: array
        minItems: 1
        maxItems: 50
        items:
          type: object
          required: [sku, qty, price]
          properties:
            sku: {type: string, pattern: "^[A-Z]{3}-[0-9]+$"}
            qty: {type: integer, minimum: 1}
            price: {type: integer, minimum: 0}
      note: {type: string}
"#;

/// Order data with ten properties, a nested object and an array of three items; `note`
/// pads it to the body size.
fn realistic_data(n: usize, padding: &str) -> serde_json::Value {
    json!({
        "order_id": n + 1, "total": 4200, "currency": "EUR", "status": "placed",
        "placed_at": "2026-12-04T02:30:00Z", "express": n.is_multiple_of(2), "coupon": null, "channel": "web",
        "customer": {"id": 77, "email": "ada@example.com", "country": "DE"},
        "items": [{"sku": "ABC-1", "qty": 1, "price": 1200}, {"sku": "DEF-22", "qty": 2, "price": 1000},
                  {"sku": "GHI-333", "qty": 1, "price": 1000}],
        "note": padding,
    })
}

fn event_body(worker: usize, n: usize, size: usize, run: &str, realistic: bool) -> String {
    padded(size, |padding| {
        let data = if realistic {
            realistic_data(n, padding)
        } else {
            json!({"order_id": n, "total": 1234, "padding": padding})
        };
        json!({"id": format!("{run}-{worker}-{n}"), "source": "bench", "type": "order.created", "data": data})
            .to_string()
    })
}

/// How the bench's events are made.
#[derive(Clone, Copy)]
struct Shape {
    size: usize,
    realistic: bool,
}

/// Sends `total` events over `concurrency` clients; returns each request's latency.
async fn load(
    base: &str,
    token: &str,
    total: usize,
    concurrency: usize,
    shape: Shape,
    run: &str,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let url = Arc::new(format!("{base}/v1/events"));
    let auth = Arc::new(format!("Bearer {token}"));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (client, url, auth, run) = (client.clone(), url.clone(), auth.clone(), run.to_owned());
        let count = total / concurrency + usize::from(worker < total % concurrency);
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            for n in 0..count {
                let body = event_body(worker, n, shape.size, &run, shape.realistic);
                let sent = Instant::now();
                let response = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .header("authorization", auth.as_str())
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                response.bytes().await?;
                if status.as_u16() != 202 {
                    bail!("unexpected status {status}");
                }
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok((all, started.elapsed()))
}

pub(super) async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.events < args.concurrency {
        bail!("--events must be at least --concurrency, and --concurrency at least 1");
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let server = ChildServer::start(None, args.database_url.as_deref(), &secret, None).await?;
    let token = TokenKeys::new(&Secret::new(secret.clone())).mint(
        "bench",
        &[Role::Ingest],
        &["*".to_owned()],
        Duration::from_secs(3600),
    );
    if args.schema {
        let operator = TokenKeys::new(&Secret::new(secret.clone())).mint(
            "bench",
            &[Role::Operator],
            &["*".to_owned()],
            Duration::from_secs(3600),
        );
        super::server::apply(&reqwest::Client::new(), &server.base, &operator, ORDER_TYPE.to_owned()).await?;
    }
    let shape = Shape { size: args.size, realistic: args.realistic || args.schema };
    let (idle_rss, _) = server.memory_kib()?;
    let run = ulid::Ulid::new().to_string();
    load(&server.base, &token, args.warmup.max(args.concurrency), args.concurrency, shape, &format!("w{run}")).await?;
    let cpu_before = server.cpu_time()?;
    let (mut latencies, elapsed) = load(&server.base, &token, args.events, args.concurrency, shape, &run).await?;
    let cpu = server.cpu_time()?.saturating_sub(cpu_before);
    let (_, peak_rss) = server.memory_kib()?;
    latencies.sort();
    let database = if args.database_url.is_some() { "postgres" } else { "sqlite" };
    let data = match (args.schema, shape.realistic) {
        (true, _) => "realistic, validated",
        (false, true) => "realistic, not validated",
        (false, false) => "padding",
    };
    outln!(
        "bench ingest: database={database} events={} concurrency={} body≈{}B data={data}",
        args.events,
        args.concurrency,
        args.size
    )?;
    outln!(
        "  throughput   {:.0} events/s ({:.2} s)",
        args.events as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    )?;
    outln!("  server CPU   {:.0} µs per event", cpu.as_secs_f64() * 1e6 / args.events as f64)?;
    outln!("  latency p50  {:.2} ms", percentile(&latencies, 0.50).as_secs_f64() * 1e3)?;
    outln!("  latency p99  {:.2} ms", percentile(&latencies, 0.99).as_secs_f64() * 1e3)?;
    outln!("  latency max  {:.2} ms", latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3)?;
    outln!(
        "  server RSS   idle {:.1} MiB, peak under load {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    )?;
    Ok(())
}
