//! [`TokenStore`] for PostgreSQL: API tokens, stored by the SHA-256 of their secret.

use tokio_postgres::Row;

use super::{column, ts_to_sql, u64_column, PgStore};
use crate::error::{Result, StoreError};
use crate::model::{TokenRecord, Role};
use crate::store::TokenStore;

const TOKEN_COLUMNS: &str = "id, name, role, token_sha256, created_at_ms";

fn token_from_row(row: &Row) -> Result<TokenRecord> {
    let role: &str = column(row, 2)?;
    let role = role
        .parse::<Role>()
        .map_err(|e| StoreError::Backend(format!("stored token role: {e}")))?;
    Ok(TokenRecord {
        id: column(row, 0)?,
        name: column(row, 1)?,
        role,
        token_sha256: column(row, 3)?,
        created_at_ms: u64_column(row, 4)?,
    })
}

#[async_trait::async_trait]
impl TokenStore for PgStore {
    async fn create_token(&self, t: TokenRecord) -> Result<()> {
        let created_at_ms = ts_to_sql("created_at_ms", t.created_at_ms)?;
        self.execute(
            "INSERT INTO tokens (id, name, role, token_sha256, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &t.id,
                &t.name,
                &t.role.as_str(),
                &t.token_sha256,
                &created_at_ms,
            ],
            || format!("token {} (or its secret)", t.id),
        )
        .await?;
        Ok(())
    }

    async fn find_token(&self, token_sha256: &str) -> Result<Option<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_sha256 = $1");
        let row = self.query_opt(&sql, &[&token_sha256]).await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id");
        let rows = self.query(&sql, &[]).await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn delete_token(&self, id: &str) -> Result<bool> {
        let deleted = self
            .execute("DELETE FROM tokens WHERE id = $1", &[&id], || {
                format!("token {id}")
            })
            .await?;
        Ok(deleted > 0)
    }
}
