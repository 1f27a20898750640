#!/usr/bin/env bash
# `make cluster`: a local redis-server, three ticketd replicas sharing one SQLite file, and nginx
# on :8000 in front of them, without Docker. Ctrl-C stops them all, gracefully and in order.
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
DATABASE_URL=${DATABASE_URL:-sqlite://cluster.db}
# TICKETD_BIN runs another build and skips the release build (the tests run the debug binary).
BIN=${TICKETD_BIN:-./target/release/ticketd}
RUN=$(mktemp -d /tmp/ticketd-cluster.XXXXXX)
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# The organizer token: yours if ADMIN_TOKEN is set, else a fresh one printed below.
ADMIN_TOKEN=${ADMIN_TOKEN:-$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')}
export ADMIN_TOKEN

[ -n "${TICKETD_BIN:-}" ] || cargo build --release --bin ticketd

redis="" nginx="" replicas=()
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
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'cleanup; exit 0' INT TERM

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
echo "Ctrl-C stops them all."
# Exit (and stop everything) as soon as any of them dies.
wait -n
