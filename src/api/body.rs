//! Reading request bodies: size-limited, JSON, never trusting the client's headers.

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use serde_json::Value;

use super::errors::ApiError;

/// Largest request body accepted (our bodies are a few dozen bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// Reads the whole body (at most `MAX_BODY` bytes, else 413) and parses it as JSON (else 422).
/// The content type is not required to be JSON, as the old service's clients did not all send it.
pub async fn json(req: &HttpRequest, payload: web::Payload) -> Result<Value, ApiError> {
    // Refuse a declared oversize body before reading a byte of it.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::TooLarge(MAX_BODY));
    }
    let bytes = match payload.to_bytes_limited(MAX_BODY).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(ApiError::MalformedJson(e.to_string())),
        Err(_) => return Err(ApiError::TooLarge(MAX_BODY)),
    };
    serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))
}
