//! `GET /report`: totals over all events, from committed rows only.

use actix_web::{web, HttpResponse};

use super::{ApiError, AppState};
use crate::store::queries;

pub async fn report(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let r = state.reads.read(queries::report).await?;
    Ok(HttpResponse::Ok().json(r))
}
