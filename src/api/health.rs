//! Liveness (`/health`: the process answers) and readiness (`/ready`: it can do its job).

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{ApiError, AppState};

/// Cheap on purpose: `make bench` uses it as the ceiling of what HTTP carries on this machine.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// 200 when the database answers and the writer runs; 503 (with what is wrong) otherwise.
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let db = state
        .reads
        .read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
        .await;
    let writer = state.writer.is_running();
    let db_ok = db.is_ok();
    let body = json!({
        "status": if db_ok && writer { "ready" } else { "unavailable" },
        "mode": state.mode,
        "database": match db { Ok(_) => "ok".to_string(), Err(e) => e.to_string() },
        "writer": if writer { "running" } else { "stopped" },
        "writer_backlog": state.writer.backlog(),
        "event_actors": state.registry.len(),
        "finalizations_in_flight": state.finalize.in_flight(),
        "redis": "not used (embedded mode)",
    });
    if db_ok && writer {
        Ok(HttpResponse::Ok().json(body))
    } else {
        Ok(HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body))
    }
}
