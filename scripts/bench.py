#!/usr/bin/env python3
"""`make bench`: flash-sale benchmarks of the release binary with wrk on loopback.

Every number is reported next to scenario 1 (`GET /health` of the same binary, in the same run):
this machine is shared and noisy, and the ceiling of what HTTP carries here moves with it.
Prints a markdown table and writes bench/results.json. Nothing here is a test: no threshold
fails the run; the targets are printed beside the measurements.

Scenario 2s, the sustained sale (issue 14), is the headline: selling and issuing at once over a
30 s window after a warm-up, counted by the service (committed bookings, FINALIZED tickets, the
PENDING left at the window's end), never by what the window merely started. Row 2, the 10 s hot
event, defers issuance past its window at the default delay and is kept for comparison.
`BENCH_ONLY=1,2s` runs the ceiling and both sustained rows (`2s0`, `2s5000`: one of them).

Rows 2pg and 5pg are rows 2 and 5 on PostgreSQL (`DATABASE_URL=postgres://`): a private server
the bench starts (scripts/pgserver.py: initdb, fsync on, never the machine's instance), a fresh
database per row, judged against the SQLite rows of the same run (`BENCH_ONLY=1,2,2pg,5,5pg`).
"""
import json, os, re, shutil, signal, socket, sqlite3, subprocess, sys, tempfile, time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no scripts/__pycache__ left behind
from pgserver import PgServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TICKETD_BIN benches another build (an older commit, for a before/after in one sitting).
BIN = os.environ.get("TICKETD_BIN") or os.path.join(ROOT, "target", "release", "ticketd")
RESULTS = os.environ.get("BENCH_RESULTS") or os.path.join(ROOT, "bench", "results.json")
WRK_DIR = os.path.join(ROOT, "bench", "wrk")
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
THREADS = 2
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
# Scenario 2m: the hot event while a scraper reads /metrics every one of these intervals (ms);
# 0 runs the same row without a scraper (a control in the same position, e.g. "0,100,0,1000").
SCRAPE_MS = [int(x) for x in os.environ.get("BENCH_SCRAPE_MS", "100,1000").split(",") if x]
# Scenario 2s, the sustained sale: wrk warms up for BENCH_WARMUP s, then the measured window of
# BENCH_SUSTAIN_SECONDS s, once per FINALIZE_DELAY_MS in BENCH_SUSTAIN_DELAYS (0 and the default).
WARMUP = int(os.environ.get("BENCH_WARMUP", "5"))
SUSTAIN = int(os.environ.get("BENCH_SUSTAIN_SECONDS", "30"))
SUSTAIN_DELAYS = [int(x) for x in os.environ.get("BENCH_SUSTAIN_DELAYS", "0,5000").split(",") if x]
DEFAULT_DELAY_MS = 5000
# ... and each measures its own process's GET /health for this many seconds first (0: not).
BESIDE_S = int(os.environ.get("BENCH_HEALTH_BESIDE_SECONDS", "5"))

procs = []
# The private PostgreSQL server of the PG rows: started by the first of them, stopped at the end.
pg_server = None


def pg():
    global pg_server
    if pg_server is None:
        pg_server = PgServer()
    return pg_server


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if http("GET", url, timeout=2)[0] == 200:
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


class Ticketd:
    def __init__(self, db, **env):
        """`db`: a SQLite file, or a database URL (postgres://...)."""
        self.port = free_port()
        url = db if "://" in db else f"sqlite://{db}"
        e = dict(os.environ, PORT=str(self.port), DATABASE_URL=url, RUST_LOG="warn",
                 TICKET_KEY="bench-ticket-key-0123456789")
        e.update({k: str(v) for k, v in env.items()})
        self.proc = subprocess.Popen([BIN], env=e, stdout=subprocess.DEVNULL)
        procs.append(self.proc)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/health")

    def status(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # MiB
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def create_event(url, capacity, title="Bench", **extra):
    status, body = http("POST", url + "/event", {"title": title, "capacity": capacity, **extra})
    assert status == 200, body
    return body["id"]


def wrk(url, script, seconds=SECONDS, conns=CONNS, **env):
    e = dict(os.environ, WRK_DIR=WRK_DIR, WRK_THREADS=str(THREADS))
    e.update({k: str(v) for k, v in env.items()})
    out = subprocess.run(
        ["wrk", "-t", str(THREADS), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "10s",
         "-s", os.path.join(WRK_DIR, script), url],
        env=e, capture_output=True, text=True, check=True).stdout
    m = re.search(r"WRKJSON (\{.*\})", out)
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return r


def db_counts(db, event_id=None):
    c = sqlite3.connect(db, timeout=30)
    try:
        if event_id is None:
            return c.execute("SELECT COALESCE(SUM(booked_count),0), COALESCE(SUM(capacity),0), "
                             "COALESCE(SUM(finalized_count),0) FROM events").fetchone()
        return c.execute("SELECT booked_count, capacity, finalized_count FROM events WHERE id=?",
                         (event_id,)).fetchone()
    finally:
        c.close()


def rows(db, event_id):
    c = sqlite3.connect(db, timeout=30)
    try:
        return c.execute("SELECT COALESCE(SUM(quantity),0), COUNT(*) FROM bookings WHERE event_id=?",
                         (event_id,)).fetchone()
    finally:
        c.close()


def wait_finalized(db, total, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        c = sqlite3.connect(db, timeout=30)
        done = c.execute("SELECT COUNT(*) FROM bookings WHERE status='FINALIZED'").fetchone()[0]
        c.close()
        if done >= total:
            return time.time()
        time.sleep(0.05)
    return None


def nginx_conf(run, listen, upstreams):
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=0;\n" for p in upstreams)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (f"{user}worker_processes 1;\ndaemon off;\npid {run}/nginx.pid;\nerror_log {run}/error.log error;\n"
            f"worker_rlimit_nofile 20000;\nevents {{ worker_connections 16000; }}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {run}/body;\n  proxy_temp_path {run}/proxy;\n"
            f"  fastcgi_temp_path {run}/fcgi;\n  uwsgi_temp_path {run}/uwsgi;\n  scgi_temp_path {run}/scgi;\n"
            f"  upstream ticketd {{\n{servers}    keepalive 512;\n  }}\n"
            f"  server {{\n    listen 127.0.0.1:{listen} backlog=8192;\n    location / {{\n"
            f"      proxy_pass http://ticketd;\n      proxy_http_version 1.1;\n"
            f"      proxy_set_header Connection \"\";\n      proxy_next_upstream error timeout;\n    }}\n  }}\n}}\n")


def main():
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="ticketd-bench-")
    results = {"machine": machine(), "seconds": SECONDS, "connections": CONNS, "scenarios": {}}
    S = results["scenarios"]
    try:
        db = os.path.join(tmp, "one.db")
        one = Ticketd(db, FINALIZE_DELAY_MS=5000)
        if not ONLY or "1" in ONLY:
            print("1. ceiling: GET /health", flush=True)
            S["1_ceiling"] = wrk(one.url, "health.lua")
        ceiling = S.get("1_ceiling", {}).get("rps") or 1.0

        if not ONLY or "2" in ONLY:
            print("2. hot event", flush=True)
            ev = create_event(one.url, 1_000_000_000)
            r = wrk(one.url, "book.lua", EVENT_ID=ev)
            booked, cap, _ = db_counts(db, ev)
            r.update(booked=booked, rows=rows(db, ev)[1], ratio=r["rps"] / ceiling)
            S["2_hot_event"] = r

        if not ONLY or "2m" in ONLY:
            for i, every_ms in enumerate(SCRAPE_MS):
                print(f"2m. hot event, /metrics scraped every {every_ms} ms (0: not scraped)", flush=True)
                ev = create_event(one.url, 1_000_000_000)
                with Scraper(one.url + "/metrics", every_ms / 1000.0) as scraper:
                    r = wrk(one.url, "book.lua", EVENT_ID=ev)
                r.update(ratio=r["rps"] / ceiling, every_ms=every_ms, **scraper.summary(),
                         vs_plain=r["rps"] / S.get("2_hot_event", {}).get("rps", r["rps"]))
                S[f"2m_hot_scraped_{i}_{every_ms}ms"] = r

        if not ONLY or "3" in ONLY:
            print("3. sold-out flood", flush=True)
            ev = create_event(one.url, 1)
            http("POST", one.url + "/book", {"user_id": 1, "event_id": ev})
            r = wrk(one.url, "book.lua", EVENT_ID=ev)
            r.update(ratio=r["rps"] / ceiling, booked=db_counts(db, ev)[0])
            S["3_sold_out"] = r

        if not ONLY or "4" in ONLY:
            print("4. spread over 10,000 events", flush=True)
            first = create_events_fast(one.url, 10_000, 1_000_000)
            r = wrk(one.url, "spread.lua", EVENT_MIN=first, EVENT_MAX=first + 9_999)
            r.update(ratio=r["rps"] / ceiling)
            S["4_spread"] = r
        one.stop()

        if not ONLY or "2pg" in ONLY:
            print("2pg. hot event on PostgreSQL, one replica (fresh process, fresh database)", flush=True)
            S["2pg_hot_event_postgres"] = hot_postgres(ceiling, S.get("2_hot_event"))

        if not ONLY or "2b" in ONLY:
            print("2b. hot event, Idempotency-Key and max_per_user (beside a plain one, each fresh)",
                  flush=True)
            S["2b_hot_keyed_limited"] = keyed_pair(tmp, ceiling)

        for delay_ms in SUSTAIN_DELAYS:
            if not ONLY or "2s" in ONLY or f"2s{delay_ms}" in ONLY:
                print(f"2s. sustained sale, FINALIZE_DELAY_MS={delay_ms}: {WARMUP} s warm-up, "
                      f"{SUSTAIN} s measured", flush=True)
                S[f"2s_sustained_{delay_ms}ms"] = sustained(tmp, ceiling, delay_ms)

        if not ONLY or "5" in ONLY:
            print("5. cluster: redis + 3 replicas + nginx, one hot event", flush=True)
            S["5_cluster"] = cluster(tmp, ceiling)

        if not ONLY or "5pg" in ONLY:
            print("5pg. cluster on PostgreSQL: redis + 3 replicas + nginx, one hot event", flush=True)
            r = cluster(tmp, ceiling, pg_db="bench_5pg")
            if "5_cluster" in S:
                r["vs_sqlite"] = r["rps"] / S["5_cluster"]["rps"]
            S["5pg_cluster_postgres"] = r

        if not ONLY or "6" in ONLY:
            print("6. issuance", flush=True)
            S["6_issuance"] = issuance(tmp)

        if not ONLY or "7" in ONLY:
            print("7. memory: 100,000 events", flush=True)
            S["7_memory"] = memory(tmp)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if pg_server is not None:
            pg_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    print(profile(results))


class Scraper:
    """A Prometheus stand-in: GETs /metrics every `every` seconds on a thread while the block
    runs, and keeps each scrape's duration and size (a failed scrape is counted, not raised)."""
    def __init__(self, url, every):
        import threading
        self.url, self.every = url, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.durations, self.sizes, self.failures = [], [], 0

    def run(self):
        while self.every > 0 and not self.stop.is_set():
            t0 = time.time()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    self.sizes.append(len(r.read()))
                self.durations.append(time.time() - t0)
            except Exception:
                self.failures += 1
            self.stop.wait(max(0.0, self.every - (time.time() - t0)))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self):
        d = sorted(self.durations) or [0.0]
        return {"scrapes": len(self.durations), "scrape_failures": self.failures,
                "scrape_p99_ms": 1000 * d[min(len(d) - 1, int(0.99 * len(d)))],
                "scrape_bytes": max(self.sizes or [0])}


def metric_sum(url, names):
    """The sum over the label sets of each counter in `names`, from the service's /metrics
    (with ADMIN_TOKEN's bearer if the environment sets one: the service then requires it)."""
    headers = {}
    if os.environ.get("ADMIN_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["ADMIN_TOKEN"]
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=30) as r:
        text = r.read().decode()
    out = dict.fromkeys(names, 0)
    for line in text.splitlines():
        m = re.match(r"([a-z_]+)(?:\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
    return out


def machine_cpu():
    """CPU seconds spent so far: the whole machine busy (all cores, not idle or iowait), its
    steal, and this script's own and its finished children's (wrk)."""
    import resource
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    procs_cpu = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # with its waited-for children's: a cargo's finished rustc runs, say
        procs_cpu[pid] = (stat[stat.index("(") + 1:stat.rindex(")")], sum(int(x) for x in fields[11:15]) / tick)
    return {"busy": (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tick, "steal": v[7] / tick,
            "irq": (v[5] + v[6]) / tick,
            "bench": me.ru_utime + me.ru_stime, "wrk": kids.ru_utime + kids.ru_stime, "procs": procs_cpu}


def thread_cpu(pids):
    """CPU seconds (user + system) per thread name, summed over the processes `pids`."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # the thread ended
            name = re.sub(r"[-:]?\d+$", "", stat[stat.index("(") + 1:stat.rindex(")")])
            fields = stat[stat.rindex(")") + 2:].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class Window:
    """What the service did over a measured window, counted by the service: its events row
    (seats booked and finalized, read from the database in one snapshot) every second on a
    thread, the PENDING rows and per-thread CPU at the window's start and end, and its own
    /metrics counters (summed over `servers`) at start and end. Only what was committed by a
    reading counts: what the window defers is still PENDING at its end."""
    COUNTERS = ("ticketd_bookings_committed_total", "ticketd_tickets_issued_total")

    def __init__(self, db, event_id, servers, every=1.0):
        import threading
        self.db, self.event_id, self.servers, self.every = db, event_id, servers, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.samples = []

    def read(self, full=False):
        if isinstance(self.db, PgDb):
            s = self.db.window_read(self.event_id, full)
        else:
            s = self.read_sqlite(full)
        if full:
            s["metrics"] = {k: sum(metric_sum(x.url, self.COUNTERS)[k] for x in self.servers) for k in self.COUNTERS}
            s["cpu"] = thread_cpu([x.proc.pid for x in self.servers])
            s["machine"] = machine_cpu()
        return s

    def read_sqlite(self, full):
        c = sqlite3.connect(self.db, timeout=30)
        try:
            c.execute("BEGIN")  # one snapshot for the counters and the PENDING rows
            t = time.time()
            booked, finalized = c.execute("SELECT booked_count, finalized_count FROM events WHERE id=?",
                                          (self.event_id,)).fetchone()
            s = {"t": t, "booked": booked, "finalized": finalized}
            if full:  # the partial index of PENDING rows: the finalizers' outbox
                s["pending"] = c.execute("SELECT COUNT(*) FROM bookings WHERE status='PENDING'").fetchone()[0]
            c.execute("COMMIT")
        finally:
            c.close()
        return s

    def run(self):
        t0 = self.samples[0]["t"]
        k = 1
        while not self.stop.wait(max(0.0, t0 + k * self.every - time.time())):
            self.samples.append(self.read())
            k += 1

    def __enter__(self):
        self.samples.append(self.read(full=True))
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.samples.append(self.read(full=True))

    def summary(self, after=5.0):
        a, b = self.samples[0], self.samples[-1]
        secs = b["t"] - a["t"]
        booked, issued = b["booked"] - a["booked"], b["finalized"] - a["finalized"]
        # the first sample at least `after` s into the window, for the rate once the delay has passed
        m = next((s for s in self.samples if s["t"] >= a["t"] + after - 0.05), b)
        later = max(b["t"] - m["t"], 1e-9)
        bps = booked / secs
        cpu = {k: v - a["cpu"].get(k, 0.0) for k, v in b["cpu"].items()}
        # what the two cores did in the window: the service, wrk, this script, and everything
        # else on the machine (another build, say) -- the noise next to each rate
        mach = {k: b["machine"][k] - a["machine"][k] for k in a["machine"] if k != "procs"}
        mach.update(server=sum(cpu.values()), cores=os.cpu_count())
        mach["others"] = mach["busy"] - mach["server"] - mach["wrk"] - mach["bench"] - mach["irq"]
        ours = {str(x.proc.pid) for x in self.servers} | {str(os.getpid())}
        top = {}
        for pid, (name, t) in b["machine"]["procs"].items():
            if pid not in ours:
                d = t - a["machine"]["procs"].get(pid, (name, 0.0))[1]
                top[name] = top.get(name, 0.0) + d
        mach["top_others"] = sorted(([k, round(v, 1)] for k, v in top.items() if v >= 0.5), key=lambda kv: -kv[1])[:4]
        return {
            "window_s": secs, "bookings": booked, "bookings_per_s": bps,
            "issued": issued, "issued_per_s": issued / secs, "issued_vs_bookings": issued / booked if booked else 0,
            "after_s": m["t"] - a["t"], "issued_per_s_after": (b["finalized"] - m["finalized"]) / later,
            "bookings_per_s_after": (b["booked"] - m["booked"]) / later,
            "pending_start": a["pending"], "pending_end": b["pending"],
            "backlog_end": b["booked"] - b["finalized"],
            "backlog_end_s": b["pending"] / bps if bps else None,
            "metrics_delta": {k: b["metrics"][k] - a["metrics"][k] for k in self.COUNTERS},
            "cpu_s": cpu, "machine_cpu_s": mach, "cpu_us_per_booking": {k: 1e6 * v / booked for k, v in cpu.items()} if booked else {},
            "per_second": [{"t": round(s["t"] - a["t"], 3), "booked": s["booked"] - a["booked"],
                            "issued": s["finalized"] - a["finalized"]} for s in self.samples],
        }


def keyed_pair(tmp, ceiling):
    """Row 2b: what an Idempotency-Key per request and a per-customer limit cost the hot event.

    Measured beside plain sales, each sale in a fresh process on a fresh database, so all start
    alike: nothing left to issue, the same file size. (Run on the process of row 2, the keyed
    sale shared the cores with the issuance of row 2's bookings, which that row defers past its
    own window: at the default 5 s delay, row 2 issues during half its window and the next sale
    on that process during all of it. That measured the backlog, not the keys: 64-68 % of plain
    there, 84-86 % with no issuance in either window.) Each sale issues its own tickets from 5 s
    into its window, as row 2 does.

    Four sales in the order plain, keyed, keyed, plain, and the ratio of the sums: this box's
    speed drifts by 10-30 % within a minute (other tenants), and a single plain-then-keyed pair
    read that drift as the keys' cost, one way or the other (72-87 % for one binary in one
    sitting); the mirrored order cancels a drift that is steady over the four windows."""
    runs = {"plain": [], "keyed": []}
    for name in ("plain", "keyed", "keyed", "plain"):
        script, limit = {"plain": ("book.lua", None), "keyed": ("book_keyed.lua", 4)}[name]
        db = os.path.join(tmp, f"2b-{name}-{len(runs[name])}.db")
        t = Ticketd(db, FINALIZE_DELAY_MS=5000)
        ev = create_event(t.url, 1_000_000_000,
                          **({"max_per_user": limit} if limit else {}))
        r = wrk(t.url, script, EVENT_ID=ev)
        # Stopped before counting: requests still queued when wrk left commit meanwhile, and a
        # count of keys taken before the count of rows would miss them.
        t.stop()
        booked, _, _ = db_counts(db, ev)
        c = sqlite3.connect(db, timeout=30)
        keys = c.execute("SELECT COUNT(*) FROM idempotency_keys").fetchone()[0]
        over = c.execute("SELECT COUNT(*) FROM customer_seats WHERE event_id=? AND seats > ?",
                         (ev, limit or 0)).fetchone()[0] if limit else 0
        c.close()
        r.update(booked=booked, rows=rows(db, ev)[1], keys=keys, over_limit=over,
                 ratio=r["rps"] / ceiling)
        runs[name].append(r)
    def mean(rs, field):
        return sum(r[field] for r in rs) / len(rs)
    # latency and wrk's socket errors: the second keyed sale's; counts and rates over all of them
    keyed = dict(runs["keyed"][1])
    keyed.update(rps=mean(runs["keyed"], "rps"), ratio=mean(runs["keyed"], "ratio"),
                 rows=sum(r["rows"] for r in runs["keyed"]),
                 booked=sum(r["booked"] for r in runs["keyed"]),
                 keys=sum(r["keys"] for r in runs["keyed"]),
                 over_limit=sum(r["over_limit"] for r in runs["keyed"]),
                 status_errors=sum(r["status_errors"] for r in runs["keyed"]),
                 sales=runs["keyed"],
                 plain=dict(runs["plain"][0], rps=mean(runs["plain"], "rps"),
                            ratio=mean(runs["plain"], "ratio"), sales=runs["plain"]))
    keyed["vs_plain"] = keyed["rps"] / keyed["plain"]["rps"]
    return keyed


def sustained(tmp, ceiling, delay_ms):
    """The sale going on and issuance keeping up (or not): one hot event that never sells out,
    wrk for the warm-up, then the measured window, with the finalizers running all along."""
    db = os.path.join(tmp, f"sustained-{delay_ms}.db")
    s = Ticketd(db, FINALIZE_DELAY_MS=delay_ms)
    # this process's own /health just before its sale: a second ceiling, next to the window,
    # for a machine whose speed moves within one run (row 1 ran a minute or more earlier)
    health = wrk(s.url, "health.lua", seconds=BESIDE_S)["rps"] if BESIDE_S else None
    ev = create_event(s.url, 1_000_000_000)
    warm = wrk(s.url, "book.lua", seconds=WARMUP, EVENT_ID=ev)
    with Window(db, ev, [s]) as w:
        r = wrk(s.url, "book.lua", seconds=SUSTAIN, EVENT_ID=ev)
    done = w.summary()
    r.update(done, delay_ms=delay_ms, warmup_s=WARMUP, warmup_rps=warm["rps"],
             ratio=done["bookings_per_s"] / ceiling, health_beside=health,
             ratio_beside=done["bookings_per_s"] / health if health else None)
    s.stop()
    return r


def create_events_fast(url, n, capacity):
    """Creates n events through the API, 16 requests at a time; returns the first id."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: create_event(url, capacity, f"Spread {i}"), range(n)))
    first = min(ids)
    assert sorted(ids) == list(range(first, first + n)), "ids are consecutive"
    return first


class PgDb:
    """One fresh database of the bench's PostgreSQL server: the SQLite rows' counts, read there."""
    def __init__(self, name):
        self.name = name
        self.url = pg().create_database(name)

    def counts(self, event_id):
        """(booked_count, capacity, finalized_count) of the event."""
        return tuple(pg().ints(self.name, "SELECT booked_count, capacity, ticketd_finalized(events) FROM events "
                                          f"WHERE id = {int(event_id)}"))

    def rows(self, event_id):
        """(seats, rows) of the event's bookings."""
        return tuple(pg().ints(self.name, "SELECT COALESCE(SUM(quantity), 0), COUNT(*) FROM bookings "
                                          f"WHERE event_id = {int(event_id)}"))

    def window_read(self, event_id, full):
        """Window.read's snapshot: one statement, so one snapshot."""
        t = time.time()
        pending = "(SELECT COUNT(*) FROM bookings WHERE status = 'PENDING')" if full else "0"
        booked, finalized, n = pg().ints(self.name, f"SELECT booked_count, ticketd_finalized(events), {pending} "
                                                    f"FROM events WHERE id = {int(event_id)}")
        s = {"t": t, "booked": booked, "finalized": finalized}
        if full:
            s["pending"] = n
        return s


def hot_postgres(ceiling, sqlite_row):
    """Row 2pg: row 2 (one hot event, issuance at the default 5 s delay, so it runs in the second
    half of the window) on PostgreSQL: a fresh process on a fresh database of the bench's server."""
    db = PgDb("bench_2pg")
    t = Ticketd(db.url, FINALIZE_DELAY_MS=5000)
    ev = create_event(t.url, 1_000_000_000)
    r = wrk(t.url, "book.lua", EVENT_ID=ev)
    # Stopped before counting: what was queued when wrk left commits meanwhile.
    t.stop()
    booked, cap, _ = db.counts(ev)
    seats, nrows = db.rows(ev)
    r.update(booked=booked, rows=nrows, ratio=r["rps"] / ceiling,
             ok=r["requests"] - r["status_errors"], oversold=booked > cap or seats != booked)
    if sqlite_row:
        r["vs_sqlite"] = r["rps"] / sqlite_row["rps"]
    return r


def cluster(tmp, ceiling, pg_db=None):
    """Row 5 (SQLite: three replicas sharing one file) or, with `pg_db` (the name of a fresh
    database of the bench's PostgreSQL server), row 5pg."""
    pgdb = PgDb(pg_db) if pg_db else None
    db = pgdb.url if pgdb else os.path.join(tmp, "cluster.db")
    rport = free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--loglevel", "warning"], stdout=subprocess.DEVNULL))
    time.sleep(0.3)
    reps = [Ticketd(db, REDIS_URL=f"redis://127.0.0.1:{rport}/", FINALIZE_DELAY_MS=5000, REPLICA_ID=f"r{i}")
            for i in range(3)]
    run = os.path.join(tmp, "nginx-" + (pg_db or "sqlite"))
    os.makedirs(run)
    port = free_port()
    with open(os.path.join(run, "nginx.conf"), "w") as f:
        f.write(nginx_conf(run, port, [r.port for r in reps]))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ng = subprocess.Popen([nginx, "-p", run, "-c", os.path.join(run, "nginx.conf"), "-e", "stderr"])
    procs.append(ng)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    cap = 10_000_000
    ev = create_event(url, cap)
    # issuance (through the Redis Stream, every replica's finalizers) over the same window
    with Window(pgdb or db, ev, reps) as w:
        r = wrk(url, "book.lua", EVENT_ID=ev)
    if pgdb is None:
        booked, capacity, _ = db_counts(db, ev)
        seats, nrows = rows(db, ev)
        r.update(ratio=r["rps"] / ceiling, booked=booked, capacity=capacity, rows=nrows,
                 oversold=booked > capacity or seats != booked, window=w.summary())
    ng.send_signal(signal.SIGTERM)
    for rep in reps:
        rep.stop()
    if pgdb is not None:
        # Counted once every replica has stopped: what wrk left in flight is committed (or not)
        # by then. Every 200 is a row; a row beyond them is a request wrk stopped waiting for (at
        # most one per connection).
        booked, capacity, _ = pgdb.counts(ev)
        seats, nrows = pgdb.rows(ev)
        ok = r["requests"] - r["status_errors"]
        r.update(ratio=r["rps"] / ceiling, booked=booked, capacity=capacity, rows=nrows, ok=ok,
                 oversold=booked > capacity or seats != booked or not 0 <= nrows - ok <= CONNS,
                 window=w.summary())
    return r


def issuance(tmp):
    out = {}
    # a) 50,000 bookings made while issuance is parked (a very long delivery), then a restart
    # with zero delay: the pickup sweep plus issuance, measured alone.
    db = os.path.join(tmp, "issue.db")
    s = Ticketd(db, FINALIZE_DELAY_MS=3_600_000)
    ev = create_event(s.url, 50_000)
    wrk(s.url, "book.lua", seconds=30, EVENT_ID=ev)
    booked = db_counts(db, ev)[0]
    s.stop()
    t0 = time.time()
    s = Ticketd(db, FINALIZE_DELAY_MS=0)
    t1 = wait_finalized(db, booked, 300)
    out["zero_delay"] = {"bookings": booked, "seconds": t1 - t0 if t1 else None,
                         "tickets_per_s": booked / (t1 - t0) if t1 else 0}
    s.stop()
    # b) 2,000 bookings with the default 5,000 ms delivery: from the first booking to the last ticket.
    db = os.path.join(tmp, "issue5s.db")
    s = Ticketd(db)
    ev = create_event(s.url, 2_000)
    t0 = time.time()
    wrk(s.url, "book.lua", seconds=2, EVENT_ID=ev)
    booked = db_counts(db, ev)[0]
    t1 = wait_finalized(db, booked, 120)
    out["default_delay"] = {"bookings": booked, "seconds": t1 - t0 if t1 else None}
    s.stop()
    return out


def memory(tmp):
    db = os.path.join(tmp, "mem.db")
    s = Ticketd(db, FINALIZE_DELAY_MS=0)
    s.stop()
    c = sqlite3.connect(db)
    c.executemany("INSERT INTO events (title, capacity, booked_count) VALUES (?, 1000, 0)",
                  ((f"Mem {i}",) for i in range(100_000)))
    c.commit()
    first = c.execute("SELECT MIN(id) FROM events").fetchone()[0]
    c.close()
    s = Ticketd(db, FINALIZE_DELAY_MS=0)
    base = s.status("VmRSS")
    r = wrk(s.url, "sweep.lua", seconds=max(SECONDS, 20), EVENT_MIN=first, EVENT_MAX=first + 99_999)
    c = sqlite3.connect(db)
    touched = c.execute("SELECT COUNT(DISTINCT event_id) FROM bookings").fetchone()[0]
    c.close()
    peak = s.status("VmHWM")
    actors = http("GET", s.url + "/ready")[1]["event_actors"]
    deadline = time.time() + 120
    while time.time() < deadline and http("GET", s.url + "/ready")[1]["event_actors"] > 0:
        time.sleep(1)
    # The service hands freed memory back on a 2 s check after mass passivation: read the
    # RSS once it has had that chance (the lowest of 5 s of samples).
    after = s.status("VmRSS")
    for _ in range(10):
        time.sleep(0.5)
        after = min(after, s.status("VmRSS"))
    left = http("GET", s.url + "/ready")[1]["event_actors"]
    s.stop()
    return {"rss_start_mib": base, "events_booked": touched, "actors_live": actors, "peak_rss_mib": peak,
            "rss_after_passivation_mib": after, "actors_after": left, "booking_rps": r["rps"]}


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release,
            "wrk": "wrk -t%d -c%d -d%ds (loopback, same machine)" % (THREADS, CONNS, SECONDS),
            "sustained": "wrk -t%d -c%d: %d s warm-up, then %d s measured" % (THREADS, CONNS, WARMUP, SUSTAIN)}


def profile(res):
    """Where the server's CPU went in each measured window: per thread name, µs per booking
    committed (from /proc/<pid>/task/*/stat at the window's start and end)."""
    out = []
    for key, r in sorted(res["scenarios"].items()):
        r = r.get("window", r)
        if r.get("cpu_us_per_booking"):
            parts = sorted(r["cpu_us_per_booking"].items(), key=lambda kv: -kv[1])
            out.append(f"{key}: server CPU per booking " + ", ".join(f"{k} {v:.1f} µs" for k, v in parts if v >= 0.05)
                       + f" (window {r['window_s']:.1f} s, {r['bookings']} bookings, {r['issued']} issued)")
            m = r.get("machine_cpu_s")
            if m:
                out.append(f"  the {m['cores']} cores over the window: {100 * m['busy'] / (m['cores'] * r['window_s']):.0f} % busy"
                           f" -- ticketd {m['server']:.1f} s, wrk {m['wrk']:.1f} s, bench {m['bench']:.1f} s, "
                           # softirq time is partly charged to the processes too: "else" is a bound
                           f"interrupts (loopback TCP) {m['irq']:.1f} s, everything else ≤ {max(m['others'] + m['irq'], 0):.1f} s "
                           f"({', '.join(f'{k} {v} s' for k, v in m['top_others']) or '-'}), steal {m['steal']:.1f} s "
                           f"(CPU seconds)")
    return "\n".join(out)


def two_b_order(r):
    """Row 2b's four sales in the order they ran (results of older runs hold one pair)."""
    p, k = r["plain"].get("sales", [r["plain"]]), r.get("sales", [r])
    return [s["rps"] for s in (p[:1] + k + p[1:])]


def table(res):
    S = res["scenarios"]
    def ms(us):
        return f"{us / 1000:.2f} ms"
    def pct(r):
        # a run without row 1 has no ceiling to judge by (`BENCH_ONLY=2b`): no ratio
        return f"{100 * r['ratio']:.0f} %" if "1_ceiling" in S else "—"
    lines = ["| scenario | result | ratio to ceiling | p99 | target |", "|---|---|---|---|---|"]
    if "1_ceiling" in S:
        r = S["1_ceiling"]
        lines.append(f"| 1 ceiling: GET /health | {r['rps']:.0f} req/s | 100 % | {ms(r['p99_us'])} | |")
    for key in sorted((k for k in S if k.startswith("2s_sustained_")), key=lambda k: S[k]["delay_ms"]):
        r = S[key]
        d = r["delay_ms"]
        name = f"delay {d} ms" + (" (default)" if d == DEFAULT_DELAY_MS else "")
        after = (f"; after its first {r['after_s']:.0f} s {r['issued_per_s_after']:.0f} issued/s "
                 f"({r['bookings_per_s_after']:.0f} bookings/s)" if d == DEFAULT_DELAY_MS else "")
        target = ("≥ 40 %; issued ≥ 95 % of bookings; PENDING at end ≤ 1 s of sales" if d == 0 else
                  "≥ 40 %; ≥ 10,000 issued/s (or = bookings/s) after the first 5 s")
        lines.append(f"| 2s sustained sale, {name}: {r['window_s']:.0f} s after {r['warmup_s']} s warm-up, "
                     f"issuing alongside | {r['bookings_per_s']:.0f} bookings/s committed (wrk {r['rps']:.0f} req/s, "
                     f"{r['status_errors']} non-200, {r['errors']} errors); {r['issued_per_s']:.0f} tickets "
                     f"issued/s = {100 * r['issued_vs_bookings']:.0f} % of bookings{after}; PENDING at end "
                     f"{r['pending_end']} = {r['backlog_end_s']:.1f} s of sales | {pct(r)}"
                     + (f" ({100 * r['ratio_beside']:.0f} % of its own /health, {r['health_beside']:.0f} req/s, "
                        f"just before)" if r.get("ratio_beside") else "") + " | "
                     f"{ms(r['p99_us'])} | {target} |")
    if "2_hot_event" in S:
        r = S["2_hot_event"]
        lines.append(f"| 2 hot event: POST /book, {res['seconds']} s (issuance deferred past the window: "
                     f"default 5 s delay) | {r['rps']:.0f} bookings/s, {r['status_errors']} non-200, "
                     f"{r['errors']} errors; {r['rows']} rows | {pct(r)} | {ms(r['p99_us'])} "
                     f"| ≥ 40 %, p99 ≤ 10 ms, 0 errors |")
    if "2pg_hot_event_postgres" in S:
        r = S["2pg_hot_event_postgres"]
        vs = f" = {100 * r['vs_sqlite']:.0f} % of 2" if "vs_sqlite" in r else ""
        lines.append(f"| 2pg hot event on PostgreSQL, one replica, fsync on (fresh process and database) | "
                     f"{r['rps']:.0f} bookings/s{vs}, {r['status_errors']} non-200, {r['errors']} errors; "
                     f"{r['rows']} rows, booked {r['booked']}, oversold: {'YES' if r['oversold'] else 'no'} | "
                     f"{pct(r)} | {ms(r['p99_us'])} | ≥ 50 % of 2 |")
    for key in sorted(k for k in S if k.startswith("2m_hot_scraped_")):
        r = S[key]
        every = f"scraped every {r['every_ms']} ms" if r["every_ms"] else "not scraped (control)"
        lines.append(f"| 2m hot event, /metrics {every} | {r['rps']:.0f} bookings/s "
                     f"= {100 * r['vs_plain']:.0f} % of 2, {r['status_errors']} non-200; {r['scrapes']} scrapes "
                     f"({r['scrape_failures']} failed, p99 {r['scrape_p99_ms']:.1f} ms, {r['scrape_bytes']} bytes) | "
                     f"{pct(r)} | {ms(r['p99_us'])} | within noise of 2 |")
    if "2b_hot_keyed_limited" in S:
        r = S["2b_hot_keyed_limited"]
        lines.append(f"| 2b hot event, Idempotency-Key + max_per_user 4 (2 seats each), fresh process | "
                     f"{r['rps']:.0f} bookings/s = {100 * r['vs_plain']:.0f} % of the plain sales beside it "
                     f"({r['plain']['rps']:.0f} bookings/s; order plain, keyed, keyed, plain: "
                     f"{', '.join(f'{x:.0f}' for x in two_b_order(r))}; each a fresh process), "
                     f"{r['status_errors']} non-200; {r['rows']} rows, "
                     f"{r['keys']} keys, {r['over_limit']} customers over the limit | {pct(r)} | "
                     f"{ms(r['p99_us'])} | ≥ 80 % of plain |")
    if "3_sold_out" in S:
        r = S["3_sold_out"]
        lines.append(f"| 3 sold-out flood (409s) | {r['rps']:.0f} req/s; {r['booked']} seat sold | "
                     f"{pct(r)} | {ms(r['p99_us'])} | ≥ 70 % |")
    if "4_spread" in S:
        r = S["4_spread"]
        lines.append(f"| 4 spread over 10,000 events | {r['rps']:.0f} bookings/s | {pct(r)} | "
                     f"{ms(r['p99_us'])} | ≥ 30 % |")
    if "5_cluster" in S:
        r = S["5_cluster"]
        lines.append(f"| 5 cluster: 3 replicas + nginx + Redis | {r['rps']:.0f} bookings/s; booked {r['booked']} = "
                     f"{r['rows']} rows, oversold: {'YES' if r['oversold'] else 'no'} | {pct(r)} | "
                     f"{ms(r['p99_us'])} | ≥ 10,000/s, p99 ≤ 50 ms, 0 oversell |")
        w = r.get("window")
        if w:
            lines.append(f"| 5 cluster, issuance over the same window (delay 5,000 ms, Redis Stream) | "
                         f"{w['bookings_per_s']:.0f} bookings/s committed; {w['issued_per_s']:.0f} tickets "
                         f"issued/s = {100 * w['issued_vs_bookings']:.0f} % of bookings; after the first "
                         f"{w['after_s']:.0f} s {w['issued_per_s_after']:.0f} issued/s "
                         f"({w['bookings_per_s_after']:.0f} bookings/s); PENDING at end {w['pending_end']} | | | "
                         f"issuance keeps pace with sales (issue 14) |")
    if "5pg_cluster_postgres" in S:
        r = S["5pg_cluster_postgres"]
        vs = f" = {r['vs_sqlite']:.2f}× row 5" if "vs_sqlite" in r else ""
        lines.append(f"| 5pg cluster on PostgreSQL: 3 replicas + nginx + Redis, fsync on | {r['rps']:.0f} bookings/s{vs}, "
                     f"{r['status_errors']} non-200, {r['errors']} errors; booked {r['booked']} = {r['rows']} rows "
                     f"({r['ok']} answered 200, {r['rows'] - r['ok']} in flight at wrk's end), oversold: "
                     f"{'YES' if r['oversold'] else 'no'} | {pct(r)} | {ms(r['p99_us'])} | "
                     f"≥ 1.5× row 5, p99 ≤ 50 ms, 0 oversell |")
    if "6_issuance" in S:
        a, b = S["6_issuance"]["zero_delay"], S["6_issuance"]["default_delay"]
        lines.append(f"| 6a issuance, 0 ms delay | {a['bookings']} tickets in {a['seconds']:.1f} s = "
                     f"{a['tickets_per_s']:.0f} tickets/s | | | ≥ 5,000/s |")
        lines.append(f"| 6b issuance, 5,000 ms delay | {b['bookings']} tickets in {b['seconds']:.1f} s "
                     f"(from the first booking) | | | ≤ 10 s |")
    if "7_memory" in S:
        r = S["7_memory"]
        lines.append(f"| 7 memory | {r['events_booked']} events booked, {r['actors_live']} actors: peak RSS "
                     f"{r['peak_rss_mib']:.0f} MiB; after passivation ({r['actors_after']} actors) "
                     f"{r['rss_after_passivation_mib']:.0f} MiB | | | peak ≤ 300 MiB, ≤ 100 MiB after |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
