//! The ticketd binary: configuration, telemetry, then the application until a signal stops it.

use std::process::ExitCode;

use ticketd::config::{Command, DatabaseUrl};
use ticketd::{telemetry, Application, Config, Tuning};

/// mimalloc instead of glibc's malloc: a booking allocates and frees its request, JSON, reply and
/// messages across threads, and glibc's allocator was a fifth of the HTTP workers' CPU (perf,
/// `make bench` row 2: `malloc`, `_int_free`, `malloc_consolidate`); with mimalloc a booking
/// costs the server ~14 % less CPU. Its arenas commit memory as it is used (a compile-time
/// default in `.cargo/config.toml`), so what passivated actors free goes back to the system.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = Config::from_env_or_exit();
    if let Some(Command::Backup { to }) = &config.command {
        let DatabaseUrl::Sqlite(db) = &config.database_url else {
            eprintln!(
                "ticketd: backup is for SQLite; DATABASE_URL is PostgreSQL: use pg_dump \
                 (e.g. pg_dump --format=custom --file=ticketd.dump \"$DATABASE_URL\")"
            );
            return ExitCode::from(2);
        };
        return match ticketd::store::backup::backup(db, to) {
            Ok(c) => {
                println!(
                    "ticketd: backup written to {}: {} events, {} bookings, {} bytes",
                    c.path.display(),
                    c.events,
                    c.bookings,
                    c.bytes
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ticketd: backup failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Import { from, to }) = &config.command {
        let target = DatabaseUrl::Postgres(to.clone());
        return match ticketd::store::import::import(from, to) {
            Ok(done) => {
                println!("ticketd: imported {} into {target}: {done}", from.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ticketd: import failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Test builds only (`--features failpoints`): failpoints configured by the FAILPOINTS env.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if let Err(e) = telemetry::init(&config.rust_log, config.log_format.is_json()) {
        eprintln!("ticketd: configuration error: {e}");
        return ExitCode::from(2);
    }
    actix_web::rt::System::new().block_on(async move {
        let app = match Application::build(config, Tuning::default()).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("ticketd: {e}");
                return ExitCode::FAILURE;
            }
        };
        actix_web::rt::spawn(ticketd::startup::stop_on_signals(app.handle()));
        match app.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ticketd: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
