//! Liveness (`/health`: the process answers) and readiness (`/ready`: it can do its job).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::{auth, ApiError, AppState};

/// `{"status": "ok"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Cheap on purpose: `make bench` uses it as the ceiling of what HTTP carries on this machine.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    summary = "The process answers",
    responses((status = 200, description = "Alive", body = Health))
)]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// `/ready`'s verdict and, for the organizer, what is wrong if anything. The detail fields are
/// absent for anyone else.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    #[schema(example = "ready")]
    status: &'static str,
    /// `embedded` or `cluster`.
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    /// `ok`, or the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    /// `running` or `stopped`.
    #[serde(skip_serializing_if = "Option::is_none")]
    writer: Option<&'static str>,
    /// Requests waiting for the writer.
    #[serde(skip_serializing_if = "Option::is_none")]
    writer_backlog: Option<usize>,
    /// Batches refused because another replica's lease fenced this one out.
    #[serde(skip_serializing_if = "Option::is_none")]
    fence_refusals: Option<u64>,
    /// Seats refused by the database's check (never expected: the actors check first).
    #[serde(skip_serializing_if = "Option::is_none")]
    seat_refusals: Option<u64>,
    /// Events with an actor in this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    event_actors: Option<usize>,
    /// Tickets being issued by this process's finalizers (embedded mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    finalizations_in_flight: Option<usize>,
    /// `ok`, `not used (embedded mode)`, or the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<String>,
}

/// 200 when the database answers, the writer runs and (cluster mode) Redis answers, else 503.
/// Anyone (a load balancer) gets the verdict; the detail (what is wrong, backlog, refusals,
/// actors) only the organizer, as for the other organizer operations (open when `ADMIN_TOKEN`
/// is unset).
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    summary = "The service can do its job",
    description = "The database answers, the writer runs and, in cluster mode, Redis answers. \
        The detail only with the organizer token (or when `ADMIN_TOKEN` is unset).",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready", body = Readiness,
            headers(("Retry-After" = i64, description = "Seconds to wait"))),
    )
)]
pub async fn ready(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let db = state.reads.read(crate::store::queries::ping).await;
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
    let mut body = Readiness {
        status,
        mode: None,
        database: None,
        writer: None,
        writer_backlog: None,
        fence_refusals: None,
        seat_refusals: None,
        event_actors: None,
        finalizations_in_flight: None,
        redis: None,
    };
    if auth::require_organizer(&state, &req).is_ok() {
        body.mode = Some(state.mode);
        body.database = Some(match db {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        });
        body.writer = Some(if writer { "running" } else { "stopped" });
        body.writer_backlog = Some(state.writer.backlog());
        body.fence_refusals = Some(state.writer.fence_refusals());
        body.seat_refusals = Some(state.writer.seat_refusals());
        body.event_actors = Some(state.registry.len());
        body.finalizations_in_flight = state.finalize.in_flight();
        body.redis = Some(match redis {
            Ok(s) | Err(s) => s,
        });
    }
    if ok {
        Ok(HttpResponse::Ok().json(body))
    } else {
        Ok(HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body))
    }
}
