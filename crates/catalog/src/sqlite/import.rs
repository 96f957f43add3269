//! Rebuilding lost backup rows from the store (`vpsbackup catalog
//! import-store`): each backup is inserted under its own id, completed,
//! in one transaction that first checks the id is free and the server
//! exists, so a second run changes nothing.

use super::{secs, SqliteCatalog};
use crate::error::map_db_error;
use crate::model::{BackupId, ImportOutcome, ImportedBackup};
use crate::Result;

impl SqliteCatalog {
    pub(super) async fn import(&self, b: &ImportedBackup) -> Result<ImportOutcome> {
        let mut tx = self.begin().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM backups WHERE id = ?")
            .bind(b.id.0)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Ok(ImportOutcome::AlreadyPresent);
        }
        let account: Option<i64> =
            sqlx::query_scalar("SELECT account_id FROM servers WHERE id = ?")
                .bind(b.server_id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(account) = account else {
            return Ok(ImportOutcome::UnknownServer);
        };
        // An explicit id above the AUTOINCREMENT sequence moves it, so new
        // backups never reuse an imported id.
        sqlx::query(
            "INSERT INTO backups (id, server_id, account_id, backup_type, status, description, \
               created_at, expires_at, completed_at, size_mb, progress, engine_backup_id, scheduled_for) \
             VALUES (?, ?, ?, ?, 'completed', ?, ?, ?, ?, ?, 100, ?, ?)",
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
        tx.commit().await?;
        Ok(ImportOutcome::Imported)
    }

    pub(super) async fn reserve_ids(&self, through: BackupId) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'backups', 0 \
             WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'backups')",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'backups'")
            .bind(through.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
