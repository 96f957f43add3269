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

#[cfg(test)]
mod tests {
    use super::*;

    fn stored<'a>(id: &'a str, labels: &'a BTreeMap<String, String>) -> StoredBackup<'a> {
        StoredBackup {
            engine_backup_id: id,
            server_id: "5",
            created_at_ms: 1_700_000_000_123,
            data_bytes: (3 << 20) + 1,
            labels,
        }
    }

    #[test]
    fn a_manifest_without_labels_imports_as_a_manual_backup_that_never_expires() {
        let none = BTreeMap::new();
        let (b, labelled) = imported_backup(&stored("b42", &none)).unwrap();
        assert!(!labelled);
        assert_eq!((b.id, b.server_id), (BackupId(42), ServerId(5)));
        assert_eq!(b.backup_type, BackupType::Manual);
        assert_eq!((b.expires_at, b.description.as_str()), (None, ""));
        assert_eq!(b.created_at.unix_timestamp(), 1_700_000_000);
        assert_eq!(b.size_mb, 4, "rounded up");
    }

    #[test]
    fn labels_round_trip_the_catalog_facts() {
        let mut l = BTreeMap::new();
        l.insert(TYPE.into(), "automatic".into());
        l.insert(DESCRIPTION.into(), "Automatic daily backup".into());
        l.insert(CREATED_AT.into(), "1699999990".into());
        l.insert(EXPIRES_AT.into(), "1701209590".into());
        l.insert(SCHEDULED_FOR.into(), "1699999200".into());
        let (b, labelled) = imported_backup(&stored("b7", &l)).unwrap();
        assert!(labelled);
        assert_eq!(b.backup_type, BackupType::Automatic);
        assert_eq!(b.created_at.unix_timestamp(), 1_699_999_990);
        assert_eq!(
            b.expires_at.map(|t| t.unix_timestamp()),
            Some(1_701_209_590)
        );
        assert_eq!(
            b.scheduled_for.map(|t| t.unix_timestamp()),
            Some(1_699_999_200)
        );
    }

    #[test]
    fn foreign_ids_and_servers_are_refused_with_a_reason() {
        let none = BTreeMap::new();
        for id in ["nightly", "b", "b0", "b-1", "bx1"] {
            assert!(
                matches!(
                    imported_backup(&stored(id, &none)),
                    Err(NotImportable::ForeignId(_))
                ),
                "{id}"
            );
        }
        let mut s = stored("b1", &none);
        s.server_id = "web-1";
        assert!(matches!(
            imported_backup(&s),
            Err(NotImportable::ServerId(_))
        ));
    }
}
