//! The catalog's facts about a backup that travel in the store's manifest
//! as labels (`Repository::backup_labelled`), and their reading back by
//! `vpsbackup catalog import-store` when the catalog is lost. Labels are
//! plain strings so the engine stays ignorant of catalogs; a manifest
//! written before labels existed has none and gets defaults (see
//! [`imported_backup`]).

use std::collections::BTreeMap;
use time::OffsetDateTime;

use crate::model::{Backup, BackupId, BackupType, ImportedBackup, ServerId};

const TYPE: &str = "backup_type";
const DESCRIPTION: &str = "description";
const CREATED_AT: &str = "created_at";
const EXPIRES_AT: &str = "expires_at";
const SCHEDULED_FOR: &str = "scheduled_for";

/// What the catalog records about `b` that the manifest should carry.
pub fn backup_labels(b: &Backup) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(TYPE.to_owned(), b.backup_type.as_str().to_owned());
    l.insert(DESCRIPTION.to_owned(), b.description.clone());
    // When it was asked for; the manifest's own time is when the engine started.
    l.insert(
        CREATED_AT.to_owned(),
        b.created_at.unix_timestamp().to_string(),
    );
    if let Some(t) = b.expires_at {
        l.insert(EXPIRES_AT.to_owned(), t.unix_timestamp().to_string());
    }
    if let Some(t) = b.scheduled_for {
        l.insert(SCHEDULED_FOR.to_owned(), t.unix_timestamp().to_string());
    }
    l
}

/// A manifest as the import sees it.
#[derive(Debug, Clone)]
pub struct StoredBackup<'a> {
    pub engine_backup_id: &'a str,
    pub server_id: &'a str,
    pub created_at_ms: u64,
    pub data_bytes: u64,
    pub labels: &'a BTreeMap<String, String>,
}

/// Why a manifest cannot become a catalog backup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotImportable {
    #[error(
        "its id {0:?} is not one the service gives (b<number>); it was made outside the service"
    )]
    ForeignId(String),
    #[error("its server id {0:?} is not a number")]
    ServerId(String),
}

/// The catalog row for a stored backup. Without labels (a manifest older
/// than them): a manual backup with no description and no expiry, so
/// nothing imported is ever expired by a guess; `labelled` says which.
pub fn imported_backup(s: &StoredBackup<'_>) -> Result<(ImportedBackup, bool), NotImportable> {
    let id = s
        .engine_backup_id
        .strip_prefix('b')
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| NotImportable::ForeignId(s.engine_backup_id.to_owned()))?;
    let server = s
        .server_id
        .parse::<i64>()
        .map_err(|_| NotImportable::ServerId(s.server_id.to_owned()))?;
    let time_label = |k: &str| {
        s.labels
            .get(k)
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
    };
    let started = OffsetDateTime::from_unix_timestamp((s.created_at_ms / 1000) as i64)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let created_at = time_label(CREATED_AT).unwrap_or(started);
    let backup_type = s
        .labels
        .get(TYPE)
        .and_then(|t| BackupType::parse(t))
        .unwrap_or(BackupType::Manual);
    let labelled = s.labels.contains_key(TYPE);
    Ok((
        ImportedBackup {
            id: BackupId(id),
            server_id: ServerId(server),
            backup_type,
            description: s.labels.get(DESCRIPTION).cloned().unwrap_or_default(),
            created_at,
            // The manifest is written last, when the backup completes; the
            // engine's start is the closest time the store keeps.
            completed_at: started,
            expires_at: match backup_type {
                BackupType::Automatic => time_label(EXPIRES_AT),
                BackupType::Manual => None,
            },
            scheduled_for: time_label(SCHEDULED_FOR),
            size_mb: s.data_bytes.div_ceil(1 << 20),
            engine_backup_id: s.engine_backup_id.to_owned(),
        },
        labelled,
    ))
}
