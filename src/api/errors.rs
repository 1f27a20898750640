//! The one place where errors become HTTP: every error is JSON with `detail`, and each kind has
//! exactly one status code.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::openapi::{header::HeaderBuilder, Content, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{PartialSchema, ToResponse, ToSchema};

use crate::domain::BookError;
use crate::domain::FieldError;
use crate::store::StoreError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("Request body not received in time")]
    BodyTimeout,
    #[error("Event not found")]
    EventNotFound,
    #[error("Booking not found")]
    BookingNotFound,
    #[error("Not Found")]
    NoRoute,
    /// With the methods the path has, for the `Allow` header.
    #[error("Method Not Allowed")]
    MethodNotAllowed(std::sync::Arc<str>),
    #[error("Not authenticated")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    SoldOut(String),
    #[error("Too many requests for this event; retry shortly")]
    Overloaded,
    #[error("A request with this Idempotency-Key is still being served; retry shortly")]
    KeyInFlight,
    /// The cause goes to the log, not to the client (it names internals: Redis, the database).
    #[error("Service temporarily unavailable; retry shortly")]
    Unavailable(String),
    /// The request may or may not have taken effect (the database connection was lost during its
    /// COMMIT); the cause goes to the log. A 503, so clients retry — with their key, they learn
    /// which.
    #[error("The database connection was lost while this request was being committed: it may or may not have taken effect. Retry with the same Idempotency-Key to learn which.")]
    OutcomeUnknown(String),
    /// A cross-origin request CORS refused (an origin, method or header not allowed).
    #[error("{0}")]
    CorsRefused(String),
    #[error("Internal server error")]
    Internal(String),
}

impl From<BookError> for ApiError {
    fn from(e: BookError) -> Self {
        match e {
            BookError::SoldOut { remaining: 0 } => ApiError::SoldOut("Event is sold out.".into()),
            BookError::SoldOut { remaining } => {
                ApiError::SoldOut(format!("Not enough seats left: {remaining} remaining."))
            }
            BookError::LimitReached { limit, may_take } => ApiError::SoldOut(format!(
                "Limit of {limit} seats per customer reached; you may book {may_take} more."
            )),
            BookError::EventNotFound => ApiError::EventNotFound,
            BookError::BookingNotFound => ApiError::BookingNotFound,
            // The route answers a used key itself (replay or 422); reaching here is a bug.
            BookError::KeyUsed { .. } => ApiError::Internal("idempotency key not resolved".into()),
            BookError::Overloaded => ApiError::Overloaded,
            BookError::Unavailable(why) => ApiError::Unavailable(why),
            BookError::OutcomeUnknown(why) => ApiError::OutcomeUnknown(why),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::WriterFull => ApiError::Overloaded,
            StoreError::WriterClosed => ApiError::Unavailable("shutting down".into()),
            // A busy or locked database is a passing condition: ask for a retry.
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                ApiError::Unavailable("database busy".into())
            }
            StoreError::Busy => ApiError::Unavailable("database busy".into()),
            StoreError::Unavailable(_) => ApiError::Unavailable("database unavailable".into()),
            StoreError::OutcomeUnknown(why) => ApiError::OutcomeUnknown(why),
            StoreError::Postgres(e) if crate::store::pg_unavailable(&e) => {
                ApiError::Unavailable("database unavailable".into())
            }
            StoreError::Pool(_) => ApiError::Unavailable("no database connection available".into()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MalformedJson(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::EventNotFound | ApiError::BookingNotFound | ApiError::NoRoute => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::SoldOut(_) | ApiError::KeyInFlight => StatusCode::CONFLICT,
            ApiError::Overloaded | ApiError::Unavailable(_) | ApiError::OutcomeUnknown(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::CorsRefused(_) => StatusCode::BAD_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE
            || matches!(self, ApiError::KeyInFlight)
        {
            res.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
        }
        if let ApiError::MethodNotAllowed(allow) = self {
            res.insert_header((header::ALLOW, allow.as_ref()));
        }
        if let ApiError::Unauthorized = self {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let ApiError::BodyTimeout = self {
            // The rest of the body may still come: the connection cannot be reused.
            res.force_close();
        }
        match self {
            ApiError::Validation(errors) => res.json(Invalid {
                detail: errors.as_slice(),
            }),
            ApiError::MalformedJson(why) => res.json(Invalid {
                detail: &[FieldError::new(
                    "json_invalid",
                    &["body"],
                    format!("JSON decode error: {why}"),
                )],
            }),
            ApiError::Internal(why) => {
                tracing::error!(error = %why, "internal error");
                res.json(Detail::of(self))
            }
            ApiError::Unavailable(why) | ApiError::OutcomeUnknown(why) => {
                tracing::warn!(cause = %why, "answered 503");
                res.json(Detail::of(self))
            }
            _ => res.json(Detail::of(self)),
        }
    }
}

/// The body of every error but a 422: `{"detail": "<what went wrong>"}`, as FastAPI's.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct Detail {
    /// What went wrong, for a person to read.
    #[schema(example = "Event not found")]
    detail: String,
}

impl Detail {
    fn of(e: &ApiError) -> Self {
        Detail {
            detail: e.to_string(),
        }
    }
}

/// The body of a 422: every reason at once, each naming where (`loc`) and why (`msg`), as
/// FastAPI's `HTTPValidationError`.
#[derive(Serialize, ToSchema)]
#[schema(as = ValidationError)]
pub struct Invalid<'a> {
    #[schema(value_type = Vec<FieldError>)]
    detail: &'a [FieldError],
}

/// The error responses of the API as OpenAPI components (`responses(...)` of each route names
/// the ones it can answer). Their bodies are the two types above: what `error_response` sends.
macro_rules! error_responses {
    ($($name:ident: $body:ty, $description:literal, $retry:literal;)*) => {$(
        #[doc = $description]
        pub struct $name;
        impl<'s> ToResponse<'s> for $name {
            fn response() -> (&'s str, RefOr<Response>) {
                (stringify!($name), error_response::<$body>($description, $retry).into())
            }
        }
    )*};
}

error_responses! {
    Invalid422: Invalid<'static>, "The request is invalid: each reason names its field", false;
    NotFound404: Detail, "No such thing (or not yours to see)", false;
    Unauthorized401: Detail, "A token is required (`WWW-Authenticate: Bearer`)", false;
    Forbidden403: Detail, "The token does not allow this", false;
    Conflict409: Detail, "Sold out, the customer's limit, or the Idempotency-Key is in use", true;
    TooLarge413: Detail, "The body is larger than 64 KiB", false;
    BodyTimeout408: Detail, "The body did not arrive in time; the connection is closed", false;
    Unavailable503: Detail, "Overloaded or a dependency is down: retry after `Retry-After` seconds", true;
}

fn error_response<B: ToSchema>(description: &str, retry_after: bool) -> Response {
    let mut r = ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(Ref::from_schema_name(B::name()))),
    );
    if retry_after {
        r = r.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Some(i64::schema()))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    r.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One failed group answers many waiters, each with a copy of the error: the copy keeps the
    /// kind, so a busy database reaches the client as a 503 to retry, never a 500.
    #[test]
    fn relayed_store_errors_keep_their_kind() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        );
        for (original, status) in [
            (StoreError::Sqlite(busy), StatusCode::SERVICE_UNAVAILABLE),
            (StoreError::WriterFull, StatusCode::SERVICE_UNAVAILABLE),
            (StoreError::WriterClosed, StatusCode::SERVICE_UNAVAILABLE),
            (
                StoreError::Sqlite(rusqlite::Error::InvalidQuery),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ] {
            let relayed = ApiError::from(original.for_reply());
            assert_eq!(relayed.status_code(), status, "{original}");
            let res = relayed.error_response();
            assert_eq!(
                res.headers().contains_key(header::RETRY_AFTER),
                status == StatusCode::SERVICE_UNAVAILABLE
            );
        }
    }
}
