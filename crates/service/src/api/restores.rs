//! `/api/v1/restores/{id}/`: follow a restore to its end.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use vpsbackup_catalog::RestoreId;

use super::views::RestoreView;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::path_id;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/restores/{restore_id}", get(detail))
}

/// One restore.
#[utoipa::path(get, path = "/api/v1/restores/{restore_id}/", tag = "restores", operation_id = "restores_detail",
    params(("restore_id" = i64, Path, minimum = 1, maximum = 9223372036854775807i64, description = "Restore id")),
    responses(
        (status = 200, description = "The restore", body = RestoreView),
        (status = 401, description = "Missing or invalid token", body = super::views::Detail),
        (status = 404, description = "Not found", body = super::views::Detail),
    ),
    security(("bearer" = [])))]
pub async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<RestoreView>, ApiError> {
    let id = RestoreId(path_id(&raw)?);
    let restore = state
        .catalog
        .restore(id, caller.scope())
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(RestoreView::from(&restore)))
}
