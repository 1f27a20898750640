//! `/admin/*`: operator actions, behind a bearer token (`ADMIN_TOKEN`; unset: disabled).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{auth, ApiError, AppState};

/// `POST /admin/finalizer/replay`: sends every dead-lettered issuance back to the finalizers.
pub async fn replay(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&state, &req)?;
    let n = state
        .finalize
        .replay()
        .await
        .map_err(ApiError::Unavailable)?;
    tracing::info!(replayed = n, "dead letters replayed");
    Ok(HttpResponse::Ok().json(json!({ "replayed": n })))
}
