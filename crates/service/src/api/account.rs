//! `/api/v1/account/me/`: who the token belongs to.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use vpsbackup_catalog::TokenOwner;

use super::views::MeView;
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/account/me", get(me))
}

/// The caller's account and token.
#[utoipa::path(get, path = "/api/v1/account/me/", tag = "account", operation_id = "account_me",
    responses(
        (status = 200, description = "The account", body = MeView),
        (status = 401, description = "Missing or invalid token", body = super::views::Detail),
    ),
    security(("bearer" = [])))]
pub async fn me(State(state): State<AppState>, caller: Caller) -> Result<Json<MeView>, ApiError> {
    let account = match caller.token.owner {
        TokenOwner::Account(id) => state.catalog.account(id).await?,
        TokenOwner::Admin => None,
    };
    Ok(Json(MeView {
        id: account.as_ref().map(|a| a.id.0),
        name: account.as_ref().map(|a| a.name.clone()),
        created_at: account.as_ref().map(|a| rfc3339(a.created_at)),
        token_name: caller.token.name.clone(),
        token_prefix: caller.token.prefix.clone(),
        is_admin: caller.token.owner == TokenOwner::Admin,
        webhook_url: account.as_ref().and_then(|a| a.webhook_url.clone()),
    }))
}
