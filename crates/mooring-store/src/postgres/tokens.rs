//! [`TokenStore`] for PostgreSQL: API tokens, stored by the SHA-256 of their secret.

use tokio_postgres::Row;

use super::{
    column, count_to_sql, nul_free_cursor, opt_ts_to_sql, opt_u64_column, role_column, ts_to_sql,
    u64_column, PgStore,
};
use crate::error::Result;
use crate::model::{check_text, TokenRecord};
use crate::store::TokenStore;

const TOKEN_COLUMNS: &str =
    "id, name, role, token_sha256, created_at_ms, scope, expires_at_ms, last_used_at_ms";

fn token_from_row(row: &Row) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: column(row, 0)?,
        name: column(row, 1)?,
        role: role_column(row, 2)?,
        token_sha256: column(row, 3)?,
        created_at_ms: u64_column(row, 4)?,
        scope: column(row, 5)?,
        expires_at_ms: opt_u64_column(row, 6)?,
        last_used_at_ms: opt_u64_column(row, 7)?,
    })
}

#[async_trait::async_trait]
impl TokenStore for PgStore {
    async fn create_token(&self, t: TokenRecord) -> Result<()> {
        t.check_text()?;
        let created_at_ms = ts_to_sql("created_at_ms", t.created_at_ms)?;
        let expires_at_ms = opt_ts_to_sql("expires_at_ms", t.expires_at_ms)?;
        let last_used_at_ms = opt_ts_to_sql("last_used_at_ms", t.last_used_at_ms)?;
        self.execute(
            &format!(
                "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            &[
                &t.id,
                &t.name,
                &t.role.as_str(),
                &t.token_sha256,
                &created_at_ms,
                &t.scope,
                &expires_at_ms,
                &last_used_at_ms,
            ],
            || format!("token {} (or its secret)", t.id),
        )
        .await?;
        Ok(())
    }

    async fn find_token(&self, token_sha256: &str) -> Result<Option<TokenRecord>> {
        if check_text("token hash", token_sha256).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_sha256 = $1");
        let row = self.query_opt(&sql, &[&token_sha256]).await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>> {
        if check_text("token id", id).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self, limit: usize, after_id: Option<&str>) -> Result<Vec<TokenRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Ids are COLLATE "C": byte order, as in SQLite.
        let after_id = nul_free_cursor(after_id.unwrap_or(""));
        let limit = count_to_sql(limit);
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = self.query(&sql, &[&after_id, &limit]).await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn touch_token(&self, id: &str, at_ms: u64) -> Result<()> {
        let at = ts_to_sql("at_ms", at_ms)?;
        if check_text("token id", id).is_err() {
            return Ok(());
        }
        self.execute(
            "UPDATE tokens SET last_used_at_ms = GREATEST(COALESCE(last_used_at_ms, 0), $2)
             WHERE id = $1",
            &[&id, &at],
            || format!("token {id}"),
        )
        .await?;
        Ok(())
    }

    async fn delete_token(&self, id: &str) -> Result<bool> {
        if check_text("token id", id).is_err() {
            return Ok(false);
        }
        let deleted = self
            .execute("DELETE FROM tokens WHERE id = $1", &[&id], || {
                format!("token {id}")
            })
            .await?;
        Ok(deleted > 0)
    }
}
