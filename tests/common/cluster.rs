//! Cluster fixtures: a private redis-server and nginx on free ports, and replicas of the binary.
//! Never the machine's shared Redis: these tests kill and restart theirs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{client, free_port, DbTarget, Proc, Target};

/// A redis-server child process without persistence (a restart loses everything, on purpose).
pub struct RedisProc {
    pub port: u16,
    child: Option<Child>,
}

impl RedisProc {
    pub async fn start() -> Self {
        let mut r = RedisProc {
            port: free_port(),
            child: None,
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)starts on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (make deps installs it)");
        self.child = Some(child);
        wait_redis(&self.url()).await;
    }

    /// SIGKILL: Redis vanishes mid-sale.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (up to 10 s) until the Redis at `url` answers PING.
pub async fn wait_redis(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = redis::Client::open(url).unwrap();
    loop {
        // A connect to an address nobody answers (a namespace not yet up) may hang: bounded.
        let connected = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        );
        if let Ok(Ok(mut c)) = connected.await {
            if redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// nginx load-balancing over replicas, as in production.
pub struct Nginx {
    pub port: u16,
    child: Child,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Target for Nginx {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn http(&self) -> &reqwest::Client {
        &self.client
    }
}

/// nginx in front of `upstreams` (`host:port` each), listening on loopback's `listen`.
pub fn nginx_conf(dir: &Path, listen: u16, upstreams: &[String]) -> String {
    let servers: String = upstreams
        .iter()
        .map(|a| format!("    server {a} max_fails=0;\n"))
        .collect();
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;\n"
    } else {
        ""
    };
    format!(
        "{user}worker_processes 1;\ndaemon off;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/error.log error;\n\
events {{ worker_connections 16000; }}\n\
http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
  upstream ticketd {{\n{servers}    keepalive 512;\n  }}\n\
  server {{\n    listen 127.0.0.1:{listen} backlog=8192;\n    location / {{\n      proxy_pass http://ticketd;\n\
      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_connect_timeout 1s;\n\
      proxy_next_upstream error timeout;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

impl Nginx {
    /// nginx on a free loopback port in front of replicas on loopback's `upstreams` ports.
    pub async fn start(upstreams: &[u16]) -> Self {
        let hosts: Vec<String> = upstreams.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Self::start_hosts(&hosts).await
    }
}

pub fn nginx_bin() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nginx"))
}

impl Drop for Nginx {
    /// SIGTERM, so the master stops its worker (a SIGKILLed master leaves it running, holding
    /// the port); SIGKILL only if it does not go.
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis for tests that never kill it: the one named by `TICKETD_TEST_REDIS_URL` (the compose
/// test run's service) or else a private one.
pub struct AnyRedis {
    pub url: String,
    _own: Option<RedisProc>,
}

impl AnyRedis {
    pub async fn get() -> Self {
        match std::env::var("TICKETD_TEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => AnyRedis { url, _own: None },
            _ => {
                let own = RedisProc::start().await;
                AnyRedis {
                    url: own.url(),
                    _own: Some(own),
                }
            }
        }
    }
}

/// Starts `n` replicas in cluster mode on one database (a SQLite file or a `Store`) and one Redis.
pub async fn replicas(
    n: usize,
    db: &(impl DbTarget + ?Sized),
    redis_url: &str,
    env: &[(&str, &str)],
) -> Vec<Proc> {
    let url = redis_url.to_string();
    let mut all = Vec::new();
    for _ in 0..n {
        let mut e: Vec<(&str, &str)> = vec![("REDIS_URL", &url)];
        e.extend_from_slice(env);
        all.push(Proc::start(db, &e).await);
    }
    all
}

/// Settings that make a replica issue, lose its lease and sweep quickly, for tests.
pub const FAST: &[(&str, &str)] = &[
    ("FINALIZE_DELAY_MS", "50"),
    ("LEASE_TTL_MS", "1000"),
    ("FINALIZE_VISIBILITY_MS", "2000"),
    ("SWEEP_INTERVAL_MS", "300"),
];

impl Nginx {
    /// nginx on a free loopback port balancing over replicas at `upstreams` (`host:port`: on
    /// loopback, or in network namespaces behind a bridge).
    pub async fn start_hosts(upstreams: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir.path(), port, upstreams)).unwrap();
        let mut cmd = Command::new(nginx_bin());
        // Stops with the test, even a test killed outright: SIGTERM when the spawning thread
        // exits (not SIGKILL: the master must take its worker down).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args([
                "-p",
                &dir.path().display().to_string(),
                "-c",
                &conf.display().to_string(),
                "-e",
                "stderr",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx (make deps installs it)");
        let n = Nginx {
            port,
            child,
            client: client(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while n
            .client
            .get(format!("{}/health", n.base()))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "nginx did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    }
}
