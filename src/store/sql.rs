//! The store's one way to run a statement on either backend.
//!
//! A statement is written once with numbered placeholders (`$1, $2, …`), which PostgreSQL
//! reads natively and sqlx-sqlite binds by their number, so a placeholder may be used twice
//! or out of order on both. Its arguments are collected as [`Arg`] values and bound in one
//! place per backend ([`Statement::pg_args`], [`Statement::sqlite_args`]); a statement runs
//! [`On`] a transaction ([`Tx`]) or a pool ([`Pool`]).
//!
//! Where the backends need different SQL (a lock PostgreSQL takes and SQLite's one writer
//! does not need, a row-lock suffix), the caller chooses it by [`Tx::backend`] or
//! [`Pool::backend`]: a value, not a second copy of the statement.

use std::borrow::Cow;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Arguments as _, Decode, FromRow, Postgres, Sqlite, Transaction, Type};

use super::{Backend, StoreError};

/// A write transaction on either backend. Dropped without [`Tx::commit`], it rolls back.
pub(super) enum Tx {
    Pg(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    pub(super) fn backend(&self) -> Backend {
        match self {
            Tx::Pg(_) => Backend::Postgres,
            Tx::Sqlite(_) => Backend::Sqlite,
        }
    }

    pub(super) async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Pg(tx) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }

    pub(super) async fn rollback(self) -> Result<(), StoreError> {
        match self {
            Tx::Pg(tx) => tx.rollback().await?,
            Tx::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// A pool to run single statements on: the store's reads ([`super::Store::reader`]) or
/// writes outside a transaction ([`super::Store::writer`]).
#[derive(Clone, Copy)]
pub(super) enum Pool<'p> {
    Pg(&'p PgPool),
    Sqlite(&'p SqlitePool),
}

impl Pool<'_> {
    pub(super) fn backend(&self) -> Backend {
        match self {
            Pool::Pg(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }
}

/// Where a statement runs.
pub(super) enum On<'c> {
    Pg(&'c mut PgConnection),
    PgPool(&'c PgPool),
    Sqlite(&'c mut SqliteConnection),
    SqlitePool(&'c SqlitePool),
}

impl<'c> From<&'c mut Tx> for On<'c> {
    fn from(tx: &'c mut Tx) -> Self {
        match tx {
            Tx::Pg(tx) => On::Pg(tx),
            Tx::Sqlite(tx) => On::Sqlite(tx),
        }
    }
}

impl On<'_> {
    pub(super) fn backend(&self) -> Backend {
        match self {
            On::Pg(_) | On::PgPool(_) => Backend::Postgres,
            On::Sqlite(_) | On::SqlitePool(_) => Backend::Sqlite,
        }
    }
}

/// A backend's own transaction, where a statement written once runs among that backend's
/// own (ingest).
impl<'c> From<&'c mut Transaction<'static, Postgres>> for On<'c> {
    fn from(tx: &'c mut Transaction<'static, Postgres>) -> Self {
        On::Pg(tx)
    }
}

impl<'c> From<&'c mut Transaction<'static, Sqlite>> for On<'c> {
    fn from(tx: &'c mut Transaction<'static, Sqlite>) -> Self {
        On::Sqlite(tx)
    }
}

impl<'p> From<Pool<'p>> for On<'p> {
    fn from(pool: Pool<'p>) -> Self {
        match pool {
            Pool::Pg(pool) => On::PgPool(pool),
            Pool::Sqlite(pool) => On::SqlitePool(pool),
        }
    }
}

/// One bound value, of the types the store binds. Each carries its type when it is
/// `NULL`, which PostgreSQL needs to know.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Arg<'a> {
    Text(Option<Cow<'a, str>>),
    Int8(Option<i64>),
    Int4(Option<i32>),
    Bool(Option<bool>),
    Time(Option<DateTime<Utc>>),
    /// A list of texts: a `text[]` on PostgreSQL, a JSON array on SQLite; see [`in_list`].
    Texts(Cow<'a, [&'a str]>),
}

/// `IN` the list bound at `placeholder` (an [`Arg::Texts`]), as `backend` reads a list.
pub(super) fn in_list(backend: Backend, placeholder: &str) -> String {
    match backend {
        Backend::Postgres => format!("= ANY({placeholder}::text[])"),
        Backend::Sqlite => format!("IN (SELECT value FROM json_each({placeholder}))"),
    }
}

/// What locks the rows a statement reads until its transaction ends: PostgreSQL's
/// `FOR UPDATE`; SQLite's one writer already holds the whole database.
pub(super) fn row_lock(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    }
}

/// A statement whose text differs per backend (see [`in_list`]), built once for each on
/// first use.
pub(super) struct PerBackend {
    build: fn(Backend) -> String,
    pg: OnceLock<String>,
    sqlite: OnceLock<String>,
}

impl PerBackend {
    pub(super) const fn new(build: fn(Backend) -> String) -> Self {
        PerBackend { build, pg: OnceLock::new(), sqlite: OnceLock::new() }
    }

    pub(super) fn get(&self, backend: Backend) -> &str {
        let text = match backend {
            Backend::Postgres => &self.pg,
            Backend::Sqlite => &self.sqlite,
        };
        text.get_or_init(|| (self.build)(backend))
    }
}

impl<'a> From<Vec<&'a str>> for Arg<'a> {
    fn from(v: Vec<&'a str>) -> Self {
        Arg::Texts(Cow::Owned(v))
    }
}

impl<'a> From<&'a [&'a str]> for Arg<'a> {
    fn from(v: &'a [&'a str]) -> Self {
        Arg::Texts(Cow::Borrowed(v))
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(Cow::Borrowed(v)))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(Cow::Borrowed(v)))
    }
}

impl From<String> for Arg<'_> {
    fn from(v: String) -> Self {
        Arg::Text(Some(Cow::Owned(v)))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v.map(Cow::Borrowed))
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Arg::Text(v.as_deref().map(Cow::Borrowed))
    }
}

impl From<Option<String>> for Arg<'_> {
    fn from(v: Option<String>) -> Self {
        Arg::Text(v.map(Cow::Owned))
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int8(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int8(v)
    }
}

impl From<&Option<i64>> for Arg<'_> {
    fn from(v: &Option<i64>) -> Self {
        Arg::Int8(*v)
    }
}

impl From<i32> for Arg<'_> {
    fn from(v: i32) -> Self {
        Arg::Int4(Some(v))
    }
}

impl From<Option<i32>> for Arg<'_> {
    fn from(v: Option<i32>) -> Self {
        Arg::Int4(v)
    }
}

impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::Bool(Some(v))
    }
}

impl From<DateTime<Utc>> for Arg<'_> {
    fn from(v: DateTime<Utc>) -> Self {
        Arg::Time(Some(v))
    }
}

impl From<Option<DateTime<Utc>>> for Arg<'_> {
    fn from(v: Option<DateTime<Utc>>) -> Self {
        Arg::Time(v)
    }
}

/// A row type both backends can decode (`#[derive(sqlx::FromRow)]` types and tuples).
pub(super) trait Row: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin {}

impl<T> Row for T where T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin {}

/// A single column value both backends can decode.
pub(super) trait Scalar:
    for<'r> Decode<'r, Postgres> + Type<Postgres> + for<'r> Decode<'r, Sqlite> + Type<Sqlite> + Send + Unpin
{
}

impl<T> Scalar for T where
    T: for<'r> Decode<'r, Postgres> + Type<Postgres> + for<'r> Decode<'r, Sqlite> + Type<Sqlite> + Send + Unpin
{
}

/// A statement and its arguments; see the module docs.
#[derive(Clone, Debug)]
pub(super) struct Statement<'a> {
    text: Cow<'a, str>,
    args: Vec<Arg<'a>>,
}

/// A statement with `$n` placeholders, to [`Statement::bind`] in order.
pub(super) fn sql(text: &str) -> Statement<'_> {
    Statement { text: Cow::Borrowed(text), args: Vec::new() }
}

impl<'a> Statement<'a> {
    /// Binds the next argument: the first is `$1`.
    pub(super) fn bind(mut self, value: impl Into<Arg<'a>>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Appends `text` to the statement, for statements whose shape depends on the input.
    pub(super) fn push(mut self, text: &str) -> Self {
        self.text.to_mut().push_str(text);
        self
    }

    /// Appends the next placeholder (`$n`, n the argument's number) and binds `value` to it.
    pub(super) fn push_bind(self, value: impl Into<Arg<'a>>) -> Self {
        let placeholder = format!("${}", self.args.len() + 1);
        self.push(&placeholder).bind(value)
    }

    /// Appends `(…)`: one placeholder per value, bound to it (a row of a multi-row
    /// `VALUES`).
    pub(super) fn push_row<const N: usize>(mut self, values: [Arg<'a>; N]) -> Self {
        for (i, value) in values.into_iter().enumerate() {
            self = self.push(if i == 0 { "(" } else { ", " }).push_bind(value);
        }
        self.push(")")
    }

    fn pg_args(values: &[Arg<'a>]) -> Result<PgArguments, StoreError> {
        let mut args = PgArguments::default();
        for arg in values {
            match arg {
                Arg::Text(v) => args.add(v.as_deref()),
                Arg::Int8(v) => args.add(*v),
                Arg::Int4(v) => args.add(*v),
                Arg::Bool(v) => args.add(*v),
                Arg::Time(v) => args.add(*v),
                Arg::Texts(v) => args.add(&**v),
            }
            .map_err(sqlx::Error::Encode)?;
        }
        Ok(args)
    }

    /// SQLite keeps bound texts until the statement runs: they are moved in, not copied.
    fn sqlite_args(values: Vec<Arg<'a>>) -> Result<SqliteArguments<'a>, StoreError> {
        let mut args = SqliteArguments::default();
        for arg in values {
            match arg {
                Arg::Text(v) => args.add(v),
                Arg::Int8(v) => args.add(v),
                Arg::Int4(v) => args.add(v),
                Arg::Bool(v) => args.add(v),
                Arg::Time(v) => args.add(v),
                Arg::Texts(v) => args.add(serde_json::to_string(&*v).expect("a list of texts always serializes")),
            }
            .map_err(sqlx::Error::Encode)?;
        }
        Ok(args)
    }

    /// Runs the statement; returns how many rows it changed.
    pub(super) async fn execute<'c>(self, on: impl Into<On<'c>>) -> Result<u64, StoreError> {
        let Statement { text, args } = self;
        let text = &*text;
        let done = match on.into() {
            On::Pg(c) => sqlx::query_with(text, Self::pg_args(&args)?).execute(c).await?.rows_affected(),
            On::PgPool(p) => sqlx::query_with(text, Self::pg_args(&args)?).execute(p).await?.rows_affected(),
            On::Sqlite(c) => sqlx::query_with(text, Self::sqlite_args(args)?).execute(c).await?.rows_affected(),
            On::SqlitePool(p) => sqlx::query_with(text, Self::sqlite_args(args)?).execute(p).await?.rows_affected(),
        };
        Ok(done)
    }

    pub(super) async fn fetch_all<'c, T: Row>(self, on: impl Into<On<'c>>) -> Result<Vec<T>, StoreError> {
        let Statement { text, args } = self;
        let text = &*text;
        let rows = match on.into() {
            On::Pg(c) => sqlx::query_as_with(text, Self::pg_args(&args)?).fetch_all(c).await?,
            On::PgPool(p) => sqlx::query_as_with(text, Self::pg_args(&args)?).fetch_all(p).await?,
            On::Sqlite(c) => sqlx::query_as_with(text, Self::sqlite_args(args)?).fetch_all(c).await?,
            On::SqlitePool(p) => sqlx::query_as_with(text, Self::sqlite_args(args)?).fetch_all(p).await?,
        };
        Ok(rows)
    }

    pub(super) async fn fetch_optional<'c, T: Row>(self, on: impl Into<On<'c>>) -> Result<Option<T>, StoreError> {
        let Statement { text, args } = self;
        let text = &*text;
        let row = match on.into() {
            On::Pg(c) => sqlx::query_as_with(text, Self::pg_args(&args)?).fetch_optional(c).await?,
            On::PgPool(p) => sqlx::query_as_with(text, Self::pg_args(&args)?).fetch_optional(p).await?,
            On::Sqlite(c) => sqlx::query_as_with(text, Self::sqlite_args(args)?).fetch_optional(c).await?,
            On::SqlitePool(p) => sqlx::query_as_with(text, Self::sqlite_args(args)?).fetch_optional(p).await?,
        };
        Ok(row)
    }

    /// The one row the statement returns; none is an error ([`sqlx::Error::RowNotFound`]).
    pub(super) async fn fetch_one<'c, T: Row>(self, on: impl Into<On<'c>>) -> Result<T, StoreError> {
        self.fetch_optional(on).await?.ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// The first column of every row.
    pub(super) async fn scalars<'c, T: Scalar>(self, on: impl Into<On<'c>>) -> Result<Vec<T>, StoreError> {
        let rows: Vec<(T,)> = self.fetch_all(on).await?;
        Ok(rows.into_iter().map(|(v,)| v).collect())
    }

    /// The first column of the first row, if there is a row.
    pub(super) async fn scalar_optional<'c, T: Scalar>(self, on: impl Into<On<'c>>) -> Result<Option<T>, StoreError> {
        let row: Option<(T,)> = self.fetch_optional(on).await?;
        Ok(row.map(|(v,)| v))
    }

    /// The first column of the one row the statement returns.
    pub(super) async fn scalar<'c, T: Scalar>(self, on: impl Into<On<'c>>) -> Result<T, StoreError> {
        let (v,): (T,) = self.fetch_one(on).await?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite() -> SqlitePool {
        SqlitePool::connect("sqlite::memory:").await.unwrap()
    }

    /// A placeholder used twice, and placeholders out of order, bind by their number.
    async fn binds_by_number(on: Pool<'_>) {
        let text: String = sql("SELECT $2 || $1 || $2").bind("a").bind("b").scalar(on).await.unwrap();
        assert_eq!(text, "bab");
        let (third, first, second): (i64, String, Option<String>) =
            sql("SELECT $3, $1, $2").bind("x").bind(None::<&str>).bind(7i64).fetch_one(on).await.unwrap();
        assert_eq!((third, first.as_str(), second), (7, "x", None));
    }

    #[tokio::test]
    async fn sqlite_binds_numbered_placeholders_by_number_reused_and_out_of_order() {
        let pool = sqlite().await;
        binds_by_number(Pool::Sqlite(&pool)).await;
    }

    /// PostgreSQL reads `$n` natively; checked here too, where a test server is given.
    #[tokio::test]
    async fn postgres_binds_the_same_numbered_placeholders() {
        let Ok(url) = std::env::var("HOOKWARDEN_TEST_POSTGRES_URL") else {
            let required = std::env::var("HOOKWARDEN_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
            assert!(!required, "HOOKWARDEN_TEST_REQUIRE_POSTGRES=1 but HOOKWARDEN_TEST_POSTGRES_URL is not set");
            return;
        };
        let pool = PgPool::connect(&url).await.unwrap();
        binds_by_number(Pool::Pg(&pool)).await;
        let mut tx = Tx::Pg(pool.begin().await.unwrap());
        assert_eq!(tx.backend(), Backend::Postgres);
        let n: i64 = sql("SELECT $1").bind(1i64).push(" + ").push_bind(2i64).scalar(&mut tx).await.unwrap();
        assert_eq!(n, 3);
        tx.rollback().await.unwrap();
    }

    #[tokio::test]
    async fn typed_nulls_and_every_argument_type_round_trip_on_sqlite() {
        let pool = sqlite().await;
        let on = Pool::Sqlite(&pool);
        sql("CREATE TABLE t (s TEXT, i INTEGER, j INTEGER, b BOOLEAN, at TEXT)").execute(on).await.unwrap();
        let at = DateTime::parse_from_rfc3339("2024-05-01T10:00:00.123Z").unwrap().with_timezone(&Utc);
        let inserted = sql("INSERT INTO t VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10)")
            .bind(String::from("one"))
            .bind(i64::MAX)
            .bind(-3i32)
            .bind(true)
            .bind(at)
            .bind(None::<String>)
            .bind(None::<i64>)
            .bind(None::<i32>)
            .bind(false)
            .bind(None::<DateTime<Utc>>)
            .execute(on)
            .await
            .unwrap();
        assert_eq!(inserted, 2);
        type Values = (Option<String>, Option<i64>, Option<i32>, bool, Option<DateTime<Utc>>);
        let rows: Vec<Values> = sql("SELECT s, i, j, b, at FROM t ORDER BY s IS NULL").fetch_all(on).await.unwrap();
        assert_eq!(
            rows,
            [(Some("one".into()), Some(i64::MAX), Some(-3), true, Some(at)), (None, None, None, false, None)]
        );
        let missing: Option<i64> = sql("SELECT i FROM t WHERE s = $1").bind("none").scalar_optional(on).await.unwrap();
        assert_eq!(missing, None);
        let err = sql("SELECT i FROM t WHERE s = $1").bind("none").scalar::<i64>(on).await.unwrap_err();
        assert!(matches!(err, StoreError::Database(sqlx::Error::RowNotFound)), "{err:?}");
    }

    #[tokio::test]
    async fn pushed_placeholders_are_numbered_after_the_bound_ones() {
        let pool = sqlite().await;
        let statement = sql("SELECT $1").bind(1i64).push(" + ").push_bind(2i64).push(" * ").push_bind(3i64);
        assert_eq!(statement.text, "SELECT $1 + $2 * $3");
        let n: i64 = statement.scalar(Pool::Sqlite(&pool)).await.unwrap();
        assert_eq!(n, 7);
        let rows = sql("VALUES ").push_row([1i64.into(), "a".into()]).push(", ").push_row([2i64.into(), "b".into()]);
        assert_eq!(rows.text, "VALUES ($1, $2), ($3, $4)");
        let rows: Vec<(i64, String)> = rows.fetch_all(Pool::Sqlite(&pool)).await.unwrap();
        assert_eq!(rows, [(1, "a".into()), (2, "b".into())]);
    }

    #[tokio::test]
    async fn a_transaction_commits_or_rolls_back_its_statements() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let pool = SqlitePool::connect(&url).await.unwrap();
        sql("CREATE TABLE t (n INTEGER)").execute(Pool::Sqlite(&pool)).await.unwrap();
        for (n, commit) in [(1i64, true), (2, false)] {
            let mut tx = Tx::Sqlite(pool.begin().await.unwrap());
            assert_eq!(tx.backend(), Backend::Sqlite);
            sql("INSERT INTO t VALUES ($1)").bind(n).execute(&mut tx).await.unwrap();
            if commit {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
        }
        let kept: Vec<i64> = sql("SELECT n FROM t").scalars(Pool::Sqlite(&pool)).await.unwrap();
        assert_eq!(kept, [1]);
    }
}
