//! HTTP routes: parse and validate, then hand over to the actors or the read pool.
//! One file per resource; errors map to status codes in `errors`.

pub mod admin;
pub mod auth;
pub mod body;
pub mod bookings;
pub mod docs;
pub mod errors;
pub mod events;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod reports;
pub mod tickets;

use std::sync::Arc;

use actix_web::http::Method;
use actix_web::{guard, web, FromRequest, Handler, HttpResponse, Responder, Route};

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
    /// `GET /openapi.json`: the description with the security in force here (`openapi::json_for`).
    pub description: actix_web::web::Bytes,
}

/// Parses an id from the path, answering 422 (naming the parameter) when it is not one.
pub(crate) fn path_id(raw: &str, name: &str) -> Result<i64, ApiError> {
    parse_path_id(raw, name).map_err(|e| ApiError::Validation(vec![e]))
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

/// A request CORS refused gets the API's JSON error (`400 {"detail": …}`) like every other
/// error, where actix-cors answers in plain text. Wrapped outside `cors`.
pub async fn cors_errors_as_json<B: actix_web::body::MessageBody>(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::EitherBody<B>>, actix_web::Error> {
    use actix_web::ResponseError;
    let refused = |e: &actix_web::Error| {
        e.as_error::<actix_cors::CorsError>()
            .map(|c| ApiError::CorsRefused(c.to_string()))
    };
    // actix-cors answers a refused preflight itself (the response keeps its error) and fails
    // a refused simple request: both become the API's error.
    let res = match next.call(req).await {
        Ok(res) => res,
        Err(e) => return Err(refused(&e).map_or(e, Into::into)),
    };
    match res.response().error().and_then(refused) {
        Some(api) => {
            let (req, _) = res.into_parts();
            let json = api.error_response();
            Ok(actix_web::dev::ServiceResponse::new(req, json).map_into_right_body())
        }
        None => Ok(res.map_into_left_body()),
    }
}

/// One route: a path (as actix matches it and as `/openapi.json` names it) and a method.
pub struct Endpoint {
    pub path: &'static str,
    /// GET stands for GET and HEAD: load balancers check health with HEAD, and actix-http sends
    /// the head of the response without its body.
    pub method: Method,
    route: Route,
}

fn endpoint<F, Args>(path: &'static str, method: Method, handler: F) -> Endpoint
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    let route = if method == Method::GET {
        web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
    } else {
        web::route().method(method.clone())
    };
    Endpoint {
        path,
        method,
        route: route.to(handler),
    }
}

/// Every route of the API, in the order they are tried. `configure` mounts exactly these, and a
/// test requires `/openapi.json` to describe exactly these.
pub fn endpoints() -> Vec<Endpoint> {
    use Method as M;
    // Resources are tried in order and the dynamic ones match by regex: the flash-sale route
    // goes first so a `POST /book` is not tested against the others.
    vec![
        endpoint("/book", M::POST, bookings::book),
        endpoint("/event", M::POST, events::create),
        endpoint("/event", M::GET, events::list),
        endpoint("/event/{id}", M::GET, events::get),
        endpoint("/event/{id}/stats", M::GET, events::stats),
        endpoint("/book/{id}", M::GET, bookings::get),
        endpoint("/book/{id}/cancel", M::POST, bookings::cancel),
        endpoint("/report", M::GET, reports::report),
        endpoint("/report/event/{id}", M::GET, events::report_event),
        endpoint("/ticket/verify", M::POST, tickets::verify),
        endpoint("/admin/finalizer/replay", M::POST, admin::replay),
        endpoint("/health", M::GET, health::health),
        endpoint("/ready", M::GET, health::ready),
        endpoint("/metrics", M::GET, metrics::metrics),
        endpoint("/openapi.json", M::GET, docs::openapi_json),
        endpoint("/docs", M::GET, docs::swagger_ui),
        endpoint("/docs/", M::GET, docs::swagger_ui_page),
        endpoint("/docs/{file}", M::GET, docs::swagger_ui_file),
        endpoint("/redoc", M::GET, docs::redoc),
        endpoint("/redoc/redoc.standalone.js", M::GET, docs::redoc_script),
    ]
}

/// Mounts every route; unknown paths and methods get JSON errors like the rest.
pub fn configure(cfg: &mut web::ServiceConfig) {
    // One resource per path, its routes together, in the order of `endpoints`.
    let mut resources: Vec<(&'static str, Vec<String>, Vec<Route>)> = Vec::new();
    for e in endpoints() {
        let mut methods = vec![e.method.to_string()];
        if e.method == Method::GET {
            methods.push(Method::HEAD.to_string());
        }
        match resources.iter_mut().find(|(path, _, _)| *path == e.path) {
            Some((_, allowed, routes)) => {
                allowed.extend(methods);
                routes.push(e.route);
            }
            None => resources.push((e.path, methods, vec![e.route])),
        }
    }
    for (path, methods, routes) in resources {
        // A 405 names the methods the path has (RFC 9110 §15.5.6).
        let allow: std::sync::Arc<str> = methods.join(", ").into();
        let refuse = move || {
            let allow = allow.clone();
            async move { Err::<HttpResponse, _>(ApiError::MethodNotAllowed(allow)) }
        };
        let resource = web::resource(path).default_service(web::to(refuse));
        cfg.service(routes.into_iter().fold(resource, |r, route| r.route(route)));
    }
    cfg.default_service(web::to(no_route));
}
