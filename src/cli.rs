//! Client commands of the CLI: they talk to a running server over its HTTP API
//! (`--server`, `--token`), except `validate` and `schema`, which need no server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use hookwarden::controller::apply::read_resource_files;
use hookwarden::resources::validate::{validate, Checks};
use hookwarden::resources::{parse_files, Kind};

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

#[derive(Args)]
pub struct FilesArgs {
    /// Resource files or directories (every *.yaml / *.yml inside, recursively).
    #[arg(short = 'f', long = "filename", required = true)]
    pub paths: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub files: FilesArgs,
    /// Run every check and show what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete resources of the apply set that are no longer in the files.
    #[arg(long, requires = "applyset")]
    pub prune: bool,
    /// The apply set these files make up (e.g. `payments`).
    #[arg(long)]
    pub applyset: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub files: FilesArgs,
    /// Also show what `--prune` would delete from this apply set.
    #[arg(long)]
    pub prune: bool,
    #[arg(long)]
    pub applyset: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Yaml,
    Json,
}

#[derive(Args)]
pub struct GetArgs {
    /// Endpoint, RetryBudget, Filter or AgentRule (plural and lower case accepted).
    pub kind: String,
    pub name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// List across every namespace the token may see.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct DeleteArgs {
    pub kind: String,
    pub name: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Exit status for a failure of the command itself (not "differences found").
const ERROR: u8 = 2;

fn read_files(args: &FilesArgs) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for path in &args.paths {
        let mut found = read_resource_files(path).with_context(|| format!("cannot read {}", path.display()))?;
        if path.is_dir() {
            for (name, _) in &mut found {
                *name = path.join(&*name).display().to_string();
            }
        }
        files.extend(found);
    }
    if files.is_empty() {
        bail!("no *.yaml or *.yml files found");
    }
    Ok(files)
}

struct Client {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Client {
    fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let token =
            args.token.clone().context("no token: pass --token or set HOOKWARDEN_TOKEN (see `hookwarden token`)")?;
        Ok(Client { http: reqwest::Client::new(), server: args.server.trim_end_matches('/').to_owned(), token })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
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

    async fn apply(&self, files: &[(String, String)], query: &[(&str, String)]) -> anyhow::Result<(u16, Value)> {
        let body = json!({ "files": files.iter().map(|(name, content)| json!({"name": name, "content": content})).collect::<Vec<_>>() });
        self.send(self.http.post(format!("{}/v1/apply", self.server)).query(query).json(&body)).await
    }
}

/// Prints the server's error answer; 422 apply errors one per line.
fn print_error(status: u16, body: &Value) {
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        for e in errors {
            let line = e.get("line").and_then(Value::as_u64).map(|l| format!(", line {l}")).unwrap_or_default();
            let path = e["path"].as_str().filter(|p| !p.is_empty()).map(|p| format!("{p}: ")).unwrap_or_default();
            eprintln!(
                "{} (document {}{line}): {path}{}",
                e["file"].as_str().unwrap_or("?"),
                e["document"],
                e["message"].as_str().unwrap_or("")
            );
        }
        return;
    }
    let message = body["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| body.to_string());
    eprintln!("error ({status}): {message}");
}

fn query(prune: bool, applyset: &Option<String>, dry_run: bool) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if dry_run {
        q.push(("dryRun", "true".to_owned()));
    }
    if prune {
        q.push(("prune", "true".to_owned()));
    }
    if let Some(set) = applyset {
        q.push(("applyset", set.clone()));
    }
    q
}

fn resource_name(r: &Value) -> String {
    format!(
        "{}/{}/{}",
        r["kind"].as_str().unwrap_or("?").to_ascii_lowercase(),
        r["namespace"].as_str().unwrap_or("?"),
        r["name"].as_str().unwrap_or("?")
    )
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let files = read_files(&args.files)?;
    let client = Client::new(&args.client)?;
    let (status, body) = client.apply(&files, &query(args.prune, &args.applyset, args.dry_run)).await?;
    if status != 200 {
        print_error(status, &body);
        return Ok(ExitCode::from(1));
    }
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    for r in body["results"].as_array().into_iter().flatten() {
        println!("{} {}{suffix}", resource_name(r), r["action"].as_str().unwrap_or("?"));
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit 0: no differences; 1: differences; 2: error.
pub async fn diff(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let files = match read_files(&args.files) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(ERROR));
        }
    };
    let client = Client::new(&args.client)?;
    let (status, body) = client.apply(&files, &query(args.prune, &args.applyset, true)).await?;
    if status != 200 {
        print_error(status, &body);
        return Ok(ExitCode::from(ERROR));
    }
    let mut differences = false;
    for r in body["results"].as_array().into_iter().flatten() {
        let action = r["action"].as_str().unwrap_or("?");
        if action == "unchanged" {
            continue;
        }
        differences = true;
        println!("{} ({action})", resource_name(r));
        for line in r["diff"].as_array().into_iter().flatten() {
            println!("  {}", line.as_str().unwrap_or(""));
        }
    }
    Ok(if differences { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Offline: every check that needs no server.
pub fn validate_files(args: FilesArgs) -> anyhow::Result<ExitCode> {
    let files = read_files(&args)?;
    let (resources, mut errors) = parse_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    let allow_private_urls = std::env::var("HOOKWARDEN_ALLOW_PRIVATE_URLS").is_ok_and(|v| v == "true" || v == "1");
    let checks = Checks { allow_private_urls, read_secret_sources: false };
    errors.extend(validate(&resources, &Default::default(), checks));
    if errors.is_empty() {
        println!("{} resources in {} files are valid", resources.len(), files.len());
        return Ok(ExitCode::SUCCESS);
    }
    for e in &errors {
        eprintln!("{e}");
    }
    eprintln!("{} errors", errors.len());
    Ok(ExitCode::from(1))
}

pub async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let kind = Kind::parse(&args.kind)
        .with_context(|| format!("unknown kind `{}`; one of Endpoint, RetryBudget, Filter, AgentRule", args.kind))?;
    let client = Client::new(&args.client)?;
    let url = match &args.name {
        Some(name) => format!("{}/v1/resources/{kind}/{}/{name}", client.server, args.namespace),
        None => format!("{}/v1/resources/{kind}", client.server),
    };
    let mut request = client.http.get(url);
    if args.name.is_none() && !args.all_namespaces {
        request = request.query(&[("namespace", &args.namespace)]);
    }
    let (status, body) = client.send(request).await?;
    if status != 200 {
        print_error(status, &body);
        return Ok(ExitCode::from(1));
    }
    let items: Vec<Value> = match body.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![body],
    };
    match args.output {
        Some(OutputFormat::Json) => {
            let out = if args.name.is_some() { items[0].clone() } else { json!({ "items": items }) };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Some(OutputFormat::Yaml) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", yaml_serde::to_string(item)?);
            }
        }
        None => {
            println!("{:<16} {:<32} {:>10}  READY", "NAMESPACE", "NAME", "GENERATION");
            for item in &items {
                let ready = item["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                    .and_then(|c| c["status"].as_str())
                    .unwrap_or("Unknown");
                println!(
                    "{:<16} {:<32} {:>10}  {ready}",
                    item["metadata"]["namespace"].as_str().unwrap_or(""),
                    item["metadata"]["name"].as_str().unwrap_or(""),
                    item["metadata"]["generation"]
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let kind = Kind::parse(&args.kind).with_context(|| format!("unknown kind `{}`", args.kind))?;
    let client = Client::new(&args.client)?;
    let url = format!("{}/v1/resources/{kind}/{}/{}", client.server, args.namespace, args.name);
    let (status, body) = client.send(client.http.delete(url)).await?;
    if status != 200 {
        print_error(status, &body);
        return Ok(ExitCode::from(1));
    }
    println!("{} deleted", resource_name(&body));
    Ok(ExitCode::SUCCESS)
}

pub fn schema() -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(&hookwarden::resources::json_schema())?);
    Ok(ExitCode::SUCCESS)
}

/// Exit 0 when every case passes, 1 when any fails, 2 when the tests cannot run.
pub fn policy_test(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let results = match hookwarden::policy::testing::run(dir) {
        Ok(results) => results,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(ERROR));
        }
    };
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    for r in &results {
        match &r.failure {
            None => println!("ok    {}: {}", r.folder.display(), r.name),
            Some(why) => println!("FAIL  {}: {}: {why}", r.folder.display(), r.name),
        }
    }
    println!("{} passed, {failed} failed", results.len() - failed);
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

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

/// Prints a JSON answer, or the error; exit 1 on an error answer.
async fn show(client: &Client, request: reqwest::RequestBuilder) -> anyhow::Result<ExitCode> {
    let (status, body) = client.send(request).await?;
    if !(200..300).contains(&status) {
        print_error(status, &body);
        return Ok(ExitCode::from(1));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(ExitCode::SUCCESS)
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
            println!("{:<32} {:<9} {:<20} {:<24} {:>6}  REASON", "ID", "STATE", "ENDPOINT", "EXPIRES", "QUORUM");
            for a in body["items"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:<9} {:<20} {:<24} {:>6}  {}",
                    a["id"].as_str().unwrap_or(""),
                    a["state"].as_str().unwrap_or(""),
                    a["endpoint"].as_str().unwrap_or(""),
                    a["expires_at"].as_str().unwrap_or(""),
                    a["quorum"],
                    a["reason"].as_str().unwrap_or("")
                );
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

#[derive(clap::Subcommand)]
pub enum AuditCommand {
    /// Download a chain as NDJSON (records, then the latest signed checkpoint).
    Export {
        /// The chain: a namespace, or `_cluster`.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Write to FILE instead of standard output.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Verify an export offline, or (with --database-url) the chains stored in a database.
    Verify {
        /// An NDJSON export.
        file: Option<PathBuf>,
        /// The checkpoint key you trust (`name+id+base64`, as the server logs it).
        #[arg(long)]
        public_key: Option<String>,
        /// Re-check every chain stored in this database instead of a file.
        #[arg(long, conflicts_with = "file")]
        database_url: Option<String>,
    },
}

pub async fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Export { namespace, output, client } => {
            let c = Client::new(&client)?;
            let response = c
                .http
                .get(format!("{}/v1/audit/export", c.server))
                .query(&[("namespace", &namespace)])
                .bearer_auth(&c.token)
                .send()
                .await
                .with_context(|| format!("cannot reach the server at {}", c.server))?;
            let status = response.status().as_u16();
            if status != 200 {
                let body = response.json().await.unwrap_or(Value::Null);
                print_error(status, &body);
                return Ok(ExitCode::from(1));
            }
            let text = response.text().await?;
            match output {
                Some(path) => {
                    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { file: Some(file), public_key, database_url: None } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            match hookwarden::audit::verify::verify_export(&text, public_key.as_deref()) {
                Ok(report) => {
                    println!(
                        "OK: {} records of chain `{}` (seq {}..{}) verified",
                        report.records, report.chain, report.first_seq, report.last_seq
                    );
                    match report.checkpoint {
                        Some((seq, key)) => println!(
                            "checkpoint at seq {seq} verified with key {key}{}",
                            if report.self_signed_only {
                                " (the key in the export: pass --public-key to check against a key you trust)"
                            } else {
                                ""
                            }
                        ),
                        None => {
                            println!("no checkpoint in the export: nothing proves it matches what the server holds")
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("FAILED: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCommand::Verify { file: None, public_key, database_url: Some(url) } => {
            verify_database(&url, public_key.as_deref()).await
        }
        AuditCommand::Verify { .. } => {
            eprintln!("error: give an export FILE or --database-url URL");
            Ok(ExitCode::from(ERROR))
        }
    }
}

/// Re-checks every stored chain page by page; names the first altered or missing record.
async fn verify_database(url: &str, public_key: Option<&str>) -> anyhow::Result<ExitCode> {
    use hookwarden::audit::checkpoint::{self, Checkpoint};
    let store = hookwarden::store::Store::connect(url).await.context("cannot connect to the database")?;
    let mut failed = false;
    for (chain, head, _) in store.audit_heads().await? {
        let mut after: Option<(i64, String)> = None;
        let mut from = 1;
        let mut broken = None;
        let mut hashes_at = std::collections::HashMap::new();
        let latest = store.latest_checkpoint(&chain).await?;
        loop {
            let page = store.audit_records(&chain, from, i64::MAX, 1000).await?;
            let Some(last) = page.last() else { break };
            if let Err(e) = hookwarden::audit::verify_chain(&page, after.clone()) {
                broken = Some(format!("seq {}: {}", e.seq.unwrap_or(0), e.reason));
                break;
            }
            if let Some((seq, _, _)) = &latest {
                if let Some(r) = page.iter().find(|r| r.seq == *seq) {
                    hashes_at.insert(r.seq, r.hash.clone());
                }
            }
            after = Some((last.seq, last.hash.clone()));
            from = last.seq + 1;
        }
        if broken.is_none() {
            if let Some((seq, hash, note)) = &latest {
                if *seq > head {
                    broken = Some(format!("the chain ends at seq {head}, but a checkpoint covers seq {seq}: records were removed from the end"));
                } else if hashes_at.get(seq) != Some(hash) {
                    broken = Some(format!("record seq {seq} no longer has the hash its checkpoint signed"));
                } else if let Some(key) = public_key {
                    let signed =
                        checkpoint::verify(note, key).map_err(|e| anyhow::anyhow!("checkpoint of `{chain}`: {e}"))?;
                    if signed != (Checkpoint { origin: Checkpoint::origin_for(&chain), seq: *seq, hash: hash.clone() })
                    {
                        broken = Some("the stored checkpoint's note does not match its row".into());
                    }
                }
            }
        }
        match broken {
            None => println!("OK: chain `{chain}`: {head} records"),
            Some(reason) => {
                failed = true;
                println!("FAILED: chain `{chain}`: {reason}");
            }
        }
    }
    store.close().await;
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
