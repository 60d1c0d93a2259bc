//! The one error type of every storage backend, with a stable machine-readable `kind()`.

/// Result of every storage operation.
pub type Result<T> = std::result::Result<T, StoreError>;

/// What went wrong in a store. `Clone` so the group-commit writer can hand the same failure to
/// every waiter of a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A row with this key already exists (device id, token id or token hash).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The addressed row does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller passed a value the store cannot represent (e.g. a timestamp above
    /// [`crate::TS_MS_MAX`], a non-finite number, an unknown token role).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The database was written by a newer Mooring: refuse to touch it (no downgrades).
    #[error("database schema version {found} was written by a newer Mooring; this build knows schema versions up to {supported} and never downgrades a database: run a Mooring that knows schema version {found}, or restore a backup taken before the upgrade")]
    SchemaTooNew { found: i64, supported: i64 },
    /// The group-commit writer task has stopped; nothing was stored.
    #[error("telemetry writer is shut down")]
    Closed,
    /// The storage cannot take the operation right now (disk full, I/O error, database busy or
    /// locked, read-only): nothing was stored; the same operation may succeed later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The backend failed (corruption, SQL error, panicked worker). Not retried here.
    #[error("storage backend error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Stable snake_case name of the variant, used in API error codes and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::AlreadyExists(_) => "already_exists",
            StoreError::NotFound(_) => "not_found",
            StoreError::InvalidInput(_) => "invalid_input",
            StoreError::SchemaTooNew { .. } => "schema_too_new",
            StoreError::Closed => "closed",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Backend(_) => "backend",
        }
    }
}
