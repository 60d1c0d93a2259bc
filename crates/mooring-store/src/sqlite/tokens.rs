//! [`TokenStore`] for SQLite: API tokens, stored by the SHA-256 of their secret.

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row};

use super::{
    count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db, SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{Role, TokenRecord};
use crate::store::TokenStore;

const TOKEN_COLUMNS: &str =
    "id, name, role, token_sha256, created_at_ms, scope, expires_at_ms, last_used_at_ms";

pub(super) fn role_column(row: &Row<'_>, index: usize) -> rusqlite::Result<Role> {
    let role: String = row.get(index)?;
    role.parse::<Role>()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(e)))
}

pub(super) fn opt_u64_column(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = row.get(index)?;
    v.map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, v)))
        .transpose()
}

pub(super) fn opt_ts_to_sql(what: &str, ts_ms: Option<u64>) -> Result<Option<i64>> {
    ts_ms.map(|t| ts_to_sql(what, t)).transpose()
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        role: role_column(row, 2)?,
        token_sha256: row.get(3)?,
        created_at_ms: u64_column(row, 4)?,
        scope: row.get(5)?,
        expires_at_ms: opt_u64_column(row, 6)?,
        last_used_at_ms: opt_u64_column(row, 7)?,
    })
}

#[async_trait::async_trait]
impl TokenStore for SqliteStore {
    async fn create_token(&self, t: TokenRecord) -> Result<()> {
        t.check_text()?;
        let created_at_ms = ts_to_sql("created_at_ms", t.created_at_ms)?;
        let expires_at_ms = opt_ts_to_sql("expires_at_ms", t.expires_at_ms)?;
        let last_used_at_ms = opt_ts_to_sql("last_used_at_ms", t.last_used_at_ms)?;
        self.write(move |conn| {
            let inserted = conn.execute(
                &format!(
                    "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    t.id,
                    t.name,
                    t.role.as_str(),
                    t.token_sha256,
                    created_at_ms,
                    t.scope,
                    expires_at_ms,
                    last_used_at_ms
                ],
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

    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"))
                .db()?
                .query_row(params![id], token_from_row)
                .optional()
                .db()
        })
        .await
    }

    async fn list_tokens(&self, limit: usize, after_id: Option<&str>) -> Result<Vec<TokenRecord>> {
        let after = after_id.unwrap_or("").to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .db()?;
            let rows = stmt.query_map(params![after, limit], token_from_row).db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn touch_token(&self, id: &str, at_ms: u64) -> Result<()> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE tokens SET last_used_at_ms = max(coalesce(last_used_at_ms, 0), ?2)
                 WHERE id = ?1",
            )
            .db()?
            .execute(params![id, at])
            .db()?;
            Ok(())
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
