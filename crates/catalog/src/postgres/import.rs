//! Rebuilding lost backup rows from the store (`vpsbackup catalog
//! import-store`) on PostgreSQL: each backup is inserted under its own id,
//! completed, in one transaction that first checks the id is free and the
//! server exists. An explicit id does not move a PostgreSQL sequence (it
//! does SQLite's AUTOINCREMENT), so the sequence is moved past it here.

use super::{secs, PgCatalog, PgTx};
use crate::error::map_db_error;
use crate::model::{ImportOutcome, ImportedBackup};
use crate::Result;

/// Moves the id sequence of `table` so the next id is above `through`
/// (never back). The table is locked against writers for the rest of `tx`,
/// so no id is handed out between reading the sequence and setting it.
pub(crate) async fn move_sequence_past(tx: &mut PgTx, table: &str, through: i64) -> Result<()> {
    let seq = match table {
        "webhook_events" => "webhook_events_seq_seq".to_owned(),
        _ => format!("{table}_id_seq"),
    };
    sqlx::query(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))
        .execute(&mut **tx)
        .await?;
    sqlx::query(&format!(
        "SELECT setval('{seq}', v, TRUE) FROM \
           (SELECT GREATEST($1::BIGINT, \
              (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq})) AS v) m \
         WHERE v >= 1"
    ))
    .bind(through)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl PgCatalog {
    pub(super) async fn import(&self, b: &ImportedBackup) -> Result<ImportOutcome> {
        let mut tx = self.begin().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM backups WHERE id = $1")
            .bind(b.id.0)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Ok(ImportOutcome::AlreadyPresent);
        }
        let account: Option<i64> =
            sqlx::query_scalar("SELECT account_id FROM servers WHERE id = $1")
                .bind(b.server_id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(account) = account else {
            return Ok(ImportOutcome::UnknownServer);
        };
        sqlx::query(
            "INSERT INTO backups (id, server_id, account_id, backup_type, status, description, \
               created_at, expires_at, completed_at, size_mb, progress, engine_backup_id, scheduled_for) \
             VALUES ($1, $2, $3, $4, 'completed', $5, $6, $7, $8, $9, 100, $10, $11)",
        )
        .bind(b.id.0)
        .bind(b.server_id.0)
        .bind(account)
        .bind(b.backup_type.as_str())
        .bind(&b.description)
        .bind(secs(b.created_at))
        .bind(b.expires_at.map(secs))
        .bind(secs(b.completed_at))
        .bind(b.size_mb as i64)
        .bind(&b.engine_backup_id)
        .bind(b.scheduled_for.map(secs))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            map_db_error(
                e,
                "An automatic backup of this server already exists for this day.",
            )
        })?;
        move_sequence_past(&mut tx, "backups", b.id.0).await?;
        tx.commit().await?;
        Ok(ImportOutcome::Imported)
    }
}
