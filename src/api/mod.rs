//! HTTP routes: parse and validate, then hand over to the actors or the read pool.
//! One file per resource; errors map to status codes in `errors`.

pub mod admin;
pub mod auth;
pub mod body;
pub mod bookings;
pub mod errors;
pub mod events;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod reports;
pub mod tickets;

use std::sync::Arc;

use actix_web::{guard, web, HttpResponse, Route};

use crate::actors::finalizer::Finalization;
use crate::actors::{Registry, Writer};
use crate::coord::RedisLink;
use crate::domain::parse_path_id;
use crate::store::ReadPool;
use crate::ticket::TicketSigner;
pub use errors::ApiError;

/// What the routes share.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub reads: ReadPool,
    pub writer: Writer,
    pub finalize: Finalization,
    pub signer: TicketSigner,
    /// The organizer token: organizer operations need it when set (`api::auth`).
    pub admin_token: Option<String>,
    /// The shop's customer tokens, when `CUSTOMER_JWT_SECRET` is set.
    pub customer_tokens: Option<auth::CustomerTokens>,
    /// Idempotency keys being served in this process.
    pub in_flight: idempotency::InFlight,
    /// `"embedded"` or `"cluster"`.
    pub mode: &'static str,
    /// Cluster mode's Redis (for `/ready`).
    pub redis: Option<RedisLink>,
    /// How long a request's body may take to arrive (`body::deadline`).
    pub body_timeout: std::time::Duration,
}

/// Parses an id from the path, answering 422 (naming the parameter) when it is not one.
pub(crate) fn path_id(raw: &str, name: &str) -> Result<i64, ApiError> {
    parse_path_id(raw, name).map_err(|e| ApiError::Validation(vec![e]))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

async fn no_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoRoute)
}

/// CORS as the old service had it (`CORSMiddleware(allow_origins=["*"])`): browsers on any
/// origin may call the API, unless `CORS_ORIGINS` names the ones that may. Preflights are
/// answered for the methods and headers the API uses; the headers a client must read (the
/// retry hints) are exposed. No credentials: tokens travel in `Authorization`, never cookies.
pub fn cors(origins: &crate::config::CorsOrigins) -> actix_cors::Cors {
    use actix_web::http::header;
    let cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "HEAD", "POST", "OPTIONS"])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("x-booking-secret"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            header::HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(600);
    match origins {
        crate::config::CorsOrigins::Any => cors.allow_any_origin(),
        crate::config::CorsOrigins::Only(list) => list
            .iter()
            .fold(cors, |cors, origin| cors.allowed_origin(origin)),
    }
}

/// A read: GET, and HEAD for the same handler (load balancers check health with HEAD; actix-http
/// sends the head of the response without its body).
fn read() -> Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// Mounts every route; unknown paths and methods get JSON errors like the rest.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let resource =
        |path: &str| web::resource(path.to_string()).default_service(web::to(method_not_allowed));
    // Resources are tried in order and the dynamic ones match by regex: the flash-sale route
    // goes first so a `POST /book` is not tested against the others.
    cfg.service(resource("/book").route(web::post().to(bookings::book)))
        .service(
            resource("/event")
                .route(web::post().to(events::create))
                .route(read().to(events::list)),
        )
        .service(resource("/event/{id}").route(read().to(events::get)))
        .service(resource("/event/{id}/stats").route(read().to(events::stats)))
        .service(resource("/book/{id}").route(read().to(bookings::get)))
        .service(resource("/book/{id}/cancel").route(web::post().to(bookings::cancel)))
        .service(resource("/report").route(read().to(reports::report)))
        .service(resource("/report/event/{id}").route(read().to(events::stats)))
        .service(resource("/ticket/verify").route(web::post().to(tickets::verify)))
        .service(resource("/admin/finalizer/replay").route(web::post().to(admin::replay)))
        .service(resource("/health").route(read().to(health::health)))
        .service(resource("/ready").route(read().to(health::ready)))
        .service(resource("/metrics").route(read().to(metrics::metrics)))
        .default_service(web::to(no_route));
}
