//! `POST /ticket/verify {code}`: is this ticket genuine, and for which booking?
//!
//! A code is genuine when its MAC matches the booking it names (so a forged or altered code is
//! refused), that booking is FINALIZED with exactly this code, and it is not cancelled. The
//! answer is 200 either way, with `valid` saying which, as a door scanner wants it; only a
//! malformed request is a 4xx.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::errors::{BodyTimeout408, Invalid422, TooLarge413, Unavailable503};
use super::openapi::VerifyBody;
use super::{body, ApiError, AppState};
use crate::domain::{parse_ticket_code, BookingStatus};
use crate::store::queries;
use crate::ticket::{TicketFacts, TicketSigner};

/// The answer at the door: `valid`, and either why not (`detail`) or whose ticket it is.
#[derive(Default, Serialize, utoipa::ToSchema)]
#[schema(as = TicketVerdict)]
pub struct Verdict {
    valid: bool,
    /// Why the code is not valid; absent when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "Not a genuine ticket")]
    detail: Option<&'static str>,
    /// The holder's booking (only when valid), and the rest of its facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    booking_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantity: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<BookingStatus>,
}

fn refused(reason: &'static str) -> HttpResponse {
    HttpResponse::Ok().json(Verdict {
        detail: Some(reason),
        ..Verdict::default()
    })
}

#[utoipa::path(
    post,
    path = "/ticket/verify",
    tag = "tickets",
    summary = "Verify a ticket code",
    description = "Genuine (its signature matches the booking it names), issued with exactly \
        this code, and not cancelled. 200 either way, with `valid` saying which.",
    request_body(content = VerifyBody),
    responses(
        (status = 200, description = "The verdict", body = Verdict),
        (status = 408, response = BodyTimeout408),
        (status = 413, response = TooLarge413),
        (status = 422, response = Invalid422),
        (status = 503, response = Unavailable503),
    )
)]
pub async fn verify(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let value = body::json(&req, payload).await?;
    let code = parse_ticket_code(&value).map_err(ApiError::Validation)?;
    let Some(id) = TicketSigner::claimed_booking(&code) else {
        return Ok(refused("Not a ticket code"));
    };
    let Some(b) = state.reads.read(move |c| queries::booking(c, id)).await? else {
        return Ok(refused("Not a genuine ticket"));
    };
    if !state.signer.verify(&code, &TicketFacts::from(&b)) {
        return Ok(refused("Not a genuine ticket"));
    }
    match b.status {
        BookingStatus::Cancelled => return Ok(refused("The booking was cancelled")),
        BookingStatus::Finalized if b.ticket_code.as_deref() == Some(code.as_str()) => {}
        _ => return Ok(refused("The ticket has not been issued")),
    }
    Ok(HttpResponse::Ok().json(Verdict {
        valid: true,
        detail: None,
        booking_id: Some(b.id),
        event_id: Some(b.event_id),
        user_id: Some(b.user_id),
        quantity: Some(b.quantity),
        status: Some(b.status),
    }))
}
