//! Client commands of the CLI: they talk to a running server over its HTTP API
//! (`--server`, `--token`), except `validate`, `schema`, `policy test`, `transform test`
//! and `audit verify`, which need no server.

mod approvals;
mod audit;
mod operations;
mod resources;
mod transform;

pub use approvals::{approvals, ApprovalsCommand};
pub use audit::{audit, AuditCommand};
pub use operations::{deliveries, endpoints, events, DeliveriesCommand, EndpointsCommand, EventsCommand};
pub use resources::{
    apply, delete, diff, get, policy_test, schema, validate_files, ApplyArgs, DeleteArgs, DiffArgs, FilesArgs, GetArgs,
};
pub use transform::{transform, TransformCommand};

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use hookwarden::{errln, outln};
use serde_json::{json, Value};

/// Where the server is and who we are.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Base URL of the Hookwarden API.
    #[arg(long, env = "HOOKWARDEN_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Bearer token (see `hookwarden token`).
    #[arg(long, env = "HOOKWARDEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Exit status for a failure of the command itself (not "differences found").
pub(crate) const ERROR: u8 = 2;

pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) server: String,
    pub(crate) token: String,
}

impl Client {
    pub(crate) fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let token =
            args.token.clone().context("no token: pass --token or set HOOKWARDEN_TOKEN (see `hookwarden token`)")?;
        Ok(Client { http: reqwest::Client::new(), server: args.server.trim_end_matches('/').to_owned(), token })
    }

    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.server))?;
        let status = response.status().as_u16();
        let text = response.text().await.context("reading the server's answer")?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    pub(crate) async fn apply(
        &self,
        files: &[(String, String)],
        query: &[(&str, String)],
    ) -> anyhow::Result<(u16, Value)> {
        let body = json!({ "files": files.iter().map(|(name, content)| json!({"name": name, "content": content})).collect::<Vec<_>>() });
        self.send(self.http.post(format!("{}/v1/apply", self.server)).query(query).json(&body)).await
    }
}

/// Prints the server's error answer; 422 apply errors one per line.
pub(crate) fn print_error(status: u16, body: &Value) {
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        for e in errors {
            let line = e.get("line").and_then(Value::as_u64).map(|l| format!(", line {l}")).unwrap_or_default();
            let path = e["path"].as_str().filter(|p| !p.is_empty()).map(|p| format!("{p}: ")).unwrap_or_default();
            errln!(
                "{} (document {}{line}): {path}{}",
                e["file"].as_str().unwrap_or("?"),
                e["document"],
                e["message"].as_str().unwrap_or("")
            );
        }
        return;
    }
    let message = body["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| body.to_string());
    errln!("error ({status}): {message}");
}

/// Prints a JSON answer, or the error; exit 1 on an error answer.
pub(crate) async fn show(client: &Client, request: reqwest::RequestBuilder) -> anyhow::Result<ExitCode> {
    let (status, body) = client.send(request).await?;
    if !(200..300).contains(&status) {
        print_error(status, &body);
        return Ok(ExitCode::from(1));
    }
    outln!("{}", serde_json::to_string_pretty(&body)?)?;
    Ok(ExitCode::SUCCESS)
}
