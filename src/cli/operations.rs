//! `deliveries` and `events`.

use std::process::ExitCode;

use super::{show, Client, ClientArgs};

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
