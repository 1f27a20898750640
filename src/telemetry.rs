//! Tracing set up once per process: one span per request (tracing-actix-web) and per committed
//! batch (the writer), filtered by `RUST_LOG`.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};
use tracing_subscriber::{fmt, EnvFilter};

/// The span of one HTTP request. Unlike tracing-actix-web's default it records the path without
/// the query string: a booking's secret may travel as `?secret=` (a link the customer keeps),
/// and a secret must never reach a log. Headers are not recorded at all.
pub struct RequestSpan;

impl RootSpanBuilder for RequestSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        tracing::info_span!(
            "HTTP request",
            http.method = %request.method(),
            http.target = %request.path(),
            http.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            exception.message = tracing::field::Empty,
            exception.details = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        let status = match outcome {
            Ok(res) => res.status().as_u16(),
            Err(e) => e.as_response_error().status_code().as_u16(),
        };
        // One line per request at `debug` (with the span's method and redacted target).
        tracing::debug!(parent: &span, status, "request done");
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// Installs the global subscriber. Returns an error naming `RUST_LOG` when the filter does not
/// parse; a second call (tests start many apps in one process) is a no-op.
pub fn init(filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("RUST_LOG: {e}"))?;
    let _ = fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .compact()
        .try_init();
    Ok(())
}
