//! `/api/v1/servers/`: the account's servers, one server, a manual backup of
//! a server, and restoring a backup onto it.

use axum::extract::{Path, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use time::OffsetDateTime;
use vpsbackup_catalog::{BackupId, CatalogError, NewRestore, Server, ServerId};

use super::backups::{start_manual_backup, CreateBackup};
use super::openapi::{RestoreBody, ServerBackupBody};
use super::views::{
    BackupView, BadRequestDoc, Detail, FieldErrorsDoc, Page, RestoreView, ServerView,
};
use super::{invalid_page, page_links, page_request};
use crate::auth::Caller;
use crate::error::{ApiError, FieldErrors};
use crate::extract::{path_id, required_int, JsonObject, QueryPairs};
use crate::scheduler::window::next_backup;
use crate::AppState;

/// The text a restore answers with.
pub const RESTORE_MESSAGE: &str =
    "Restore has started. The server's disks will be overwritten with the backup's content.";

pub fn router(state: &AppState) -> Router<AppState> {
    let idempotent = from_fn_with_state(state.clone(), super::idempotency::replay_or_run);
    Router::new()
        .route("/api/v1/servers", get(list))
        .route("/api/v1/servers/{server_id}", get(detail))
        .route(
            "/api/v1/servers/{server_id}/backup",
            post(backup.layer(idempotent.clone())),
        )
        .route(
            "/api/v1/servers/{server_id}/restore",
            post(restore.layer(idempotent)),
        )
}

fn server_path_id(raw: &str) -> Result<ServerId, ApiError> {
    path_id(raw)
        .map(ServerId)
        .map_err(|_| ApiError::NotFound("Server not found.".into()))
}

/// The account's servers.
#[utoipa::path(get, path = "/api/v1/servers/", tag = "servers", operation_id = "servers_list",
    params(
        ("page" = Option<u32>, Query, minimum = 1, maximum = 4294967295u32, description = "Page number, from 1 (default 1); past the last page: 404 \"Invalid page.\""),
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Results per page, 1 to 500 (default 50)"),
    ),
    responses(
        (status = 200, description = "A page of servers", body = Page<ServerView>),
        (status = 400, description = "A page_size that is not valid: {\"page_size\": [\"Ensure this value is less than or equal to 500.\"]}", body = FieldErrorsDoc),
        (status = 401, description = "Missing or invalid token", body = Detail),
        (status = 404, description = "Invalid page: {\"detail\": \"Invalid page.\"}", body = Detail),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: QueryPairs,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Page<ServerView>>, ApiError> {
    let page = page_request(&query)?;
    let listed = state.catalog.list_servers(caller.scope(), page).await?;
    if page.number > 1 && listed.items.is_empty() {
        return Err(invalid_page());
    }
    let (next, previous) = page_links(&headers, uri.path(), &query, page, listed.count);
    let results = views_with_next_backup(&state, &listed.items).await?;
    Ok(Json(Page {
        count: listed.count,
        next,
        previous,
        results,
    }))
}

/// One server, with its plan and how many manual backups are left.
#[utoipa::path(get, path = "/api/v1/servers/{server_id}/", tag = "servers", operation_id = "servers_detail",
    params(("server_id" = i64, Path, minimum = 1, maximum = 9223372036854775807i64, description = "Server id")),
    responses(
        (status = 200, description = "The server", body = ServerView),
        (status = 401, description = "Missing or invalid token", body = Detail),
        (status = 404, description = "Server not found", body = Detail),
    ),
    security(("bearer" = [])))]
pub async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<ServerView>, ApiError> {
    let id = server_path_id(&raw)?;
    let server = state
        .catalog
        .server(id, caller.scope())
        .await?
        .ok_or_else(|| ApiError::NotFound("Server not found.".into()))?;
    let mut views = views_with_next_backup(&state, std::slice::from_ref(&server)).await?;
    Ok(Json(views.remove(0)))
}

/// The views of `servers`, each with its next automatic backup as the
/// scheduler plans it (one catalog query for the lot).
async fn views_with_next_backup(
    state: &AppState,
    servers: &[Server],
) -> Result<Vec<ServerView>, ApiError> {
    let ids: Vec<ServerId> = servers.iter().map(|s| s.id).collect();
    let now = state.clock.now();
    let planned: HashMap<ServerId, OffsetDateTime> = state
        .schedule
        .auto_backup_servers_in(&ids)
        .await?
        .iter()
        .filter_map(|a| {
            let next = next_backup(a, now, &state.settings.schedule)?;
            Some((a.server_id, next))
        })
        .collect();
    Ok(servers
        .iter()
        .map(|s| ServerView::new(s, planned.get(&s.id).copied()))
        .collect())
}

/// Start a manual backup of this server (same as POST /backups/).
#[utoipa::path(post, path = "/api/v1/servers/{server_id}/backup/", tag = "servers", operation_id = "servers_backup",
    params(("server_id" = i64, Path, minimum = 1, maximum = 9223372036854775807i64, description = "Server id"), ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 255, pattern = r"^[ -~]+$", description = "1 to 255 printable ASCII characters; a retry with the same key and body gets the first answer back (with `Idempotent-Replayed: true`) and starts nothing new; keys are kept 24 h")),
    request_body(content = ServerBackupBody, description = "An optional description; the body may be left out"),
    responses(
        (status = 201, description = "Backup started (or, with `Idempotent-Replayed: true`, the stored answer to the first request with this Idempotency-Key)", body = BackupView),
        (status = 400, description = "Invalid fields or Idempotency-Key, or the manual backup limit (10 per server) is reached", body = BadRequestDoc),
        (status = 401, description = "Missing or invalid token", body = Detail),
        (status = 404, description = "Server not found: {\"detail\": \"Server not found.\"}", body = Detail),
        (status = 409, description = "The first request with this Idempotency-Key is still running (or was cut short by a restart)", body = Detail),
        (status = 422, description = "This Idempotency-Key was used for a different request", body = Detail),
    ),
    security(("bearer" = [])))]
pub async fn backup(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    body: JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let id = server_path_id(&raw)?;
    let req = CreateBackup::parse(&body, Some(id))?;
    start_manual_backup(&state, &caller, req).await
}

/// Overwrite the server's disks with a completed backup of it. Answers at once.
#[utoipa::path(post, path = "/api/v1/servers/{server_id}/restore/", tag = "servers", operation_id = "servers_restore",
    params(("server_id" = i64, Path, minimum = 1, maximum = 9223372036854775807i64, description = "Server id"), ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 255, pattern = r"^[ -~]+$", description = "1 to 255 printable ASCII characters; a retry with the same key and body gets the first answer back (with `Idempotent-Replayed: true`) and starts nothing new; keys are kept 24 h")),
    request_body(content = RestoreBody, description = "The backup to restore"),
    responses(
        (status = 202, description = "Restore started (or, with `Idempotent-Replayed: true`, the stored answer to the first request with this Idempotency-Key)", body = RestoreView),
        (status = 400, description = "Invalid backup_id or Idempotency-Key, a backup that is not completed, is damaged, or is of another server", body = BadRequestDoc),
        (status = 401, description = "Missing or invalid token", body = Detail),
        (status = 404, description = "Server or backup not found", body = Detail),
        (status = 409, description = "A backup or restore of this server is queued or running, the server is running (a QEMU holds its disks) and has no pre_restore hook to stop it, or the first request with this Idempotency-Key is still running", body = Detail),
        (status = 422, description = "This Idempotency-Key was used for a different request", body = Detail),
    ),
    security(("bearer" = [])))]
pub async fn restore(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    body: JsonObject,
) -> Result<(StatusCode, Json<RestoreView>), ApiError> {
    let server_id = server_path_id(&raw)?;
    let Some(server) = state.catalog.server(server_id, caller.scope()).await? else {
        return Err(ApiError::NotFound("Server not found.".into()));
    };
    let mut errors = FieldErrors::new();
    let backup_id = required_int(&body.0, "backup_id", &mut errors);
    let backup_id = match backup_id {
        Some(b) if errors.is_empty() => BackupId(b),
        _ => return Err(ApiError::Fields(errors)),
    };
    // Overwriting the disks of a running guest would corrupt both; a
    // pre_restore hook is the provider's way to stop it first.
    if server.hooks.pre_restore.is_none() && running(&server).await {
        return Err(ApiError::Conflict(
            "The server is running; stop it before restoring it from a backup.".into(),
        ));
    }
    let restore = state
        .catalog
        .create_restore(
            NewRestore {
                server_id,
                backup_id,
                scope: caller.scope(),
            },
            state.clock.now(),
        )
        .await
        .map_err(|e| match e {
            CatalogError::NotFound("Backup") => ApiError::NotFound("Backup not found.".into()),
            other => other.into(),
        })?;
    state.jobs.wake();
    tracing::info!(
        restore = restore.id.0,
        server = server_id.0,
        backup = backup_id.0,
        "restore queued"
    );
    let mut view = RestoreView::from(&restore);
    view.message = Some(RESTORE_MESSAGE);
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// True if a running QEMU holds any of the server's disks (its image
/// locks), or libvirt says the server's domain is running (a block device
/// carries no image lock). An unanswered libvirt leaves the locks to tell.
async fn running(server: &Server) -> bool {
    let paths: Vec<std::path::PathBuf> =
        server.disks.iter().map(|d| d.path.clone().into()).collect();
    let domain = match &server.runtime {
        vpsbackup_catalog::ServerRuntime::Libvirt { domain } => Some(domain.clone()),
        _ => None,
    };
    tokio::task::spawn_blocking(move || {
        domain.is_some_and(|d| vpsbackup_engine::libvirt::domain_is_active(&d).unwrap_or(false))
            || paths.iter().any(|p| {
                matches!(
                    vpsbackup_engine::ensure_not_in_use(p),
                    Err(vpsbackup_engine::DiskError::InUse { .. })
                )
            })
    })
    .await
    .unwrap_or(false)
}
