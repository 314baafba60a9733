//! `hookwarden transform test`: the body an Endpoint's transform builds for one event,
//! offline (no server, no database), through the compile and render path the server uses.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::resources::{read_files, FilesArgs};
use super::ERROR;
use hookwarden::api::strict_json::{self, Problem};
use hookwarden::catalog::EventView;
use hookwarden::config::IngestConfig;
use hookwarden::delivery::transform::{self, Transform};
use hookwarden::policy::expr::Limits;
use hookwarden::resources::{parse_files, ResourceError, Spec};
use hookwarden::{errln, outln};

#[derive(Subcommand)]
pub enum TransformCommand {
    /// Print the body an Endpoint's transform builds for an event (exit 1: the transform
    /// is refused or fails on it, as the delivery would; 2: the input cannot be used).
    Test(TestArgs),
}

#[derive(Args)]
pub struct TestArgs {
    #[command(flatten)]
    files: FilesArgs,
    /// The event, as `POST /v1/events` takes it (`source`, `type`, `data`, …).
    #[arg(long)]
    event: PathBuf,
    /// The Endpoint to use when the files hold more than one with a transform.
    #[arg(long)]
    endpoint: Option<String>,
}

/// The event file: the fields of `POST /v1/events`, the same rules for each.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventFile {
    /// Stands in for the `evt_…` id the server gives each event (default `evt_test`).
    id: Option<String>,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: Option<String>,
    time: Option<DateTime<Utc>>,
    namespace: Option<String>,
    #[allow(dead_code)]
    specversion: Option<String>,
    #[allow(dead_code)]
    datacontenttype: Option<String>,
    data: Box<RawValue>,
}

pub fn transform(command: TransformCommand) -> anyhow::Result<ExitCode> {
    let TransformCommand::Test(args) = command;
    let files = read_files(&args.files)?;
    let event_name = args.event.display().to_string();
    let event_text =
        std::fs::read_to_string(&args.event).with_context(|| format!("cannot read {}", args.event.display()))?;
    let (body, failure) = match try_out(&files, args.endpoint.as_deref(), &event_name, &event_text) {
        Ok(body) => (Some(body), None),
        Err(Failure::Input(problems)) => {
            for problem in &problems {
                errln!("{problem}");
            }
            return Ok(ExitCode::from(ERROR));
        }
        Err(Failure::Transform(message)) => (None, Some(message)),
    };
    if let Some(body) = body {
        outln!("{body}")?;
        return Ok(ExitCode::SUCCESS);
    }
    errln!("{}", failure.unwrap_or_default());
    Ok(ExitCode::from(1))
}

/// Why there is no body.
#[derive(Debug)]
enum Failure {
    /// The files or the event cannot be used: every problem, one per line.
    Input(Vec<String>),
    /// Apply would refuse the transform, or it fails on this event (the delivery would
    /// fail): where, and why.
    Transform(String),
}

/// The body the chosen Endpoint's transform builds for the event in `event_text`.
fn try_out(
    files: &[(String, String)],
    endpoint: Option<&str>,
    event_name: &str,
    event_text: &str,
) -> Result<String, Failure> {
    let parsed = parse_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    if !parsed.errors.is_empty() {
        return Err(Failure::Input(parsed.errors.iter().map(ToString::to_string).collect()));
    }
    let endpoints: Vec<_> = parsed
        .resources
        .iter()
        .filter_map(|r| match &r.resource.spec {
            Spec::Endpoint(spec) => Some((r, spec)),
            _ => None,
        })
        .collect();
    let names = |list: &[&str]| list.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    let with_transform: Vec<_> = endpoints.iter().filter(|(_, spec)| spec.transform.is_some()).collect();
    let (located, spec) = match endpoint {
        Some(name) => *endpoints.iter().find(|(r, _)| r.resource.metadata.name == name).ok_or_else(|| {
            let found: Vec<&str> = endpoints.iter().map(|(r, _)| r.resource.metadata.name.as_str()).collect();
            Failure::Input(vec![format!("no Endpoint `{name}` in the files (found: {})", names(&found))])
        })?,
        None => match with_transform.as_slice() {
            [one] => **one,
            [] => return Err(Failure::Input(vec!["no Endpoint in the files has a `spec.transform`".into()])),
            several => {
                let found: Vec<&str> = several.iter().map(|(r, _)| r.resource.metadata.name.as_str()).collect();
                return Err(Failure::Input(vec![format!(
                    "{} Endpoints have a `spec.transform` ({}): choose one with --endpoint",
                    found.len(),
                    names(&found)
                )]));
            }
        },
    };
    let metadata = &located.resource.metadata;
    let Some(source) = &spec.transform else {
        return Err(Failure::Input(vec![format!(
            "Endpoint `{}` has no `spec.transform`: it is sent the standard envelope",
            metadata.name
        )]));
    };
    // CEL within the default limits: a server configured otherwise decides by its own.
    let limits = Limits::default();
    let program = Transform::compile(source, &limits).map_err(|message| {
        Failure::Transform(ResourceError::at(&located.origin, "spec.transform", message).to_string())
    })?;
    let event = read_event(event_name, event_text)?;
    let endpoint = transform::endpoint_json(&metadata.namespace, &metadata.name, &metadata.labels);
    program
        .render(&event, &endpoint, limits.budget())
        .map_err(|message| Failure::Transform(format!("the transform failed: {message}")))
}

/// The `event` variable for the event file, as the server binds it.
fn read_event(name: &str, text: &str) -> Result<Value, Failure> {
    let problem = |message: String| Failure::Input(vec![format!("{name}: {message}")]);
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| problem(format!("not valid JSON: {e}")))?;
    strict_json::check(text.as_bytes(), "", IngestConfig::default().max_json_depth).map_err(|p| match p {
        Problem::DuplicateKey { path } => problem(format!("{path}: the key appears more than once in its object")),
        Problem::TooDeep { path, limit } => problem(format!("{path}: nests deeper than {limit} levels")),
    })?;
    let event: EventFile =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text)).map_err(|e| {
            match e.path().to_string().as_str() {
                "." => problem(e.inner().to_string()),
                path => problem(format!("{path}: {}", e.inner())),
            }
        })?;
    let namespace = event.namespace.as_deref().unwrap_or("default");
    Ok(EventView {
        id: event.id.as_deref().unwrap_or("evt_test"),
        namespace,
        source: &event.source,
        event_type: &event.event_type,
        subject: event.subject.as_deref(),
        time: event.time.map(|t| t.to_rfc3339()),
        data: event.data.get(),
    }
    .to_json())
}
