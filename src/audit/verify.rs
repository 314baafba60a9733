//! Offline verification of an export: every hash and link, `seq` continuity, and the
//! signed checkpoint (its signature, and that the export really contains what it signed).

use serde::Deserialize;
use serde_json::Value;

use super::checkpoint::{self, Checkpoint};
use super::{verify_chain, AuditRecord, ChainError};

/// What a successful verification established.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub chain: String,
    pub records: usize,
    pub first_seq: i64,
    pub last_seq: i64,
    /// `(seq, key)` of the verified checkpoint.
    pub checkpoint: Option<(i64, String)>,
    /// The checkpoint was checked only against the key the export itself carries.
    pub self_signed_only: bool,
}

#[derive(Deserialize)]
struct CheckpointLine {
    checkpoint: CheckpointBody,
}

#[derive(Deserialize)]
struct CheckpointBody {
    namespace: String,
    seq: i64,
    hash: String,
    note: String,
    public_key: String,
}

/// Reads a line's JSON as `T`; the error names the field, in plain words.
fn shaped<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        match crate::messages::field_error(&path, &e.into_inner().to_string()) {
            (path, message) if path.is_empty() => message,
            (path, message) => format!("{path}: {message}"),
        }
    })
}

/// Verifies an NDJSON export. With `public_key`, the checkpoint must be signed by it.
pub fn verify_export(text: &str, public_key: Option<&str>) -> Result<Report, String> {
    let mut records: Vec<AuditRecord> = Vec::new();
    let mut checkpoint_line: Option<CheckpointBody> = None;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        if value.get("checkpoint").is_some() {
            let parsed: CheckpointLine = shaped(value).map_err(|e| format!("line {}: bad checkpoint: {e}", i + 1))?;
            checkpoint_line = Some(parsed.checkpoint);
        } else {
            if checkpoint_line.is_some() {
                return Err(format!("line {}: a record after the checkpoint line", i + 1));
            }
            let record: AuditRecord = shaped(value).map_err(|e| format!("line {}: not an audit record: {e}", i + 1))?;
            records.push(record);
        }
    }
    let first = records.first().ok_or("the export holds no records")?;
    let chain = first.namespace.clone();
    if let Some((i, other)) = records.iter().enumerate().find(|(_, r)| r.namespace != chain) {
        return Err(format!(
            "record {} (seq {}): belongs to chain `{}`, not `{chain}`",
            i + 1,
            other.seq,
            other.namespace
        ));
    }
    // An export may start mid-chain: trust the first record's link to what came before.
    let after = (first.seq > 1).then(|| (first.seq - 1, first.prev_hash.clone()));
    verify_chain(&records, after).map_err(|e: ChainError| e.to_string())?;
    let (first_seq, last_seq) = (first.seq, records.last().map(|r| r.seq).unwrap_or(0));
    let mut report = Report {
        chain: chain.clone(),
        records: records.len(),
        first_seq,
        last_seq,
        checkpoint: None,
        self_signed_only: false,
    };
    if let Some(line) = checkpoint_line {
        let key = public_key.unwrap_or(&line.public_key);
        report.self_signed_only = public_key.is_none();
        let signed = checkpoint::verify(&line.note, key).map_err(|e| format!("checkpoint: {e}"))?;
        if signed != (Checkpoint { origin: Checkpoint::origin_for(&chain), seq: line.seq, hash: line.hash.clone() })
            || line.namespace != chain
        {
            return Err("checkpoint: the signed note does not state what its line says".into());
        }
        if signed.seq > last_seq {
            return Err(format!(
                "checkpoint: the server signed chain `{chain}` up to seq {}, but the export ends at seq {last_seq}: records were cut from the end",
                signed.seq
            ));
        }
        if signed.seq >= first_seq {
            let at = records.iter().find(|r| r.seq == signed.seq).ok_or("checkpoint: its record is missing")?;
            if at.hash != signed.hash {
                return Err(format!(
                    "checkpoint: record seq {} has hash {}, but the server signed {}",
                    signed.seq, at.hash, signed.hash
                ));
            }
        }
        report.checkpoint = Some((signed.seq, key.to_owned()));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::CheckpointSigner;
    use crate::audit::NewAuditRecord;
    use serde_json::json;

    fn export(n: usize, checkpoint_at: usize) -> (String, CheckpointSigner) {
        let mut records: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let prev = records.last().map(|r| (r.seq, r.hash.as_str()));
            records.push(
                NewAuditRecord::new(
                    "system",
                    "delivery.delivered",
                    "payments",
                    format!("delivery/{i}"),
                    json!({"i": i}),
                )
                .seal(prev),
            );
        }
        let (signer, _) = CheckpointSigner::generate("test");
        let at = &records[checkpoint_at - 1];
        let note = signer
            .sign(&Checkpoint { origin: Checkpoint::origin_for("payments"), seq: at.seq, hash: at.hash.clone() })
            .unwrap();
        let mut text: String = records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        text.push_str(&json!({"checkpoint": {"namespace": "payments", "seq": at.seq, "hash": at.hash, "note": note, "public_key": signer.public_key()}}).to_string());
        (text, signer)
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn an_untouched_export_verifies_against_the_trusted_key() {
        let (text, signer) = export(10, 8);
        let report = verify_export(&text, Some(&signer.public_key())).unwrap();
        assert_eq!((report.records, report.checkpoint.map(|c| c.0)), (10, Some(8)));
        let (other, _) = CheckpointSigner::generate("test");
        assert!(verify_export(&text, Some(&other.public_key())).is_err(), "a checkpoint by another key is refused");
    }

    #[test]
    fn each_kind_of_tampering_is_detected_and_located() {
        let (text, signer) = export(10, 8);
        let key = signer.public_key();
        let mut changed = lines(&text);
        changed[3] = changed[3].replace("\"i\":3", "\"i\":4");
        let err = verify_export(&changed.join("\n"), Some(&key)).unwrap_err();
        assert!(err.starts_with("record 4: hash "), "{err}");
        let mut deleted = lines(&text);
        deleted.remove(5);
        let err = verify_export(&deleted.join("\n"), Some(&key)).unwrap_err();
        assert!(err.starts_with("record 7 (the 6th in the input): seq 7 follows seq 5"), "{err}");
        let mut swapped = lines(&text);
        swapped.swap(2, 3);
        let err = verify_export(&swapped.join("\n"), Some(&key)).unwrap_err();
        assert!(err.starts_with("record 4 (the 3rd in the input): seq 4 follows seq 2"), "{err}");
        let mut retyped = lines(&text);
        retyped[1] = retyped[1].replace("\"seq\":2", "\"seq\":\"two\"");
        let err = verify_export(&retyped.join("\n"), Some(&key)).unwrap_err();
        assert_eq!(
            err,
            "line 2: not an audit record: seq: must be a whole number from -9223372036854775808 to 9223372036854775807, not a text"
        );
        let mut unhashed = lines(&text);
        unhashed[0] = unhashed[0].replace("\"hash\":", "\"hush\":");
        let err = verify_export(&unhashed.join("\n"), Some(&key)).unwrap_err();
        assert_eq!(err, "line 1: not an audit record: hash: is required");
        let mut cut = lines(&text);
        cut.drain(6..10);
        let err = verify_export(&cut.join("\n"), Some(&key)).unwrap_err();
        assert!(err.contains("up to seq 8") && err.contains("ends at seq 6"), "{err}");
    }
}
