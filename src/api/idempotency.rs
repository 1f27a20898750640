//! `Idempotency-Key` on `POST /book` and `POST /event` (IETF draft "The Idempotency-Key HTTP
//! Header Field", Stripe): a client that cannot tell whether its request went through retries
//! with the same key and gets the original answer, never a second booking.
//!
//! - A key is scoped to who sent it (`KeyScope`: the customer, by user id, for bookings; the
//!   organizer for events) and lives 24 hours.
//! - It is written by the writer in the transaction of what it names, so it survives a crash
//!   between the commit and the reply, and holds across replicas (the writer checks it under the
//!   event's lease before booking).
//! - The same key with the same request: the original answer, `200`, `Idempotent-Replayed: true`.
//!   With another request: `422`. While the first is still being served (in this process): `409`
//!   with `Retry-After`.
//! - Refusals (sold out, limit, 503) are not remembered: the key stays free for a retry, and the
//!   sold-out fast path writes nothing. But before a keyed request is refused, the route asks
//!   whether the key already names a booking — a retry after a lost 200 gets its booking even
//!   once the event has sold out.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse};
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::domain::{parse_idempotency_key, FieldError, IdempotencyKey, KeyScope};
use crate::store::queries::{self, KeyRecord};

/// The key of the request, if it carries one; `422` naming the header when malformed. Shared
/// (an `Arc`) by the route, the in-flight set and the writer's batch, never copied.
pub fn from_request(
    req: &HttpRequest,
    scope: KeyScope,
    fingerprint: &str,
) -> Result<Option<Arc<IdempotencyKey>>, ApiError> {
    let Some(raw) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = parse_idempotency_key(raw.as_bytes()).map_err(|e| ApiError::Validation(vec![e]))?;
    Ok(Some(Arc::new(IdempotencyKey {
        scope,
        key,
        fingerprint: fingerprint_of(fingerprint),
    })))
}

/// What makes two requests "the same": their validated meaning, hashed (a title may be long);
/// 128 bits are plenty to tell one client's requests apart, and keep the key records small.
fn fingerprint_of(meaning: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(meaning.as_bytes())[..16])
}

/// Keys being served right now in this process: a second request with one of them is `409`.
/// Bounded by the requests in flight, which the queues bound.
#[derive(Default)]
pub struct InFlight(DashMap<Scoped, ()>);

/// A key as the in-flight set tells keys apart: by scope and key, whatever the request's body.
#[derive(Clone)]
struct Scoped(Arc<IdempotencyKey>);

impl PartialEq for Scoped {
    fn eq(&self, other: &Self) -> bool {
        (&self.0.scope, &self.0.key) == (&other.0.scope, &other.0.key)
    }
}

impl Eq for Scoped {}

impl Hash for Scoped {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (&self.0.scope, &self.0.key).hash(state)
    }
}

/// A key marked in flight until dropped (the request answered, or its client gone).
pub struct Claim<'a> {
    map: &'a InFlight,
    id: Scoped,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.map.0.remove(&self.id);
    }
}

impl InFlight {
    /// Marks `key` in flight, or answers `409` if it already is.
    pub fn claim(&self, key: &Arc<IdempotencyKey>) -> Result<Claim<'_>, ApiError> {
        let id = Scoped(key.clone());
        match self.0.entry(id.clone()) {
            dashmap::Entry::Occupied(_) => Err(ApiError::KeyInFlight),
            dashmap::Entry::Vacant(v) => {
                v.insert(());
                Ok(Claim { map: self, id })
            }
        }
    }
}

/// The live record of `key`, from the read pool.
pub async fn lookup(state: &AppState, key: &IdempotencyKey) -> Result<Option<KeyRecord>, ApiError> {
    let (scope, k) = (key.scope, key.key.clone());
    let live_after = (chrono::Utc::now() - crate::actors::persistence::KEY_TTL).timestamp_millis();
    Ok(state
        .reads
        .read(move |c| queries::idempotency_key(c, scope, &k, live_after))
        .await?)
}

/// `422` when the key was first used with another request.
pub fn same_request(key: &IdempotencyKey, first: &str) -> Result<(), ApiError> {
    if key.fingerprint == first {
        Ok(())
    } else {
        Err(ApiError::Validation(vec![FieldError::new(
            "idempotency_key_reused",
            &["header", "idempotency-key"],
            "This Idempotency-Key was already used with a different request",
        )]))
    }
}

/// Marks a response as the replay of an earlier answer.
pub fn replayed(mut res: HttpResponse) -> HttpResponse {
    res.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static("idempotent-replayed"),
        actix_web::http::header::HeaderValue::from_static("true"),
    );
    res
}
