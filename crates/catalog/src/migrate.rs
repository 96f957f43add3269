//! Moving a single box to the cluster (`vpsbackup catalog migrate`): every
//! row of a SQLite catalog copied into an empty PostgreSQL one with its id
//! intact, so tokens, backup ids and the store's manifests (`b<id>`) keep
//! meaning the same thing; each id sequence is moved past the ids copied.
//!
//! The source is read in one read transaction (one consistent snapshot even
//! if a process still writes it); the target is written in one transaction,
//! so a copy that fails leaves it as empty as it was. `backup_counts` is not
//! copied: PostgreSQL's triggers rebuild it from the backups inserted.

use sqlx::Row;

use crate::postgres::move_sequence_past;
use crate::{CatalogError, PgCatalog, Result, SqliteCatalog};

/// How a column is stored: SQLite keeps flags as 0/1 integers, PostgreSQL
/// as booleans; everything else maps one to one.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Blob,
    Flag,
}

use Kind::*;

/// The tables in foreign-key order, with their columns (SQLite migrations
/// 0001-0010; a column added to both schemas is added here too).
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "accounts",
        &[
            ("id", Int),
            ("name", Text),
            ("created_at", Int),
            ("webhook_url", Text),
            ("webhook_secret", Text),
        ],
    ),
    (
        "api_tokens",
        &[
            ("id", Int),
            ("token_hash", Blob),
            ("prefix", Text),
            ("name", Text),
            ("account_id", Int),
            ("is_admin", Flag),
            ("created_at", Int),
            ("revoked_at", Int),
        ],
    ),
    (
        "plans",
        &[
            ("id", Int),
            ("name", Text),
            ("retention_days", Int),
            ("window_start_minute", Int),
            ("window_minutes", Int),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    ),
    (
        "servers",
        &[
            ("id", Int),
            ("name", Text),
            ("hostname", Text),
            ("account_id", Int),
            ("plan_id", Int),
            ("auto_backup_enabled", Flag),
            ("window_start_minute", Int),
            ("hook_pre_backup", Text),
            ("hook_post_backup", Text),
            ("hook_pre_restore", Text),
            ("hook_post_restore", Text),
            ("created_at", Int),
            ("updated_at", Int),
            ("runtime", Text),
            ("qmp_socket", Text),
            ("libvirt_domain", Text),
            ("guest_agent", Text),
            ("node", Text),
        ],
    ),
    (
        "server_disks",
        &[
            ("server_id", Int),
            ("idx", Int),
            ("path", Text),
            ("format", Text),
        ],
    ),
    (
        "backups",
        &[
            ("id", Int),
            ("server_id", Int),
            ("account_id", Int),
            ("backup_type", Text),
            ("status", Text),
            ("description", Text),
            ("created_at", Int),
            ("expires_at", Int),
            ("completed_at", Int),
            ("size_mb", Int),
            ("stored_bytes", Int),
            ("progress", Int),
            ("error", Text),
            ("engine_backup_id", Text),
            ("scheduled_for", Int),
            ("verified_at", Int),
            ("damaged", Flag),
            ("verify_error", Text),
            ("incremental", Flag),
            ("bytes_read", Int),
            ("full_reason", Text),
            ("consistency", Text),
        ],
    ),
    (
        "restores",
        &[
            ("id", Int),
            ("server_id", Int),
            ("account_id", Int),
            ("backup_id", Int),
            ("status", Text),
            ("progress", Int),
            ("created_at", Int),
            ("completed_at", Int),
            ("error", Text),
        ],
    ),
    (
        "jobs",
        &[
            ("id", Int),
            ("kind", Text),
            ("server_id", Int),
            ("backup_id", Int),
            ("restore_id", Int),
            ("state", Text),
            ("attempts", Int),
            ("max_attempts", Int),
            ("claimed_by", Text),
            ("heartbeat_at", Int),
            ("run_after", Int),
            ("created_at", Int),
            ("finished_at", Int),
            ("error", Text),
            ("error_detail", Text),
            ("node", Text),
            ("lease_expires_at", Int),
        ],
    ),
    (
        "auto_backup_slots",
        &[("server_id", Int), ("last_slot", Int)],
    ),
    (
        "scheduler_tasks",
        &[("name", Text), ("last_run", Int), ("summary", Text)],
    ),
    (
        "idempotency_keys",
        &[
            ("owner", Text),
            ("idem_key", Text),
            ("request_hash", Blob),
            ("status", Int),
            ("body", Blob),
            ("created_at", Int),
        ],
    ),
    (
        "webhook_events",
        &[
            ("seq", Int),
            ("id", Text),
            ("account_id", Int),
            ("event", Text),
            ("backup_id", Int),
            ("restore_id", Int),
            ("payload", Text),
            ("state", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("last_error", Text),
            ("created_at", Int),
            ("finished_at", Int),
            ("claimed_until", Int),
        ],
    ),
];

/// Tables whose id comes from a sequence, and that sequence's column.
const SEQUENCED: &[(&str, &str)] = &[
    ("accounts", "id"),
    ("api_tokens", "id"),
    ("plans", "id"),
    ("backups", "id"),
    ("restores", "id"),
    ("jobs", "id"),
    ("webhook_events", "seq"),
];

/// Rows copied per table, in copy order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub tables: Vec<(&'static str, u64)>,
}

/// Copies every row of `from` into `to`, which must be empty (a fresh
/// database: its migrations' default plans and nothing else).
pub async fn sqlite_to_postgres(from: &SqliteCatalog, to: &PgCatalog) -> Result<MigrateReport> {
    let mut tx = to.pool().begin().await?;
    // Nobody else may write the target while it is checked and filled.
    for (table, _) in TABLES {
        sqlx::query(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
            .execute(&mut *tx)
            .await?;
    }
    let mut used = Vec::new();
    for (table, _) in TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await?;
        if n > 0 && *table != "plans" {
            used.push(format!("{n} {}", table.replace('_', " ")));
        }
    }
    let custom_plans: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM plans WHERE name NOT IN ('basic', 'standard', 'premium') \
         OR (name, retention_days, window_start_minute, window_minutes) NOT IN \
            (('basic', 7, 180, 120), ('standard', 14, 180, 120), ('premium', 30, 180, 120))",
    )
    .fetch_one(&mut *tx)
    .await?;
    if custom_plans > 0 {
        used.push(format!("{custom_plans} plans added or changed"));
    }
    if !used.is_empty() {
        return Err(CatalogError::Conflict(format!(
            "The target catalog is not empty ({}); migrate only into a new, empty database.",
            used.join(", ")
        )));
    }
    // The target's default plans make way for the source's, ids and all.
    sqlx::query("DELETE FROM plans").execute(&mut *tx).await?;

    let mut src = from.read_pool().acquire().await?;
    sqlx::query("BEGIN").execute(&mut *src).await?;
    let copied = copy_tables(&mut src, &mut tx).await;
    sqlx::query("COMMIT").execute(&mut *src).await.ok();
    let tables = copied?;
    for (table, column) in SEQUENCED {
        let high: Option<i64> = sqlx::query_scalar(&format!("SELECT MAX({column}) FROM {table}"))
            .fetch_one(&mut *tx)
            .await?;
        if let Some(high) = high {
            move_sequence_past(&mut tx, table, high).await?;
        }
    }
    tx.commit().await?;
    // A bulk copy leaves the planner with no statistics and the count rows
    // (updated by a trigger per backup copied) with one dead version per
    // backup: the first listing plans walked every backup of the account
    // and read through the dead versions (2,480 req/s on the API bench
    // before, 3,580 after). VACUUM cannot run inside a transaction.
    let mut vacuumed: Vec<&str> = TABLES.iter().map(|(t, _)| *t).collect();
    vacuumed.extend(["backup_counts", "account_backup_counts"]);
    sqlx::query(&format!("VACUUM (ANALYZE) {}", vacuumed.join(", ")))
        .execute(to.pool())
        .await?;
    Ok(MigrateReport { tables })
}

async fn copy_tables(
    src: &mut sqlx::SqliteConnection,
    tx: &mut crate::postgres::PgTx,
) -> Result<Vec<(&'static str, u64)>> {
    let mut report = Vec::new();
    for (table, columns) in TABLES {
        let names: Vec<&str> = columns.iter().map(|(c, _)| *c).collect();
        let select = format!("SELECT {} FROM {table}", names.join(", "));
        let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            placeholders.join(", ")
        );
        let rows = sqlx::query(&select).fetch_all(&mut *src).await?;
        for row in &rows {
            let mut q = sqlx::query(&insert);
            for (i, (_, kind)) in columns.iter().enumerate() {
                q = match kind {
                    Int => q.bind(row.try_get::<Option<i64>, _>(i)?),
                    Text => q.bind(row.try_get::<Option<String>, _>(i)?),
                    Blob => q.bind(row.try_get::<Option<Vec<u8>>, _>(i)?),
                    Flag => q.bind(row.try_get::<Option<i64>, _>(i)?.map(|v| v != 0)),
                };
            }
            q.execute(&mut **tx).await?;
        }
        report.push((*table, rows.len() as u64));
    }
    Ok(report)
}
