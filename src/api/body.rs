//! Request bodies: bounded in size (`MAX_BODY`) and in time (`BODY_TIMEOUT_MS`), JSON, never
//! trusting the client's headers.
//!
//! actix-http cuts a client whose *headers* stall (`client_request_timeout`), but not one whose
//! body stalls: a request with `Content-Length: 1000` and five bytes sent, or a chunked body
//! that never ends, held its connection (and a file descriptor) for as long as the client liked,
//! and thousands of them exhausted the process's file limit. [`deadline`] gives every body a
//! total time to arrive, measured from the request's headers, whether or not the route reads it.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{web, HttpMessage, HttpRequest};
use futures_util::Stream;
use serde_json::Value;
use tokio::time::{Instant, Sleep};

use super::errors::ApiError;
use super::AppState;

/// Largest request body accepted (our bodies are a few dozen bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// Reads the whole body (at most `MAX_BODY` bytes, else 413; within the body deadline, else 408)
/// and parses it as JSON (else 422). The content type is not required to be JSON, as the old
/// service's clients did not all send it.
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
        Ok(Err(e)) if timed_out(&e) => return Err(ApiError::BodyTimeout),
        Ok(Err(e)) => return Err(ApiError::MalformedJson(e.to_string())),
        Err(_) => return Err(ApiError::TooLarge(MAX_BODY)),
    };
    serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))
}

fn timed_out(e: &actix_web::Error) -> bool {
    matches!(
        e.as_error::<PayloadError>(),
        Some(PayloadError::Io(io)) if io.kind() == io::ErrorKind::TimedOut
    )
}

/// Middleware: the body of every request must arrive within the body timeout (`AppState`).
///
/// - A route reading a body that stalls gets an error at the deadline (`json` answers 408).
/// - A response sent before its request's body has fully arrived closes the connection: the
///   response's body keeps the request's body alive until it has been sent, so actix-http sees
///   an unread body that nobody dropped and closes, instead of draining a chunked body that may
///   never end (it drains a *dropped* chunked body with no time limit).
///
/// Requests without a body (every GET of the hot paths) pass untouched; a body that arrives with
/// its headers, as bookings do, never starts a timer.
pub async fn deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let timeout = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.body_timeout)
        .unwrap_or(DEFAULT_BODY_TIMEOUT);
    let payload = req.take_payload();
    if matches!(payload, Payload::None) {
        return Ok(next
            .call(req)
            .await?
            .map_body(|_, response| WithRequestBody {
                response: response.boxed(),
                _request: None,
            }));
    }
    let body = Rc::new(RefCell::new(payload));
    req.set_payload(Payload::Stream {
        payload: Box::pin(Deadlined {
            body: body.clone(),
            deadline: Instant::now() + timeout,
            timer: None,
        }),
    });
    let res = next.call(req).await?;
    Ok(res.map_body(|_, response| WithRequestBody {
        response: response.boxed(),
        _request: Some(body),
    }))
}

/// Used when the app state is missing (it never is outside unit tests).
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A response body that keeps its request's body alive until it has been sent.
struct WithRequestBody {
    response: BoxBody,
    _request: Option<Rc<RefCell<Payload>>>,
}

impl MessageBody for WithRequestBody {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.response.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.response).poll_next(cx)
    }
}

/// A request body that fails with `TimedOut` once its deadline has passed.
struct Deadlined {
    body: Rc<RefCell<Payload>>,
    deadline: Instant,
    /// Started only when the body is not all there yet.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stream for Deadlined {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let ready @ Poll::Ready(_) = Pin::new(&mut *this.body.borrow_mut()).poll_next(cx) {
            return ready;
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "request body not received in time",
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }
}
