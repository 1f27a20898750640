//! The OpenAPI 3.1 description of the API, generated from the routes' `#[utoipa::path]`
//! attributes and the types they answer with: `GET /openapi.json`, and what `/docs` and `/redoc`
//! render.
//!
//! Request bodies are parsed by hand (`domain::input`: FastAPI's 422 list, stricter integers), so
//! their schemas are written here from the same constants the parsers check; the responses are
//! the serialized types themselves. The test at the end fails when a mounted route is missing
//! from the description, or the description names a route that is not mounted.

use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Required};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToSchema};

use super::errors::{
    BodyTimeout408, Conflict409, Detail, Forbidden403, Invalid, Invalid422, NotFound404,
    TooLarge413, Unauthorized401, Unavailable503,
};
use super::{admin, bookings, docs, events, health, metrics, reports, tickets};
use crate::domain::{DEFAULT_PAGE, MAX_CAPACITY, MAX_KEY_CHARS, MAX_PAGE, MAX_QUANTITY};
use crate::domain::{MAX_TICKET_CODE, MAX_TITLE_CHARS};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ticketd",
        description = "Flash-sale ticket booking: create events, book seats (never oversold), \
            read and cancel bookings with their secret, verify tickets at the door.\n\n\
            Errors are JSON: `{\"detail\": \"...\"}`, or for 422 a list naming each field \
            (`loc`) and reason (`msg`). A `503` carries `Retry-After`."
    ),
    paths(
        bookings::book,
        bookings::get,
        bookings::cancel,
        events::list,
        events::create,
        events::get,
        events::stats,
        events::report_event,
        reports::report,
        tickets::verify,
        admin::replay,
        health::health,
        health::ready,
        metrics::metrics,
        docs::openapi_json,
        docs::swagger_ui,
        docs::swagger_ui_page,
        docs::swagger_ui_file,
        docs::redoc,
        docs::redoc_script,
    ),
    components(schemas(Detail, Invalid), responses(
        Invalid422,
        NotFound404,
        Unauthorized401,
        Forbidden403,
        Conflict409,
        TooLarge413,
        BodyTimeout408,
        Unavailable503
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "bookings", description = "Book seats, read and cancel a booking"),
        (name = "events", description = "What is on sale"),
        (name = "organizer", description = "The organizer's operations: with `ADMIN_TOKEN` set \
            they need `Authorization: Bearer <ADMIN_TOKEN>`; unset, they are open, as the old \
            service's"),
        (name = "tickets", description = "At the door"),
        (name = "operations", description = "Health, readiness"),
        (name = "documentation", description = "This description and its viewers"),
    )
)]
pub struct ApiDoc;

/// What this process asks callers to prove: the description states the security that is in
/// force, not every scheme the code knows (a client generator, or schemathesis, takes it at its
/// word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// `ADMIN_TOKEN` is set: organizer operations need it.
    pub organizer_token: bool,
    /// `CUSTOMER_JWT_SECRET` is set: `POST /book` needs a customer token.
    pub customer_tokens: bool,
}

impl Access {
    /// Every scheme in force: what the code's attributes describe.
    pub const ALL: Access = Access {
        organizer_token: true,
        customer_tokens: true,
    };
}

/// The description as this process serves it (serialized once, at start).
pub fn json_for(access: Access) -> String {
    let mut spec = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(v) => v,
        Err(e) => return format!("{{\"error\": \"{e}\"}}"),
    };
    if let Some(paths) = spec.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for (path, item) in paths.iter_mut() {
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for op in ops.values_mut() {
                if let Some(security) = op.get_mut("security") {
                    *security = security_in_force(path, security, access);
                }
            }
        }
    }
    spec.to_string()
}

/// One operation's security requirements as they hold in this process. The attributes on the
/// handlers describe the service with every scheme in force; without `ADMIN_TOKEN`, organizer
/// operations are open to anyone (as in the old service; a bearer token is ignored), `/admin/*`
/// answers everyone `403`, and the organizer reads no booking; without `CUSTOMER_JWT_SECRET`,
/// no customer token is asked for or honoured; with it, booking needs one.
fn security_in_force(
    path: &str,
    security: &serde_json::Value,
    access: Access,
) -> serde_json::Value {
    use serde_json::{json, Value};
    let names = |req: &Value| -> Vec<String> {
        req.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let declared: Vec<Value> = security.as_array().cloned().unwrap_or_default();
    let organizer_only = declared.len() == 1 && names(&declared[0]) == ["organizer"];
    if organizer_only && !access.organizer_token {
        return if path.starts_with("/admin/") {
            json!([{}]) // disabled: no credential changes the answer
        } else {
            json!([{}, {"organizer": []}])
        };
    }
    let kept: Vec<Value> = declared
        .into_iter()
        .filter(|req| {
            let n = names(req);
            (access.organizer_token || !n.iter().any(|s| s == "organizer"))
                && (access.customer_tokens || !n.iter().any(|s| s == "customer"))
                && !(n.is_empty() && path == "/book" && access.customer_tokens)
        })
        .collect();
    if kept.is_empty() {
        json!([{}])
    } else {
        Value::Array(kept)
    }
}

/// The ways a request proves who sends it (DESIGN.md, "Who may do what").
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        let bearer = |what: &str, format: Option<&str>| {
            let mut b = HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(what));
            if let Some(f) = format {
                b = b.bearer_format(f);
            }
            SecurityScheme::Http(b.build())
        };
        components.add_security_scheme(
            "organizer",
            bearer("The organizer token (`ADMIN_TOKEN`)", None),
        );
        components.add_security_scheme(
            "customer",
            bearer(
                "A customer token of the shop (HS256, `sub` = the user id, `exp`), when \
                 `CUSTOMER_JWT_SECRET` is set: it then says who books",
                Some("JWT"),
            ),
        );
        components.add_security_scheme(
            "booking_secret",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                super::auth::SECRET_HEADER,
                "The `secret` the booking's `POST /book` answered",
            ))),
        );
        components.add_security_scheme(
            "booking_secret_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "secret",
                "The booking's secret in the link the customer keeps",
            ))),
        );
    }
}

fn integer(min: i64, max: i64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Int64,
        )))
        .minimum(Some(min))
        .maximum(Some(max))
}

/// `POST /event`'s body, as `NewEvent::parse` reads it (unknown fields are ignored).
pub struct NewEventBody;

impl PartialSchema for NewEventBody {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property(
                "title",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(MAX_TITLE_CHARS))
                    .pattern(Some(crate::domain::title_pattern()))
                    .description(Some(
                        "Not blank; no control, bidirectional-control or zero-width characters",
                    ))
                    .examples([serde_json::json!("Concert")]),
            )
            .required("title")
            .property(
                "capacity",
                integer(1, MAX_CAPACITY).examples([serde_json::json!(100)]),
            )
            .required("capacity")
            .property(
                "max_per_user",
                integer(1, MAX_CAPACITY)
                    .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                        Type::Integer,
                        Type::Null,
                    ]))
                    .description(Some(
                        "Most seats one customer may hold, at most the capacity; absent or \
                         null: unlimited",
                    )),
            )
            .into()
    }
}
impl ToSchema for NewEventBody {
    fn name() -> std::borrow::Cow<'static, str> {
        "NewEvent".into()
    }
}

/// `POST /book`'s body, as `NewBooking::parse_for` reads it.
pub struct NewBookingBody;

impl PartialSchema for NewBookingBody {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property(
                "user_id",
                integer(1, i64::MAX).description(Some(
                    "Who books. With customer tokens in use, it may be left out (the token's) \
                     and must otherwise be the token's",
                )),
            )
            .required("user_id")
            .property("event_id", integer(1, i64::MAX))
            .required("event_id")
            .property(
                "quantity",
                integer(1, MAX_QUANTITY)
                    .default(Some(serde_json::json!(1)))
                    .description(Some("Seats to book together")),
            )
            .into()
    }
}
impl ToSchema for NewBookingBody {
    fn name() -> std::borrow::Cow<'static, str> {
        "NewBooking".into()
    }
}

/// `POST /ticket/verify`'s body, as `parse_ticket_code` reads it.
pub struct VerifyBody;

impl PartialSchema for VerifyBody {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property(
                "code",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(MAX_TICKET_CODE))
                    .description(Some("The ticket code as scanned")),
            )
            .required("code")
            .into()
    }
}
impl ToSchema for VerifyBody {
    fn name() -> std::borrow::Cow<'static, str> {
        "TicketCode".into()
    }
}

fn parameter(name: &str, place: ParameterIn, schema: ObjectBuilder, what: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(place)
        .required(Required::False)
        .schema(Some(schema))
        .description(Some(what))
        .build()
}

/// `GET /event`'s query, as `domain::Page::parse` reads it.
pub struct PageQuery;

impl IntoParams for PageQuery {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            parameter(
                "limit",
                ParameterIn::Query,
                integer(1, MAX_PAGE).default(Some(serde_json::json!(DEFAULT_PAGE))),
                "Most events on the page",
            ),
            parameter(
                "after",
                ParameterIn::Query,
                integer(0, i64::MAX).default(Some(serde_json::json!(0))),
                "List the events whose id is greater (the `next` of the previous page)",
            ),
        ]
    }
}

/// The `Idempotency-Key` header of the POSTs that create something (`api::idempotency`).
pub struct IdempotencyHeader;

impl IntoParams for IdempotencyHeader {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![parameter(
            "Idempotency-Key",
            ParameterIn::Header,
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_KEY_CHARS))
                .pattern(Some("^[\\x20-\\x7e]+$")),
            "A retry with the same key and body gets the first answer again \
             (`Idempotent-Replayed: true`), never a second booking; with another body, 422; \
             while the first is in flight, 409. Kept 24 hours.",
        )]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every mounted route is described, and nothing else is: the description comes from the
    /// code, and this keeps the two the same set.
    #[test]
    fn the_description_names_exactly_the_mounted_routes() {
        let spec = ApiDoc::openapi();
        let described: BTreeSet<(String, String)> = spec
            .paths
            .paths
            .iter()
            .flat_map(|(path, item)| {
                [
                    ("GET", item.get.is_some()),
                    ("POST", item.post.is_some()),
                    ("PUT", item.put.is_some()),
                    ("DELETE", item.delete.is_some()),
                    ("PATCH", item.patch.is_some()),
                    ("HEAD", item.head.is_some()),
                    ("OPTIONS", item.options.is_some()),
                ]
                .into_iter()
                .filter(|(_, present)| *present)
                .map(move |(m, _)| (path.clone(), m.to_string()))
            })
            .collect();
        let mounted: BTreeSet<(String, String)> = super::super::endpoints()
            .iter()
            .map(|e| (e.path.to_string(), e.method.as_str().to_string()))
            .collect();
        let undescribed: Vec<_> = mounted.difference(&described).collect();
        let unmounted: Vec<_> = described.difference(&mounted).collect();
        assert!(
            undescribed.is_empty() && unmounted.is_empty(),
            "mounted but not in /openapi.json: {undescribed:?}; described but not mounted: \
             {unmounted:?}"
        );
    }

    /// Viewers refuse a description with a dangling `$ref` (ReDoc renders nothing at all).
    #[test]
    fn every_reference_resolves() {
        let spec: serde_json::Value =
            serde_json::from_str(&json_for(Access::ALL)).expect("the description is JSON");
        fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::String(r)) = map.get("$ref") {
                        out.push(r);
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        refs(&spec, &mut found);
        assert!(found.len() > 20, "{found:?}");
        for r in found {
            let pointer = r.strip_prefix('#').unwrap_or(r);
            assert!(spec.pointer(pointer).is_some(), "dangling $ref {r}");
        }
    }

    /// Operation ids name client methods and ReDoc's anchors: two alike and one is lost.
    #[test]
    fn operation_ids_are_unique() {
        let spec = ApiDoc::openapi();
        let mut seen = BTreeSet::new();
        for item in spec.paths.paths.values() {
            for op in [&item.get, &item.post].into_iter().flatten() {
                let id = op.operation_id.clone().expect("every operation has an id");
                assert!(seen.insert(id.clone()), "operationId {id} twice");
            }
        }
    }

    /// The description names the credentials this process asks for, no more: without
    /// `ADMIN_TOKEN` the organizer's operations are open and `/admin/*` is shut to everyone;
    /// without `CUSTOMER_JWT_SECRET` no customer token is involved; with it, booking needs one.
    #[test]
    fn the_security_described_is_the_security_in_force() {
        use serde_json::json;
        let security = |access: Access, path: &str, method: &str| {
            let spec: serde_json::Value =
                serde_json::from_str(&json_for(access)).expect("the description is JSON");
            spec["paths"][path][method]["security"].clone()
        };
        let locked = Access::ALL;
        let open = Access {
            organizer_token: false,
            customer_tokens: false,
        };
        assert_eq!(
            security(locked, "/event", "post"),
            json!([{"organizer": []}])
        );
        assert_eq!(
            security(open, "/event", "post"),
            json!([{}, {"organizer": []}])
        );
        assert_eq!(
            security(open, "/metrics", "get"),
            json!([{}, {"organizer": []}])
        );
        assert_eq!(
            security(open, "/admin/finalizer/replay", "post"),
            json!([{}])
        );
        assert_eq!(security(locked, "/book", "post"), json!([{"customer": []}]));
        assert_eq!(security(open, "/book", "post"), json!([{}]));
        let booking = security(open, "/book/{id}", "get");
        assert_eq!(
            booking,
            json!([{"booking_secret": []}, {"booking_secret_query": []}]),
            "without tokens only the secret reads a booking"
        );
        let all = security(locked, "/book/{id}/cancel", "post");
        for scheme in ["booking_secret", "customer", "organizer"] {
            assert!(all.to_string().contains(scheme), "{scheme} in {all}");
        }
        assert_eq!(security(open, "/health", "get"), serde_json::Value::Null);
    }

    #[test]
    fn it_is_openapi_3_1_with_the_security_schemes() {
        let spec: serde_json::Value =
            serde_json::from_str(&json_for(Access::ALL)).expect("the description is JSON");
        assert!(spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")));
        for scheme in [
            "organizer",
            "customer",
            "booking_secret",
            "booking_secret_query",
        ] {
            assert!(
                spec["components"]["securitySchemes"][scheme].is_object(),
                "{scheme}"
            );
        }
    }
}
