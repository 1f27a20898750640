//! `/book`: book seats (through the event's actor) and read a booking back.
//!
//! The 200 of `POST /book` carries the booking's `secret`: with it (or the organizer token) the
//! customer reads and later cancels the booking; without it, a booking is indistinguishable from
//! one that does not exist.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::{auth, body, path_id, ApiError, AppState};
use crate::actors::Booked;
use crate::domain::NewBooking;
use crate::store::queries;
use crate::ticket::TicketFacts;

/// The body of a successful `POST /book`: the booking and its secret.
#[derive(Serialize)]
struct BookingCreated<'a> {
    #[serde(flatten)]
    booked: &'a Booked,
    secret: String,
}

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
    let secret = state.signer.booking_secret(&TicketFacts::from(&booked));
    Ok(HttpResponse::Ok().json(BookingCreated {
        booked: &booked,
        secret,
    }))
}

/// `GET /book/{id}` with the booking's secret or the organizer token: the booking, its status
/// and, once FINALIZED, its ticket code. Anyone else gets the 404 of an unknown id.
pub async fn get(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&id, "id")?;
    let b = state.reads.read(move |c| queries::booking(c, id)).await?;
    match b {
        Some(b) if auth::may_act_on(&state, &req, &TicketFacts::from(&b)) => {
            Ok(HttpResponse::Ok().json(b))
        }
        _ => Err(ApiError::BookingNotFound),
    }
}
