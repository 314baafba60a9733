//! The audit chain: append-only records, each hashed over its predecessor's hash, one chain
//! per namespace (plus `_cluster` for cluster-wide actions), with signed checkpoints.
//!
//! `hash = lowercase hex SHA-256(prev_hash ‖ RFC 8785 canonical JSON of the record without
//! its "hash" field)`, where `prev_hash` is the previous record's hash as 64 lowercase hex
//! characters (64 zeros for `seq` 1), and the canonical JSON includes `prev_hash` too.
//! `docs/AUDIT.md` states this precisely, so any language can verify an export.
//!
//! Pure: hashing, verification and the checkpoint format ([`checkpoint`]); the store
//! appends, the API exports, and the leader's job in [`checkpoints`] signs.

pub mod checkpoint;
pub mod checkpoints;
pub mod verify;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The chain of cluster-wide actions.
pub const CLUSTER_CHAIN: &str = "_cluster";

/// A record as stored and exported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    /// RFC 3339 UTC with microseconds, as hashed.
    pub time: String,
    /// The token subject that caused it, or `system`.
    pub actor: String,
    pub action: String,
    pub namespace: String,
    /// What it is about: `delivery/dlv_…`, `Endpoint/payments/warehouse`, `approval/apr_…`.
    pub subject: String,
    pub data: Value,
    pub prev_hash: String,
    pub hash: String,
}

/// A record to append: the store assigns `seq`, `prev_hash` and `hash`.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAuditRecord {
    pub time: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub namespace: String,
    pub subject: String,
    pub data: Value,
}

impl NewAuditRecord {
    pub fn new(actor: &str, action: &str, namespace: &str, subject: impl Into<String>, data: Value) -> Self {
        NewAuditRecord {
            time: Utc::now(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            namespace: namespace.to_owned(),
            subject: subject.into(),
            data,
        }
    }

    /// Seals the record after `prev` (`None` for the first of its chain).
    pub fn seal(self, prev: Option<(i64, &str)>) -> AuditRecord {
        let (seq, prev_hash) = match prev {
            Some((seq, hash)) => (seq + 1, hash.to_owned()),
            None => (1, GENESIS.to_owned()),
        };
        let mut record = AuditRecord {
            seq,
            time: self.time.to_rfc3339_opts(SecondsFormat::Micros, true),
            actor: self.actor,
            action: self.action,
            namespace: self.namespace,
            subject: self.subject,
            data: self.data,
            prev_hash,
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        record
    }
}

impl AuditRecord {
    /// The hash this record must carry, from its other fields.
    pub fn compute_hash(&self) -> String {
        let body = serde_json::json!({
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "namespace": self.namespace,
            "subject": self.subject,
            "data": self.data,
            "prev_hash": self.prev_hash,
        });
        let canonical = serde_json_canonicalizer::to_string(&body).expect("JSON values always canonicalize");
        let mut hasher = Sha256::new();
        hasher.update(self.prev_hash.as_bytes());
        hasher.update(canonical.as_bytes());
        hex::encode(hasher.finalize())
    }
}

/// Where and why a chain does not verify. Shown as `record 11: …`, naming the record by
/// its `seq`, with its place in the input when that differs (`record 4 (the 3rd in the
/// input): …`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("record {seq}{}: {reason}", place(*.position, *.seq))]
pub struct ChainError {
    /// 1-based position in the input.
    pub position: usize,
    /// The `seq` the record carries.
    pub seq: i64,
    pub reason: String,
}

fn place(position: usize, seq: i64) -> String {
    if usize::try_from(seq) == Ok(position) {
        String::new()
    } else {
        format!(" (the {} in the input)", crate::messages::ordinal(position))
    }
}

/// Checks hashes, links and `seq` continuity of one chain's records, in order, starting
/// after `(seq, hash)` of the record before them (`None`: from the start).
pub fn verify_chain(records: &[AuditRecord], after: Option<(i64, String)>) -> Result<(), ChainError> {
    let (mut seq, mut prev) = after.unwrap_or((0, GENESIS.to_owned()));
    for (i, record) in records.iter().enumerate() {
        let fail = |reason: String| ChainError { position: i + 1, seq: record.seq, reason };
        if record.seq != seq + 1 {
            return Err(fail(format!(
                "seq {} follows seq {seq}: records are missing, duplicated or out of order",
                record.seq
            )));
        }
        if record.prev_hash != prev {
            return Err(fail(format!(
                "prev_hash {} does not link to the previous record's hash {prev}",
                record.prev_hash
            )));
        }
        let expected = record.compute_hash();
        if record.hash != expected {
            return Err(fail(format!(
                "hash {} does not match its content (expected {expected}): the record was altered",
                record.hash
            )));
        }
        seq = record.seq;
        prev = record.hash.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: usize) -> Vec<AuditRecord> {
        let mut records: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let prev = records.last().map(|r| (r.seq, r.hash.as_str()));
            let record = NewAuditRecord::new(
                "alice",
                "resource.applied",
                "payments",
                format!("Endpoint/payments/e{i}"),
                json!({"i": i, "é": [1.5, "x"]}),
            )
            .seal(prev);
            records.push(record);
        }
        records
    }

    #[test]
    fn a_sealed_chain_verifies() {
        let records = chain(5);
        assert_eq!(records[0].prev_hash, GENESIS);
        assert_eq!(records[4].seq, 5);
        verify_chain(&records, None).unwrap();
        verify_chain(&records[2..], Some((2, records[1].hash.clone()))).unwrap();
    }

    #[test]
    fn tampering_is_located() {
        let mut altered = chain(5);
        altered[2].data = json!({"i": 999});
        assert_eq!(verify_chain(&altered, None).unwrap_err().position, 3);

        let mut removed = chain(5);
        removed.remove(1);
        assert!(verify_chain(&removed, None).unwrap_err().reason.contains("missing"));

        let mut swapped = chain(5);
        swapped.swap(1, 2);
        let err = verify_chain(&swapped, None).unwrap_err();
        assert_eq!(err.position, 2);
        assert_eq!(
            err.to_string(),
            "record 3 (the 2nd in the input): seq 3 follows seq 1: records are missing, duplicated or out of order"
        );
        let altered_err = verify_chain(&altered, None).unwrap_err().to_string();
        assert!(altered_err.starts_with("record 3: hash "), "{altered_err}");

        let mut relinked = chain(3);
        relinked[1].prev_hash = GENESIS.to_owned();
        assert!(verify_chain(&relinked, None).unwrap_err().reason.contains("does not link"));
    }

    #[test]
    fn the_hash_is_over_prev_hash_and_the_canonical_record() {
        let record = NewAuditRecord {
            time: DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z").unwrap().with_timezone(&Utc),
            actor: "system".into(),
            action: "delivery.delivered".into(),
            namespace: "default".into(),
            subject: "delivery/dlv_1".into(),
            data: json!({"b": 1, "a": [true, null]}),
        }
        .seal(None);
        let canonical = r#"{"action":"delivery.delivered","actor":"system","data":{"a":[true,null],"b":1},"namespace":"default","prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","seq":1,"subject":"delivery/dlv_1","time":"2026-11-28T10:00:00.000000Z"}"#;
        let expected = hex::encode(Sha256::digest(format!("{GENESIS}{canonical}").as_bytes()));
        assert_eq!(record.hash, expected);
    }
}
