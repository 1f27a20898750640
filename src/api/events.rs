//! `/event`: create events, read them and their statistics.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::{auth, body, path_id, ApiError, AppState};
use crate::domain::NewEvent;
use crate::store::{queries, EventRow};

/// `GET /event/{id}/stats` and `GET /report/event/{id}` (the old service's shape).
#[derive(Serialize)]
struct Stats {
    event_id: i64,
    capacity: i64,
    booked_count: i64,
    finalized_count: i64,
}

/// `POST /event {title, capacity}` → `{id, title, capacity, booked_count}` (organizer).
#[tracing::instrument(name = "create_event", skip_all)]
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::require_organizer(&state, &req)?;
    let value = body::json(&req, payload).await?;
    let new = NewEvent::parse(&value).map_err(ApiError::Validation)?;
    let row = state.writer.create_event(new.title, new.capacity).await?;
    tracing::info!(event_id = row.id, capacity = row.capacity, "event created");
    Ok(HttpResponse::Ok().json(row))
}

async fn load(state: &AppState, raw: &str) -> Result<EventRow, ApiError> {
    let id = path_id(raw, "id")?;
    state
        .reads
        .read(move |c| queries::event(c, id))
        .await?
        .ok_or(ApiError::EventNotFound)
}

/// `GET /event/{id}`.
pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(load(&state, &id).await?))
}

/// `GET /event/{id}/stats`: counts of committed seats, and of seats whose ticket is issued.
pub async fn stats(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let e = load(&state, &id).await?;
    Ok(HttpResponse::Ok().json(Stats {
        event_id: e.id,
        capacity: e.capacity,
        booked_count: e.booked_count,
        finalized_count: e.finalized_count,
    }))
}
