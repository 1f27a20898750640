//! `/event`: create events, read them and their statistics.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::errors::{
    BodyTimeout408, Conflict409, Forbidden403, Invalid422, NotFound404, TooLarge413,
    Unauthorized401, Unavailable503,
};
use super::openapi::{IdempotencyHeader, NewEventBody, PageQuery};
use super::{auth, body, idempotency, path_id, ApiError, AppState};
use crate::actors::persistence::CreateEvent;
use crate::domain::{KeyScope, NewEvent};
use crate::store::{queries, EventRow};

/// `GET /event?limit=&after=`: one page of events, and where the next one starts.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventPage)]
pub struct Listing {
    /// By increasing id.
    events: Vec<EventRow>,
    /// The `after` of the next page; null on the last one.
    next: Option<i64>,
}

/// `GET /event?limit=1..200&after=<id>` (public: what is on sale is public information).
#[utoipa::path(
    get,
    path = "/event",
    tag = "events",
    summary = "List events",
    description = "By id, a page at a time: pass the `next` of a page as `after` for the next.",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of events", body = Listing),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let query =
        web::Query::<Vec<(String, String)>>::from_query(req.query_string()).map_err(|_| {
            ApiError::Validation(vec![crate::domain::FieldError::new(
                "query_invalid",
                &["query"],
                "The query string could not be read",
            )])
        })?;
    let page = crate::domain::Page::parse(&query).map_err(ApiError::Validation)?;
    // One row past the page says whether another page follows: `next` is null on the last
    // page even when it is exactly full, so a client never fetches an empty page.
    let mut events = state
        .reads
        .read(move |c| queries::events_after(c, page.after, page.limit + 1))
        .await?;
    let more = events.len() as i64 > page.limit;
    events.truncate(page.limit as usize);
    let next = match events.last() {
        Some(last) if more => Some(last.id),
        _ => None,
    };
    Ok(HttpResponse::Ok().json(Listing { events, next }))
}

/// `GET /event/{id}/stats` and `GET /report/event/{id}` (the old service's shape).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventStats)]
pub struct Stats {
    event_id: i64,
    capacity: i64,
    booked_count: i64,
    finalized_count: i64,
}

/// `POST /event {title, capacity, max_per_user?}` → `{id, title, capacity, booked_count,
/// max_per_user?}` (organizer; `Idempotency-Key` honoured).
#[utoipa::path(
    post,
    path = "/event",
    tag = "organizer",
    summary = "Create an event",
    params(IdempotencyHeader),
    request_body(content = NewEventBody, description = "Unknown fields are ignored"),
    security(("organizer" = [])),
    responses(
        (status = 200, description = "The event, created (or, for a retried `Idempotency-Key`, \
            as first answered, with `Idempotent-Replayed: true`)", body = EventRow,
            headers(("Idempotent-Replayed" = String, description = "`true` on a replay"))),
        (status = 401, response = Unauthorized401),
        (status = 403, response = Forbidden403),
        (status = 408, response = BodyTimeout408),
        (status = 409, response = Conflict409),
        (status = 413, response = TooLarge413),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
#[tracing::instrument(name = "create_event", skip_all)]
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::require_organizer(&state, &req)?;
    let value = body::json(&req, payload).await?;
    let new = NewEvent::parse(&value).map_err(ApiError::Validation)?;
    let meaning = serde_json::json!(["event", new.title, new.capacity, new.max_per_user]);
    let key = idempotency::from_request(&req, KeyScope::Organizer, &meaning.to_string())?;
    let _in_flight = match &key {
        Some(k) => Some(state.in_flight.claim(k)?),
        None => None,
    };
    let created = state
        .writer
        .create_event(CreateEvent {
            title: new.title,
            capacity: new.capacity,
            max_per_user: new.max_per_user,
            key: key.clone(),
        })
        .await?;
    match (created, key) {
        (Ok(row), _) => {
            tracing::info!(event_id = row.id, capacity = row.capacity, "event created");
            Ok(HttpResponse::Ok().json(row))
        }
        (Err(first), Some(key)) => {
            idempotency::same_request(&key, &first.fingerprint)?;
            let id = first.event_id.unwrap_or(0);
            let mut row = state
                .reads
                .read(move |c| queries::event(c, id))
                .await?
                .ok_or(ApiError::EventNotFound)?;
            row.booked_count = 0; // as first answered
            Ok(idempotency::replayed(HttpResponse::Ok().json(row)))
        }
        (Err(_), None) => Err(ApiError::Internal("a key record without a key".into())),
    }
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
#[utoipa::path(
    get,
    path = "/event/{id}",
    operation_id = "get_event",
    tag = "events",
    summary = "An event",
    params(("id" = i64, Path, minimum = 1, description = "The event's id")),
    responses(
        (status = 200, description = "The event", body = EventRow),
        (status = 404, response = NotFound404),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(load(&state, &id).await?))
}

/// `GET /event/{id}/stats`: counts of committed seats, and of seats whose ticket is issued.
#[utoipa::path(
    get,
    path = "/event/{id}/stats",
    tag = "events",
    summary = "An event's seats: committed and issued",
    params(("id" = i64, Path, minimum = 1, description = "The event's id")),
    responses(
        (status = 200, description = "Its counts", body = Stats),
        (status = 404, response = NotFound404),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
pub async fn stats(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    stats_of(&state, &id).await
}

/// `GET /report/event/{id}`: the old service's name for the same counts (public, as there).
#[utoipa::path(
    get,
    path = "/report/event/{id}",
    tag = "events",
    summary = "An event's seats (the old service's path)",
    params(("id" = i64, Path, minimum = 1, description = "The event's id")),
    responses(
        (status = 200, description = "Its counts", body = Stats),
        (status = 404, response = NotFound404),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
pub async fn report_event(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    stats_of(&state, &id).await
}

async fn stats_of(state: &AppState, id: &str) -> Result<HttpResponse, ApiError> {
    let e = load(state, id).await?;
    Ok(HttpResponse::Ok().json(Stats {
        event_id: e.id,
        capacity: e.capacity,
        booked_count: e.booked_count,
        finalized_count: e.finalized_count,
    }))
}
