//! `/book`: book seats (through the event's actor) and read a booking back.

use actix_web::{web, HttpRequest, HttpResponse};

use super::{body, path_id, ApiError, AppState};
use crate::domain::NewBooking;
use crate::store::queries;

/// `POST /book {user_id, event_id, quantity?}` → 200 only once the booking is committed.
#[tracing::instrument(name = "book", skip_all, fields(event_id, user_id, quantity))]
pub async fn book(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let value = body::json(&req, payload).await?;
    let new = NewBooking::parse(&value).map_err(ApiError::Validation)?;
    let span = tracing::Span::current();
    span.record("event_id", new.event_id.0);
    span.record("user_id", new.user_id);
    span.record("quantity", new.quantity);
    let booked = state.registry.book(new).await?;
    Ok(HttpResponse::Ok().json(booked))
}

/// `GET /book/{id}`: the booking, its status and, once FINALIZED, its ticket code.
pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&id, "id")?;
    let b = state
        .reads
        .read(move |c| queries::booking(c, id))
        .await?
        .ok_or(ApiError::BookingNotFound)?;
    Ok(HttpResponse::Ok().json(b))
}
