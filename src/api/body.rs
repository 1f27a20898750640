//! Reading request bodies: size-limited, JSON, never trusting the client's headers.

use actix_web::web;
use serde_json::Value;

use super::errors::ApiError;

/// Largest request body accepted (our bodies are a few dozen bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// Reads the whole body (at most `MAX_BODY` bytes, else 413) and parses it as JSON (else 422).
/// The content type is not required to be JSON, as the old service's clients did not all send it.
pub async fn json(payload: web::Payload) -> Result<Value, ApiError> {
    let bytes = match payload.to_bytes_limited(MAX_BODY).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return Err(ApiError::TooLarge(MAX_BODY)),
        Err(e) => return Err(ApiError::MalformedJson(e.to_string())),
    };
    serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))
}
