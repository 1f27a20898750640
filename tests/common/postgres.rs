//! A private PostgreSQL server for one test: `initdb` into a temporary directory, `pg_ctl start`
//! on a free port of loopback, one database created; stopped and deleted on drop.
//!
//! Never the machine's own instance (5432): tests stop and restart their server. PostgreSQL
//! refuses to run as root, so when the tests run as root the server runs as the `postgres` user
//! (`runuser`), in a directory it owns. `fsync` and `synchronous_commit` stay on: promise 2
//! (an acknowledged booking is durable) is what the tests check. `initdb --no-sync` only skips
//! flushing the freshly made template files once; the server it starts syncs every commit.
//!
//! Shared by the black-box tests (`mod common`) and the unit tests of `src/store/postgres`
//! (`#[path]`): it uses only std, libc and tempfile.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The running server. Drop stops it (`pg_ctl stop -m immediate`) and deletes its directory.
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// Run the server's commands as `postgres` (we are root).
    as_postgres: bool,
    running: bool,
    database: String,
    dir: tempfile::TempDir,
}

/// The server binaries: `PG_BIN` if set, else the newest `/usr/lib/postgresql/*/bin`, else
/// whatever `pg_config --bindir` names.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("no PostgreSQL server found: install Debian's `postgresql` (make deps)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer into static storage (or null); read at once, before any
    // other call to the passwd functions on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root, and there is no `postgres` user to run PostgreSQL as (make deps)"
    );
    // SAFETY: non-null, just returned.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
    assert_eq!(rc, 0, "chown {}", path.display());
}

impl PgServer {
    /// Starts a fresh server with one empty database (`ticketd`).
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new()
            .prefix("ticketd-pg-")
            .tempdir()
            .expect("tempdir");
        if as_postgres {
            chown(dir.path(), postgres_ids());
        }
        let mut pg = PgServer {
            port: 0,
            bin,
            data: dir.path().join("data"),
            log: dir.path().join("server.log"),
            as_postgres,
            running: false,
            database: "ticketd".into(),
            dir,
        };
        let init = pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                pg.data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
                "--no-instructions".as_ref(),
            ],
        );
        assert!(init.status.success(), "initdb: {}", pg.output_text(&init));
        // A port taken between our probe and the server's bind: try another.
        for attempt in 0.. {
            pg.port = free_port();
            if pg.try_start() {
                break;
            }
            assert!(attempt < 4, "PostgreSQL did not start: {}", pg.server_log());
        }
        let created = pg.run(
            "createdb",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                pg.port.to_string().as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                pg.database.as_ref(),
            ],
        );
        assert!(
            created.status.success(),
            "createdb: {}",
            pg.output_text(&created)
        );
        pg
    }

    /// Starts a server again on the data another program left in `dir` (`dir/data`, as
    /// `make cluster DB=postgres` keeps it), on `port`; the directory is deleted on drop.
    pub fn adopt(dir: tempfile::TempDir, port: u16) -> PgServer {
        let mut pg = PgServer {
            port,
            bin: bin_dir(),
            data: dir.path().join("data"),
            log: dir.path().join("adopted.log"),
            as_postgres: unsafe { libc::geteuid() } == 0,
            running: false,
            database: "ticketd".into(),
            dir,
        };
        assert!(
            pg.try_start(),
            "PostgreSQL starts again on its data: {}",
            pg.server_log()
        );
        pg
    }

    /// `postgres://postgres@127.0.0.1:PORT/ticketd`
    pub fn url(&self) -> String {
        self.url_of(&self.database)
    }

    /// The URL of another database of this server.
    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Creates another empty database on this server; returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let out = self.run(
            "createdb",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                self.port.to_string().as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                name.as_ref(),
            ],
        );
        assert!(out.status.success(), "createdb: {}", self.output_text(&out));
        self.url_of(name)
    }

    /// Stops the server (`-m fast`: rolls back open transactions, as a restart would).
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// Stops the server as a crash would (`-m immediate`: no shutdown checkpoint, sessions cut);
    /// `restart` recovers from its WAL.
    pub fn crash(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    /// Starts it again on the same port and data (after `stop`).
    pub fn restart(&mut self) {
        assert!(self.try_start(), "restart: {}", self.server_log());
    }

    /// The server's log, for a failing test's message.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_start(&mut self) -> bool {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c fsync=on -c synchronous_commit=on -c full_page_writes=on -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "-D".as_ref(),
                self.data.as_os_str(),
                "-l".as_ref(),
                self.log.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
            ],
        );
        self.running = out.status.success();
        if !self.running {
            // A failed start may leave a postmaster behind on a port race: make sure it is gone.
            self.pg_ctl_stop("immediate");
        }
        self.running
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        let _ = self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "-m".as_ref(),
                mode.as_ref(),
                "-D".as_ref(),
                self.data.as_os_str(),
            ],
        );
        self.running = false;
    }

    /// Runs one of the server's binaries, as `postgres` when we are root.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn output_text(&self, out: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            self.pg_ctl_stop("immediate");
        }
        // The TempDir deletes the data directory after this.
    }
}

/// Waits until `port` on loopback refuses connections (the server is gone).
pub fn wait_closed(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The directory of the server binaries (`initdb`, `pg_ctl`, …), as `PgServer` finds it: for
/// fixtures that run a server elsewhere (another network namespace: `tests/common/netns.rs`).
pub fn server_bin_dir() -> PathBuf {
    bin_dir()
}

/// Gives `path` to the `postgres` user (a server's directory, when the tests run as root).
pub fn chown_to_postgres(path: &Path) {
    chown(path, postgres_ids());
}
