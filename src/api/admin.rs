//! `/admin/*`: operator actions, behind a bearer token (`ADMIN_TOKEN`; unset: disabled).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{ApiError, AppState};

/// Checks `Authorization: Bearer <ADMIN_TOKEN>` (constant-time comparison).
fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token.as_deref() else {
        return Err(ApiError::Forbidden(
            "Admin endpoints are disabled; set ADMIN_TOKEN".into(),
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::Forbidden("Invalid admin token".into()))
    }
}

/// `POST /admin/finalizer/replay`: sends every dead-lettered issuance back to the finalizers.
pub async fn replay(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let n = state
        .finalize
        .replay()
        .await
        .map_err(ApiError::Unavailable)?;
    tracing::info!(replayed = n, "dead letters replayed");
    Ok(HttpResponse::Ok().json(json!({ "replayed": n })))
}
