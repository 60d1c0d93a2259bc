//! [`TokenStore`] for SQLite: API tokens, stored by the SHA-256 of their secret.

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row};

use super::{is_constraint_violation, store_error, ts_to_sql, u64_column, Db, SqliteStore};
use crate::error::{Result, StoreError};
use crate::model::{TokenRecord, TokenRole};
use crate::store::TokenStore;

const TOKEN_COLUMNS: &str = "id, name, role, token_sha256, created_at_ms";

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let role: String = row.get(2)?;
    let role = role
        .parse::<TokenRole>()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, Type::Text, Box::new(e)))?;
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        role,
        token_sha256: row.get(3)?,
        created_at_ms: u64_column(row, 4)?,
    })
}

#[async_trait::async_trait]
impl TokenStore for SqliteStore {
    async fn create_token(&self, t: TokenRecord) -> Result<()> {
        let created_at_ms = ts_to_sql("created_at_ms", t.created_at_ms)?;
        self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO tokens (id, name, role, token_sha256, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![t.id, t.name, t.role.as_str(), t.token_sha256, created_at_ms],
            );
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if is_constraint_violation(&e) => Err(StoreError::AlreadyExists(format!(
                    "token {} (or its secret)",
                    t.id
                ))),
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }

    async fn find_token(&self, token_sha256: &str) -> Result<Option<TokenRecord>> {
        let token_sha256 = token_sha256.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_sha256 = ?1"
            ))
            .db()?
            .query_row(params![token_sha256], token_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id"))
                .db()?;
            let rows = stmt.query_map([], token_from_row).db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn delete_token(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |conn| {
            let deleted = conn
                .execute("DELETE FROM tokens WHERE id = ?1", params![id])
                .db()?;
            Ok(deleted > 0)
        })
        .await
    }
}
