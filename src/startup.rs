//! `Application`: builds every part from a `Config`, listens (port 0 works: tests use it), and
//! runs until a shutdown signal or handle stops it, then drains in order.

use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App};
use tracing::info;
use tracing_actix_web::TracingLogger;

use crate::actors::event::EventDeps;
use crate::actors::finalizer::{Finalization, FinalizerDeps, FinalizerPool, Source, READ_BLOCK};
use crate::actors::{PersistenceActor, Registry};
use crate::api::{self, AppState};
use crate::config::{Config, DatabaseUrl, Tuning};
use crate::coord::stream::{Consumer, StreamPusher};
use crate::coord::{Lease, LocalQueue, Outbox, RedisLease, RedisLink};
use crate::store::{self, ReadPool, StoreError, WriteConn};
use crate::ticket::TicketSigner;

/// Connections the kernel holds for us past `MAX_CONNECTIONS` (or while the workers are busy)
/// before it starts dropping handshakes.
const LISTEN_BACKLOG: i32 = 4096;

/// Bookings waiting in the in-process finalization queue, all lanes together.
const FINALIZE_QUEUE: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error("database {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A built ticketd, listening, not yet running.
pub struct Application {
    port: u16,
    server: Server,
    persistence: PersistenceActor,
    _finalizers: FinalizerPool,
}

impl Application {
    /// Opens and migrates the database, starts the writer, the finalizers and the HTTP server.
    /// Must run inside an actix `System`.
    pub async fn build(config: Config, tuning: Tuning) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        // Before anything counts (a handle taken before the recorder exists counts into
        // nothing); and every series is scraped from the start, at 0, not from its first event.
        crate::metrics::handles();
        let store_err = |source| StartError::Store {
            path: config.database_url.to_string(),
            source,
        };
        let fresh_key = || {
            TicketSigner::generate_key().map_err(|e| StartError::Config(format!("TICKET_KEY: {e}")))
        };
        let (conn, stored_key, reads) = match &config.database_url {
            DatabaseUrl::Sqlite(path) => {
                let conn = store::open_writer(path).map_err(store_err)?;
                let key = match &config.ticket_key {
                    Some(_) => None,
                    None => Some(
                        store::sqlite::meta_get_or_insert(&conn, "ticket_key", &fresh_key()?)
                            .map_err(|e| store_err(e.into()))?,
                    ),
                };
                let reads = ReadPool::open(path, tuning.read_pool_size).map_err(store_err)?;
                (WriteConn::from(conn), key, reads)
            }
            DatabaseUrl::Postgres(url) => {
                let default = match &config.ticket_key {
                    Some(_) => None,
                    None => Some(fresh_key()?),
                };
                let (conn, key) = store::open_postgres(url, default).map_err(store_err)?;
                let reads =
                    ReadPool::open_postgres(url, tuning.read_pool_size).map_err(store_err)?;
                (conn, key, reads)
            }
        };
        let Some(key) = config.ticket_key.clone().or(stored_key) else {
            return Err(StartError::Config(
                "TICKET_KEY: none set and none stored".into(),
            ));
        };
        let signer = TicketSigner::new(key.as_bytes());

        // Cluster mode: one Redis link for the leases, the finalize stream and `/ready`.
        let redis = match &config.redis_url {
            None => None,
            Some(url) => Some(
                RedisLink::new(url).map_err(|e| StartError::Config(format!("REDIS_URL: {e}")))?,
            ),
        };
        let mode = if redis.is_some() {
            "cluster"
        } else {
            "embedded"
        };
        let replica = config.replica_id.clone().unwrap_or_else(random_replica_id);
        crate::telemetry::set_replica(&replica);

        let workers = usize::from(config.finalizer_workers);
        let max_deliveries = usize::from(config.finalize_max_deliveries);
        let (outbox, sources, finalization) = match &redis {
            None => {
                let (q, lanes) = LocalQueue::new(workers, FINALIZE_QUEUE / workers, max_deliveries);
                let sources = lanes
                    .into_iter()
                    .map(|lane| Source::Lane(q.clone(), lane))
                    .collect();
                (Outbox::Local(q.clone()), sources, Finalization::Local(q))
            }
            Some(link) => {
                let pusher = StreamPusher::start(link.clone(), FINALIZE_QUEUE);
                let sources = (0..workers)
                    .map(|i| {
                        Source::Stream(Box::new(Consumer::new(
                            link.clone(),
                            format!("{replica}-{i}"),
                            READ_BLOCK,
                        )))
                    })
                    .collect();
                (
                    Outbox::Stream(pusher),
                    sources,
                    Finalization::Stream(link.clone()),
                )
            }
        };
        let persistence =
            PersistenceActor::start(conn, tuning.writer_queue_limit, tuning.max_group, outbox);
        let writer = persistence.writer();

        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let tuning = Arc::new(tuning);
        let lease_ttl = Duration::from_millis(config.lease_ttl_ms);
        let lease = match &redis {
            None => Lease::in_process(lease_ttl),
            // A fresh nonce per process: a restarted replica never mistakes its predecessor's
            // lease for its own.
            Some(link) => Lease::redis(
                RedisLease::new(link.clone(), lease_ttl),
                &format!("{replica}-{}", random_replica_id()),
            ),
        };
        let deps = EventDeps {
            writer: writer.clone(),
            reads: reads.clone(),
            lease,
            tuning: tuning.clone(),
        };
        // Event actors live on the HTTP workers (see `Registry::new`).
        let registry = Registry::new(deps, Vec::new());
        let finalizers = FinalizerPool::start(
            FinalizerDeps {
                reads: reads.clone(),
                writer: writer.clone(),
                signer: signer.clone(),
                delay: config.finalize_delay(),
                in_flight: Arc::new(tokio::sync::Semaphore::new(
                    config.finalize_in_flight as usize,
                )),
                visibility: Duration::from_millis(config.finalize_visibility_ms),
                max_deliveries,
            },
            sources,
            finalization.clone(),
            Duration::from_millis(config.sweep_interval_ms),
        );

        if let Some(link) = &redis {
            let (free, returned) = (Arc::downgrade(&registry), Arc::downgrade(&registry));
            actix::spawn(crate::coord::redis::watch_notifications(
                link.client().clone(),
                move |event| {
                    if let Some(r) = free.upgrade() {
                        r.lease_free(event);
                    }
                },
                move |event| {
                    if let Some(r) = returned.upgrade() {
                        r.seats_returned(event);
                    }
                },
            ));
        }
        let registry_for_trim = registry.clone();
        let state = web::Data::new(AppState {
            registry,
            reads,
            writer,
            finalize: finalization,
            signer,
            admin_token: config.admin_token.clone(),
            customer_tokens: config
                .customer_jwt_secret
                .as_deref()
                .map(api::auth::CustomerTokens::new),
            in_flight: Default::default(),
            mode,
            redis,
            body_timeout: Duration::from_millis(config.body_timeout_ms),
            description: api::openapi::json_for(api::openapi::Access {
                organizer_token: config.admin_token.is_some(),
                customer_tokens: config.customer_jwt_secret.is_some(),
            })
            .into(),
        });
        let addr = format!("{}:{}", config.host, config.port);
        let listen_err = |source| StartError::Listen {
            addr: addr.clone(),
            source,
        };
        let listener = crate::limits::listen(&addr, LISTEN_BACKLOG).map_err(listen_err)?;
        let port = listener.local_addr().map_err(listen_err)?.port();
        let http_workers = if tuning.http_workers == 0 {
            cores
        } else {
            tuning.http_workers
        };
        let file_limit = crate::limits::raise_file_limit();
        let max_connections = crate::limits::connection_cap(
            config.max_connections,
            file_limit,
            tuning.read_pool_size + 1,
        );
        if max_connections < config.max_connections as usize {
            tracing::warn!(
                max_connections,
                file_limit,
                "MAX_CONNECTIONS lowered to what the file limit allows"
            );
        }
        let builder = actix_server::Server::build()
            .workers(http_workers)
            // actix-server counts connections per worker.
            .max_concurrent_connections(max_connections.div_ceil(http_workers))
            .shutdown_timeout(tuning.shutdown_timeout.as_secs())
            // actix-server stops *forcibly* on SIGINT (cutting accepted requests whose bookings
            // may be committed); the binary handles the signals itself (`stop_on_signals`).
            .disable_signals();
        let settings = crate::server::H1Settings {
            keep_alive: match config.keep_alive_ms {
                0 => actix_web::http::KeepAlive::Disabled,
                ms => actix_web::http::KeepAlive::Timeout(Duration::from_millis(ms)),
            },
            client_request_timeout: Duration::from_millis(config.header_timeout_ms),
            ..Default::default()
        };
        let cors_origins = config.cors_origins.clone();
        // Decided once: with the access log filtered out (`RUST_LOG=warn`) its middleware is not
        // mounted at all (the filter cannot change while the process runs).
        let access_log = tracing::enabled!(target: "access", tracing::Level::INFO);
        let server = crate::server::listen(builder, listener, settings, move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(api::body::deadline))
                .wrap(api::cors(&cors_origins))
                .wrap(actix_web::middleware::from_fn(api::cors_errors_as_json))
                .wrap(TracingLogger::<crate::telemetry::RequestSpan>::new())
                .wrap(actix_web::middleware::Condition::new(
                    access_log,
                    actix_web::middleware::from_fn(crate::telemetry::access_log),
                ))
                .wrap(actix_web::middleware::from_fn(crate::metrics::http_metrics))
                .app_data(state.clone())
                .configure(api::configure)
        })
        .map_err(listen_err)?
        .run();
        actix::spawn(give_back_memory(registry_for_trim));
        actix::spawn(async {
            loop {
                tokio::time::sleep(crate::telemetry::WINDOW).await;
                crate::telemetry::report_held_back();
            }
        });
        info!(%addr, port, db = %config.database_url, mode, "ticketd listening");
        if config.admin_token.is_none() {
            tracing::warn!(
                "ADMIN_TOKEN is not set: anyone may create events and read reports, as in the \
                 old service, and the admin endpoints are disabled; set it before going live"
            );
        }
        Ok(Application {
            port,
            server,
            persistence,
            _finalizers: finalizers,
        })
    }

    /// The port actually bound (useful with `PORT=0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that stops the server gracefully (what SIGTERM does).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM, SIGINT or `handle().stop(true)`): the server stops
    /// accepting and answers what it accepted; then the writer commits everything handed to it
    /// and stops; then the actors stop.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Application {
            server,
            persistence,
            ..
        } = self;
        let served = server.await;
        let _ = tokio::task::spawn_blocking(move || persistence.shutdown()).await;
        info!("ticketd stopped");
        served
    }
}

/// SIGTERM and SIGINT (Ctrl-C) both stop gracefully: stop accepting, answer every accepted
/// request, commit what was handed to the writer (`run_until_stopped`). A second signal forces
/// the stop (accepted requests are then cut). Installed by the binary, not by in-process tests.
pub async fn stop_on_signals(server: ServerHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT: stop the service with SIGKILL");
        return;
    };
    let first = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(
        signal = first,
        "stopping: answering every accepted request (a second signal forces)"
    );
    // Sends the command now; the future only waits for the stop to complete.
    drop(server.stop(true));
    let second = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::warn!(
        signal = second,
        "second signal: stopping now, accepted requests are cut"
    );
    drop(server.stop(false));
}

/// A name unique to this process: the replica id when none is configured, and the nonce that
/// makes lease owners (`<replica>-<nonce>:<actor>`) unique per process.
fn random_replica_id() -> String {
    let mut buf = [0u8; 4];
    let _ = getrandom::fill(&mut buf);
    format!(
        "{}-{}",
        std::process::id(),
        data_encoding::HEXLOWER.encode(&buf)
    )
}

/// After many event actors passivate, or many connections close, hands the freed memory back to
/// the system.
///
/// Rust's allocations go to mimalloc (src/main.rs), which returns freed pages by itself (its
/// arenas commit as they are used: `.cargo/config.toml`). What is left to glibc's malloc is the
/// C side — SQLite's page caches and statements — which glibc keeps in its per-thread arenas
/// after they are freed; `malloc_trim` returns it. (With glibc for everything, RSS stayed at
/// 168 MiB after 100,000 actors had passivated, for a 174 MiB peak, and 30 MiB above its start
/// after 50 pipelining connections closed.) Checked every 2 s (two reads), trimming only when
/// the live actors fell by at least 1,000 from their highest since the last trim, or the open
/// connections by at least 32, so a steady service never pays for it.
async fn give_back_memory(registry: Arc<Registry>) {
    let mut high = registry.len();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = registry.len();
        high = high.max(now);
        let (connections_high, connections) = (
            crate::server::take_connection_high(),
            crate::server::open_connections(),
        );
        if now + 1000 <= high || connections + 32 <= connections_high {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
            tracing::debug!(high, now, "trimmed the heap after passivation");
            high = now;
        }
    }
}
