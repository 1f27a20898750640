//! Who may do what (DESIGN.md, "Who may do what"): the organizer proves itself with
//! `Authorization: Bearer <ADMIN_TOKEN>`, a booking's holder with the booking's secret
//! (`X-Booking-Secret` or `?secret=`). Every comparison goes through `secrets::constant_time_eq`.
//!
//! A request that may not see a booking is answered exactly as one for a booking that does not
//! exist (404, the same body): ids are sequential, so anything else would let a stranger learn
//! which bookings exist, and how many were sold.

use actix_web::http::header;
use actix_web::HttpRequest;

use super::{ApiError, AppState};
use crate::secrets::constant_time_eq;
use crate::ticket::TicketFacts;

/// The header that carries a booking's secret.
pub const SECRET_HEADER: &str = "x-booking-secret";

/// The bearer token of the request, if it carries one (the scheme is case-insensitive).
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// True if the request carries the organizer token. Never true when no token is set.
pub fn is_organizer(state: &AppState, req: &HttpRequest) -> bool {
    match (state.admin_token.as_deref(), bearer(req)) {
        (Some(expected), Some(given)) => constant_time_eq(given.as_bytes(), expected.as_bytes()),
        _ => false,
    }
}

/// Organizer operations (create events, `GET /report`): with `ADMIN_TOKEN` set they need it —
/// 401 without a token, 403 with a wrong one; unset, they are open, as in the old service, whose
/// clients keep working (the service warns at start).
pub fn require_organizer(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token.as_deref() else {
        return Ok(());
    };
    let given = bearer(req).ok_or(ApiError::Unauthorized)?;
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Forbidden("Invalid organizer token".into()))
    }
}

/// `/admin/*`: the organizer token, and never open: without `ADMIN_TOKEN` they are disabled (the
/// old service had none, so no old client needs them open).
pub fn require_admin(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    if state.admin_token.is_none() {
        return Err(ApiError::Forbidden(
            "Admin endpoints are disabled; set ADMIN_TOKEN".into(),
        ));
    }
    require_organizer(state, req)
}

/// The booking secret the request presents: the header, else the query parameter `secret` (a
/// link the customer keeps). Request logs record the path without its query (`telemetry`).
fn presented_secret(req: &HttpRequest) -> Option<String> {
    if let Some(v) = req.headers().get(SECRET_HEADER) {
        return v.to_str().ok().map(str::to_string);
    }
    #[derive(serde::Deserialize)]
    struct Query {
        secret: Option<String>,
    }
    actix_web::web::Query::<Query>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.into_inner().secret)
}

/// May this request read or act on the booking with these facts? Its secret, the organizer
/// token, or its customer's token. Callers answer `ApiError::BookingNotFound` when not, as for
/// an unknown id.
pub fn may_act_on(state: &AppState, req: &HttpRequest, booking: &TicketFacts) -> bool {
    if is_organizer(state, req) {
        return true;
    }
    if presented_secret(req).is_some_and(|s| state.signer.check_booking_secret(&s, booking)) {
        return true;
    }
    matches!(customer(state, req), Ok(Some(user)) if user == booking.user_id)
}

/// Verifies the shop's customer tokens: HS256 only (`alg: none` and every other algorithm are
/// refused by the validation), `exp` required and checked, `sub` a decimal user id.
pub struct CustomerTokens {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

impl CustomerTokens {
    pub fn new(secret: &str) -> Self {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        CustomerTokens {
            key: jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// The user id a valid token names; `None` for anything else (malformed, forged, expired).
    fn user(&self, token: &str) -> Option<i64> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).ok()?;
        let sub = data.claims.sub;
        // Plain decimal digits, as the path ids: no sign, no leading zero.
        if sub.is_empty() || sub.starts_with('0') || !sub.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        sub.parse().ok()
    }
}

/// The customer the request proves with its bearer token. `Ok(None)` when customer tokens are
/// not in use (`CUSTOMER_JWT_SECRET` unset); `401` when they are and the token is missing,
/// malformed, expired or forged.
pub fn customer(state: &AppState, req: &HttpRequest) -> Result<Option<i64>, ApiError> {
    let Some(tokens) = &state.customer_tokens else {
        return Ok(None);
    };
    let token = bearer(req).ok_or(ApiError::Unauthorized)?;
    tokens.user(token).map(Some).ok_or(ApiError::Unauthorized)
}
