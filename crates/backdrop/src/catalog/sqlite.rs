//! The SQLite catalog source: a read-only connection streams a table (`--table`, rows named by
//! rowid) or a query (`--query`, rows named by their number) through a bounded channel, so a
//! million-row table is never held in memory. Cells become text; BLOBs are row problems.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{Column, Connection, Executor, Row, SqliteConnection, Statement, TypeInfo, ValueRef};
use tokio::sync::mpsc;

use super::{CatalogError, CatalogSpec, Location, RawRow};

/// Rows buffered between the reading task and the validator.
const CHANNEL: usize = 1024;

/// The hidden column that carries the rowid in `--table` mode.
const ROWID: &str = "__backdrop_rowid";

/// A SQLite catalog being read.
#[derive(Debug)]
pub struct SqliteSource {
    columns: Result<Vec<String>, String>,
    rows: mpsc::Receiver<Result<RawRow, CatalogError>>,
}

/// True when the file starts with SQLite's magic header.
#[must_use]
pub fn looks_like_sqlite(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 16];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && &magic == b"SQLite format 3\0"
}

impl SqliteSource {
    /// Opens the database read-only and starts streaming the table or query.
    ///
    /// # Errors
    /// [`CatalogError::Sqlite`] when the database cannot be opened or the statement is invalid
    /// (unknown table, SQL error).
    pub async fn open(spec: &CatalogSpec) -> Result<Self, CatalogError> {
        let path = spec.path.clone();
        let err = |what: &str, e: sqlx::Error| CatalogError::Sqlite {
            path: spec.path.clone(),
            message: format!("{what}: {}", describe(&e)),
        };
        if !path.is_file() {
            return Err(CatalogError::Io {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let options = SqliteConnectOptions::new().filename(&path).read_only(true).create_if_missing(false);
        let mut conn = SqliteConnection::connect_with(&options).await.map_err(|e| err("cannot open", e))?;
        let (sql, by_rowid) = match (&spec.table, &spec.query) {
            (Some(table), _) => {
                let quoted = table.replace('"', "\"\"");
                (format!("SELECT rowid AS {ROWID}, * FROM \"{quoted}\" ORDER BY rowid"), true)
            }
            (None, Some(query)) => (query.trim().trim_end_matches(';').to_owned(), false),
            (None, None) => {
                return Err(CatalogError::Unusable { path, message: "give --table or --query".into() });
            }
        };
        let what = if by_rowid { "cannot read table" } else { "invalid --query" };
        let columns: Vec<String> = {
            let stmt = (&mut conn).prepare(sql.as_str()).await.map_err(|e| err(what, e))?;
            stmt.columns().iter().map(|c| c.name().trim().to_owned()).collect()
        };
        let columns = if by_rowid { columns.into_iter().skip(1).collect() } else { columns };
        let (tx, rows) = mpsc::channel(CHANNEL);
        tokio::spawn(stream_rows(conn, sql, by_rowid, path, tx));
        Ok(Self { columns: Ok(columns), rows })
    }

    /// The column names.
    pub fn columns(&self) -> &Result<Vec<String>, String> {
        &self.columns
    }

    /// The next row, or `None` at the end.
    ///
    /// # Errors
    /// [`CatalogError::Sqlite`] when the query fails part-way.
    pub async fn next_row(&mut self) -> Result<Option<RawRow>, CatalogError> {
        self.rows.recv().await.transpose()
    }
}

async fn stream_rows(
    mut conn: SqliteConnection,
    sql: String,
    by_rowid: bool,
    path: PathBuf,
    tx: mpsc::Sender<Result<RawRow, CatalogError>>,
) {
    let mut stream = sqlx::query(&sql).fetch(&mut conn);
    let mut n: u64 = 0;
    loop {
        let next = match stream.try_next().await {
            Ok(Some(row)) => {
                n += 1;
                Ok(convert(&row, n, by_rowid))
            }
            Ok(None) => break,
            Err(e) => Err(CatalogError::Sqlite { path: path.clone(), message: describe(&e) }),
        };
        let stop = next.is_err();
        // The receiver is gone when the planner stopped early: nothing left to do.
        if tx.send(next).await.is_err() || stop {
            break;
        }
    }
    drop(stream);
    let _ = conn.close().await;
}

fn convert(row: &SqliteRow, n: u64, by_rowid: bool) -> RawRow {
    let (location, position, first) = if by_rowid {
        let rowid: i64 = row.try_get(0).unwrap_or_default();
        (Location::Rowid(rowid), rowid, 1)
    } else {
        (Location::Row(n), i64::try_from(n).unwrap_or(i64::MAX), 0)
    };
    let values = (first..row.len()).map(|i| cell(row, i)).collect();
    RawRow { location, position, values }
}

fn cell(row: &SqliteRow, i: usize) -> Result<String, String> {
    let name = || row.columns().get(i).map_or(String::new(), |c| c.name().to_owned());
    let raw = row.try_get_raw(i).map_err(|e| format!("column {}: {e}", name()))?;
    if raw.is_null() {
        return Ok(String::new());
    }
    let kind = raw.type_info().name().to_owned();
    let unreadable = |e: sqlx::Error| format!("column {}: {e}", name());
    match kind.as_str() {
        "INTEGER" => row.try_get_unchecked::<i64, _>(i).map(|v| v.to_string()).map_err(unreadable),
        "REAL" => row.try_get_unchecked::<f64, _>(i).map(|v| v.to_string()).map_err(unreadable),
        "TEXT" => {
            let bytes = row.try_get_unchecked::<&[u8], _>(i).map_err(unreadable)?;
            std::str::from_utf8(bytes).map(str::to_owned).map_err(|e| {
                format!("column {}: invalid UTF-8 at byte {} of the value", name(), e.valid_up_to())
            })
        }
        other => Err(format!("column {} holds a {other} value (expected text or a number)", name())),
    }
}

fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn make_db(path: &Path) {
        let opts = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&opts).await.unwrap();
        conn.execute(
            "CREATE TABLE products (sku TEXT, name TEXT, price REAL, qty INTEGER, pic BLOB);
             INSERT INTO products VALUES ('A-1', 'Mug', 9.5, 3, NULL);
             INSERT INTO products VALUES (42, 'Lamp', NULL, NULL, NULL);
             INSERT INTO products VALUES ('A-3', CAST(X'6F6BFF' AS TEXT), 1, 1, NULL);
             INSERT INTO products VALUES ('A-4', 'Bad', 1, 1, X'00');",
        )
        .await
        .unwrap();
        conn.close().await.unwrap();
    }

    async fn read_all(spec: &CatalogSpec) -> (Vec<String>, Vec<RawRow>) {
        let mut src = SqliteSource::open(spec).await.unwrap();
        let mut rows = Vec::new();
        while let Some(r) = src.next_row().await.unwrap() {
            rows.push(r);
        }
        (src.columns().clone().unwrap(), rows)
    }

    #[tokio::test]
    async fn table_rows_carry_rowids_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        make_db(&path).await;
        assert!(looks_like_sqlite(&path));
        let spec = CatalogSpec { path: path.clone(), table: Some("products".into()), query: None };
        let (cols, rows) = read_all(&spec).await;
        assert_eq!(cols, ["sku", "name", "price", "qty", "pic"]);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].location, Location::Rowid(1));
        assert_eq!(rows[0].values.as_ref().unwrap(), &["A-1", "Mug", "9.5", "3", ""]);
        assert_eq!(rows[1].values.as_ref().unwrap()[0], "42");
        assert_eq!(rows[2].values, Err("column name: invalid UTF-8 at byte 2 of the value".into()));
        assert!(rows[3].values.as_ref().unwrap_err().contains("BLOB"));
    }

    #[tokio::test]
    async fn queries_number_their_rows_and_bad_sql_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        make_db(&path).await;
        let spec = CatalogSpec {
            path: path.clone(),
            table: None,
            query: Some("SELECT sku, name FROM products WHERE qty = 3;".into()),
        };
        let (cols, rows) = read_all(&spec).await;
        assert_eq!(cols, ["sku", "name"]);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].location, Location::Row(1));
        let bad = CatalogSpec { path: path.clone(), table: Some("nope".into()), query: None };
        let err = SqliteSource::open(&bad).await.unwrap_err().to_string();
        assert!(err.contains("no such table"), "{err}");
    }
}
