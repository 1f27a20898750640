#!/usr/bin/env bash
# `make cluster`: a local redis-server, three ticketd replicas sharing one SQLite file, and nginx
# on :8000 in front of them, without Docker. Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
REDIS_PORT=${REDIS_PORT:-6390}
DATABASE_URL=${DATABASE_URL:-sqlite://cluster.db}
BIN=./target/release/ticketd
RUN=$(mktemp -d /tmp/ticketd-cluster.XXXXXX)
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# The organizer token: yours if ADMIN_TOKEN is set, else a fresh one printed below.
ADMIN_TOKEN=${ADMIN_TOKEN:-$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')}
export ADMIN_TOKEN

cargo build --release --bin ticketd

pids=()
cleanup() {
  trap - EXIT INT TERM
  echo "stopping the cluster..."
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no --loglevel warning &
pids+=($!)

upstreams=""
for i in 1 2 3; do
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" PORT=$((PORT + i)) DATABASE_URL="$DATABASE_URL" \
    "$BIN" &
  pids+=($!)
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
"$NGINX" -p "$RUN" -c "$RUN/nginx.conf" -e stderr &
pids+=($!)

echo "ticketd cluster: nginx on http://127.0.0.1:$PORT -> replicas :$((PORT + 1)) :$((PORT + 2)) :$((PORT + 3)), redis :$REDIS_PORT, $DATABASE_URL"
echo "organizer token: export ADMIN_TOKEN=$ADMIN_TOKEN"
echo "Ctrl-C stops them all."
# Exit (and stop everything) as soon as any of them dies.
wait -n
