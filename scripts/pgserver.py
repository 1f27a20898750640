"""A private PostgreSQL server for the benchmarks (scripts/bench.py), stdlib only.

`initdb` into a fresh directory, `pg_ctl start` on a free port of loopback, never the machine's
own instance (5432). PostgreSQL refuses to run as root: as root, its programs run as the
`postgres` user (`runuser`), in a directory it owns -- as tests/common/postgres.rs and
scripts/cluster.sh do. fsync, synchronous_commit and full_page_writes are on: the numbers are
those of durable commits, as SQLite's `synchronous=FULL` rows are. `initdb --no-sync` only skips
flushing the freshly made template files once; the server syncs every commit.

    pg = PgServer()                    # started
    url = pg.create_database("row_x")  # postgres://postgres@127.0.0.1:PORT/row_x
    pg.query("row_x", "SELECT 1")      # [["1"]]
    pg.stop()                          # stopped, directory deleted
"""
import glob, os, shutil, socket, subprocess, tempfile

__all__ = ["PgServer", "pg_bin"]


def pg_bin():
    """The server binaries: PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian's layout,
    not on PATH), else `pg_config --bindir`."""
    if os.environ.get("PG_BIN"):
        return os.environ["PG_BIN"]
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        v = os.path.basename(os.path.dirname(d))
        if v.isdigit() and os.path.exists(os.path.join(d, "pg_ctl")):
            found.append((int(v), d))
    if found:
        return max(found)[1]
    try:
        return subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit("no PostgreSQL server found: install Debian's postgresql (make deps)")


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class PgServer:
    def __init__(self, max_connections=200):
        self.bin = pg_bin()
        self.as_postgres = os.geteuid() == 0
        self.dir = tempfile.mkdtemp(prefix="ticketd-bench-pg-")
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.running = False
        self.run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--no-sync", "--no-instructions")
        # A port taken between our probe and the server's bind: try another.
        for attempt in range(5):
            self.port = _free_port()
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                    f"-c unix_socket_directories='{self.dir}' -c fsync=on -c synchronous_commit=on "
                    f"-c full_page_writes=on -c max_connections={max_connections}")
            r = self.run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l", self.log,
                         "-o", opts, check=False)
            if r.returncode == 0:
                self.running = True
                return
            self.run("pg_ctl", "stop", "-m", "immediate", "-D", self.data, check=False)
        log = open(self.log).read() if os.path.exists(self.log) else ""
        self.stop()
        raise RuntimeError("PostgreSQL did not start:\n" + log[-2000:])

    def run(self, program, *args, check=True):
        """One of the server's programs, as `postgres` when we are root, from its directory."""
        cmd = [os.path.join(self.bin, program), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, cwd=self.dir, env=dict(os.environ, LC_ALL="C"),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{program}: {r.stdout}{r.stderr}")
        return r

    def url(self, database):
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name):
        """A fresh, empty database (dropped first if it exists); its URL."""
        self.run("dropdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                 "--if-exists", name)
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def query(self, database, sql):
        """The rows of one statement (each a list of text fields; NULL is ""), through psql."""
        r = self.run("psql", "-X", "-q", "-t", "-A", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                     "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
                     "-c", sql)
        return [line.split("\t") for line in r.stdout.splitlines() if line]

    def ints(self, database, sql):
        """The first row of `sql` as integers."""
        return [int(x or 0) for x in self.query(database, sql)[0]]

    def stop(self):
        """Stops the server (`-m fast`) and deletes its directory."""
        if self.running:
            self.run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", self.data, check=False)
            self.running = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
