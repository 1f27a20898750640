//! Test harness: the real application on port 0 with its own temporary database (in-process),
//! or the real binary as a child process (for kill and signal tests). No shared state between
//! tests: every test gets its own directory, file and port.
#![allow(dead_code)]

pub mod cluster;
pub mod postgres;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use ticketd::{Application, Config, Tuning};

pub const TEST_KEY: &str = "test-ticket-key-0123456789";

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// A response: status, headers we care about, JSON body.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub content_type: String,
    pub retry_after: Option<String>,
}

pub async fn send(req: reqwest::RequestBuilder) -> Resp {
    let r = req.send().await.expect("request");
    let status = r.status();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        body,
        content_type,
        retry_after,
    }
}

/// Anything that serves the API at a base URL.
pub trait Target {
    fn base(&self) -> String;
    fn http(&self) -> &reqwest::Client;
    /// The organizer token the server was started with, if any: organizer calls send it.
    fn admin_token(&self) -> Option<&str> {
        None
    }

    /// `req` with the organizer token, when the server has one.
    fn as_organizer(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.admin_token() {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }
    /// A GET as the organizer (`/report`, any booking).
    async fn admin_get(&self, path: &str) -> Resp {
        send(self.as_organizer(self.http().get(format!("{}{path}", self.base())))).await
    }
    /// A booking read with its secret, as its customer would.
    async fn get_booking(&self, id: i64, secret: &str) -> Resp {
        send(
            self.http()
                .get(format!("{}/book/{id}", self.base()))
                .header("x-booking-secret", secret),
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Resp {
        send(
            self.http()
                .post(format!("{}{path}", self.base()))
                .json(&body),
        )
        .await
    }
    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Resp {
        send(
            self.http()
                .post(format!("{}{path}", self.base()))
                .body(body),
        )
        .await
    }
    async fn get(&self, path: &str) -> Resp {
        send(self.http().get(format!("{}{path}", self.base()))).await
    }
    async fn create_event(&self, title: &str, capacity: i64) -> i64 {
        let req = self
            .http()
            .post(format!("{}/event", self.base()))
            .json(&serde_json::json!({"title": title, "capacity": capacity}));
        let r = send(self.as_organizer(req)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["id"].as_i64().expect("id")
    }
}

/// Runs each test on both backends, as `name::sqlite` and `name::postgres` (a private server,
/// `postgres::PgServer`, started by `TestApp::spawn*`): the same body, not a copy.
///
/// ```ignore
/// both_backends! {
///     #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
///     async fn booking_contract() { let app = TestApp::spawn(); … }
/// }
/// ```
#[macro_export]
macro_rules! both_backends {
    ($( $(#[$attr:meta])* async fn $name:ident() $body:block )*) => { $(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            async fn sqlite() $body

            $(#[$attr])*
            async fn postgres() {
                let _on = $crate::common::Backend::Postgres.select();
                $body
            }
        }
    )* };
}

/// Which database `TestApp::spawn*` starts the application on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

thread_local! {
    /// The test's backend: a test's body (and so its `TestApp::spawn`) runs on the thread of its
    /// runtime's `block_on`.
    static BACKEND: std::cell::Cell<Backend> = const { std::cell::Cell::new(Backend::Sqlite) };
}

/// Puts the backend back to SQLite when dropped.
pub struct Selected(());

impl Drop for Selected {
    fn drop(&mut self) {
        BACKEND.with(|b| b.set(Backend::Sqlite));
    }
}

impl Backend {
    /// The backend of the apps this thread spawns from now on, until the guard drops.
    pub fn select(self) -> Selected {
        BACKEND.with(|b| b.set(self));
        Selected(())
    }

    pub fn current() -> Backend {
        BACKEND.with(|b| b.get())
    }
}

/// A test's view of the application's database, whichever backend: integer rows by SQL with
/// `$1`, `$2`… parameters (both SQLite and PostgreSQL read them).
pub enum TestDb {
    Sqlite(rusqlite::Connection),
    /// `None` only once dropped.
    Postgres(std::sync::Mutex<Option<::postgres::Client>>),
}

impl Drop for TestDb {
    /// The blocking client closes by blocking: not on a thread of the test's runtime.
    fn drop(&mut self) {
        if let TestDb::Postgres(c) = self {
            if let Some(c) = c.get_mut().ok().and_then(Option::take) {
                let _ = std::thread::spawn(move || drop(c)).join();
            }
        }
    }
}

/// A parameter of `Sql::ints`.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(i64),
    Text(&'a str),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}

/// A column's value in a row of `Sql::rows`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Int(i64),
    Text(String),
    Null,
}

impl Cell {
    pub fn int(&self) -> i64 {
        match self {
            Cell::Int(v) => *v,
            other => panic!("not an integer: {other:?}"),
        }
    }
    pub fn text(&self) -> String {
        match self {
            Cell::Text(v) => v.clone(),
            other => panic!("not a text: {other:?}"),
        }
    }
}

/// Tests' reads of the application's database, whichever backend.
pub trait Sql {
    /// Every row of `sql`, as integers, texts and nulls.
    fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Vec<Vec<Cell>>;

    /// The integer columns of the first row of `sql` (it must return one).
    fn ints(&self, sql: &str, args: &[Arg<'_>]) -> Vec<i64> {
        self.ints_opt(sql, args)
            .unwrap_or_else(|| panic!("{sql}: no row"))
    }

    /// The integer columns of the first row of `sql`, if there is one.
    fn ints_opt(&self, sql: &str, args: &[Arg<'_>]) -> Option<Vec<i64>> {
        let row = self.rows(sql, args).into_iter().next()?;
        Some(row.iter().map(Cell::int).collect())
    }

    /// An event's issued seats, as an expression over a row of `events`: the column on SQLite;
    /// on PostgreSQL the column plus the finalizers' slots (`ticketd_finalized`).
    fn finalized(&self) -> &'static str {
        "finalized_count"
    }
}

impl Sql for rusqlite::Connection {
    fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Vec<Vec<Cell>> {
        let params: Vec<Box<dyn rusqlite::ToSql>> = args
            .iter()
            .map(|a| -> Box<dyn rusqlite::ToSql> {
                match *a {
                    Arg::Int(v) => Box::new(v),
                    Arg::Text(v) => Box::new(v.to_string()),
                }
            })
            .collect();
        let mut st = self.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let n = st.column_count();
        st.query_map(rusqlite::params_from_iter(params.iter()), |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Integer(v) => Cell::Int(v),
                        rusqlite::types::ValueRef::Text(t) => {
                            Cell::Text(String::from_utf8_lossy(t).into_owned())
                        }
                        rusqlite::types::ValueRef::Null => Cell::Null,
                        other => panic!("{sql}: unexpected column {other:?}"),
                    })
                })
                .collect::<Result<Vec<_>, rusqlite::Error>>()
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Sql for TestDb {
    fn finalized(&self) -> &'static str {
        match self {
            TestDb::Sqlite(_) => "finalized_count",
            TestDb::Postgres(_) => "ticketd_finalized(events)",
        }
    }

    fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Vec<Vec<Cell>> {
        match self {
            TestDb::Sqlite(c) => c.rows(sql, args),
            TestDb::Postgres(c) => {
                // The blocking client runs a runtime of its own: not on a thread of the test's.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let mut c = c.lock().unwrap();
                        let c = c.as_mut().expect("connected");
                        let params: Vec<Box<dyn ::postgres::types::ToSql + Sync>> = args
                            .iter()
                            .map(|a| -> Box<dyn ::postgres::types::ToSql + Sync> {
                                match *a {
                                    Arg::Int(v) => Box::new(v),
                                    Arg::Text(v) => Box::new(v.to_string()),
                                }
                            })
                            .collect();
                        let refs: Vec<&(dyn ::postgres::types::ToSql + Sync)> =
                            params.iter().map(|p| p.as_ref()).collect();
                        let rows = c.query(sql, &refs).unwrap_or_else(|e| panic!("{sql}: {e}"));
                        rows.iter().map(pg_cells).collect()
                    })
                    .join()
                    .expect("query thread")
                })
            }
        }
    }
}

/// A PostgreSQL row as cells: integers of any width, texts, nulls.
fn pg_cells(row: &::postgres::Row) -> Vec<Cell> {
    use ::postgres::types::Type;
    (0..row.len())
        .map(|i| {
            let t = row.columns()[i].type_().clone();
            let cell = if t == Type::INT8 {
                row.get::<_, Option<i64>>(i).map(Cell::Int)
            } else if t == Type::INT4 {
                row.get::<_, Option<i32>>(i).map(|v| Cell::Int(v.into()))
            } else if t == Type::INT2 {
                row.get::<_, Option<i16>>(i).map(|v| Cell::Int(v.into()))
            } else if t == Type::BOOL {
                row.get::<_, Option<bool>>(i).map(|v| Cell::Int(v.into()))
            } else {
                row.get::<_, Option<String>>(i).map(Cell::Text)
            };
            cell.unwrap_or(Cell::Null)
        })
        .collect()
}

/// Connects to PostgreSQL at `url` (off the test's runtime threads).
pub fn connect_pg(url: &str) -> ::postgres::Client {
    std::thread::scope(|s| {
        s.spawn(|| ::postgres::Client::connect(url, ::postgres::NoTls).expect("connects"))
            .join()
            .expect("connect thread")
    })
}

/// The application in this process, in its own actix System on its own thread.
pub struct TestApp {
    pub port: u16,
    pub admin: Option<String>,
    pub db_path: PathBuf,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    pub client: reqwest::Client,
    _dir: Option<TempDir>,
    /// The private PostgreSQL server of a test on that backend (dropped after the app).
    pub pg: Option<postgres::PgServer>,
}

impl Target for TestApp {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn http(&self) -> &reqwest::Client {
        &self.client
    }
    fn admin_token(&self) -> Option<&str> {
        self.admin.as_deref()
    }
}

impl TestApp {
    pub fn spawn() -> Self {
        Self::spawn_with(|_, _| {})
    }

    /// Spawns with a fresh database, after `f` adjusts the settings: a temporary SQLite file, or
    /// a private PostgreSQL server when the test runs on that backend (`both_backends!`).
    pub fn spawn_with(f: impl FnOnce(&mut Config, &mut Tuning)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("ticket.db");
        let mut app = match Backend::current() {
            Backend::Sqlite => Self::spawn_on(&db, f),
            Backend::Postgres => {
                let pg = postgres::PgServer::start();
                let url = pg.url();
                let mut app = Self::spawn_on(&db, move |c, t| {
                    c.database_url = ticketd::config::DatabaseUrl::Postgres(url);
                    f(c, t)
                });
                app.pg = Some(pg);
                app
            }
        };
        app._dir = Some(dir);
        app
    }

    /// Spawns on an existing database file (a restart).
    pub fn spawn_on(db: &Path, f: impl FnOnce(&mut Config, &mut Tuning)) -> Self {
        let _ = ticketd::telemetry::init(
            &std::env::var("TEST_LOG").unwrap_or_else(|_| "error".into()),
            false,
        );
        let mut config = Config::for_tests(db);
        config.ticket_key = Some(TEST_KEY.into());
        let mut tuning = Tuning {
            http_workers: 2,
            ..Tuning::default()
        };
        f(&mut config, &mut tuning);
        let admin = config.admin_token.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                match Application::build(config, tuning).await {
                    Ok(app) => {
                        let _ = tx.send(Ok((app.port(), app.handle())));
                        app.run_until_stopped().await.expect("server ran");
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            })
        });
        let (port, handle) = rx.recv().expect("app thread").expect("app builds");
        TestApp {
            port,
            admin,
            db_path: db.to_path_buf(),
            handle,
            thread: Some(thread),
            client: client(),
            _dir: None,
            pg: None,
        }
    }

    /// Graceful stop, waiting until the writer has drained and the thread has ended.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(t) = self.thread.take() {
            tokio::task::spawn_blocking(move || t.join().expect("app thread"))
                .await
                .unwrap();
        }
    }

    /// The application's database, whichever backend.
    pub fn db(&self) -> TestDb {
        match &self.pg {
            None => TestDb::Sqlite(open_db(&self.db_path)),
            Some(pg) => TestDb::Postgres(std::sync::Mutex::new(Some(connect_pg(&pg.url())))),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        #[allow(clippy::let_underscore_future)]
        let _ = self.handle.stop(false);
    }
}

pub fn open_db(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("open db");
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// Where a child process's database is: its `DATABASE_URL`.
pub trait DbTarget {
    fn database_url(&self) -> String;
}

impl DbTarget for Path {
    fn database_url(&self) -> String {
        format!("sqlite://{}", self.display())
    }
}

impl DbTarget for PathBuf {
    fn database_url(&self) -> String {
        self.as_path().database_url()
    }
}

/// A `DATABASE_URL` as it is.
impl DbTarget for str {
    fn database_url(&self) -> String {
        self.to_string()
    }
}

impl<T: DbTarget + ?Sized> DbTarget for &T {
    fn database_url(&self) -> String {
        (**self).database_url()
    }
}

/// The database of one test's processes (`Proc::start(&store, …)`, `replicas`), on the test's
/// backend (`both_backends!`): a SQLite file in a temporary directory, or a private PostgreSQL
/// server. Dropped after the processes, it deletes both.
pub struct Store {
    /// The SQLite file.
    pub path: PathBuf,
    pub pg: Option<postgres::PgServer>,
    /// Holds the file's directory for the test's length.
    _dir: TempDir,
}

impl Store {
    pub fn fresh() -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = (Backend::current() == Backend::Postgres).then(postgres::PgServer::start);
        Store {
            path: dir.path().join("ticket.db"),
            pg,
            _dir: dir,
        }
    }

    /// The database as the application sees it.
    pub fn db(&self) -> TestDb {
        match &self.pg {
            None => TestDb::Sqlite(open_db(&self.path)),
            Some(pg) => TestDb::Postgres(std::sync::Mutex::new(Some(connect_pg(&pg.url())))),
        }
    }

    pub fn pg(&mut self) -> &mut postgres::PgServer {
        self.pg.as_mut().expect("a test on PostgreSQL")
    }
}

impl DbTarget for Store {
    fn database_url(&self) -> String {
        match &self.pg {
            None => self.path.database_url(),
            Some(pg) => pg.url(),
        }
    }
}

/// The ticketd binary as a child process.
pub struct Proc {
    pub child: Child,
    pub port: u16,
    pub client: reqwest::Client,
    pub admin: Option<String>,
}

impl Target for Proc {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn http(&self) -> &reqwest::Client {
        &self.client
    }
    fn admin_token(&self) -> Option<&str> {
        self.admin.as_deref()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Proc {
    /// Starts the binary on `db` (a SQLite file or a `Store`) and waits until `/health` answers.
    pub async fn start(db: &(impl DbTarget + ?Sized), env: &[(&str, &str)]) -> Self {
        Self::start_logging(db, env, None).await
    }

    /// As `start`, with the child's log (its stdout) written to `log`.
    pub async fn start_logging(
        db: &(impl DbTarget + ?Sized),
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Self {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ticketd"));
        cmd.env_clear()
            .env("PORT", port.to_string())
            .env("DATABASE_URL", db.database_url())
            .env("TICKET_KEY", TEST_KEY)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit())
            .stdout(match log {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
                None => Stdio::null(),
            });
        for (k, v) in env {
            // An empty value unsets what is set above (`TICKET_KEY`: the key stored in the
            // database signs then).
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let child = cmd.spawn().expect("spawn ticketd");
        let admin = env
            .iter()
            .find(|(k, _)| *k == "ADMIN_TOKEN")
            .map(|(_, v)| v.to_string());
        let mut p = Proc {
            child,
            port,
            client: client(),
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = p.client.get(format!("{}/health", p.base())).send().await {
                if r.status() == 200 {
                    return p;
                }
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("ticketd exited during start: {status}");
            }
            assert!(Instant::now() < deadline, "ticketd did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: i32) {
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub async fn wait(mut self) -> Option<i32> {
        wait_child(&mut self.child, "ticketd").await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to a minute) for a child process to exit; its exit code, None if a signal ended it.
pub async fn wait_child(child: &mut Child, what: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(booked_count, capacity, finalized_count)` of an event, read straight from the database.
pub fn event_counts(db: &impl Sql, id: i64) -> (i64, i64, i64) {
    let v = db.ints(
        &format!(
            "SELECT booked_count, capacity, {} FROM events WHERE id = $1",
            db.finalized()
        ),
        &[id.into()],
    );
    (v[0], v[1], v[2])
}

/// Sum of quantities of the event's bookings (all statuses) and their number.
pub fn booking_sums(db: &impl Sql, id: i64) -> (i64, i64) {
    let v = db.ints(
        "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT), COUNT(*) FROM bookings
         WHERE event_id = $1",
        &[id.into()],
    );
    (v[0], v[1])
}

pub fn count_status(db: &impl Sql, status: &str) -> i64 {
    db.ints(
        "SELECT COUNT(*) FROM bookings WHERE status = $1",
        &[status.into()],
    )[0]
}

/// Ticket codes of the FINALIZED bookings, by booking id.
pub fn codes(db: &impl Sql) -> std::collections::HashMap<i64, String> {
    db.rows(
        "SELECT id, ticket_code FROM bookings WHERE status = 'FINALIZED'",
        &[],
    )
    .into_iter()
    .map(|r| (r[0].int(), r[1].text()))
    .collect()
}
