//! `/book`: book seats, read a booking back, cancel it — bookings and cancellations both go
//! through the event's actor and its fenced batch.
//!
//! The 200 of `POST /book` carries the booking's `secret`: with it (or the organizer token) the
//! customer reads and cancels the booking; without it, a booking is indistinguishable from one
//! that does not exist.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::errors::{
    BodyTimeout408, Conflict409, Forbidden403, Invalid422, NotFound404, TooLarge413,
    Unauthorized401, Unavailable503,
};
use super::openapi::{IdempotencyHeader, NewBookingBody};
use super::{auth, body, idempotency, path_id, ApiError, AppState};
use crate::domain::{
    BookError, Booked, Booking, BookingStatus, IdempotencyKey, KeyScope, NewBooking,
};
use crate::store::queries;
use crate::ticket::TicketFacts;

/// The body of a successful `POST /book`: the booking and its secret.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = BookingCreated)]
pub struct BookingCreated<'a> {
    #[serde(flatten)]
    #[schema(inline, value_type = Booked)]
    booked: &'a Booked,
    /// Keep it: with it (`X-Booking-Secret` or `?secret=`) the customer reads and cancels the
    /// booking; without it the booking is answered as if it did not exist.
    secret: String,
}

fn created(state: &AppState, booked: &Booked) -> HttpResponse {
    let secret = state.signer.booking_secret(&TicketFacts::from(booked));
    HttpResponse::Ok().json(BookingCreated { booked, secret })
}

/// `POST /book {user_id, event_id, quantity?}` → 200 only once the booking is committed.
#[utoipa::path(
    post,
    path = "/book",
    tag = "bookings",
    summary = "Book seats",
    description = "Answers 200 only once the booking is committed: it is never lost, and the \
        event is never oversold. Its ticket is issued afterwards (`status` becomes FINALIZED, \
        see `GET /book/{id}`).",
    params(IdempotencyHeader),
    request_body(content = NewBookingBody, description = "Unknown fields are ignored"),
    security((), ("customer" = [])),
    responses(
        (status = 200, description = "Booked (or, for a retried `Idempotency-Key`, the booking \
            it made, with `Idempotent-Replayed: true`)", body = BookingCreated,
            headers(("Idempotent-Replayed" = String, description = "`true` on a replay"))),
        (status = 401, response = Unauthorized401),
        (status = 403, response = Forbidden403),
        (status = 404, response = NotFound404),
        (status = 408, response = BodyTimeout408),
        (status = 409, response = Conflict409),
        (status = 413, response = TooLarge413),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
#[tracing::instrument(name = "book", skip_all, fields(event_id, user_id, quantity))]
pub async fn book(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // With customer tokens in use, the token says who books (401 before anything else).
    let customer = auth::customer(&state, &req)?;
    let value = body::json(&req, payload).await?;
    let new = NewBooking::parse_for(&value, customer).map_err(ApiError::Validation)?;
    if customer.is_some_and(|c| c != new.user_id) {
        return Err(ApiError::Forbidden(
            "user_id differs from the customer's token".into(),
        ));
    }
    let span = tracing::Span::current();
    span.record("event_id", new.event_id.0);
    span.record("user_id", new.user_id);
    span.record("quantity", new.quantity);
    let key = idempotency::from_request(
        &req,
        KeyScope::Customer(new.user_id),
        &format!("book|{}|{}|{}", new.event_id.0, new.user_id, new.quantity),
    )?;
    let _in_flight = match &key {
        Some(k) => Some(state.in_flight.claim(k)?),
        None => None,
    };
    let result = state
        .registry
        .book(new.event_id.0, new.user_id, new.quantity, key.clone())
        .await;
    match (result, key) {
        (Ok(booked), _) => Ok(created(&state, &booked)),
        (
            Err(BookError::KeyUsed {
                booking_id,
                fingerprint,
            }),
            Some(key),
        ) => replay(&state, &key, booking_id, &fingerprint).await,
        // A refusal to a keyed request: a retry whose first attempt did book gets that booking.
        (Err(e @ (BookError::SoldOut { .. } | BookError::LimitReached { .. })), Some(key)) => {
            match idempotency::lookup(&state, &key).await? {
                Some(first) => {
                    replay(
                        &state,
                        &key,
                        first.booking_id.unwrap_or(0),
                        &first.fingerprint,
                    )
                    .await
                }
                None => Err(e.into()),
            }
        }
        (Err(e), _) => Err(e.into()),
    }
}

/// Answers a retry with the booking its key names, as it was first answered.
async fn replay(
    state: &AppState,
    key: &IdempotencyKey,
    booking_id: i64,
    first: &str,
) -> Result<HttpResponse, ApiError> {
    idempotency::same_request(key, first)?;
    let b = state
        .reads
        .read(move |c| queries::booking(c, booking_id))
        .await?
        .ok_or_else(|| ApiError::Internal(format!("key names missing booking {booking_id}")))?;
    Ok(idempotency::replayed(created(
        state,
        &Booked::as_first_answered(&b),
    )))
}

/// The booking `raw` names, if the request may act on it (its secret, the organizer token or
/// its customer's token); otherwise the 404 of an unknown id.
async fn authorized(state: &AppState, req: &HttpRequest, raw: &str) -> Result<Booking, ApiError> {
    let id = path_id(raw, "id")?;
    let b = state.reads.read(move |c| queries::booking(c, id)).await?;
    match b {
        Some(b) if auth::may_act_on(state, req, &TicketFacts::from(&b)) => Ok(b),
        _ => Err(ApiError::BookingNotFound),
    }
}

/// `GET /book/{id}` with the booking's secret or the organizer token: the booking, its status
/// and, once FINALIZED, its ticket code. Anyone else gets the 404 of an unknown id.
#[utoipa::path(
    get,
    path = "/book/{id}",
    operation_id = "get_booking",
    tag = "bookings",
    summary = "A booking, and its ticket once issued",
    description = "With the booking's secret, its customer's token or the organizer token; \
        to anyone else a booking is answered exactly as one that does not exist.",
    params(("id" = i64, Path, minimum = 1, description = "The booking's id")),
    security(("booking_secret" = []), ("booking_secret_query" = []), ("customer" = []),
        ("organizer" = [])),
    responses(
        (status = 200, description = "The booking", body = Booking),
        (status = 404, response = NotFound404),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
pub async fn get(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(authorized(&state, &req, &id).await?))
}

/// `POST /book/{id}/cancel` (its secret or the organizer token): the booking, CANCELLED. Its
/// seats return to the event through the event's actor and the fenced update; cancelling twice
/// answers the same. A booking whose ticket is being issued is cancelled all the same and never
/// becomes FINALIZED; an issued ticket stops verifying.
#[utoipa::path(
    post,
    path = "/book/{id}/cancel",
    tag = "bookings",
    summary = "Cancel a booking",
    description = "Its seats go back on sale at once; its ticket, issued or not, never verifies \
        again. Cancelling twice answers the same.",
    params(("id" = i64, Path, minimum = 1, description = "The booking's id")),
    security(("booking_secret" = []), ("booking_secret_query" = []), ("customer" = []),
        ("organizer" = [])),
    responses(
        (status = 200, description = "The booking, CANCELLED", body = Booking),
        (status = 404, response = NotFound404),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
#[tracing::instrument(name = "cancel", skip_all, fields(booking_id))]
pub async fn cancel(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let b = authorized(&state, &req, &id).await?;
    tracing::Span::current().record("booking_id", b.id);
    if b.status == BookingStatus::Cancelled {
        return Ok(HttpResponse::Ok().json(b));
    }
    let cancelled = state.registry.cancel(b.event_id, b.id).await?;
    tracing::info!(
        booking_id = b.id,
        event_id = b.event_id,
        "booking cancelled"
    );
    Ok(HttpResponse::Ok().json(cancelled))
}
