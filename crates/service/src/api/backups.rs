//! `/api/v1/backups/`: list (filters, pages), create a manual backup, one
//! backup, delete (cancelling it when in progress).

use axum::extract::{Path, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use vpsbackup_catalog::{BackupFilter, BackupId, BackupType, CatalogError, NewBackup, ServerId};

use super::openapi::CreateBackupBody;
use super::views::{BackupTypeDoc, BackupView, BadRequestDoc, Detail, FieldErrorsDoc, Page};
use super::{invalid_page, page_links, page_request};
use crate::auth::Caller;
use crate::error::{ApiError, FieldErrors};
use crate::extract::{
    optional_string, parse_int_text, path_id, required_int, JsonObject, QueryPairs,
};
use crate::AppState;

/// The text a create answers with, as in the seed.
pub const CREATE_MESSAGE: &str =
    "Backup is being created. This may take several minutes depending on server size.";
/// Longest description accepted.
pub const DESCRIPTION_MAX: usize = 255;

pub fn router(state: &AppState) -> Router<AppState> {
    let idempotent = from_fn_with_state(state.clone(), super::idempotency::replay_or_run);
    Router::new()
        .route("/api/v1/backups", get(list).post(create.layer(idempotent)))
        .route("/api/v1/backups/{backup_id}", get(detail).delete(delete))
}

/// List backups, newest first.
#[utoipa::path(get, path = "/api/v1/backups/", tag = "backups", operation_id = "backups_list",
    params(
        ("server_id" = Option<i64>, Query, minimum = -9223372036854775808i64, maximum = 9223372036854775807i64, description = "Only this server's backups"),
        ("backup_type" = Option<BackupTypeDoc>, Query, description = "Only backups of this type"),
        ("page" = Option<u32>, Query, minimum = 1, maximum = 4294967295u32, description = "Page number, from 1 (default 1); past the last page: 404 \"Invalid page.\""),
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Results per page, 1 to 500 (default 50)"),
    ),
    responses(
        (status = 200, description = "A page of backups", body = Page<BackupView>),
        (status = 400, description = "A filter or page_size that is not valid: {\"server_id\": [\"A valid integer is required.\"]}", body = FieldErrorsDoc),
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
) -> Result<Json<Page<BackupView>>, ApiError> {
    let mut errors = FieldErrors::new();
    let server_id = match query.get("server_id").map(str::trim) {
        None | Some("") => None,
        Some(v) => match parse_int_text(v) {
            Some(id) => Some(ServerId(id)),
            None => {
                errors.insert(
                    "server_id".into(),
                    vec!["A valid integer is required.".into()],
                );
                None
            }
        },
    };
    let backup_type = match query.get("backup_type").map(str::trim) {
        None | Some("") => None,
        Some(v) => match BackupType::parse(v) {
            Some(t) => Some(t),
            None => {
                errors.insert(
                    "backup_type".into(),
                    vec![format!(
                        "Select a valid choice. {v} is not one of the available choices."
                    )],
                );
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::Fields(errors));
    }
    let page = page_request(&query)?;
    let filter = BackupFilter {
        scope: caller.account(),
        server_id,
        backup_type,
    };
    let listed = state.catalog.list_backups(filter, page).await?;
    if page.number > 1 && listed.items.is_empty() {
        return Err(invalid_page());
    }
    let (next, previous) = page_links(&headers, uri.path(), &query, page, listed.count);
    Ok(Json(Page {
        count: listed.count,
        next,
        previous,
        results: listed.items.iter().map(BackupView::from).collect(),
    }))
}

/// A validated manual-backup request.
pub struct CreateBackup {
    pub server_id: ServerId,
    pub description: String,
}

impl CreateBackup {
    /// Parses `{"server_id": int, "description": string?}`.
    pub fn parse(body: &JsonObject, server_from_path: Option<ServerId>) -> Result<Self, ApiError> {
        let mut errors = FieldErrors::new();
        let server_id = match server_from_path {
            Some(s) => Some(s),
            None => required_int(&body.0, "server_id", &mut errors).map(ServerId),
        };
        let description = optional_string(&body.0, "description", DESCRIPTION_MAX, &mut errors)
            .unwrap_or_default();
        match server_id {
            Some(server_id) if errors.is_empty() => Ok(CreateBackup {
                server_id,
                description,
            }),
            _ => Err(ApiError::Fields(errors)),
        }
    }
}

/// Starts a manual backup; shared by `POST /backups/` and `POST /servers/{id}/backup/`.
pub async fn start_manual_backup(
    state: &AppState,
    caller: &Caller,
    req: CreateBackup,
) -> Result<(StatusCode, Json<BackupView>), ApiError> {
    let backup = state
        .catalog
        .create_backup(
            NewBackup {
                server_id: req.server_id,
                scope: caller.scope(),
                backup_type: BackupType::Manual,
                description: req.description,
                expires_at: None,
                scheduled_for: None,
                run_after: None,
            },
            state.clock.now(),
        )
        .await?;
    state.jobs.wake();
    tracing::info!(
        backup = backup.id.0,
        server = backup.server_id.0,
        "manual backup queued"
    );
    let mut view = BackupView::from(&backup);
    view.message = Some(CREATE_MESSAGE);
    Ok((StatusCode::CREATED, Json(view)))
}

/// Start a manual backup. Answers at once; follow it with GET /backups/{id}/.
#[utoipa::path(post, path = "/api/v1/backups/", tag = "backups", operation_id = "backups_create",
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 255, pattern = r"^[ -~]+$", description = "1 to 255 printable ASCII characters; a retry with the same key and body gets the first answer back (with `Idempotent-Replayed: true`) and starts nothing new; keys are kept 24 h")),
    request_body(content = CreateBackupBody, description = "The server to back up and an optional description"),
    responses(
        (status = 201, description = "Backup started (or, with `Idempotent-Replayed: true`, the stored answer to the first request with this Idempotency-Key)", body = BackupView),
        (status = 400, description = "Invalid fields or Idempotency-Key, or the manual backup limit (10 per server) is reached", body = BadRequestDoc),
        (status = 401, description = "Missing or invalid token", body = Detail),
        (status = 404, description = "Server not found: {\"detail\": \"Server not found.\"}", body = Detail),
        (status = 409, description = "The first request with this Idempotency-Key is still running (or was cut short by a restart)", body = Detail),
        (status = 422, description = "This Idempotency-Key was used for a different request", body = Detail),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let req = CreateBackup::parse(&body, None)?;
    start_manual_backup(&state, &caller, req).await
}

/// One backup.
#[utoipa::path(get, path = "/api/v1/backups/{backup_id}/", tag = "backups", operation_id = "backups_detail",
    params(("backup_id" = i64, Path, minimum = 1, maximum = 9223372036854775807i64, description = "Backup id")),
    responses(
        (status = 200, description = "The backup", body = BackupView),
        (status = 401, description = "Missing or invalid token", body = Detail),
        (status = 404, description = "Not found", body = Detail),
    ),
    security(("bearer" = [])))]
pub async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<BackupView>, ApiError> {
    let id = BackupId(path_id(&raw)?);
    let backup = state
        .catalog
        .backup(id, caller.scope())
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(BackupView::from(&backup)))
}

/// Delete a backup for good; an in-progress one is cancelled.
#[utoipa::path(delete, path = "/api/v1/backups/{backup_id}/", tag = "backups", operation_id = "backups_delete",
    params(("backup_id" = i64, Path, minimum = 1, maximum = 9223372036854775807i64, description = "Backup id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid token", body = Detail),
        (status = 404, description = "Not found", body = Detail),
        (status = 409, description = "A running restore reads this backup", body = Detail),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = BackupId(path_id(&raw)?);
    let deleted = match state.catalog.delete_backup(id, caller.scope()).await {
        Err(CatalogError::NotFound(_)) => return Err(ApiError::not_found()),
        other => other?,
    };
    if let Some(job) = deleted.job {
        state.jobs.cancel(job);
    }
    // The row is gone, so the data goes too. A backup still running is
    // cleaned up by its worker when the engine stops (see the runner).
    let repo = state.repo.clone();
    let engine_id = deleted.backup.engine_backup_id.clone();
    let res = tokio::task::spawn_blocking(move || repo.delete_backup(&engine_id)).await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(backup = id.0, error = %e, "could not delete backup data; gc will")
        }
        Err(e) => tracing::warn!(backup = id.0, error = %e, "delete task failed"),
    }
    tracing::info!(backup = id.0, "backup deleted");
    Ok(StatusCode::NO_CONTENT)
}
