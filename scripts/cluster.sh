#!/usr/bin/env bash
# `make cluster`: a local redis-server, three ticketd replicas sharing one SQLite file, and nginx
# on :8000 in front of them, without Docker. Ctrl-C stops them all, gracefully and in order.
#
# `make cluster DB=postgres`: the replicas on a PostgreSQL server of the cluster's own instead
# (never the machine's: initdb into ./cluster-pg, `pg_ctl start` on 127.0.0.1:$PG_PORT, 6391 by
# default, fsync on). Its data survives between runs, as cluster.db does; delete ./cluster-pg for
# a fresh database. PostgreSQL refuses to run as root: as root its commands run as `postgres`.
#
# The children run in sessions of their own (setsid), so a terminal's Ctrl-C reaches only this
# script: sent to the whole group, it made nginx cut its clients at once (SIGINT is its fast
# shutdown) and the replicas see a second signal from the cleanup (a forced stop), and bookings
# committed by then lost their 200. The cleanup stops the front first: nginx finishes the
# requests it carries (SIGQUIT), then each replica stops (one SIGTERM: it answers what it
# accepted and commits what its writer holds), then Redis.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
REDIS_PORT=${REDIS_PORT:-6390}
DB=${DB:-sqlite}
case "$DB" in
  sqlite) DATABASE_URL=${DATABASE_URL:-sqlite://cluster.db} ;;
  postgres)
    PG_PORT=${PG_PORT:-6391}
    # The server's directory: data/ (the cluster), server.log.
    PG_DIR=$(mkdir -p "${PG_DIR:-cluster-pg}" && cd "${PG_DIR:-cluster-pg}" && pwd)
    if [ -n "${DATABASE_URL:-}" ]; then
      echo "DB=postgres: the replicas use the cluster's own PostgreSQL, not DATABASE_URL=$DATABASE_URL" >&2
    fi
    DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/ticketd"
    ;;
  *) echo "DB=$DB: expected sqlite or postgres" >&2; exit 2 ;;
esac
# TICKETD_BIN runs another build and skips the release build (the tests run the debug binary).
BIN=${TICKETD_BIN:-./target/release/ticketd}
RUN=$(mktemp -d /tmp/ticketd-cluster.XXXXXX)
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# The organizer token: yours if ADMIN_TOKEN is set, else a fresh one printed below.
ADMIN_TOKEN=${ADMIN_TOKEN:-$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')}
export ADMIN_TOKEN

[ -n "${TICKETD_BIN:-}" ] || cargo build --release --bin ticketd

redis="" nginx="" replicas=() pg_started="" pg_watch=""
# Signals `pid` and waits until it has exited.
stop() {
  [ -n "$2" ] || return 0
  kill -s "$1" "$2" 2>/dev/null || true
  wait "$2" 2>/dev/null || true
}
cleanup() {
  trap - EXIT INT TERM
  echo "stopping the cluster: nginx, then the replicas, then redis..."
  stop QUIT "$nginx"
  for p in "${replicas[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${replicas[@]}"; do wait "$p" 2>/dev/null || true; done
  stop TERM "$redis"
  if [ -n "$pg_started" ]; then
    stop TERM "$pg_watch"
    echo "stopping PostgreSQL (its data stays in $PG_DIR/data)..."
    pg pg_ctl stop -D "$PG_DIR/data" -m fast -w -t 60 >/dev/null || true
  fi
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'cleanup; exit 0' INT TERM

# PostgreSQL (DB=postgres) ------------------------------------------------------------------
# The server binaries: PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian's layout, not
# on PATH), else `pg_config --bindir` -- as tests/common/postgres.rs finds them.
pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$d" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return; fi
  pg_config --bindir 2>/dev/null \
    || { echo "no PostgreSQL server found: install Debian's postgresql (make deps)" >&2; exit 1; }
}
# Runs one of the server's programs, as `postgres` when we are root, from the server's directory.
pg() {
  local prog=$1
  shift
  if [ "$(id -u)" = 0 ]; then
    (cd "$PG_DIR" && LC_ALL=C runuser -u postgres -- "$PGBIN/$prog" "$@")
  else
    (cd "$PG_DIR" && LC_ALL=C "$PGBIN/$prog" "$@")
  fi
}
start_postgres() {
  PGBIN=$(pg_bin)
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$PG_DIR"
    runuser -u postgres -- test -w "$PG_DIR" || {
      echo "the postgres user cannot write $PG_DIR (a parent directory closed to others?):" \
        "set PG_DIR to a directory it can reach" >&2
      exit 1
    }
  fi
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    echo "initdb: a new PostgreSQL cluster in $PG_DIR/data"
    pg initdb -D "$PG_DIR/data" -U postgres -A trust -E UTF8 --no-instructions >/dev/null
  fi
  if pg pg_ctl status -D "$PG_DIR/data" >/dev/null 2>&1; then
    echo "a PostgreSQL server already runs on $PG_DIR/data (a cluster still running, or one" \
      "left by a killed run): stop it with: $( [ "$(id -u)" = 0 ] && echo 'runuser -u postgres -- ')$PGBIN/pg_ctl stop -D $PG_DIR/data" >&2
    exit 1
  fi
  # The socket in a directory of its own (the run dir is root's, closed to `postgres`).
  PG_SOCK=$(mktemp -d "$RUN/pg.XXXXXX")
  chmod 755 "$RUN"
  [ "$(id -u)" = 0 ] && chown postgres: "$PG_SOCK"
  # pg_ctl puts the server in a session of its own: a terminal's Ctrl-C does not reach it.
  pg_started=1
  pg pg_ctl start -w -t 60 -D "$PG_DIR/data" -l "$PG_DIR/server.log" -o "-p $PG_PORT \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories='$PG_SOCK' -c fsync=on \
    -c synchronous_commit=on -c full_page_writes=on -c max_connections=200" >/dev/null || {
    pg_started=""
    # A start that timed out may have left a server behind.
    pg pg_ctl stop -D "$PG_DIR/data" -m immediate >/dev/null 2>&1 || true
    echo "PostgreSQL did not start on 127.0.0.1:$PG_PORT (PG_PORT taken?); $PG_DIR/server.log:" >&2
    tail -n 5 "$PG_DIR/server.log" >&2
    exit 1
  }
  if [ -z "$(pg psql -X -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'ticketd'")" ]; then
    pg createdb -h 127.0.0.1 -p "$PG_PORT" -U postgres ticketd
  fi
  # The cluster stops as a whole when its server goes away (as when any other part exits).
  local pid
  pid=$(head -n 1 "$PG_DIR/data/postmaster.pid")
  while kill -0 "$pid" 2>/dev/null; do sleep 1; done &
  pg_watch=$!
}
[ "$DB" = postgres ] && start_postgres

setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no --loglevel warning &
redis=$!

upstreams=""
for i in 1 2 3; do
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" PORT=$((PORT + i)) DATABASE_URL="$DATABASE_URL" \
    REPLICA_ID="r$i" setsid "$BIN" &
  replicas+=($!)
  upstreams+="    server 127.0.0.1:$((PORT + i)) max_fails=0;"$'\n'
done

user=""
[ "$(id -u)" = 0 ] && user="user root;"
cat > "$RUN/nginx.conf" <<CONF
$user
worker_processes 1;
daemon off;
pid $RUN/nginx.pid;
error_log $RUN/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $RUN/body;
  proxy_temp_path $RUN/proxy;
  fastcgi_temp_path $RUN/fcgi;
  uwsgi_temp_path $RUN/uwsgi;
  scgi_temp_path $RUN/scgi;
  upstream ticketd {
$upstreams    keepalive 512;
  }
  server {
    listen 127.0.0.1:$PORT backlog=8192;
    location / {
      proxy_pass http://ticketd;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_connect_timeout 1s;
      proxy_next_upstream error timeout;
    }
  }
}
CONF
setsid "$NGINX" -p "$RUN" -c "$RUN/nginx.conf" -e stderr &
nginx=$!

echo "ticketd cluster: nginx on http://127.0.0.1:$PORT -> replicas :$((PORT + 1)) :$((PORT + 2)) :$((PORT + 3)), redis :$REDIS_PORT, $DATABASE_URL"
echo "organizer token: export ADMIN_TOKEN=$ADMIN_TOKEN"
[ "$DB" = postgres ] && echo "PostgreSQL: 127.0.0.1:$PG_PORT, data in $PG_DIR/data (kept between runs), log $PG_DIR/server.log"
echo "Ctrl-C stops them all."
# Exit (and stop everything) as soon as any of them dies.
wait -n
