//! `apply`, `diff`, `validate`, `get`, `delete`, `schema` and `policy test`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::{print_error, Client, ClientArgs, ERROR};
use hookwarden::controller::apply::read_resource_files;
use hookwarden::resources::secret_sources::SecretsConfig;
use hookwarden::resources::validate::{check_endpoint_quotas, validate, Checks};
use hookwarden::resources::{parse_files, Kind};
use hookwarden::{errln, out, outln};

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
    /// Endpoint, RetryBudget, Filter, AgentRule, EventType or Namespace (plural and lower
    /// case accepted).
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

pub(crate) fn read_files(args: &FilesArgs) -> anyhow::Result<Vec<(String, String)>> {
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

/// `kind/namespace/name`, or `kind/name` for a cluster-scoped resource (no namespace).
fn resource_name(r: &Value) -> String {
    let kind = r["kind"].as_str().unwrap_or("?").to_ascii_lowercase();
    let name = r["name"].as_str().unwrap_or("?");
    match r["namespace"].as_str() {
        Some(namespace) => format!("{kind}/{namespace}/{name}"),
        None => format!("{kind}/{name}"),
    }
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
        let enabled =
            if r["reenabled"] == true { " (enabled again: its spec changed since it answered 410)" } else { "" };
        outln!("{} {}{suffix}{enabled}", resource_name(r), r["action"].as_str().unwrap_or("?"))?;
        for warning in r["warnings"].as_array().into_iter().flatten() {
            outln!(
                "  warning: {}: {}",
                warning["path"].as_str().unwrap_or("?"),
                warning["message"].as_str().unwrap_or("")
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit 0: no differences; 1: differences; 2: error.
pub async fn diff(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let files = match read_files(&args.files) {
        Ok(files) => files,
        Err(e) => {
            errln!("error: {e:#}");
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
        outln!("{} ({action})", resource_name(r))?;
        for line in r["diff"].as_array().into_iter().flatten() {
            outln!("  {}", line.as_str().unwrap_or(""))?;
        }
    }
    Ok(if differences { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Offline: every check that needs no server.
pub fn validate_files(args: FilesArgs) -> anyhow::Result<ExitCode> {
    let files = read_files(&args)?;
    let parsed = parse_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    let allow_private_urls = std::env::var("HOOKWARDEN_ALLOW_PRIVATE_URLS").is_ok_and(|v| v == "true" || v == "1");
    // The server's secret settings, as far as this shell knows them (its environment).
    let mut secrets = SecretsConfig {
        file_root: std::env::var_os("HOOKWARDEN_SECRETS_FILE_ROOT").map(PathBuf::from),
        ..SecretsConfig::default()
    };
    if let Ok(prefix) = std::env::var("HOOKWARDEN_SECRETS_ENV_PREFIX") {
        secrets.env_prefix = prefix;
    }
    // CEL within the default limits: a server configured otherwise decides by its own.
    let checks = Checks { allow_private_urls, secrets, ..Checks::default() };
    let (resources, mut errors) = (parsed.resources, parsed.errors);
    errors.extend(validate(&resources, &parsed.unparsed, &checks));
    errors.extend(check_endpoint_quotas(&resources, &parsed.unparsed, &Default::default()));
    if errors.is_empty() {
        outln!("{} resources in {} files are valid", resources.len(), files.len())?;
        return Ok(ExitCode::SUCCESS);
    }
    for e in &errors {
        errln!("{e}");
    }
    errln!("{} error{}", errors.len(), if errors.len() == 1 { "" } else { "s" });
    Ok(ExitCode::from(1))
}

pub async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let kind = Kind::parse(&args.kind)
        .with_context(|| format!("unknown kind `{}`; one of {}", args.kind, hookwarden::resources::KIND_NAMES))?;
    let client = Client::new(&args.client)?;
    // Event types come from the catalog, which adds what subscribes to each; namespaces
    // (cluster-scoped) from their own routes, with what each holds.
    let route = match kind {
        Kind::EventType => "event-types".to_owned(),
        Kind::Namespace => "namespaces".to_owned(),
        _ => format!("resources/{kind}"),
    };
    let url = match &args.name {
        Some(name) if kind == Kind::Namespace => format!("{}/v1/{route}/{name}", client.server),
        Some(name) => format!("{}/v1/{route}/{}/{name}", client.server, args.namespace),
        None => format!("{}/v1/{route}", client.server),
    };
    let mut request = client.http.get(url);
    if args.name.is_none() && !args.all_namespaces && kind != Kind::Namespace {
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
            outln!("{}", serde_json::to_string_pretty(&out)?)?;
        }
        Some(OutputFormat::Yaml) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    outln!("---")?;
                }
                out!("{}", yaml_serde::to_string(item)?)?;
            }
        }
        None if kind == Kind::EventType => out!("{}", event_type_table(&items))?,
        None if kind == Kind::Namespace => out!("{}", namespace_table(&items))?,
        None => out!("{}", table(kind, &items))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The catalog's event types as an aligned table.
fn event_type_table(items: &[Value]) -> String {
    let mut rows: Vec<Vec<String>> =
        vec![["NAMESPACE", "NAME", "DEPRECATED", "SUBSCRIBERS", "DESCRIPTION"].map(str::to_owned).to_vec()];
    for item in items {
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        let subscribers: Vec<&str> =
            item["subscribers"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        rows.push(vec![
            text(&item["namespace"]),
            text(&item["name"]),
            item["deprecated"].as_bool().unwrap_or(false).to_string(),
            if subscribers.is_empty() { "-".to_owned() } else { subscribers.join(",") },
            text(&item["description"]),
        ]);
    }
    aligned(rows)
}

/// Namespaces as an aligned table: the settings each runs with and what it holds.
fn namespace_table(items: &[Value]) -> String {
    let mut rows: Vec<Vec<String>> =
        vec![["NAME", "RESOURCE", "RETENTION", "DEDUP", "EVENTS-TODAY", "EVENTS", "DELIVERIES", "ATTEMPTS", "OLDEST"]
            .map(str::to_owned)
            .to_vec()];
    for item in items {
        let status = &item["status"];
        let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
        rows.push(vec![
            text(&item["metadata"]["name"]),
            if status["resource"] == true { "yes" } else { "no (defaults)" }.to_owned(),
            text(&status["settings"]["retention"]["events"]),
            text(&status["settings"]["dedupWindow"]),
            text(&status["eventsToday"]),
            text(&status["rows"]["events"]),
            text(&status["rows"]["deliveries"]),
            text(&status["rows"]["attempts"]),
            status["oldestEvent"].as_str().unwrap_or("-").to_owned(),
        ]);
    }
    aligned(rows)
}

/// The resources as an aligned table; endpoints with their delivery state and breaker.
fn table(kind: Kind, items: &[Value]) -> String {
    let condition = |item: &Value, kind: &str| {
        item["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .and_then(|c| c["status"].as_str())
            .unwrap_or("Unknown")
            .to_owned()
    };
    let mut header = vec!["NAMESPACE", "NAME", "GENERATION", "READY"];
    if kind == Kind::Endpoint {
        header.extend(["STATE", "BREAKER"]);
    }
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for item in items {
        let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
        let mut row = vec![
            text(&item["metadata"]["namespace"]),
            text(&item["metadata"]["name"]),
            text(&item["metadata"]["generation"]),
            condition(item, "Ready"),
        ];
        if kind == Kind::Endpoint {
            let delivery = &item["status"]["delivery"];
            row.push(delivery["state"].as_str().unwrap_or("Unknown").to_owned());
            row.push(match (delivery["breaker"].as_str(), delivery["breakerOpenUntil"].as_str()) {
                (Some(breaker), Some(until)) => format!("{breaker} until {until}"),
                (Some(breaker), None) => breaker.to_owned(),
                _ => "Unknown".to_owned(),
            });
        }
        rows.push(row);
    }
    aligned(rows)
}

/// Rows as columns padded to their widest cell.
fn aligned(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let kind = Kind::parse(&args.kind).with_context(|| format!("unknown kind `{}`", args.kind))?;
    let client = Client::new(&args.client)?;
    let url = if kind == Kind::Namespace {
        format!("{}/v1/namespaces/{}", client.server, args.name)
    } else {
        format!("{}/v1/resources/{kind}/{}/{}", client.server, args.namespace, args.name)
    };
    let (status, body) = client.send(client.http.delete(url)).await?;
    if status != 200 {
        print_error(status, &body);
        return Ok(ExitCode::from(1));
    }
    outln!("{} deleted", resource_name(&body))?;
    Ok(ExitCode::SUCCESS)
}

pub fn schema() -> anyhow::Result<ExitCode> {
    outln!("{}", serde_json::to_string_pretty(&hookwarden::resources::json_schema())?)?;
    Ok(ExitCode::SUCCESS)
}

/// Exit 0 when every case passes, 1 when any fails, 2 when the tests cannot run.
pub fn policy_test(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let results = match hookwarden::policy::testing::run(dir) {
        Ok(results) => results,
        Err(e) => {
            errln!("error: {e}");
            return Ok(ExitCode::from(ERROR));
        }
    };
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    for r in &results {
        match &r.failure {
            None => outln!("ok    {}: {}", r.folder.display(), r.name)?,
            Some(why) => outln!("FAIL  {}: {}: {why}", r.folder.display(), r.name)?,
        }
    }
    outln!("{} passed, {failed} failed", results.len() - failed)?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
