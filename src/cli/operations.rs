//! `approvals`, `deliveries` and `events`.

use std::process::ExitCode;

use hookwarden::outln;
use serde_json::json;

use super::{print_error, show, Client, ClientArgs};

#[derive(clap::Subcommand)]
pub enum ApprovalsCommand {
    /// Pending approval requests (or another state with --state).
    List {
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "pending")]
        state: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One request with its votes.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Vote to grant.
    Grant {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Vote to deny (one denial decides).
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum DeliveriesCommand {
    /// Deliveries newest first.
    List {
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One delivery with its attempts and policy decision.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send a finished delivery again.
    Replay {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum EventsCommand {
    /// One event with its deliveries.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn approvals(command: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ApprovalsCommand::List { namespace, state, client } => {
            let c = Client::new(&client)?;
            let (status, body) = c
                .send(
                    c.http
                        .get(format!("{}/v1/approvals", c.server))
                        .query(&[("namespace", &namespace), ("state", &state)]),
                )
                .await?;
            if status != 200 {
                print_error(status, &body);
                return Ok(ExitCode::from(1));
            }
            outln!("{:<32} {:<9} {:<20} {:<24} {:>6}  REASON", "ID", "STATE", "ENDPOINT", "EXPIRES", "QUORUM")?;
            for a in body["items"].as_array().into_iter().flatten() {
                outln!(
                    "{:<32} {:<9} {:<20} {:<24} {:>6}  {}",
                    a["id"].as_str().unwrap_or(""),
                    a["state"].as_str().unwrap_or(""),
                    a["endpoint"].as_str().unwrap_or(""),
                    a["expires_at"].as_str().unwrap_or(""),
                    a["quorum"],
                    a["reason"].as_str().unwrap_or("")
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ApprovalsCommand::Show { id, client } => {
            let c = Client::new(&client)?;
            show(&c, c.http.get(format!("{}/v1/approvals/{id}", c.server))).await
        }
        ApprovalsCommand::Grant { id, reason, client } => {
            let c = Client::new(&client)?;
            show(&c, c.http.post(format!("{}/v1/approvals/{id}/grant", c.server)).json(&json!({ "reason": reason })))
                .await
        }
        ApprovalsCommand::Deny { id, reason, client } => {
            let c = Client::new(&client)?;
            show(&c, c.http.post(format!("{}/v1/approvals/{id}/deny", c.server)).json(&json!({ "reason": reason })))
                .await
        }
    }
}

pub async fn deliveries(command: DeliveriesCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeliveriesCommand::List { namespace, state, endpoint, client } => {
            let c = Client::new(&client)?;
            let mut query = vec![("namespace", namespace)];
            query.extend(state.map(|s| ("state", s)));
            query.extend(endpoint.map(|e| ("endpoint", e)));
            show(&c, c.http.get(format!("{}/v1/deliveries", c.server)).query(&query)).await
        }
        DeliveriesCommand::Show { id, client } => {
            let c = Client::new(&client)?;
            show(&c, c.http.get(format!("{}/v1/deliveries/{id}", c.server))).await
        }
        DeliveriesCommand::Replay { id, client } => {
            let c = Client::new(&client)?;
            show(&c, c.http.post(format!("{}/v1/deliveries/{id}/replay", c.server))).await
        }
    }
}

pub async fn events(command: EventsCommand) -> anyhow::Result<ExitCode> {
    match command {
        EventsCommand::Show { id, client } => {
            let c = Client::new(&client)?;
            show(&c, c.http.get(format!("{}/v1/events/{id}", c.server))).await
        }
    }
}
