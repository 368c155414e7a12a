#!/usr/bin/env bash
# Shared set-up for scripts/test, scripts/demo and scripts/bench: installs
# what is missing, starts a throwaway PostgreSQL and Redis on free loopback
# ports in a temporary directory, and stops them on exit.
set -euo pipefail

KEEL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEEL_PACKAGES=(meson ninja-build pkg-config gcc libuv1-dev libpq-dev libhiredis-dev
  libwebsockets-dev libwebsockets-evlib-uv libjansson-dev libcriterion-dev postgresql redis-server
  pgbouncer prometheus chromium)

log() { printf '[keel] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

keel_install_deps() {
  local missing=()
  for p in "${KEEL_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
}

# Prints a TCP port on 127.0.0.1 that nothing listens on.
# Waits up to 5 s for the daemon whose pid file is $1 to accept connections
# on port $2. Fails when it is gone: a port free when probed can be taken
# (by any connection's local end) before the daemon binds it.
keel_wait_daemon() {
  local pidfile="$1" port="$2" pid
  for _ in $(seq 1 100); do
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
      && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  return 1
}

keel_free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  log "no free port found"
  return 1
}

keel_pg_bindir() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -n "$dir" ] || { log "PostgreSQL binaries not found"; return 1; }
  echo "$dir"
}

KEEL_TMP=""
KEEL_PG_DATA=""
KEEL_REDIS_PIDFILE=""
KEEL_PGBOUNCER_PIDFILE=""

keel_stop_services() {
  local status=$?
  if [ -n "$KEEL_PG_DATA" ] && [ -f "$KEEL_PG_DATA/postmaster.pid" ]; then
    keel_as_pg "$(keel_pg_bindir)/pg_ctl" -D "$KEEL_PG_DATA" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "$KEEL_PGBOUNCER_PIDFILE" ] && [ -f "$KEEL_PGBOUNCER_PIDFILE" ]; then
    kill "$(cat "$KEEL_PGBOUNCER_PIDFILE")" 2>/dev/null || true
  fi
  if [ -n "$KEEL_REDIS_PIDFILE" ] && [ -f "$KEEL_REDIS_PIDFILE" ]; then
    kill "$(cat "$KEEL_REDIS_PIDFILE")" 2>/dev/null || true
  fi
  if [ -n "$KEEL_TMP" ]; then rm -rf "$KEEL_TMP"; fi
  return $status
}

# Runs a command as the postgres user when we are root (initdb refuses root).
keel_as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

keel_start_services() {
  KEEL_TMP="$(mktemp -d /tmp/keel-services.XXXXXX)"
  chmod 755 "$KEEL_TMP"
  trap keel_stop_services EXIT
  trap 'exit 130' INT TERM

  local bindir pg_port redis_port
  bindir="$(keel_pg_bindir)"
  KEEL_PG_DATA="$KEEL_TMP/pg"
  mkdir -p "$KEEL_PG_DATA"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$KEEL_PG_DATA"; fi
  keel_as_pg "$bindir/initdb" -D "$KEEL_PG_DATA" -U postgres -A trust -E UTF8 --no-locale >"$KEEL_TMP/initdb.log" 2>&1 \
    || { cat "$KEEL_TMP/initdb.log" >&2; return 1; }
  # A port free when probed can be taken before the server binds it (other
  # runs start servers too): try a few ports before giving up.
  local started=0
  for _ in 1 2 3 4 5; do
    pg_port="$(keel_free_port)"
    if keel_as_pg "$bindir/pg_ctl" -D "$KEEL_PG_DATA" -l "$KEEL_PG_DATA/server.log" -w -t 60 \
      -o "-p $pg_port -k $KEEL_PG_DATA -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=600" \
      start >/dev/null; then
      started=1
      break
    fi
  done
  [ "$started" = 1 ] || { cat "$KEEL_PG_DATA/server.log" >&2; return 1; }
  export KEEL_TEST_PG="host=127.0.0.1 port=$pg_port user=postgres dbname=postgres"
  export KEEL_TEST_PG_DATA="$KEEL_PG_DATA"
  export KEEL_TEST_PG_BINDIR="$bindir"

  KEEL_REDIS_PIDFILE="$KEEL_TMP/redis.pid"
  started=0
  for _ in 1 2 3 4 5; do
    redis_port="$(keel_free_port)"
    rm -f "$KEEL_REDIS_PIDFILE"
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
      --daemonize yes --pidfile "$KEEL_REDIS_PIDFILE" --dir "$KEEL_TMP" \
      --logfile "$KEEL_TMP/redis.log" >/dev/null
    if keel_wait_daemon "$KEEL_REDIS_PIDFILE" "$redis_port"; then
      started=1
      break
    fi
  done
  [ "$started" = 1 ] || { tail -5 "$KEEL_TMP/redis.log" >&2; return 1; }
  export KEEL_TEST_REDIS="127.0.0.1:$redis_port"
  keel_start_pgbouncer "$pg_port"
  log "PostgreSQL: $KEEL_TEST_PG"
  log "PgBouncer (transaction mode): $KEEL_TEST_PG_POOLER"
  log "Redis: $KEEL_TEST_REDIS"
}

# PgBouncer in transaction mode in front of the throwaway server (issue 20):
# exports KEEL_TEST_PG_POOLER, a conninfo through it. It refuses to run as
# root, so it runs as the postgres user.
keel_start_pgbouncer() {
  local pg_port="$1" dir="$KEEL_TMP/pgbouncer" port
  mkdir -p "$dir"
  KEEL_PGBOUNCER_PIDFILE="$dir/pgbouncer.pid"
  for _ in 1 2 3 4 5; do
    port="$(keel_free_port)"
    rm -f "$KEEL_PGBOUNCER_PIDFILE"
    keel_write_pgbouncer_ini "$dir" "$pg_port" "$port"
    if keel_as_pg pgbouncer -d "$dir/pgbouncer.ini" >/dev/null 2>&1 \
      && keel_wait_daemon "$KEEL_PGBOUNCER_PIDFILE" "$port"; then
      export KEEL_TEST_PG_POOLER="host=127.0.0.1 port=$port user=postgres dbname=postgres"
      return 0
    fi
  done
  cat "$dir/pgbouncer.log" >&2 2>/dev/null
  return 1
}

keel_write_pgbouncer_ini() {
  local dir="$1" pg_port="$2" port="$3"
  printf '"postgres" ""\n' >"$dir/users.txt"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
server_reset_query =
ignore_startup_parameters = extra_float_digits,options
pidfile = $dir/pgbouncer.pid
logfile = $dir/pgbouncer.log
admin_users = postgres
INI
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres:postgres "$dir"; fi
}
