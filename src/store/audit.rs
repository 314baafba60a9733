//! Audit records, appended in the same transaction as the change they describe.
//!
//! Appends to one chain are serialized (PostgreSQL: a transaction-scoped advisory lock per
//! chain; SQLite: the single writer), so concurrent writers in any number of processes can
//! neither fork a chain nor leave a gap; a batch of records costs one lock and one read of
//! the chain's head.

use super::sql::Tx;
use super::{PgStore, SqliteStore, StoreError};
use crate::audit::{AuditRecord, NewAuditRecord};

/// Appends `records` inside `tx`; returns them sealed.
pub(super) async fn append_in(tx: &mut Tx, records: &[NewAuditRecord]) -> Result<Vec<AuditRecord>, StoreError> {
    match tx {
        Tx::Pg(tx) => PgStore::append_audit_in(tx, records).await,
        Tx::Sqlite(tx) => SqliteStore::append_audit_in(tx, records).await,
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    pub chain: String,
    pub seq: i64,
    pub time: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub data: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRow {
    pub(super) fn into_record(self) -> AuditRecord {
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
pub(super) fn by_chain(records: &[NewAuditRecord]) -> Vec<(&str, Vec<&NewAuditRecord>)> {
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

/// Expands the audit methods for one backend; `$lock` serializes appends per chain.
macro_rules! audit_methods {
    ($store:ty, $sql:path, $lock:expr) => {
        impl $store {
            /// Appends `records` inside `tx`; returns them sealed.
            pub(super) async fn append_audit_in(
                tx: &mut sqlx::Transaction<'static, <$store as $crate::store::sql::HasDatabase>::Db>,
                records: &[$crate::audit::NewAuditRecord],
            ) -> Result<Vec<$crate::audit::AuditRecord>, $crate::store::StoreError> {
                let mut sealed = Vec::with_capacity(records.len());
                for (chain, list) in $crate::store::audit::by_chain(records) {
                    let lock: Option<&str> = $lock;
                    if let Some(lock) = lock {
                        sqlx::query(&$sql(lock)).bind(format!("audit\u{1f}{chain}")).execute(&mut **tx).await?;
                    }
                    let head: Option<(i64, String)> =
                        sqlx::query_as(&$sql("SELECT seq, hash FROM audit_records WHERE chain = ? ORDER BY seq DESC LIMIT 1"))
                            .bind(chain)
                            .fetch_optional(&mut **tx)
                            .await?;
                    let mut prev = head;
                    let mut chain_records = Vec::with_capacity(list.len());
                    for record in list {
                        let record = record.clone().seal(prev.as_ref().map(|(s, h)| (*s, h.as_str())));
                        prev = Some((record.seq, record.hash.clone()));
                        chain_records.push(record);
                    }
                    // Multi-row inserts: a batch costs a few round trips, not one per record.
                    for chunk in chain_records.chunks(500) {
                        let mut insert = sqlx::QueryBuilder::<<$store as $crate::store::sql::HasDatabase>::Db>::new(
                            "INSERT INTO audit_records (chain, seq, time, actor, action, subject, data, prev_hash, hash) ",
                        );
                        insert.push_values(chunk, |mut row, r| {
                            row.push_bind(r.namespace.clone())
                                .push_bind(r.seq)
                                .push_bind(r.time.clone())
                                .push_bind(r.actor.clone())
                                .push_bind(r.action.clone())
                                .push_bind(r.subject.clone())
                                .push_bind(r.data.to_string())
                                .push_bind(r.prev_hash.clone())
                                .push_bind(r.hash.clone());
                        });
                        insert.build().execute(&mut **tx).await?;
                    }
                    if let Some(last) = chain_records.last() {
                        sqlx::query(&$sql(
                            "INSERT INTO audit_heads (chain, seq, hash) VALUES (?, ?, ?) \
                             ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                        ))
                        .bind(chain)
                        .bind(last.seq)
                        .bind(&last.hash)
                        .execute(&mut **tx)
                        .await?;
                    }
                    sealed.extend(chain_records);
                }
                Ok(sealed)
            }

            /// Appends records in a transaction of their own.
            pub(super) async fn append_audit(
                &self,
                records: &[$crate::audit::NewAuditRecord],
            ) -> Result<Vec<$crate::audit::AuditRecord>, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let sealed = Self::append_audit_in(&mut tx, records).await?;
                tx.commit().await?;
                Ok(sealed)
            }

            /// Records of `chain` with `from <= seq <= to`, at most `limit`, in order.
            pub(super) async fn audit_records(
                &self,
                chain: &str,
                from: i64,
                to: i64,
                limit: u32,
            ) -> Result<Vec<$crate::audit::AuditRecord>, $crate::store::StoreError> {
                let rows: Vec<$crate::store::audit::AuditRow> = sqlx::query_as(&$sql(
                    "SELECT chain, seq, time, actor, action, subject, data, prev_hash, hash FROM audit_records \
                     WHERE chain = ? AND seq >= ? AND seq <= ? ORDER BY seq LIMIT ?",
                ))
                .bind(chain)
                .bind(from)
                .bind(to)
                .bind(i64::from(limit))
                .fetch_all(self.read_pool())
                .await?;
                Ok(rows.into_iter().map(|r| r.into_record()).collect())
            }

            /// Every chain and its head `(seq, hash)`.
            pub(super) async fn audit_heads(&self) -> Result<Vec<(String, i64, String)>, $crate::store::StoreError> {
                // The heads table is a cache kept by appends; the records are the truth. Take
                // each chain's last record itself, so that a tampered heads table misleads nothing.
                let chains: Vec<String> = sqlx::query_scalar(&$sql("SELECT chain FROM audit_heads ORDER BY chain"))
                    .fetch_all(self.read_pool())
                    .await?;
                let mut heads = Vec::with_capacity(chains.len());
                for chain in chains {
                    let head: Option<(i64, String)> =
                        sqlx::query_as(&$sql("SELECT seq, hash FROM audit_records WHERE chain = ? ORDER BY seq DESC LIMIT 1"))
                            .bind(&chain)
                            .fetch_optional(self.read_pool())
                            .await?;
                    if let Some((seq, hash)) = head {
                        heads.push((chain, seq, hash));
                    }
                }
                Ok(heads)
            }

            /// Fenced: refused once `term` is over.
            pub(super) async fn save_checkpoint(
                &self,
                term: $crate::store::Term,
                chain: &str,
                seq: i64,
                hash: &str,
                note: &str,
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                Self::hold_term_in(&mut tx, term).await?;
                sqlx::query(&$sql(
                    "INSERT INTO audit_checkpoints (chain, seq, hash, note, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                ))
                .bind(chain)
                .bind(seq)
                .bind(hash)
                .bind(note)
                .bind(chrono::Utc::now())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            /// The latest checkpoint of `chain`: `(seq, hash, note)`.
            pub(super) async fn latest_checkpoint(
                &self,
                chain: &str,
            ) -> Result<Option<(i64, String, String)>, $crate::store::StoreError> {
                Ok(sqlx::query_as(&$sql(
                    "SELECT seq, hash, note FROM audit_checkpoints WHERE chain = ? ORDER BY seq DESC LIMIT 1",
                ))
                .bind(chain)
                .fetch_optional(self.read_pool())
                .await?)
            }
        }
    };
}

pub(super) use audit_methods;
