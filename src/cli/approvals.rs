//! `approvals list|show|grant|deny`: what approvers run. `show` prints the held action in a
//! readable form (`-o json|yaml` for the API's answer as it is); `list` takes `-n NS` or
//! `-A` like `get`; `show`, `grant` and `deny` take no namespace (the id names the request).

use std::fmt::Write as _;
use std::process::ExitCode;

use hookwarden::{out, outln};
use serde_json::{json, Value};

use super::resources::OutputFormat;
use super::{print_error, show, Client, ClientArgs};

#[derive(clap::Subcommand)]
pub enum ApprovalsCommand {
    /// Pending approval requests (or another state with --state), newest first.
    List {
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// List across every namespace the token may see.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(long, default_value = "pending")]
        state: String,
        #[arg(short = 'o', long, value_enum)]
        output: Option<OutputFormat>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One request: the action it would release, the spend figures, the votes.
    Show {
        id: String,
        #[arg(short = 'o', long, value_enum)]
        output: Option<OutputFormat>,
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

pub async fn approvals(command: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ApprovalsCommand::List { namespace, all_namespaces, state, output, client } => {
            let c = Client::new(&client)?;
            let mut query = vec![("state", state)];
            if !all_namespaces {
                query.push(("namespace", namespace));
            }
            let (status, body) = c.send(c.http.get(format!("{}/v1/approvals", c.server)).query(&query)).await?;
            if status != 200 {
                print_error(status, &body);
                return Ok(ExitCode::from(1));
            }
            let items = body["items"].as_array().cloned().unwrap_or_default();
            match output {
                Some(format) => print_as(format, &json!({ "items": items }))?,
                None => out!("{}", table(&items))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        ApprovalsCommand::Show { id, output, client } => {
            let c = Client::new(&client)?;
            let (status, body) = c.send(c.http.get(format!("{}/v1/approvals/{id}", c.server))).await?;
            if status != 200 {
                print_error(status, &body);
                return Ok(ExitCode::from(1));
            }
            match output {
                Some(format) => print_as(format, &body)?,
                None => out!("{}", describe(&body))?,
            }
            Ok(ExitCode::SUCCESS)
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

fn print_as(format: OutputFormat, value: &Value) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(value)?)?,
        OutputFormat::Yaml => out!("{}", yaml_serde::to_string(value)?)?,
    }
    Ok(())
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}

/// The listing: one line per request.
fn table(items: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<32} {:<9} {:<20} {:<28} {:>6}  REASON",
        "NAMESPACE", "ID", "STATE", "ENDPOINT", "EXPIRES", "QUORUM"
    );
    for a in items {
        let _ = writeln!(
            out,
            "{:<16} {:<32} {:<9} {:<20} {:<28} {:>6}  {}",
            text(&a["namespace"]),
            text(&a["id"]),
            text(&a["state"]),
            text(&a["endpoint"]),
            text(&a["expires_at"]),
            a["quorum"].to_string(),
            text(&a["reason"])
        );
    }
    out
}

/// One request as an approver reads it: the request, the event, the spend, the votes.
fn describe(a: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: &str| {
        let _ = writeln!(out, "  {label:<13} {value}");
    };
    let _ = writeln!(out, "Approval {}  {}", text(&a["id"]), text(&a["state"]).to_uppercase());
    line(&mut out, "namespace", text(&a["namespace"]));
    let endpoint = match a["endpoint_detail"]["url"].as_str() {
        Some(url) => format!("{} -> {url}", text(&a["endpoint"])),
        None => format!("{} (no longer configured)", text(&a["endpoint"])),
    };
    line(&mut out, "endpoint", &endpoint);
    line(&mut out, "rule", text(&a["rule"]));
    line(&mut out, "reason", text(&a["reason"]));
    line(&mut out, "requested by", &format!("{}, at {}", text(&a["requested_by"]), text(&a["created_at"])));
    line(&mut out, "deadline", &format!("{} (on expiry: {})", text(&a["expires_at"]), text(&a["on_expiry"])));
    let p = &a["progress"];
    line(
        &mut out,
        "quorum",
        &format!(
            "{} of {} grants ({} more needed), {} denials; voters need role {}",
            p["grants"],
            p["quorum"],
            p["needed"],
            p["denials"],
            text(&a["role"])
        ),
    );
    if !a["decided_at"].is_null() {
        line(&mut out, "decided", &format!("{}: {}", text(&a["decided_at"]), text(&a["decided_reason"])));
    }
    line(&mut out, "action hash", text(&a["action_hash"]));

    let e = &a["event"];
    let _ = writeln!(out, "\nEvent {}", text(&e["id"]));
    if e.is_null() {
        let _ = writeln!(out, "  (the event is no longer stored)");
    } else {
        for (label, field) in [("type", "type"), ("source", "source"), ("subject", "subject"), ("time", "time")] {
            line(&mut out, label, text(&e[field]));
        }
        line(&mut out, "received", text(&e["received_at"]));
        let _ = writeln!(out, "  data ({} bytes):", e["data_bytes"]);
        let body = match (&e["data"], e["data_preview"].as_str()) {
            (Value::Null, Some(preview)) => preview.to_owned(),
            (data, _) => serde_json::to_string_pretty(data).unwrap_or_default(),
        };
        for text in body.lines() {
            let _ = writeln!(out, "    {text}");
        }
        if let Some(note) = e["data_note"].as_str() {
            let _ = writeln!(out, "  note: {note}");
        }
    }

    let spend = a["spend"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !spend.is_empty() {
        let _ = writeln!(out, "\nSpend (minor units)");
        let _ = writeln!(
            out,
            "  {:<24} {:<8} {:>12} {:>14} {:>12} {:>12}",
            "RULE", "CURRENCY", "AMOUNT", "WINDOW TOTAL", "LIMIT", "REMAINING"
        );
        for s in spend {
            let shadow = if s["shadow"] == true { "  (shadow)" } else { "" };
            let _ = writeln!(
                out,
                "  {:<24} {:<8} {:>12} {:>14} {:>12} {:>12}{shadow}",
                text(&s["rule"]),
                text(&s["currency"]),
                s["amount"].to_string(),
                s["window_total"].to_string(),
                s["limit"].to_string(),
                s["remaining"].to_string()
            );
        }
    }

    let decision = a["decision"].get("evaluated").unwrap_or(&a["decision"]);
    let rules = decision["rules"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !rules.is_empty() {
        let _ = writeln!(out, "\nRules");
        for r in rules {
            let outcome = r["outcome"].as_str().unwrap_or("no match");
            let shadow = if r["shadow"] == true { " (shadow)" } else { "" };
            let _ = writeln!(out, "  {:<24} {:<9} {}{shadow}", text(&r["rule"]), outcome, text(&r["reason"]));
        }
    }

    let votes = a["votes"].as_array().map(Vec::as_slice).unwrap_or_default();
    let _ = writeln!(out, "\nVotes");
    if votes.is_empty() {
        let _ = writeln!(out, "  (none yet)");
    }
    for v in votes {
        let _ = writeln!(
            out,
            "  {:<20} {:<6} {}  {}",
            text(&v["voter"]),
            text(&v["vote"]),
            text(&v["created_at"]),
            text(&v["reason"])
        );
    }
    out
}
