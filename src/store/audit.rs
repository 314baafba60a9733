//! Audit records, appended in the same transaction as the change they describe.
//!
//! Appends to one chain are serialized (PostgreSQL: a transaction-scoped advisory lock per
//! chain; SQLite: the single writer), so concurrent writers in any number of processes can
//! neither fork a chain nor leave a gap; a batch of records costs one lock and one read of
//! the chain's head.

use chrono::Utc;

use super::sql::{sql, Tx};
use super::{leadership, Backend, Store, StoreError, Term};
use crate::audit::{AuditRecord, NewAuditRecord};

/// The head `(seq, hash)` of chain `$1`, read from its records.
const CHAIN_HEAD: &str = "SELECT seq, hash FROM audit_records WHERE chain = $1 ORDER BY seq DESC LIMIT 1";

#[derive(sqlx::FromRow)]
struct AuditRow {
    chain: String,
    seq: i64,
    time: String,
    actor: String,
    action: String,
    subject: String,
    data: String,
    prev_hash: String,
    hash: String,
}

impl AuditRow {
    fn into_record(self) -> AuditRecord {
        AuditRecord {
            seq: self.seq,
            time: self.time,
            actor: self.actor,
            action: self.action,
            namespace: self.chain,
            subject: self.subject,
            // Stored by us as JSON; unreadable text is kept as a string so the hash check fails loudly.
            data: serde_json::from_str(&self.data).unwrap_or(serde_json::Value::String(self.data)),
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

/// Groups records by chain, keeping their order.
fn by_chain(records: &[NewAuditRecord]) -> Vec<(&str, Vec<&NewAuditRecord>)> {
    let mut chains: Vec<(&str, Vec<&NewAuditRecord>)> = Vec::new();
    for r in records {
        match chains.iter_mut().find(|(c, _)| *c == r.namespace) {
            Some((_, list)) => list.push(r),
            None => chains.push((&r.namespace, vec![r])),
        }
    }
    // Lock chains in one order, so two writers cannot deadlock.
    chains.sort_by(|a, b| a.0.cmp(b.0));
    chains
}

impl Store {
    /// Appends audit records in a transaction of their own.
    pub async fn append_audit(&self, records: &[NewAuditRecord]) -> Result<Vec<AuditRecord>, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let sealed = append_in(&mut tx, records).await?;
            tx.commit().await?;
            Ok(sealed)
        })
        .await
    }

    /// Appends records as the leader of `term` (the checkpoint key it signs with), refused
    /// once the term is over.
    pub async fn append_audit_as_leader(
        &self,
        term: Term,
        records: &[NewAuditRecord],
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            leadership::hold_term_in(&mut tx, term).await?;
            let sealed = append_in(&mut tx, records).await?;
            tx.commit().await?;
            Ok(sealed)
        })
        .await
    }

    /// Records of `chain` with `from <= seq <= to`, at most `limit`, in order.
    pub async fn audit_records(
        &self,
        chain: &str,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.observed(async {
            let rows: Vec<AuditRow> =
                sql("SELECT chain, seq, time, actor, action, subject, data, prev_hash, hash FROM audit_records \
                 WHERE chain = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq LIMIT $4")
                .bind(chain)
                .bind(from)
                .bind(to)
                .bind(i64::from(limit))
                .fetch_all(self.reader())
                .await?;
            Ok(rows.into_iter().map(AuditRow::into_record).collect())
        })
        .await
    }

    /// Every chain's head: `(chain, seq, hash)`.
    pub async fn audit_heads(&self) -> Result<Vec<(String, i64, String)>, StoreError> {
        self.observed(async {
            // The heads table is a cache kept by appends; the records are the truth. Take
            // each chain's last record itself, so that a tampered heads table misleads nothing.
            let chains: Vec<String> =
                sql("SELECT chain FROM audit_heads ORDER BY chain").scalars(self.reader()).await?;
            let mut heads = Vec::with_capacity(chains.len());
            for chain in chains {
                let head: Option<(i64, String)> = sql(CHAIN_HEAD).bind(&chain).fetch_optional(self.reader()).await?;
                if let Some((seq, hash)) = head {
                    heads.push((chain, seq, hash));
                }
            }
            Ok(heads)
        })
        .await
    }

    /// Stores a signed checkpoint; a leader-only write, refused once `term` is over.
    pub async fn save_checkpoint(
        &self,
        term: Term,
        chain: &str,
        seq: i64,
        hash: &str,
        note: &str,
    ) -> Result<(), StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            leadership::hold_term_in(&mut tx, term).await?;
            sql("INSERT INTO audit_checkpoints (chain, seq, hash, note, created_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT DO NOTHING")
            .bind(chain)
            .bind(seq)
            .bind(hash)
            .bind(note)
            .bind(Utc::now())
            .execute(&mut tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// The latest signed checkpoint of `chain`: `(seq, hash, note)`.
    pub async fn latest_checkpoint(&self, chain: &str) -> Result<Option<(i64, String, String)>, StoreError> {
        let select = sql("SELECT seq, hash, note FROM audit_checkpoints WHERE chain = $1 ORDER BY seq DESC LIMIT 1");
        self.observed(select.bind(chain).fetch_optional(self.reader())).await
    }
}

/// Appends `records` inside `tx`, each chain's after its head; returns them sealed.
pub(super) async fn append_in(tx: &mut Tx, records: &[NewAuditRecord]) -> Result<Vec<AuditRecord>, StoreError> {
    let mut sealed = Vec::with_capacity(records.len());
    for (chain, list) in by_chain(records) {
        if tx.backend() == Backend::Postgres {
            sql("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(format!("audit\u{1f}{chain}"))
                .execute(&mut *tx)
                .await?;
        }
        let mut prev: Option<(i64, String)> = sql(CHAIN_HEAD).bind(chain).fetch_optional(&mut *tx).await?;
        let mut chain_records = Vec::with_capacity(list.len());
        for record in list {
            let record = record.clone().seal(prev.as_ref().map(|(s, h)| (*s, h.as_str())));
            prev = Some((record.seq, record.hash.clone()));
            chain_records.push(record);
        }
        // Multi-row inserts: a batch costs a few round trips, not one per record.
        for chunk in chain_records.chunks(500) {
            let mut insert = sql(
                "INSERT INTO audit_records (chain, seq, time, actor, action, subject, data, prev_hash, hash) VALUES ",
            );
            for (i, r) in chunk.iter().enumerate() {
                insert = insert.push(if i == 0 { "" } else { ", " }).push_row([
                    (&r.namespace).into(),
                    r.seq.into(),
                    (&r.time).into(),
                    (&r.actor).into(),
                    (&r.action).into(),
                    (&r.subject).into(),
                    r.data.to_string().into(),
                    (&r.prev_hash).into(),
                    (&r.hash).into(),
                ]);
            }
            insert.execute(&mut *tx).await?;
        }
        if let Some(last) = chain_records.last() {
            sql("INSERT INTO audit_heads (chain, seq, hash) VALUES ($1, $2, $3) \
                 ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash")
            .bind(chain)
            .bind(last.seq)
            .bind(&last.hash)
            .execute(&mut *tx)
            .await?;
        }
        sealed.extend(chain_records);
    }
    Ok(sealed)
}
