//! Hosts on one machine: each in its own network namespace with its own address, all on one
//! bridge in the root namespace (the "switch"), as separate machines on one LAN would be.
//!
//! ```text
//!   root namespace: the test, nginx;  bridge tk<pid>.<n>b  10.77.S.1/24
//!      |-- veth tk<pid>.<n>h0 ==== eth0 in namespace tk<pid>.<n>-db  10.77.S.10  (PostgreSQL, Redis)
//!      |-- veth tk<pid>.<n>h1 ==== eth0 in namespace tk<pid>.<n>-r0  10.77.S.11  (a replica)
//!      ...
//! ```
//! A "cable cut" is the bridge-side end of a host's veth set down: the host keeps its address
//! and its sockets, and every packet to or from it is dropped silently (no RST, no "unreachable"),
//! until the link is set up again and TCP's retransmissions get through.
//!
//! Robustness:
//! - names: `tk` + the pid in base 36 + `.` + a per-process counter in base 36 (interface names
//!   stay ≤ 15 bytes: at most 13), so parallel tests and test processes never share one;
//! - the subnet `10.77.S.0/24` is claimed with an `flock` on `/tmp/ticketd-netns/10.77.S.lock`
//!   (held for the `Net`'s life, released by the kernel even if the process is killed) and only
//!   if no local interface has an address in it;
//! - `Drop` (also while unwinding from a panic) kills every process left in the namespaces,
//!   deletes them, their veths and the bridge; it never panics;
//! - leftovers of a test process that was killed before its `Drop` ran (its pid is gone) are
//!   swept by the next `Net::new`.
//!
//! Creating a namespace needs root and iproute2's `ip netns`. When that fails, the test panics
//! with a loud message: a machine that cannot build the network fails the test, never skips it.
#![allow(dead_code)]

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common::postgres::{chown_to_postgres, server_bin_dir};
use crate::common::{client, Target, TEST_KEY};

/// Prefix of every name this module creates (namespaces, bridges, veths).
const PREFIX: &str = "tk";
/// Where subnet locks live (never deleted: deleting a lock file races with its next taker).
const LOCK_DIR: &str = "/tmp/ticketd-netns";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Panics with the loud message of a machine that cannot run the hosts tests.
#[track_caller]
pub fn cannot(why: &str) -> ! {
    panic!(
        "\n\n********************************************************************************\n\
         *** THE HOSTS TEST CANNOT RUN HERE: {why}\n\
         *** It needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's `ip netns`, `ip link`\n\
         *** (bridge, veth). It does not skip: a machine that cannot build its network FAILS it.\n\
         ********************************************************************************\n"
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap()
}

/// The pid in a name made here (`tk<pid36>.…`), if it is one.
fn owner_pid(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('.')?;
    u64::from_str_radix(pid, 36).ok()
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| cannot(&format!("`ip` does not run ({e}): install iproute2")))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string()
}

/// `ip args`, or the loud failure: building the network is what this machine must be able to do.
fn setup(args: &[&str]) {
    let out = ip(args);
    if !out.status.success() {
        cannot(&format!("`ip {}` failed: {}", args.join(" "), text(&out)));
    }
}

/// SIGKILLs every process in namespace `ns` (best effort; for cleanup).
fn kill_all_in(ns: &str) {
    for _ in 0..50 {
        let out = ip(&["netns", "pids", ns]);
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: a signal to a process; at worst it is already gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deletes namespaces and links left by test processes that no longer exist.
fn sweep_stale() {
    let alive = |pid: u64| Path::new(&format!("/proc/{pid}")).exists();
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if owner_pid(name).is_some_and(|p| !alive(p)) {
            kill_all_in(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
    let out = ip(&["-o", "link", "show"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "7: tk1a2b.0h1@if6: <…" or "5: tk1a2b.0b: <…"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or_default();
        if owner_pid(name).is_some_and(|p| !alive(p)) {
            let _ = ip(&["link", "del", name]);
        }
    }
}

/// Claims a free `10.77.S.0/24`: the lock on its file, and no local address in it.
fn claim_subnet(seed: u64) -> (u8, File) {
    std::fs::create_dir_all(LOCK_DIR).unwrap_or_else(|e| cannot(&format!("{LOCK_DIR}: {e}")));
    // Local addresses and routes: a subnet in use here (a VPN, another tool) is not ours.
    let addrs = String::from_utf8_lossy(&ip(&["-o", "-4", "addr", "show"]).stdout).to_string();
    let routes = String::from_utf8_lossy(&ip(&["-4", "route", "show"]).stdout).to_string();
    for k in 0..240u64 {
        let s = 10 + ((seed + k) % 240) as u8;
        let path = format!("{LOCK_DIR}/10.77.{s}.lock");
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if addrs.contains(&format!(" 10.77.{s}.")) || routes.contains(&format!("10.77.{s}.")) {
            continue;
        }
        return (s, file);
    }
    cannot("no free subnet 10.77.S.0/24 (all 240 taken?)")
}

/// Makes the child die with this process (SIGKILL when the thread that spawned it exits): a
/// test killed outright leaves no replica, Redis or nginx behind. PostgreSQL is not a child
/// (`pg_ctl` daemonizes it): the next `Net::new` kills what is left in a dead test's namespaces.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// One simulated machine: a network namespace with one address on the bridge.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace's name (`ip netns exec <ns> …`).
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The bridge-side end of its veth: set down, the host is cut off.
    pub link: String,
    /// A short name for logs (`db`, `r0`, …).
    pub role: String,
}

impl Host {
    /// `program` to be run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

/// The network of one test: a bridge, its hosts, and a directory for their logs.
pub struct Net {
    tag: String,
    subnet: u8,
    bridge: String,
    hosts: Vec<Host>,
    logs: tempfile::TempDir,
    _lock: File,
}

impl Net {
    /// A bridge on a fresh subnet. Panics loudly when this machine cannot create namespaces.
    pub fn new() -> Net {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            cannot("not running as root");
        }
        sweep_stale();
        let pid = std::process::id() as u64;
        let n = NEXT.fetch_add(1, Ordering::Relaxed) as u64;
        let tag = format!("{PREFIX}{}.{}", base36(pid), base36(n));
        assert!(
            tag.len() <= 11,
            "{tag}: interface names must stay ≤ 15 bytes"
        );
        let (subnet, lock) = claim_subnet(pid * 7 + n * 13);
        let net = Net {
            bridge: format!("{tag}b"),
            tag,
            subnet,
            hosts: Vec::new(),
            logs: tempfile::Builder::new()
                .prefix("ticketd-hosts-")
                .tempdir()
                .expect("tempdir"),
            _lock: lock,
        };
        // From here on, Drop removes whatever was made.
        setup(&["link", "add", &net.bridge, "type", "bridge"]);
        setup(&["link", "set", &net.bridge, "up"]);
        let gw = format!("{}/24", net.gateway());
        setup(&["addr", "add", &gw, "dev", &net.bridge]);
        net
    }

    /// The bridge's address in the root namespace (the test and nginx speak from it).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 1)
    }

    /// `10.77.S.0/24`
    pub fn cidr(&self) -> String {
        format!("10.77.{}.0/24", self.subnet)
    }

    /// A new host named `role` (≤ 8 chars): a namespace, a veth to the bridge, an address.
    pub fn host(&mut self, role: &str) -> Host {
        let i = self.hosts.len();
        assert!(i < 100 && role.len() <= 8, "host {role}");
        let host = Host {
            ns: format!("{}-{role}", self.tag),
            addr: Ipv4Addr::new(10, 77, self.subnet, 10 + i as u8),
            link: format!("{}h{i}", self.tag),
            role: role.to_string(),
        };
        assert!(host.link.len() <= 15, "{}", host.link);
        let out = ip(&["netns", "add", &host.ns]);
        if !out.status.success() {
            cannot(&format!(
                "creating a network namespace (`ip netns add {}`) failed: {}",
                host.ns,
                text(&out)
            ));
        }
        self.hosts.push(host.clone());
        setup(&[
            "link", "add", &host.link, "type", "veth", "peer", "name", "eth0", "netns", &host.ns,
        ]);
        setup(&["link", "set", &host.link, "master", &self.bridge]);
        setup(&["link", "set", &host.link, "up"]);
        let addr = format!("{}/24", host.addr);
        setup(&["-n", &host.ns, "addr", "add", &addr, "dev", "eth0"]);
        setup(&["-n", &host.ns, "link", "set", "eth0", "up"]);
        setup(&["-n", &host.ns, "link", "set", "lo", "up"]);
        host
    }

    /// Cuts `host` off the network: its cable's switch end goes down (packets dropped silently).
    pub fn cut(&self, host: &Host) {
        let out = ip(&["link", "set", &host.link, "down"]);
        assert!(out.status.success(), "link down: {}", text(&out));
    }

    /// Plugs `host` back in.
    pub fn reconnect(&self, host: &Host) {
        let out = ip(&["link", "set", &host.link, "up"]);
        assert!(out.status.success(), "link up: {}", text(&out));
    }

    /// A log file for a process of this test (kept if the test fails).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// The names this network created: namespaces, then links (the bridge last).
    pub fn names(&self) -> (Vec<String>, Vec<String>) {
        let mut links: Vec<String> = self.hosts.iter().map(|h| h.link.clone()).collect();
        links.push(self.bridge.clone());
        (self.hosts.iter().map(|h| h.ns.clone()).collect(), links)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let has_logs = std::fs::read_dir(self.logs.path()).is_ok_and(|mut d| d.next().is_some());
        if std::thread::panicking() && has_logs {
            let keep = std::env::temp_dir().join(format!("ticketd-hosts-logs-{}", self.tag));
            let _ = std::fs::create_dir_all(&keep);
            if let Ok(entries) = std::fs::read_dir(self.logs.path()) {
                for e in entries.flatten() {
                    let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
            eprintln!(
                "hosts test failed: the processes' logs are in {}",
                keep.display()
            );
        }
        for h in &self.hosts {
            kill_all_in(&h.ns);
            let _ = ip(&["netns", "del", &h.ns]);
            // Gone with its peer once the namespace is; deleted here in case it is not.
            let _ = ip(&["link", "del", &h.link]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Polls `url` from the root namespace until it answers 200.
async fn wait_http_ok(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    mut gone: impl FnMut() -> Option<String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == 200 {
                return;
            }
        }
        if let Some(why) = gone() {
            panic!("{url}: {why}");
        }
        assert!(Instant::now() < deadline, "{url} did not answer 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ticketd binary running in a host's namespace.
pub struct Replica {
    pub host: Host,
    pub port: u16,
    pub child: Child,
    pub client: reqwest::Client,
    pub admin: Option<String>,
}

impl Target for Replica {
    fn base(&self) -> String {
        format!("http://{}:{}", self.host.addr, self.port)
    }
    fn http(&self) -> &reqwest::Client {
        &self.client
    }
    fn admin_token(&self) -> Option<&str> {
        self.admin.as_deref()
    }
}

impl Replica {
    /// Starts the binary in `host` with the environment `Proc::start` gives (plus `HOST`, its
    /// address, and `REPLICA_ID`, its role), then `env`; its stdout goes to `log`. Waits until
    /// `/health` answers through the bridge.
    pub async fn start(host: &Host, env: &[(&str, &str)], log: &Path) -> Replica {
        let port = 8000;
        let mut cmd = host.command(env!("CARGO_BIN_EXE_ticketd"));
        cmd.env_clear()
            .env("HOST", host.addr.to_string())
            .env("PORT", port.to_string())
            .env("REPLICA_ID", &host.role)
            .env("TICKET_KEY", TEST_KEY)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(File::create(log).expect("log file")))
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // `ip netns exec` execs the program: the child's pid is ticketd's own.
        let child = die_with_parent(&mut cmd)
            .spawn()
            .expect("spawn ticketd in its namespace");
        let admin = env
            .iter()
            .find(|(k, _)| *k == "ADMIN_TOKEN")
            .map(|(_, v)| v.to_string());
        let mut r = Replica {
            host: host.clone(),
            port,
            child,
            client: client(),
            admin,
        };
        let url = format!("{}/health", r.base());
        let http = r.client.clone();
        let child = &mut r.child;
        wait_http_ok(&http, &url, Duration::from_secs(30), || {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|s| format!("ticketd exited during start: {s}"))
        })
        .await;
        r
    }

    /// SIGKILL, and the exit collected.
    pub fn kill9(&mut self) {
        // SAFETY: a signal to our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// `/ready` with the organizer's detail.
    pub async fn ready(&self) -> crate::common::Resp {
        self.admin_get("/ready").await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server in a host's namespace, on its address, without persistence (a restart loses
/// everything, on purpose).
pub struct NsRedis {
    pub host: Host,
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl NsRedis {
    pub async fn start(host: &Host, log: &Path) -> NsRedis {
        let mut r = NsRedis {
            host: host.clone(),
            port: 6379,
            child: None,
            log: log.to_path_buf(),
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.host.addr, self.port)
    }

    /// (Re)starts on the same address, empty; waits until it answers PING through the bridge.
    pub async fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("redis log");
        let mut cmd = self.host.command("redis-server");
        let child = die_with_parent(&mut cmd)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                &self.host.addr.to_string(),
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (make deps installs it)");
        self.child = Some(child);
        crate::common::cluster::wait_redis(&self.url()).await;
    }

    /// SIGKILL: Redis vanishes (and loses everything).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NsRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private PostgreSQL in a host's namespace, listening on the host's address (as `PgServer`,
/// which listens on loopback of the root namespace: initdb in a temporary directory owned by
/// `postgres`, `pg_ctl` as `postgres`, fsync on). Clients of other hosts are trusted
/// (`host all all 10.77.0.0/16 trust` in `pg_hba.conf`).
pub struct NsPg {
    pub host: Host,
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    running: bool,
    dir: tempfile::TempDir,
}

impl NsPg {
    /// A fresh server with one empty database, `ticketd`.
    pub fn start(host: &Host) -> NsPg {
        let dir = tempfile::Builder::new()
            .prefix("ticketd-pg-")
            .tempdir()
            .expect("tempdir");
        chown_to_postgres(dir.path());
        let mut pg = NsPg {
            host: host.clone(),
            port: 5432,
            bin: server_bin_dir(),
            data: dir.path().join("data"),
            log: dir.path().join("server.log"),
            running: false,
            dir,
        };
        let data = pg.data.display().to_string();
        let init = pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        );
        assert!(init.status.success(), "initdb: {}", text(&init));
        let hba = pg.data.join("pg_hba.conf");
        let mut conf = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        conf.push_str("\nhost all all 10.77.0.0/16 trust\n");
        std::fs::write(&hba, conf).expect("pg_hba.conf");
        pg.start_again();
        let port = pg.port.to_string();
        let addr = pg.host.addr.to_string();
        let created = pg.run(
            "createdb",
            &["-h", &addr, "-p", &port, "-U", "postgres", "ticketd"],
        );
        assert!(created.status.success(), "createdb: {}", text(&created));
        pg
    }

    /// `postgres://postgres@10.77.S.x:5432/ticketd`
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@{}:{}/ticketd",
            self.host.addr, self.port
        )
    }

    /// Starts the server (again: same data, same address).
    pub fn start_again(&mut self) {
        let opts = format!(
            "-p {} -c listen_addresses={} -c unix_socket_directories='{}' \
             -c fsync=on -c synchronous_commit=on -c full_page_writes=on -c max_connections=200",
            self.port,
            self.host.addr,
            self.dir.path().display()
        );
        let (data, log) = (
            self.data.display().to_string(),
            self.log.display().to_string(),
        );
        let out = self.run(
            "pg_ctl",
            &[
                "start", "-w", "-t", "30", "-D", &data, "-l", &log, "-o", &opts,
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            text(&out),
            self.server_log()
        );
        self.running = true;
    }

    /// `pg_ctl stop -m immediate`: the server vanishes as in a crash (no checkpoint, every
    /// connection cut); a start runs crash recovery.
    pub fn stop_immediate(&mut self) {
        let data = self.data.display().to_string();
        let out = self.run(
            "pg_ctl",
            &["stop", "-w", "-t", "30", "-m", "immediate", "-D", &data],
        );
        assert!(out.status.success(), "pg_ctl stop: {}", text(&out));
        self.running = false;
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A server binary, as `postgres`, in the host's namespace.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.host
            .command("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }
}

impl Drop for NsPg {
    fn drop(&mut self) {
        if self.running {
            let data = self.data.display().to_string();
            let _ = self.run(
                "pg_ctl",
                &["stop", "-w", "-t", "30", "-m", "immediate", "-D", &data],
            );
        }
    }
}
