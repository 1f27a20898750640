//! A booking, its status, and what travels between the routes, the event actors and the writer.

use serde::{Serialize, Serializer};
use tokio::sync::oneshot;

/// Where a booking is in its life. Stored as the old service's strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[schema(rename_all = "UPPERCASE")]
pub enum BookingStatus {
    /// Committed; its ticket is not issued yet.
    Pending,
    /// Its ticket is issued (the code is on the row).
    Finalized,
    /// Cancelled: its seats went back to the event; it is never issued afterwards.
    Cancelled,
}

impl BookingStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            BookingStatus::Pending => "PENDING",
            BookingStatus::Finalized => "FINALIZED",
            BookingStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PENDING" => Some(BookingStatus::Pending),
            "FINALIZED" => Some(BookingStatus::Finalized),
            "CANCELLED" => Some(BookingStatus::Cancelled),
            _ => None,
        }
    }
}

impl Serialize for BookingStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A booking as stored, as `GET /book/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Booking {
    pub id: i64,
    pub event_id: i64,
    pub user_id: i64,
    pub quantity: i64,
    pub status: BookingStatus,
    /// When it was committed: ISO 8601, UTC.
    #[schema(example = "2026-11-25T09:00:00.123456Z")]
    pub created_at: String,
    /// The ticket, to show at the door (`POST /ticket/verify`); null until FINALIZED.
    pub ticket_code: Option<String>,
    /// When its ticket was issued (ISO 8601, UTC); null until then.
    pub finalized_at: Option<String>,
    /// When it was cancelled (ISO 8601, UTC); absent unless CANCELLED.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancelled_at: Option<String>,
}

/// A committed booking, as `POST /book` returns it (with the secret the route adds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Booked {
    pub id: i64,
    pub event_id: i64,
    pub user_id: i64,
    pub quantity: i64,
    /// Always PENDING: the ticket is issued afterwards.
    pub status: BookingStatus,
    /// When it was committed: ISO 8601, UTC.
    #[schema(example = "2026-11-25T09:00:00.123456Z")]
    pub created_at: String,
}

impl Booked {
    /// The body `POST /book` answered when this booking was made: what a replay answers again.
    pub fn as_first_answered(b: &Booking) -> Self {
        Booked {
            id: b.id,
            event_id: b.event_id,
            user_id: b.user_id,
            quantity: b.quantity,
            status: BookingStatus::Pending,
            created_at: b.created_at.clone(),
        }
    }
}

/// A validated `Idempotency-Key`, scoped to whoever sent it, with the fingerprint of the request
/// it was first sent with (its meaning, not its bytes: the same booking asked with other
/// whitespace is the same request).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub scope: KeyScope,
    pub key: String,
    pub fingerprint: String,
}

/// Whose key it is: a customer's (bookings, by user id) or the organizer's (events). Two
/// customers may use the same key without meeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyScope {
    Organizer,
    Customer(i64),
}

impl KeyScope {
    /// The scope as one integer, as SQLite stores it: `0` the organizer, else the customer's user
    /// id (always `>= 1`). An integer keeps the key records short and their B-tree compares cheap
    /// (the text `user:<id>` cost the writer about a microsecond per keyed booking).
    pub fn code(self) -> i64 {
        match self {
            KeyScope::Organizer => 0,
            KeyScope::Customer(user_id) => user_id,
        }
    }

    /// The scope of a stored code; `None` for a code no scope has (below zero).
    pub fn from_code(code: i64) -> Option<KeyScope> {
        match code {
            0 => Some(KeyScope::Organizer),
            n if n >= 1 => Some(KeyScope::Customer(n)),
            _ => None,
        }
    }
}

/// The text form, as PostgreSQL stores it: `organizer`, or `user:<id>`.
impl std::fmt::Display for KeyScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyScope::Organizer => f.write_str("organizer"),
            KeyScope::Customer(id) => write!(f, "user:{id}"),
        }
    }
}

/// A seat request waiting for its batch: the client's reply channel travels with it, so whoever
/// decides the request's fate answers it directly.
#[derive(Debug)]
pub struct SeatRequest {
    pub user_id: i64,
    pub quantity: i64,
    pub key: Option<std::sync::Arc<IdempotencyKey>>,
    pub reply: oneshot::Sender<Result<Booked, BookError>>,
}

/// A cancellation waiting for its batch. Cancellations go through the event's actor and the
/// fenced update like bookings, so the seats they free are counted exactly once, everywhere.
#[derive(Debug)]
pub struct CancelRequest {
    pub booking_id: i64,
    pub reply: oneshot::Sender<Result<Booking, BookError>>,
}

/// Why a booking (or a cancellation) was not made. The mapping to HTTP lives in `api::errors`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error("Event is sold out.")]
    SoldOut { remaining: i64 },
    #[error("Limit of {limit} seats per customer reached")]
    LimitReached { limit: i64, may_take: i64 },
    #[error("Event not found")]
    EventNotFound,
    #[error("Booking not found")]
    BookingNotFound,
    /// The idempotency key already names a committed booking: the route answers with it (or 422
    /// if it was made with another body).
    #[error("idempotency key already used")]
    KeyUsed {
        booking_id: i64,
        fingerprint: String,
    },
    #[error("too many requests for this event")]
    Overloaded,
    #[error("booking unavailable: {0}")]
    Unavailable(String),
    /// The database connection was lost while the request's transaction committed: it may or
    /// may not have taken effect (PostgreSQL; the cause goes to the log).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

#[cfg(test)]
mod tests {
    use super::KeyScope;

    #[test]
    fn a_scope_keeps_its_identity_in_both_stored_forms() {
        for scope in [
            KeyScope::Organizer,
            KeyScope::Customer(1),
            KeyScope::Customer(i64::MAX),
        ] {
            assert_eq!(KeyScope::from_code(scope.code()), Some(scope));
        }
        assert_eq!(KeyScope::Customer(42).to_string(), "user:42");
        assert_eq!(KeyScope::Organizer.to_string(), "organizer");
        // Two customers never share a scope, nor a customer the organizer's.
        assert_ne!(KeyScope::Customer(1).code(), KeyScope::Organizer.code());
        assert_eq!(KeyScope::from_code(-1), None);
    }
}
