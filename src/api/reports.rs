//! `GET /report`: totals over all events, from committed rows only, plus the finalizer's dead
//! letters (null when they cannot be counted right now, e.g. Redis down: the report still works).
//!
//! The totals are kept by every commit (one row, `queries::report`), not summed per call, and are
//! 128-bit: exact JSON integers, which a JavaScript client reads exactly only up to 2^53 (the
//! README says so; each event's own counts are capped far below it).

use actix_web::{web, HttpRequest, HttpResponse};

use super::errors::{Forbidden403, Unauthorized401, Unavailable503};
use super::{auth, ApiError, AppState};
use crate::store::queries;

/// `GET /report` (organizer): the totals of every event.
#[utoipa::path(
    get,
    path = "/report",
    tag = "organizer",
    summary = "Totals over every event",
    security(("organizer" = [])),
    responses(
        (status = 200, description = "The totals", body = ReportBody),
        (status = 401, response = Unauthorized401),
        (status = 403, response = Forbidden403),
        (status = 503, response = Unavailable503),
    )
)]
pub async fn report(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    auth::require_organizer(&state, &req)?;
    let totals = state.reads.read(queries::report).await?;
    let dead_letters = state.finalize.dead_letters().await.ok();
    // A struct, not `json!`: serde_json's Value holds no integer past u64 (it would panic),
    // while its serializer writes an i128 as the exact integer it is.
    Ok(HttpResponse::Ok().json(ReportBody {
        total_capacity: totals.total_capacity,
        total_reserved: totals.total_reserved,
        total_finalized: totals.total_finalized,
        dead_letters,
    }))
}

/// Exact integers, which may pass 2^53 (a JavaScript client reads those inexactly).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = Report)]
pub struct ReportBody {
    /// Seats of every event.
    #[schema(value_type = i64, format = "")]
    total_capacity: i128,
    /// Seats committed.
    #[schema(value_type = i64, format = "")]
    total_reserved: i128,
    /// Seats whose ticket is issued.
    #[schema(value_type = i64, format = "")]
    total_finalized: i128,
    /// Ticket issuances given up after their retries (`POST /admin/finalizer/replay`); null
    /// when they cannot be counted right now.
    #[schema(minimum = 0)]
    dead_letters: Option<u64>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn totals_past_u64_serialize_exactly() {
        let body = super::ReportBody {
            total_capacity: i128::from(u64::MAX) * 3,
            total_reserved: 0,
            total_finalized: 0,
            dead_letters: None,
        };
        let text = serde_json::to_string(&body).expect("a report serializes");
        assert!(
            text.contains("\"total_capacity\":55340232221128654845"),
            "{text}"
        );
    }
}
