//! `audit export` and `audit verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use hookwarden::{errln, out, outln};
use serde_json::Value;

use super::{print_error, Client, ClientArgs, ERROR};

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
                None => out!("{text}")?,
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { file: Some(file), public_key, database_url: None } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            match hookwarden::audit::verify::verify_export(&text, public_key.as_deref()) {
                Ok(report) => {
                    outln!(
                        "OK: {} records of chain `{}` (seq {}..{}) verified",
                        report.records,
                        report.chain,
                        report.first_seq,
                        report.last_seq
                    )?;
                    match report.checkpoint {
                        Some((seq, key)) => outln!(
                            "checkpoint at seq {seq} verified with key {key}{}",
                            if report.self_signed_only {
                                " (the key in the export: pass --public-key to check against a key you trust)"
                            } else {
                                ""
                            }
                        )?,
                        None => outln!("no checkpoint in the export: nothing proves it matches what the server holds")?,
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    outln!("FAILED: {e}")?;
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCommand::Verify { file: None, public_key, database_url: Some(url) } => {
            verify_database(&url, public_key.as_deref()).await
        }
        AuditCommand::Verify { .. } => {
            errln!("error: give an export FILE or --database-url URL");
            Ok(ExitCode::from(ERROR))
        }
    }
}

/// Re-checks every stored chain page by page; names the first altered or missing record.
/// Read-only: the database is opened so that nothing is written or created.
async fn verify_database(url: &str, public_key: Option<&str>) -> anyhow::Result<ExitCode> {
    use hookwarden::audit::checkpoint::{self, Checkpoint};
    let store = hookwarden::store::Store::open_read_only(url).await.context("cannot open the database")?;
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
                broken = Some(format!("record {}: {}", e.seq, e.reason));
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
            None => outln!("OK: chain `{chain}`: {head} records")?,
            Some(reason) => {
                failed = true;
                outln!("FAILED: chain `{chain}`: {reason}")?;
            }
        }
    }
    store.close().await;
    if store.read_snapshot_is_stale() {
        errln!("error: a server opened the database while it was being verified, so what was read may be torn; verify again");
        return Ok(ExitCode::from(ERROR));
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
