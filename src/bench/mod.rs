//! `hookwarden bench`: load generators that measure a real `hookwarden serve` process.
//!
//! The server runs as a child process (this same binary) so that its memory is measured
//! apart from the load generator's; both share the machine, as they would on a small host.
//! Figures and the commands that produced them are kept in `docs/PERFORMANCE.md`.

mod cel;
mod deliver;
mod ingest;
mod pgstats;
mod policy;
mod procfs;
mod server;
mod work;
mod wrk;

use clap::Subcommand;

pub use cel::CelArgs;
pub use deliver::{AuditOutcomes, DeliverArgs};
pub use ingest::IngestArgs;
pub use policy::PolicyArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and latency of `POST /v1/events`.
    Ingest(IngestArgs),
    /// End-to-end deliveries: enqueue → signed POST → 2xx at a local receiver.
    Deliver(DeliverArgs),
    /// The policy gate alone: decisions per second and latency per decision.
    Policy(PolicyArgs),
    /// Hostile CEL: what Filters and AgentRules built to be expensive cost the server.
    Cel(CelArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest(args) => ingest::ingest(args).await,
        BenchCommand::Deliver(args) => deliver::deliver(args).await,
        BenchCommand::Policy(args) => policy::policy(args).await,
        BenchCommand::Cel(args) => cel::cel(args).await,
    }
}
