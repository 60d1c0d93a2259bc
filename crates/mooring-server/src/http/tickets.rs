//! `/api/v1/tickets` (docs/health.md "Playbooks").

use super::jobs::creator;
use super::{ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::{Extension, Json};
use mooring_api::{Ticket, TicketList, TicketListParams};
use std::sync::Arc;

#[utoipa::path(get, path = "/api/v1/tickets", params(TicketListParams),
    responses((status = 200, body = TicketList, description = "newest first; a scoped caller sees the tickets all of whose devices it sees"),
        (status = 400, body = ErrorBody, description = "invalid_state, invalid_limit")))]
pub(super) async fn list_tickets(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<TicketListParams>,
) -> ApiResult<Json<TicketList>> {
    let (tickets, next_cursor) = app.jobs.playbooks().list(&caller.access, &p).await?;
    Ok(Json(TicketList {
        tickets,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/tickets/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Ticket), (status = 404, body = ErrorBody, description = "ticket_not_found")))]
pub(super) async fn get_ticket(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Ticket>> {
    Ok(Json(app.jobs.playbooks().get(&caller.access, &id).await?))
}

#[utoipa::path(post, path = "/api/v1/tickets/{id}/close", params(("id" = String, Path)),
    responses((status = 200, body = Ticket, description = "closed (a closed ticket is returned as it is)"),
        (status = 404, body = ErrorBody, description = "ticket_not_found")))]
pub(super) async fn close_ticket(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Ticket>> {
    let by = creator(&caller).name;
    Ok(Json(
        app.jobs.playbooks().close(&caller.access, &id, &by).await?,
    ))
}
