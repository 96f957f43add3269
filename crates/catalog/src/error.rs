//! The catalog's error type. Texts are sentences an operator (CLI) or a
//! customer (API) can act on; database details stay in `Database`.

/// Why a catalog call failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The thing named does not exist (or is outside the caller's scope).
    #[error("{0} not found.")]
    NotFound(&'static str),
    /// A uniqueness or state rule forbids the change.
    #[error("{0}")]
    Conflict(String),
    /// The server already has a backup or restore queued or running.
    #[error("{0}")]
    Busy(String),
    /// Input the schema rejects (out of range, dangling reference).
    #[error("{0}")]
    Invalid(String),
    /// The per-server manual backup limit is reached.
    #[error("This server already has {limit} manual backups, the maximum. Delete a manual backup you no longer need, then try again.")]
    ManualLimit { limit: u32 },
    /// The database itself failed; not the caller's fault.
    #[error("catalog database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database server did not answer.
    #[error("catalog database unreachable: {0}")]
    Unreachable(String),
    /// Applying the schema migrations failed.
    #[error("catalog migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Turns a database error into the catalog's words, for both backends:
/// uniqueness becomes a conflict with `duplicate` as its text, other
/// constraints become invalid input, anything else stays a database error
/// (a 500 upstream).
pub(crate) fn map_db_error(e: sqlx::Error, duplicate: &str) -> CatalogError {
    if let sqlx::Error::Database(db) = &e {
        use sqlx::error::ErrorKind;
        match db.kind() {
            ErrorKind::UniqueViolation => return CatalogError::Conflict(duplicate.to_owned()),
            ErrorKind::ForeignKeyViolation => {
                return CatalogError::Invalid("It refers to something that does not exist.".into())
            }
            ErrorKind::CheckViolation | ErrorKind::NotNullViolation => {
                return CatalogError::Invalid(format!(
                    "A value is out of range ({}).",
                    db.message()
                ))
            }
            _ => {}
        }
    }
    CatalogError::Database(e)
}
