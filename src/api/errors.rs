//! The one place where errors become HTTP: every error is JSON with `detail`, and each kind has
//! exactly one status code.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

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
    #[error("Method Not Allowed")]
    MethodNotAllowed,
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
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::SoldOut(_) | ApiError::KeyInFlight => StatusCode::CONFLICT,
            ApiError::Overloaded | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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
        if let ApiError::Unauthorized = self {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let ApiError::BodyTimeout = self {
            // The rest of the body may still come: the connection cannot be reused.
            res.force_close();
        }
        let body = match self {
            ApiError::Validation(errors) => json!({ "detail": errors }),
            ApiError::MalformedJson(why) => json!({ "detail": [{
                "type": "json_invalid", "loc": ["body"], "msg": format!("JSON decode error: {why}"),
            }]}),
            ApiError::Internal(why) => {
                tracing::error!(error = %why, "internal error");
                json!({ "detail": self.to_string() })
            }
            ApiError::Unavailable(why) => {
                tracing::warn!(cause = %why, "answered 503");
                json!({ "detail": self.to_string() })
            }
            _ => json!({ "detail": self.to_string() }),
        };
        res.json(body)
    }
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
