//! `GET /api/v1/events`: live events as Server-Sent Events (see `events.rs` and docs/events.md).

use super::{ApiError, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use crate::error::{ErrorKind, ServiceError};
use crate::events::{EventFilter, Opened};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::Extension;
use futures::Stream;
use mooring_api::EventsParams;
use std::convert::Infallible;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How often a live stream re-checks its caller's credentials.
pub const CREDENTIALS_RECHECK_MS: u64 = 1_000;

/// Closes the HTTP connection a request came on (set by `serve.rs` per connection): a stream
/// whose client stopped reading is ended even though hyper no longer polls its body.
#[derive(Clone)]
pub struct ConnectionCloser(pub CancellationToken);

/// The request's selector and the caller's access scope, as one filter (the events service
/// applies both to every event about a device).
fn filter(params: &EventsParams, caller: &Caller) -> ApiResult<EventFilter> {
    let selector = params
        .selector
        .as_deref()
        .map(crate::commands::parse_selector)
        .transpose()?;
    Ok(EventFilter::new(selector, caller.access.scope().cloned()))
}

#[utoipa::path(get, path = "/api/v1/events", params(EventsParams,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event: the `id:` of the last message received, on any node")),
    responses(
        (status = 200, content_type = "text/event-stream", body = mooring_api::Event,
         description = "Server-Sent Events: `event: <kind>` (presence, telemetry, command, shadow), `id: <cursor>`, `data: <Event JSON>`; \
            `event: reset` (data `EventsReset`) when the stream cannot resume without a gap: reload state; a keep-alive comment every 15 s"),
        (status = 400, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "too_many_streams: the caller holds `[events] streams_per_caller_max` streams on this node"),
        (status = 503, body = ErrorBody, description = "too_many_streams: this node serves `[events] streams_max` streams")))]
pub(super) async fn events(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    closer: Option<Extension<ConnectionCloser>>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<EventsParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let filter = filter(&params, &caller)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let closer = closer.map(|Extension(c)| c.0);
    match app
        .events
        .open(app.registry.clone(), caller.principal(), filter, last, closer)
    {
        Opened::Full => Err(ApiError(ServiceError::new(
            ErrorKind::Unavailable,
            "too_many_streams",
            "this node serves as many event streams as it may; retry later or on another node",
        ))),
        Opened::CallerFull => Err(ApiError(ServiceError::new(
            ErrorKind::TooManyRequests,
            "too_many_streams",
            "you hold as many event streams on this node as one user or token may; close one (another tab?) first",
        ))),
        Opened::Stream(rx) => {
            // A stream outlives its request: the caller's credentials are checked again every
            // CREDENTIALS_RECHECK_MS, and the stream ends once they no longer hold (token
            // revoked or expired, logged out, user disabled, role or scope changed).
            let mut recheck =
                tokio::time::interval(std::time::Duration::from_millis(CREDENTIALS_RECHECK_MS));
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            recheck.reset();
            let state = (rx, recheck, app, caller);
            let stream =
                futures::stream::unfold(state, |(mut rx, mut recheck, app, caller)| async move {
                    loop {
                        tokio::select! {
                            frame = rx.recv() => {
                                return frame.map(|f| (Ok(f), (rx, recheck, app, caller)));
                            }
                            _ = recheck.tick() => {
                                if !caller.still_valid(&app).await {
                                    return None;
                                }
                            }
                        }
                    }
                });
            Ok(Sse::new(stream))
        }
    }
}
