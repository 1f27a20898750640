//! `POST /ticket/verify {code}`: is this ticket genuine, and for which booking?
//!
//! A code is genuine when its MAC matches the booking it names (so a forged or altered code is
//! refused), that booking is FINALIZED with exactly this code, and it is not cancelled. The
//! answer is 200 either way, with `valid` saying which, as a door scanner wants it; only a
//! malformed request is a 4xx.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{body, ApiError, AppState};
use crate::domain::{parse_ticket_code, BookingStatus};
use crate::store::queries;
use crate::ticket::{TicketFacts, TicketSigner};

fn refused(reason: &str) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "valid": false, "detail": reason }))
}

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
    Ok(HttpResponse::Ok().json(json!({
        "valid": true,
        "booking_id": b.id,
        "event_id": b.event_id,
        "user_id": b.user_id,
        "quantity": b.quantity,
        "status": b.status,
    })))
}
