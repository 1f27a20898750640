//! `GET /metrics`: the Prometheus scrape, on the service's own port.
//!
//! It shows business numbers (seats sold, bookings, refusals), so it is an organizer operation:
//! with `ADMIN_TOKEN` set it needs the organizer token (401 without, 403 with a wrong one) — a
//! Prometheus job sends it as `authorization: {credentials: …}`; unset, it is open like the
//! rest of the old service's organizer calls.

use actix_web::{web, HttpRequest, HttpResponse};

use super::errors::{Forbidden403, Unauthorized401};
use super::{auth, ApiError, AppState};

/// The exposition format's content type (text, version 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics` (organizer): counters and histograms as counted, gauges read now.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    description = "Requests by route and status, bookings, seats, refusals by reason, group \
        commits, leases, ticket issuance, actors, connections: the Prometheus text format. An \
        organizer call (it shows what was sold).",
    security(("organizer" = [])),
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        (status = 401, response = Unauthorized401),
        (status = 403, response = Forbidden403),
    )
)]
pub async fn metrics(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    auth::require_organizer(&state, &req)?;
    let gauges = crate::metrics::gauges();
    gauges.event_actors.set(state.registry.len() as f64);
    gauges.writer_backlog.set(state.writer.backlog() as f64);
    gauges
        .open_connections
        .set(crate::server::open_connections() as f64);
    // Cluster mode reads these from Redis: when it cannot answer, the gauges keep their last
    // value and the scrape still succeeds (`/ready` says that Redis is down).
    match state.finalize.queue_depth().await {
        Ok(n) => gauges.finalize_queue.set(n as f64),
        Err(e) => tracing::debug!(error = %e, "finalize queue depth not read"),
    }
    match state.finalize.dead_letters().await {
        Ok(n) => gauges.dead_letters.set(n as f64),
        Err(e) => tracing::debug!(error = %e, "dead letters not counted"),
    }
    Ok(HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .body(crate::metrics::render()))
}
