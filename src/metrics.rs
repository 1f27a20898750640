//! Prometheus metrics: the one home of their names, descriptions, units and buckets, of the
//! recorder, and of the handles the hot paths count with.
//!
//! Every fact is counted where it is decided (the writer after COMMIT, the event actor when the
//! lease answers, the registry when a booking is refused, …), never re-derived from logs or rows.
//! `GET /metrics` (`api::metrics`) renders them on the service's own port; gauges that are a
//! reading of some state (live actors, queue depths) are set when scraped.
//!
//! Cost on the hot path: a `metrics::counter!` with labels builds and hashes its key and looks it
//! up in the recorder's map on every call. The per-request and per-batch paths instead use
//! handles registered once (`handles()`, and a per-thread cache for the HTTP series), so that
//! counting is one atomic add; nothing is done per seat.
//!
//! The recorder is process-global (the `metrics` facade has one): it is installed once, on first
//! use, whatever number of applications the process starts (the tests start many), and the
//! applications of one process share its series.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// HTTP (the middleware `http_metrics`).
pub const HTTP_REQUESTS: &str = "ticketd_http_requests_total";
pub const HTTP_DURATION: &str = "ticketd_http_request_duration_seconds";
// Bookings (the writer after COMMIT; refusals in the registry).
pub const BOOKINGS_COMMITTED: &str = "ticketd_bookings_committed_total";
pub const SEATS_SOLD: &str = "ticketd_seats_sold_total";
pub const CANCELLATIONS: &str = "ticketd_cancellations_total";
pub const SEATS_RETURNED: &str = "ticketd_seats_returned_total";
pub const REFUSALS: &str = "ticketd_booking_refusals_total";
// The writer.
pub const GROUP_OPS: &str = "ticketd_group_commit_ops";
pub const GROUP_DURATION: &str = "ticketd_group_commit_duration_seconds";
pub const GROUP_FAILURES: &str = "ticketd_group_commit_failures_total";
pub const BATCH_REQUESTS: &str = "ticketd_batch_requests";
pub const BATCH_REFUSALS: &str = "ticketd_batch_refusals_total";
pub const WAL_CHECKPOINTS: &str = "ticketd_wal_checkpoints_total";
pub const WRITER_BACKLOG: &str = "ticketd_writer_backlog";
// Leases (the event actor).
pub const LEASE_ACQUIRED: &str = "ticketd_lease_acquisitions_total";
pub const LEASE_WAITS: &str = "ticketd_lease_waits_total";
pub const LEASE_UNAVAILABLE: &str = "ticketd_lease_unavailable_total";
// Issuing tickets (the finalizer pool and its queues).
pub const TICKETS_ISSUED: &str = "ticketd_tickets_issued_total";
pub const FINALIZE_FAILURES: &str = "ticketd_finalize_failures_total";
pub const FINALIZE_RETRIES: &str = "ticketd_finalize_retries_total";
pub const DEAD_LETTERED: &str = "ticketd_finalize_dead_lettered_total";
pub const FINALIZE_QUEUE: &str = "ticketd_finalize_queue_depth";
pub const DEAD_LETTERS: &str = "ticketd_finalize_dead_letters";
// Actors and connections.
pub const EVENT_ACTORS: &str = "ticketd_event_actors";
pub const EVENT_ACTORS_STARTED: &str = "ticketd_event_actors_started_total";
pub const OPEN_CONNECTIONS: &str = "ticketd_open_connections";

/// The `route` label of a request no route matched: one series for every unknown path, so a
/// client walking random paths cannot grow the scrape (or the recorder's memory).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Request latency, seconds: from a cached read (~100 µs) through a group commit with its fsync
/// (~1–5 ms) to a shared disk's stalls (tens of ms) and the 10 s body timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Group commits are shorter (no HTTP): the fsync is most of them.
const COMMIT_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
];
/// Counts (ops per group, requests per batch): powers of two up to `Tuning`'s largest limits.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// Histogram samples are folded into buckets by the recorder's upkeep (and at each scrape); run
/// it even when nobody scrapes, or samples pile up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder, once per process; later calls return the same handle.
/// `None` if another recorder was installed first (then `/metrics` renders nothing, and the
/// service runs on).
pub fn install() -> Option<&'static PrometheusHandle> {
    PROMETHEUS.get_or_init(build).as_ref()
}

fn build() -> Option<PrometheusHandle> {
    let builder = [
        (HTTP_DURATION, LATENCY_BUCKETS),
        (GROUP_DURATION, COMMIT_BUCKETS),
        (GROUP_OPS, SIZE_BUCKETS),
        (BATCH_REQUESTS, SIZE_BUCKETS),
    ]
    .into_iter()
    .try_fold(PrometheusBuilder::new(), |b, (name, buckets)| {
        b.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
    });
    let handle = match builder.map(PrometheusBuilder::install_recorder) {
        Ok(Ok(handle)) => handle,
        Ok(Err(e)) | Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed: /metrics stays empty");
            return None;
        }
    };
    describe();
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("ticketd-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms fold at scrape only");
    }
    Some(handle)
}

/// The metrics in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// `# HELP` lines (and units) of every metric.
fn describe() {
    use Unit::{Count, Seconds};
    describe_counter!(
        HTTP_REQUESTS,
        Count,
        "HTTP requests answered, by route pattern (`unmatched` for unknown paths), method and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        Seconds,
        "Time from the request's arrival to its response, by route pattern and method"
    );
    describe_counter!(
        BOOKINGS_COMMITTED,
        Count,
        "Bookings committed to the database (each answered 200 after its COMMIT)"
    );
    describe_counter!(SEATS_SOLD, Count, "Seats of the committed bookings");
    describe_counter!(
        CANCELLATIONS,
        Count,
        "Bookings cancelled (committed; a repeated cancellation is not counted again)"
    );
    describe_counter!(SEATS_RETURNED, Count, "Seats given back by cancellations");
    describe_counter!(
        REFUSALS,
        Count,
        "Bookings refused, by reason: sold_out (409), limit (409), overloaded (503), \
         unavailable (503), unknown_event (404)"
    );
    describe_histogram!(
        GROUP_OPS,
        Count,
        "Writes (event batches, issued tickets, new events) per group commit: one transaction, one fsync"
    );
    describe_histogram!(
        GROUP_DURATION,
        Seconds,
        "Duration of a group commit, BEGIN to the last reply"
    );
    describe_counter!(
        GROUP_FAILURES,
        Count,
        "Group commits that failed (BEGIN or COMMIT); their clients were answered 503"
    );
    describe_histogram!(
        BATCH_REQUESTS,
        Count,
        "Booking requests allocated in one event batch (one lease round trip) and sent to the writer"
    );
    describe_counter!(
        BATCH_REFUSALS,
        Count,
        "Event batches the fenced update refused, by reason: fence (a newer lease token wrote; \
         a stale holder stopped) or seats (the actor's view was behind the row)"
    );
    describe_counter!(
        WAL_CHECKPOINTS,
        Count,
        "WAL checkpoints run by the writer, by mode (passive, restart) and outcome \
         (complete, incomplete, failed)"
    );
    describe_gauge!(
        WRITER_BACKLOG,
        Count,
        "Writes waiting for the next group commit"
    );
    describe_counter!(
        LEASE_ACQUIRED,
        Count,
        "Event leases taken or renewed (one per batch) with a fencing token"
    );
    describe_counter!(
        LEASE_WAITS,
        Count,
        "Lease requests that found the lease held by another replica (retried in 1 ms or on notice)"
    );
    describe_counter!(
        LEASE_UNAVAILABLE,
        Count,
        "Lease requests that could not reach the coordinator (Redis); the queue was answered 503"
    );
    describe_counter!(
        TICKETS_ISSUED,
        Count,
        "Bookings finalized by this replica's finalizers (ticket issued, FINALIZED committed)"
    );
    describe_counter!(
        FINALIZE_FAILURES,
        Count,
        "Issuance attempts that failed; the booking stays PENDING and is delivered again"
    );
    describe_counter!(
        FINALIZE_RETRIES,
        Count,
        "Issuances delivered again: re-queued by the sweeper, reclaimed from a stalled consumer, \
         or resumed by a restarted one"
    );
    describe_counter!(
        DEAD_LETTERED,
        Count,
        "Issuances parked as dead letters after too many deliveries (replay: POST /admin/finalizer/replay)"
    );
    describe_gauge!(
        FINALIZE_QUEUE,
        Count,
        "Issuances waiting or under way: this replica's queue (embedded), the shared stream (cluster)"
    );
    describe_gauge!(
        DEAD_LETTERS,
        Count,
        "Dead letters waiting for a replay (as GET /report's dead_letters)"
    );
    describe_gauge!(
        EVENT_ACTORS,
        Count,
        "Live event actors (idle ones passivate)"
    );
    describe_counter!(
        EVENT_ACTORS_STARTED,
        Count,
        "Event actors spawned (a passivated event's next request spawns one again)"
    );
    describe_gauge!(OPEN_CONNECTIONS, Count, "Client connections open");
}

/// Handles of the counters and histograms the hot paths touch, registered once.
pub struct Handles {
    pub bookings_committed: Counter,
    pub seats_sold: Counter,
    pub cancellations: Counter,
    pub seats_returned: Counter,
    pub refused_sold_out: Counter,
    pub refused_limit: Counter,
    pub refused_overloaded: Counter,
    pub refused_unavailable: Counter,
    pub refused_unknown_event: Counter,
    pub group_ops: Histogram,
    pub group_duration: Histogram,
    pub group_failures: Counter,
    pub batch_requests: Histogram,
    pub fence_refusals: Counter,
    pub seat_refusals: Counter,
    pub lease_acquired: Counter,
    pub lease_waits: Counter,
    pub lease_unavailable: Counter,
    pub tickets_issued: Counter,
    pub finalize_failures: Counter,
    pub finalize_retries: Counter,
    pub dead_lettered: Counter,
    pub actors_started: Counter,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

/// The handles, registered with the recorder (installed first: a handle taken before the
/// recorder exists would count into nothing, forever).
pub fn handles() -> &'static Handles {
    HANDLES.get_or_init(|| {
        install();
        for (mode, outcome) in CHECKPOINT_SERIES {
            let _ = counter!(WAL_CHECKPOINTS, "mode" => mode, "outcome" => outcome);
        }
        let refused = |reason: &'static str| counter!(REFUSALS, "reason" => reason);
        let batch_refused = |reason: &'static str| counter!(BATCH_REFUSALS, "reason" => reason);
        Handles {
            bookings_committed: counter!(BOOKINGS_COMMITTED),
            seats_sold: counter!(SEATS_SOLD),
            cancellations: counter!(CANCELLATIONS),
            seats_returned: counter!(SEATS_RETURNED),
            refused_sold_out: refused("sold_out"),
            refused_limit: refused("limit"),
            refused_overloaded: refused("overloaded"),
            refused_unavailable: refused("unavailable"),
            refused_unknown_event: refused("unknown_event"),
            group_ops: histogram!(GROUP_OPS),
            group_duration: histogram!(GROUP_DURATION),
            group_failures: counter!(GROUP_FAILURES),
            batch_requests: histogram!(BATCH_REQUESTS),
            fence_refusals: batch_refused("fence"),
            seat_refusals: batch_refused("seats"),
            lease_acquired: counter!(LEASE_ACQUIRED),
            lease_waits: counter!(LEASE_WAITS),
            lease_unavailable: counter!(LEASE_UNAVAILABLE),
            tickets_issued: counter!(TICKETS_ISSUED),
            finalize_failures: counter!(FINALIZE_FAILURES),
            finalize_retries: counter!(FINALIZE_RETRIES),
            dead_lettered: counter!(DEAD_LETTERED),
            actors_started: counter!(EVENT_ACTORS_STARTED),
        }
    })
}

/// The WAL checkpoint series, registered at 0 with the handles.
const CHECKPOINT_SERIES: [(&str, &str); 6] = [
    ("passive", "complete"),
    ("passive", "incomplete"),
    ("passive", "failed"),
    ("restart", "complete"),
    ("restart", "incomplete"),
    ("restart", "failed"),
];

/// A WAL checkpoint and how it went (rare: once per ~1,000 pages of log, so the labelled macro).
pub fn wal_checkpoint(mode: &'static str, outcome: &'static str) {
    install();
    counter!(WAL_CHECKPOINTS, "mode" => mode, "outcome" => outcome).increment(1);
}

/// Gauges that read some state, set when `/metrics` is scraped.
pub fn gauges() -> Gauges {
    install();
    Gauges {
        writer_backlog: gauge!(WRITER_BACKLOG),
        finalize_queue: gauge!(FINALIZE_QUEUE),
        dead_letters: gauge!(DEAD_LETTERS),
        event_actors: gauge!(EVENT_ACTORS),
        open_connections: gauge!(OPEN_CONNECTIONS),
    }
}

pub struct Gauges {
    pub writer_backlog: Gauge,
    pub finalize_queue: Gauge,
    pub dead_letters: Gauge,
    pub event_actors: Gauge,
    pub open_connections: Gauge,
}

/// The `method` label: the methods the API serves, and `other` for any token a client invents
/// (actix-http accepts extension methods), so the label stays bounded.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// One request's series: its counter (by status) and its latency histogram.
struct HttpSeries {
    requests: Counter,
    duration: Histogram,
}

thread_local! {
    /// Per HTTP worker: (route pattern, method, status) -> handles. Bounded by the routes the
    /// service has, the methods above and the statuses it answers (a few hundred at most).
    static HTTP_SERIES: RefCell<HashMap<(String, &'static str, u16), HttpSeries>> =
        RefCell::new(HashMap::new());
}

/// Counts one answered request. `route` is the matched route's pattern (`/book/{id}`), never
/// the path: ids in paths would make one series per booking.
pub fn http_request(
    route: Option<String>,
    method: &actix_web::http::Method,
    status: u16,
    seconds: f64,
) {
    let key = (
        route.unwrap_or_else(|| UNMATCHED_ROUTE.to_string()),
        method_label(method),
        status,
    );
    HTTP_SERIES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(s) = cache.get(&key) {
            s.requests.increment(1);
            s.duration.record(seconds);
            return;
        }
        install();
        let (route, method, status) = (key.0.clone(), key.1, key.2);
        let s = HttpSeries {
            requests: counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method,
                "status" => status.to_string()),
            duration: histogram!(HTTP_DURATION, "route" => route, "method" => method),
        };
        s.requests.increment(1);
        s.duration.record(seconds);
        cache.insert(key, s);
    });
}

/// Middleware: counts every request by route pattern, method and status, with its latency.
/// Mounted outside the routes (next to the access log), so 404s, 405s and errors count too.
pub async fn http_metrics(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let res = next.call(req).await?;
    http_request(
        res.request().match_pattern(),
        &method,
        res.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    Ok(res)
}

/// The value of one series in a scrape of this process (0 when absent), for unit tests.
#[cfg(test)]
pub(crate) fn sample(series: &str) -> f64 {
    render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_histogram_has_buckets_in_increasing_order() {
        for b in [LATENCY_BUCKETS, COMMIT_BUCKETS, SIZE_BUCKETS] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
    }

    #[test]
    fn installs_once_and_renders_the_described_metrics() {
        assert!(install().is_some());
        assert!(install().is_some(), "a second install is the same recorder");
        handles().bookings_committed.increment(1);
        http_request(
            Some("/book/{id}".into()),
            &actix_web::http::Method::GET,
            200,
            0.001,
        );
        let text = render();
        assert!(
            text.contains("# TYPE ticketd_bookings_committed_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP ticketd_bookings_committed_total"),
            "{text}"
        );
        assert!(
            text.contains("ticketd_http_request_duration_seconds_bucket{route=\"/book/{id}\",method=\"GET\",le=\"0.0025\"}"),
            "{text}"
        );
    }
}
