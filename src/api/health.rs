//! Liveness (`/health`: the process answers) and readiness (`/ready`: it can do its job).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{auth, ApiError, AppState};

/// Cheap on purpose: `make bench` uses it as the ceiling of what HTTP carries on this machine.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// 200 when the database answers, the writer runs and (cluster mode) Redis answers, else 503.
/// Anyone (a load balancer) gets the verdict; the detail (what is wrong, backlog, refusals,
/// actors) only the organizer, as for the other organizer operations (open when `ADMIN_TOKEN`
/// is unset).
pub async fn ready(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let db = state
        .reads
        .read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
        .await;
    let writer = state.writer.is_running();
    let db_ok = db.is_ok();
    let redis = match &state.redis {
        None => Ok("not used (embedded mode)".to_string()),
        Some(link) => link
            .ping()
            .await
            .map(|()| "ok".to_string())
            .map_err(|e| e.to_string()),
    };
    let redis_ok = redis.is_ok();
    let ok = db_ok && writer && redis_ok;
    let status = if ok { "ready" } else { "unavailable" };
    if !ok {
        tracing::warn!(?db, writer, ?redis, "not ready");
    }
    let body = if auth::require_organizer(&state, &req).is_err() {
        json!({ "status": status })
    } else {
        json!({
        "status": status,
        "mode": state.mode,
        "database": match db { Ok(_) => "ok".to_string(), Err(e) => e.to_string() },
        "writer": if writer { "running" } else { "stopped" },
        "writer_backlog": state.writer.backlog(),
        "fence_refusals": state.writer.fence_refusals(),
        "seat_refusals": state.writer.seat_refusals(),
        "event_actors": state.registry.len(),
        "finalizations_in_flight": state.finalize.in_flight(),
        "redis": match redis { Ok(s) | Err(s) => s },
        })
    };
    if ok {
        Ok(HttpResponse::Ok().json(body))
    } else {
        Ok(HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body))
    }
}
