//! Tracing set up once per process: one span per request (tracing-actix-web) and per committed
//! batch (the writer), filtered by `RUST_LOG`.
//!
//! Logs must not be a client's to fill: a client's mistake (a 4xx, a request actix-http cannot
//! parse) is not a server error, and a warning repeated by a flood is written a few times, then
//! counted (`Throttled`).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};

use tracing::callsite::Identifier;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

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

/// actix-http logs every request it cannot parse at ERROR ("stream error: request parse
/// error"), before any route sees it: 20,000 malformed requests wrote 1.86 MB of ERROR lines at
/// `RUST_LOG=warn`. Those are the client's faults (it got its 400), so its dispatcher is quiet
/// unless `RUST_LOG` names actix_http itself.
const QUIET_DISPATCHER: &str = "actix_http::h1::dispatcher=off";

/// Installs the global subscriber: compact text, or one JSON object per line (`json`, for log
/// shippers). Returns an error naming `RUST_LOG` when the filter does not parse; a second call
/// (tests start many apps in one process) is a no-op.
pub fn init(filter: &str, json: bool) -> Result<(), String> {
    let mut env_filter = EnvFilter::try_new(filter).map_err(|e| format!("RUST_LOG: {e}"))?;
    if !filter.contains("actix_http") {
        env_filter =
            env_filter.add_directive(QUIET_DISPATCHER.parse().map_err(|e| format!("{e}"))?);
    }
    let fmt: Box<dyn Layer<_> + Send + Sync> = if json {
        fmt::layer().json().flatten_event(true).boxed()
    } else {
        fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .compact()
            .boxed()
    };
    let throttled = Throttled::new(fmt, BURST, WINDOW);
    let held_back = throttled.held_back();
    if tracing_subscriber::registry()
        .with(env_filter)
        .with(throttled)
        .try_init()
        .is_ok()
    {
        let _ = HELD_BACK.set(held_back);
    }
    Ok(())
}

/// This process's replica id, for the access log (set once at start).
static REPLICA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn set_replica(id: &str) {
    let _ = REPLICA.set(id.to_string());
}

/// Middleware: one `info` line per request, written when its response is ready: method, path
/// (never the query string, where a booking's `?secret=` travels), status, latency and replica,
/// so lines from several replicas can be told apart. `RUST_LOG=warn` turns it off.
pub async fn access_log(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.path().to_string();
    let res = next.call(req).await?;
    tracing::info!(
        target: "access",
        method = %method,
        path = %path,
        status = res.status().as_u16(),
        latency_us = started.elapsed().as_micros() as u64,
        replica = REPLICA.get().map(String::as_str).unwrap_or(""),
        "request"
    );
    Ok(res)
}

/// Writes how many warnings the installed subscriber held back since the last call (the service
/// calls it every `WINDOW`).
pub fn report_held_back() {
    if let Some(h) = HELD_BACK.get() {
        h.report(WINDOW);
    }
}

static HELD_BACK: std::sync::OnceLock<HeldBack> = std::sync::OnceLock::new();

/// Warnings and errors from one place in the code written per `WINDOW`; the rest are counted,
/// and the counts written every `WINDOW` (`report_held_back`).
pub const WINDOW: Duration = Duration::from_secs(10);
const BURST: u32 = 10;

/// A layer that passes at most `burst` WARN/ERROR events per call site and window to `inner`
/// (INFO and below pass untouched) and counts the rest for `HeldBack::report`. (It cannot write
/// the count itself: tracing drops an event emitted while another is being dispatched.)
pub struct Throttled<L> {
    inner: L,
    burst: u32,
    window: Duration,
    sites: Arc<Mutex<HashMap<Identifier, Budget>>>,
}

struct Budget {
    site: &'static tracing::Metadata<'static>,
    since: Instant,
    written: u32,
    held_back: u64,
}

/// The counts of a `Throttled` layer.
#[derive(Clone)]
pub struct HeldBack(Arc<Mutex<HashMap<Identifier, Budget>>>);

impl HeldBack {
    /// One WARN line per call site that was held back, with the count; the counts restart.
    pub fn report(&self, window: Duration) {
        let counts: Vec<(&'static tracing::Metadata<'static>, u64)> = {
            let mut sites = self.0.lock().unwrap_or_else(|e| e.into_inner());
            sites
                .values_mut()
                .filter(|b| b.held_back > 0)
                .map(|b| (b.site, std::mem::take(&mut b.held_back)))
                .collect()
        };
        for (site, held_back) in counts {
            tracing::warn!(
                held_back,
                site = %format_args!("{}:{}", site.file().unwrap_or("?"), site.line().unwrap_or(0)),
                "similar warnings were not logged in the last {} s",
                window.as_secs()
            );
        }
    }
}

impl<L> Throttled<L> {
    pub fn new(inner: L, burst: u32, window: Duration) -> Self {
        Throttled {
            inner,
            burst,
            window,
            sites: Default::default(),
        }
    }

    pub fn held_back(&self) -> HeldBack {
        HeldBack(self.sites.clone())
    }

    /// Whether this event may be written.
    fn admit(&self, event: &Event<'_>) -> bool {
        let site = event.metadata();
        if *site.level() > Level::WARN {
            return true;
        }
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let b = sites.entry(site.callsite()).or_insert(Budget {
            site,
            since: now,
            written: 0,
            held_back: 0,
        });
        if now.duration_since(b.since) >= self.window {
            b.since = now;
            b.written = 0;
        }
        if b.written < self.burst {
            b.written += 1;
            true
        } else {
            b.held_back += 1;
            false
        }
    }
}

impl<S: Subscriber, L: Layer<S>> Layer<S> for Throttled<L> {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber)
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber)
    }
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_new_span(attrs, id, ctx)
    }
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_record(id, values, ctx)
    }
    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_follows_from(span, follows, ctx)
    }
    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx)
    }
    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx)
    }
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx)
    }
    fn on_id_change(&self, old: &tracing::span::Id, new: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx)
    }
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if self.admit(event) {
            self.inner.on_event(event, ctx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the events that reach it, with their messages.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            struct Msg(String);
            impl tracing::field::Visit for Msg {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            let mut m = Msg(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }

    #[test]
    fn a_flood_of_one_warning_is_written_a_few_times_then_counted() {
        let seen = Seen::default();
        let throttled = Throttled::new(seen.clone(), 3, Duration::from_millis(200));
        let held_back = throttled.held_back();
        let subscriber = tracing_subscriber::registry().with(throttled);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..50 {
                tracing::warn!("the same warning");
                tracing::info!("info passes");
            }
            held_back.report(Duration::from_millis(200));
            std::thread::sleep(Duration::from_millis(250));
            tracing::warn!("the same warning");
            held_back.report(Duration::from_millis(200)); // nothing held back since
        });
        let seen = seen.0.lock().unwrap();
        let count = |m: &str| seen.iter().filter(|s| s.contains(m)).count();
        assert_eq!(count("info passes"), 50);
        assert_eq!(count("the same warning"), 3 + 1, "{seen:?}");
        assert_eq!(count("similar warnings were not logged"), 1, "{seen:?}");
    }
}
