//! Configuration: the environment names of DESIGN.md, each also a command-line flag.
//!
//! Parsing is strict on purpose: a typo in `PORT` or `FINALIZER_WORKERS` must stop the start
//! with one line that names the setting, not run a flash sale on a default nobody chose.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Settings read from the environment or the command line (the same names, see DESIGN.md).
#[derive(Debug, Clone, Parser)]
#[command(name = "ticketd", version, about = "Flash-sale ticket booking service")]
pub struct Config {
    /// Listen address.
    #[arg(long, env = "HOST", value_name = "HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Listen port (0 picks a free one).
    #[arg(long, env = "PORT", value_name = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// The database: a SQLite file, `sqlite://path` (the default), or PostgreSQL,
    /// `postgres://user@host:port/db` (replicas on several hosts); created or migrated on start.
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL", default_value = "sqlite://ticket.db",
          value_parser = parse_database_url)]
    pub database_url: DatabaseUrl,
    /// Redis URL; unset runs the embedded mode (one replica, in-process lease and queue).
    #[arg(long, env = "REDIS_URL", value_name = "REDIS_URL", value_parser = parse_redis_url)]
    pub redis_url: Option<String>,
    /// Simulated PDF/email time per ticket, in milliseconds.
    #[arg(long, env = "FINALIZE_DELAY_MS", value_name = "FINALIZE_DELAY_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub finalize_delay_ms: u64,
    /// Finalizer actors per replica.
    #[arg(long, env = "FINALIZER_WORKERS", value_name = "FINALIZER_WORKERS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub finalizer_workers: u16,
    /// Key that signs ticket codes (HMAC-SHA256); unset: generated once and stored in the database.
    #[arg(long, env = "TICKET_KEY", value_name = "TICKET_KEY", hide_env_values = true,
          value_parser = parse_ticket_key)]
    pub ticket_key: Option<String>,
    /// Cluster mode: how long an event's lease lives unless its holder renews it (each batch
    /// does). A holder paused longer than this loses the lease; fencing keeps it from writing.
    #[arg(long, env = "LEASE_TTL_MS", value_name = "LEASE_TTL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(50..=600_000))]
    pub lease_ttl_ms: u64,
    /// How long a booking may stay PENDING before another finalizer takes it over (must exceed
    /// the worst issuance time; only used in cluster mode, where replicas share the outbox).
    #[arg(long, env = "FINALIZE_VISIBILITY_MS", value_name = "FINALIZE_VISIBILITY_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub finalize_visibility_ms: u64,
    /// Deliveries of one booking's issuance after which it is parked as a dead letter.
    #[arg(long, env = "FINALIZE_MAX_DELIVERIES", value_name = "FINALIZE_MAX_DELIVERIES", default_value_t = 5,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub finalize_max_deliveries: u16,
    /// Issuances waiting for their delivery at once in this replica (about 125 bytes each);
    /// beyond it the backlog waits in the database or the stream.
    #[arg(long, env = "FINALIZE_IN_FLIGHT", value_name = "FINALIZE_IN_FLIGHT", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub finalize_in_flight: u32,
    /// This replica's name (finalize stream consumers are `<REPLICA_ID>-<n>`; keep it stable
    /// across restarts so a restarted replica resumes its own unacknowledged entries).
    #[arg(long, env = "REPLICA_ID", value_name = "REPLICA_ID", value_parser = parse_replica_id)]
    pub replica_id: Option<String>,
    /// The organizer's bearer token: creating events, reports, reading any booking and
    /// `/admin/*` need it. Unset: events and reports are open (as in the old service) and
    /// `/admin/*` is disabled.
    #[arg(long, env = "ADMIN_TOKEN", value_name = "ADMIN_TOKEN", hide_env_values = true,
          value_parser = parse_ticket_key)]
    pub admin_token: Option<String>,
    /// Secret of the shop's customer tokens (JWT, HS256, `sub` = the user id, `exp` required).
    /// Set: `POST /book` needs `Authorization: Bearer <JWT>` and books for its `sub`; the same
    /// token reads and cancels that customer's bookings. Unset: user ids are taken on trust.
    #[arg(long, env = "CUSTOMER_JWT_SECRET", value_name = "CUSTOMER_JWT_SECRET",
          hide_env_values = true, value_parser = parse_ticket_key)]
    pub customer_jwt_secret: Option<String>,
    /// How often the sweeper looks for PENDING bookings that nobody is issuing.
    #[arg(long, env = "SWEEP_INTERVAL_MS", value_name = "SWEEP_INTERVAL_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
    pub sweep_interval_ms: u64,
    /// How long a request's body may take to arrive, in total, from the end of its headers;
    /// past it the request is answered `408` and its connection closed.
    #[arg(long, env = "BODY_TIMEOUT_MS", value_name = "BODY_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub body_timeout_ms: u64,
    /// How long a new connection may take to send its first request's headers (`408` after).
    #[arg(long, env = "HEADER_TIMEOUT_MS", value_name = "HEADER_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub header_timeout_ms: u64,
    /// How long an idle keep-alive connection stays open between two requests.
    #[arg(long, env = "KEEP_ALIVE_MS", value_name = "KEEP_ALIVE_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub keep_alive_ms: u64,
    /// Most client connections open at once (all HTTP workers together). Past it, new
    /// connections wait in the listen backlog until one closes. Lowered at start to what the
    /// process's file limit allows, with room kept for the database, Redis and the listener.
    #[arg(long, env = "MAX_CONNECTIONS", value_name = "MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    pub max_connections: u32,
    /// Browser origins allowed to call the API (CORS), comma-separated (`https://shop.example`),
    /// or `*` for any, as the old service allowed.
    #[arg(long, env = "CORS_ORIGINS", value_name = "CORS_ORIGINS", default_value = "*",
          value_parser = parse_cors_origins)]
    pub cors_origins: CorsOrigins,
    /// Log lines as compact text (`text`) or one JSON object per line (`json`, for log shippers).
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Tracing filter (tracing-subscriber's EnvFilter syntax).
    #[arg(
        long,
        env = "RUST_LOG",
        value_name = "RUST_LOG",
        default_value = "info"
    )]
    pub rust_log: String,
    /// Something else than serving: `backup`, `import`.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The binary's other jobs (without one, it serves).
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Copies the database of DATABASE_URL to a new file, consistent as of one commit, while the
    /// service keeps selling (SQLite's online backup API; never a file copy of a WAL database).
    Backup {
        /// The new file; an existing one is never overwritten.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Moves a sale from SQLite to PostgreSQL: copies the SQLite database's events, bookings,
    /// fences, ticket codes, idempotency keys, per-customer counts and stored ticket key into an
    /// empty PostgreSQL database, in one transaction, and refuses a database that is not empty.
    /// The SQLite file is only read (as of one commit: it may be live).
    Import {
        /// The SQLite database to copy (`sqlite://path`, as DATABASE_URL takes it); never written.
        #[arg(long, value_name = "SQLITE_URL", value_parser = parse_import_from)]
        from: PathBuf,
        /// The PostgreSQL database to fill (`postgres://…`): migrated, then it must be empty.
        #[arg(long, value_name = "POSTGRES_URL", value_parser = parse_import_to)]
        to: String,
    },
}

/// `import --from`: a SQLite database, named as DATABASE_URL names one.
fn parse_import_from(s: &str) -> Result<PathBuf, String> {
    match parse_database_url(s)? {
        DatabaseUrl::Sqlite(path) => Ok(path),
        DatabaseUrl::Postgres(_) => {
            Err("the source of an import is a SQLite database (sqlite://path)".into())
        }
    }
}

/// `import --to`: a PostgreSQL URL (an import into another SQLite file is a `backup`).
fn parse_import_to(s: &str) -> Result<String, String> {
    match parse_database_url(s)? {
        DatabaseUrl::Postgres(url) => Ok(url),
        DatabaseUrl::Sqlite(_) => Err(
            "the target of an import is PostgreSQL (postgres://user@host:port/db); \
             to copy a SQLite database to another file, use `ticketd backup --to FILE`"
                .into(),
        ),
    }
}

/// Which database, where. SQLite: `sqlite://ticket.db` and `sqlite:///abs/path.db` both work,
/// as does a bare path, like SQLAlchemy's `sqlite:///./ticket.db` of the old service.
/// PostgreSQL: `postgres://…` or `postgresql://…` (libpq's URL form), kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::fmt::Display for DatabaseUrl {
    /// For messages: the file, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "{}", path.display()),
            DatabaseUrl::Postgres(url) => match url.parse::<url_parts::Url>() {
                Ok(u) => write!(f, "{u}"),
                Err(()) => f.write_str("postgres://…"),
            },
        }
    }
}

/// Just enough of a URL to print one without its password.
mod url_parts {
    pub struct Url(String);
    impl std::str::FromStr for Url {
        type Err = ();
        fn from_str(s: &str) -> Result<Self, ()> {
            let (scheme, rest) = s.split_once("://").ok_or(())?;
            let (auth, tail) = match rest.find(['/', '?']) {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let auth = match auth.rsplit_once('@') {
                Some((user, host)) => {
                    let user = user.split(':').next().unwrap_or_default();
                    format!("{user}@{host}")
                }
                None => auth.to_string(),
            };
            let tail = tail.split('?').next().unwrap_or_default();
            Ok(Url(format!("{scheme}://{auth}{tail}")))
        }
    }
    impl std::fmt::Display for Url {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
}

fn parse_database_url(s: &str) -> Result<DatabaseUrl, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return match s.parse::<postgres::Config>() {
            Ok(c) if c.get_hosts().is_empty() => Err("the PostgreSQL URL names no host".into()),
            Ok(_) => Ok(DatabaseUrl::Postgres(s.to_string())),
            Err(e) => Err(format!("not a PostgreSQL URL: {e}")),
        };
    }
    let path = if let Some(rest) = s.strip_prefix("sqlite://") {
        // `sqlite://ticket.db` and `sqlite:///abs.db` (sqlx) as written; SQLAlchemy's
        // `sqlite:///./rel.db` and `sqlite:////abs.db` (the old service's style) as it meant them.
        if rest.starts_with("//") || rest.starts_with("/./") || rest.starts_with("/../") {
            rest[1..].to_string()
        } else {
            rest.to_string()
        }
    } else if s.contains("://") {
        return Err("only sqlite://, postgres:// and postgresql:// URLs are supported".into());
    } else {
        s.to_string()
    };
    let path = path.split('?').next().unwrap_or_default().to_string();
    if path.is_empty() {
        return Err("the database path is empty".into());
    }
    if path == ":memory:" {
        return Err("an in-memory database would lose every booking on exit; give a file".into());
    }
    Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn is_json(self) -> bool {
        self == LogFormat::Json
    }
}

/// Who may call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    Only(Vec<String>),
}

/// Origins are written as a browser sends them in `Origin` (its serialization of the page's
/// URL: scheme and host in lower case, no default port), because that header is compared with
/// them byte for byte: `https://Shop.example:443` in the setting would otherwise match no
/// request at all, and the shop's page would fail its CORS checks with nothing in the log.
fn parse_cors_origins(s: &str) -> Result<CorsOrigins, String> {
    if s.trim() == "*" {
        return Ok(CorsOrigins::Any);
    }
    let origins: Vec<&str> = s
        .split(',')
        .map(|o| o.trim().trim_end_matches('/'))
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Err("expected `*` or a comma-separated list of origins".into());
    }
    origins
        .into_iter()
        .map(|o| {
            let lower = o.to_ascii_lowercase();
            let (scheme, rest, default_port) = if let Some(rest) = lower.strip_prefix("https://") {
                ("https", rest, ":443")
            } else if let Some(rest) = lower.strip_prefix("http://") {
                ("http", rest, ":80")
            } else {
                return Err(format!("{o}: an origin is scheme://host[:port]"));
            };
            let host = rest.strip_suffix(default_port).unwrap_or(rest);
            if host.is_empty() || host.contains('/') || host.contains('*') {
                return Err(format!(
                    "{o}: an origin is scheme://host[:port], without a path"
                ));
            }
            Ok(format!("{scheme}://{host}"))
        })
        .collect::<Result<_, _>>()
        .map(CorsOrigins::Only)
}

fn parse_redis_url(s: &str) -> Result<String, String> {
    let ok = ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|p| s.starts_with(p) && s.len() > p.len());
    if ok {
        Ok(s.to_string())
    } else {
        Err("expected redis://host:port[/db]".into())
    }
}

fn parse_replica_id(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(s.to_string())
    } else {
        Err("1 to 64 characters of A-Z a-z 0-9 - _".into())
    }
}

/// Secrets (TICKET_KEY, ADMIN_TOKEN) must not be guessable.
fn parse_ticket_key(s: &str) -> Result<String, String> {
    if s.len() < 16 {
        Err("must be at least 16 characters".into())
    } else {
        Ok(s.to_string())
    }
}

impl Config {
    /// Parses the process arguments and environment; on error prints one line naming the
    /// setting and exits with status 2 (help and version print as usual).
    pub fn from_env_or_exit() -> Self {
        match Self::try_parse() {
            Ok(c) => match c.validate() {
                Ok(()) => c,
                Err(line) => {
                    eprintln!("ticketd: configuration error: {line}");
                    std::process::exit(2);
                }
            },
            Err(e) => {
                use clap::error::ErrorKind;
                if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                    e.exit();
                }
                let text = e.to_string();
                let line = text.lines().next().unwrap_or("invalid configuration");
                let line = line.trim_start_matches("error: ");
                eprintln!("ticketd: configuration error: {line}");
                std::process::exit(2);
            }
        }
    }

    /// The settings of a test or embedded run: port 0 on loopback, a given database file.
    pub fn for_tests(db: impl Into<PathBuf>) -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 0,
            database_url: DatabaseUrl::Sqlite(db.into()),
            redis_url: None,
            finalize_delay_ms: 0,
            finalizer_workers: 4,
            ticket_key: None,
            lease_ttl_ms: 2000,
            finalize_max_deliveries: 5,
            finalize_in_flight: 100_000,
            replica_id: None,
            admin_token: None,
            customer_jwt_secret: None,
            finalize_visibility_ms: 30_000,
            sweep_interval_ms: 10_000,
            body_timeout_ms: 10_000,
            header_timeout_ms: 5_000,
            keep_alive_ms: 5_000,
            max_connections: 10_000,
            cors_origins: CorsOrigins::Any,
            log_format: LogFormat::Text,
            rust_log: "warn".into(),
            command: None,
        }
    }

    pub fn finalize_delay(&self) -> Duration {
        Duration::from_millis(self.finalize_delay_ms)
    }

    /// Checks that hold between settings; one line naming the setting on failure.
    pub fn validate(&self) -> Result<(), String> {
        if self.redis_url.is_some() && self.finalize_visibility_ms <= self.finalize_delay_ms {
            return Err(format!(
                "FINALIZE_VISIBILITY_MS ({}) must exceed FINALIZE_DELAY_MS ({}), or every ticket is issued twice",
                self.finalize_visibility_ms, self.finalize_delay_ms
            ));
        }
        Ok(())
    }
}

/// Tunables that are not part of the public configuration: their defaults suit production, and
/// tests shorten them (idle passivation, sweeper period) to exercise the paths quickly.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// An event actor with nothing to do for this long stops and leaves the registry.
    pub actor_idle: Duration,
    /// Requests an event actor holds (mailbox plus its own queue) before answering 503.
    pub event_queue_limit: usize,
    /// Most requests one event actor puts in one batch.
    pub max_batch: usize,
    /// Most operations the writer puts in one transaction.
    pub max_group: usize,
    /// Operations waiting for the writer before new ones are refused with 503.
    pub writer_queue_limit: usize,
    /// Read connections.
    pub read_pool_size: u32,
    /// HTTP worker threads (0: one per core).
    pub http_workers: usize,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            actor_idle: Duration::from_secs(30),
            event_queue_limit: 4096,
            max_batch: 512,
            max_group: 4096,
            writer_queue_limit: 65_536,
            read_pool_size: 4,
            http_workers: 0,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut v = vec!["ticketd"];
        v.extend_from_slice(args);
        Config::try_parse_from(v)
    }

    #[test]
    fn database_urls() {
        assert_eq!(
            parse_database_url("sqlite://ticket.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("ticket.db"))
        );
        assert_eq!(
            parse_database_url("sqlite:///./t.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("./t.db"))
        );
        assert_eq!(
            parse_database_url("sqlite:////tmp/t.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("/tmp/t.db"))
        );
        assert_eq!(
            parse_database_url("/tmp/x.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(
            parse_database_url("sqlite:///tmp/x.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(
            parse_database_url("postgres://u:pw@db.example:5433/t").unwrap(),
            DatabaseUrl::Postgres("postgres://u:pw@db.example:5433/t".into())
        );
        assert!(parse_database_url("postgresql://localhost/t").is_ok());
        assert!(parse_database_url("postgres://host:notaport/t").is_err());
        assert!(parse_database_url("mysql://x").is_err());
        assert_eq!(
            DatabaseUrl::Postgres("postgres://u:secret@h:1/d?sslmode=disable".into()).to_string(),
            "postgres://u@h:1/d",
            "messages never show the password"
        );
        assert!(parse_database_url("sqlite://").is_err());
        assert!(parse_database_url("sqlite://:memory:").is_err());
    }

    #[test]
    fn import_takes_sqlite_from_and_postgres_to() {
        let c = parse(&[
            "import",
            "--from",
            "sqlite:///tmp/t.db",
            "--to",
            "postgres://u@h:5433/d",
        ])
        .unwrap();
        assert_eq!(
            c.command,
            Some(Command::Import {
                from: PathBuf::from("/tmp/t.db"),
                to: "postgres://u@h:5433/d".into()
            })
        );
        let e = parse(&[
            "import",
            "--from",
            "postgres://h/d",
            "--to",
            "postgres://h/d",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--from") && e.contains("SQLite"), "{e}");
        let e = parse(&["import", "--from", "t.db", "--to", "sqlite://other.db"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--to") && e.contains("PostgreSQL"), "{e}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = parse(&["--port", "eighty"]).unwrap_err().to_string();
        assert!(e.contains("PORT"), "{e}");
        let e = parse(&["--finalizer-workers", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FINALIZER_WORKERS"), "{e}");
        let e = parse(&["--redis-url", "localhost:6379"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("REDIS_URL"), "{e}");
        let e = parse(&["--ticket-key", "short"]).unwrap_err().to_string();
        assert!(e.contains("TICKET_KEY"), "{e}");
    }

    #[test]
    fn defaults_match_design() {
        // Only flags given here: the defaults of DESIGN.md.
        let c = parse(&["--host", "127.0.0.1"]).unwrap();
        assert_eq!(c.port, 8000);
        assert_eq!(
            c.database_url,
            DatabaseUrl::Sqlite(PathBuf::from("ticket.db"))
        );
        assert_eq!(c.finalize_delay_ms, 5000);
        assert_eq!(c.finalizer_workers, 4);
        assert_eq!(c.body_timeout_ms, 10_000);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.cors_origins, CorsOrigins::Any);
    }

    #[test]
    fn cors_origins() {
        assert_eq!(
            parse_cors_origins("https://shop.example, http://localhost:3000/").unwrap(),
            CorsOrigins::Only(vec![
                "https://shop.example".into(),
                "http://localhost:3000".into()
            ])
        );
        assert_eq!(
            parse_cors_origins(
                "HTTPS://Shop.Example:443, http://LOCALHOST:80, http://a.example:8080"
            )
            .unwrap(),
            CorsOrigins::Only(vec![
                "https://shop.example".into(),
                "http://localhost".into(),
                "http://a.example:8080".into()
            ]),
            "as a browser writes them in Origin: lower case, no default port"
        );
        for bad in [
            "",
            "https://:443",
            "shop.example",
            "https://shop.example/path",
            "https://*.example",
        ] {
            assert!(parse_cors_origins(bad).is_err(), "{bad}");
        }
    }
}
