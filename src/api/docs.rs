//! `/openapi.json`, and the two viewers of it the old FastAPI service had: Swagger UI at `/docs`
//! (with "Try it out") and ReDoc at `/redoc`. Their files are compiled into the binary (Swagger
//! UI by `utoipa-swagger-ui`'s `vendored` feature, ReDoc from `assets/redoc/`): the pages work
//! with no internet, and load nothing from anywhere but this service.

use std::sync::{Arc, OnceLock};

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use super::ApiError;

/// `GET /openapi.json`: the OpenAPI 3.1 description of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "documentation",
    summary = "This description (OpenAPI 3.1)",
    responses((status = 200, description = "The OpenAPI 3.1 description", content_type = "application/json", body = Object))
)]
pub async fn openapi_json(state: web::Data<super::AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.description.clone())
}

/// `GET /docs`: Swagger UI lives under `/docs/` (its files are relative to it), as a browser
/// finds it from the old service's address.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "documentation",
    summary = "Swagger UI (redirects to `/docs/`)",
    responses((status = 308, description = "Swagger UI is at `/docs/`", headers(("Location" = String))))
)]
pub async fn swagger_ui() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "/docs/"))
        .finish()
}

fn swagger_config() -> Arc<utoipa_swagger_ui::Config<'static>> {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            Arc::new(
                utoipa_swagger_ui::Config::from("/openapi.json")
                    // Its default asks validator.swagger.io for a badge: nothing leaves.
                    .validator_url("none")
                    .try_it_out_enabled(false)
                    .display_request_duration(true),
            )
        })
        .clone()
}

/// `GET /docs/`: Swagger UI, with "Try it out" on every operation.
#[utoipa::path(
    get,
    path = "/docs/",
    tag = "documentation",
    summary = "Swagger UI",
    responses((status = 200, description = "Swagger UI's page", content_type = "text/html"))
)]
pub async fn swagger_ui_page() -> Result<HttpResponse, ApiError> {
    swagger_file("")
}

/// `GET /docs/{file}`: Swagger UI's files.
#[utoipa::path(
    get,
    path = "/docs/{file}",
    tag = "documentation",
    summary = "Swagger UI's files",
    params(("file" = String, Path, description = "A file of Swagger UI")),
    responses(
        (status = 200, description = "The file (HTML, CSS, JavaScript or an image)"),
        (status = 404, response = super::errors::NotFound404),
    )
)]
pub async fn swagger_ui_file(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    swagger_file(&file)
}

/// What the two pages may load: their own files, and calls to this service only (ReDoc compiles
/// schemas with `new Function` and searches in a `blob:` worker; both style inline). A link in
/// the description cannot make a reader's browser fetch from elsewhere, and ReDoc's footer logo
/// (from its CDN) is not fetched.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-eval' blob:; \
    worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
    font-src 'self' data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'none'";

fn swagger_file(file: &str) -> Result<HttpResponse, ApiError> {
    match utoipa_swagger_ui::serve(file, swagger_config()) {
        Ok(Some(f)) => {
            let mut res = HttpResponse::Ok();
            if f.content_type.starts_with("text/html") {
                res.insert_header((header::CONTENT_SECURITY_POLICY, DOCS_CSP));
            }
            res.content_type(f.content_type);
            if f.gzpipped {
                res.insert_header((header::CONTENT_ENCODING, "gzip"));
            }
            Ok(res.body(f.bytes.into_owned()))
        }
        Ok(None) => Err(ApiError::NoRoute),
        Err(e) => Err(ApiError::Internal(format!("swagger ui: {e}"))),
    }
}

/// ReDoc's page: the vendored script finds the `<redoc>` element and renders `/openapi.json` (no
/// inline script, no fonts or scripts from elsewhere).
const REDOC_PAGE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ticketd — ReDoc</title>
<style>
body { margin: 0; padding: 0; }
/* ReDoc's footer links its logo from its CDN, which the page's policy refuses to load. */
.menu-content a[href*="redocly"] { display: none; }
</style>
</head>
<body>
<redoc spec-url="/openapi.json"></redoc>
<script src="/redoc/redoc.standalone.js"></script>
</body>
</html>
"#;

/// ReDoc 2.5.4's standalone bundle (MIT; `assets/redoc/redoc.standalone.js.LICENSE.txt`), from
/// the npm package `redoc`.
const REDOC_SCRIPT: &[u8] = include_bytes!("../../assets/redoc/redoc.standalone.js");

/// `GET /redoc`: the API description as ReDoc renders it.
#[utoipa::path(
    get,
    path = "/redoc",
    tag = "documentation",
    summary = "ReDoc",
    responses((status = 200, description = "ReDoc's page", content_type = "text/html"))
)]
pub async fn redoc() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, DOCS_CSP))
        .body(REDOC_PAGE)
}

/// `GET /redoc/redoc.standalone.js`: ReDoc itself.
#[utoipa::path(
    get,
    path = "/redoc/redoc.standalone.js",
    tag = "documentation",
    summary = "ReDoc's script",
    responses((status = 200, description = "ReDoc's script", content_type = "text/javascript"))
)]
pub async fn redoc_script() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "public, max-age=86400"))
        .body(REDOC_SCRIPT)
}
