//! `deliveries` and `events`.

use std::process::ExitCode;

use hookwarden::outln;

use super::{print_error, show, Client, ClientArgs};

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
pub enum EndpointsCommand {
    /// Enable an endpoint again (a 410 disabled it, or its breaker is open): what waits goes out.
    Enable {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Success rates, latency, consecutive failures, breaker and delivery state.
    Health {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
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

pub async fn endpoints(command: EndpointsCommand) -> anyhow::Result<ExitCode> {
    match command {
        EndpointsCommand::Enable { name, namespace, client } => {
            let c = Client::new(&client)?;
            let (status, body) =
                c.send(c.http.post(format!("{}/v1/endpoints/{namespace}/{name}/enable", c.server))).await?;
            if status != 200 {
                print_error(status, &body);
                return Ok(ExitCode::from(1));
            }
            if body["enabled"] == true {
                outln!("endpoint/{namespace}/{name} enabled")?;
            } else {
                outln!("endpoint/{namespace}/{name} was not disabled; nothing to do")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        EndpointsCommand::Health { name, namespace, client } => {
            let c = Client::new(&client)?;
            show(&c, c.http.get(format!("{}/v1/endpoints/{namespace}/{name}/health", c.server))).await
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
