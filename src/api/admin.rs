//! `/admin/*`: operator actions, behind a bearer token (`ADMIN_TOKEN`; unset: disabled).

use actix_web::{web, HttpRequest, HttpResponse};

use super::errors::{Forbidden403, Unauthorized401, Unavailable503};
use super::{auth, ApiError, AppState};

/// How many dead letters went back to the finalizers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Replayed {
    #[schema(minimum = 0)]
    replayed: u64,
}

/// `POST /admin/finalizer/replay`: sends every dead-lettered issuance back to the finalizers.
#[utoipa::path(
    post,
    path = "/admin/finalizer/replay",
    tag = "organizer",
    summary = "Retry the ticket issuances that were given up",
    description = "Needs `ADMIN_TOKEN` set (disabled otherwise: 403) and presented.",
    security(("organizer" = [])),
    responses(
        (status = 200, description = "How many went back", body = Replayed),
        (status = 401, response = Unauthorized401),
        (status = 403, response = Forbidden403),
        (status = 503, response = Unavailable503),
    )
)]
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
    Ok(HttpResponse::Ok().json(Replayed { replayed: n }))
}
