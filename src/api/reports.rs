//! `GET /report`: totals over all events, from committed rows only, plus the finalizer's dead
//! letters (null when they cannot be counted right now, e.g. Redis down: the report still works).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{auth, ApiError, AppState};
use crate::store::queries;

/// `GET /report` (organizer): the totals of every event.
pub async fn report(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    auth::require_organizer(&state, &req)?;
    let r = state.reads.read(queries::report).await?;
    let dead = state.finalize.dead_letters().await.ok();
    Ok(HttpResponse::Ok().json(json!({
        "total_capacity": r.total_capacity,
        "total_reserved": r.total_reserved,
        "total_finalized": r.total_finalized,
        "dead_letters": dead,
    })))
}
