#!/usr/bin/env bash
# Make sure the local Redis (127.0.0.1:6379) and Postgres (127.0.0.1:5432) answer, starting
# them from the Debian packages if they are down (installing the packages where missing).
set -euo pipefail

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  for _ in $(seq 1 60); do answers "$1" && return 0; sleep 0.5; done
  echo "services: nothing answers on 127.0.0.1:$1" >&2
  return 1
}

install_if_missing() {
  if ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    echo "services: installing redis-server and postgresql (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql >/dev/null
  fi
}

if ! answers 6379; then
  install_if_missing
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 6379
fi

if ! answers 5432; then
  install_if_missing
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
  wait_for 5432
fi

# The test database must exist and accept the postgres user without a password.
if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
  su postgres -c "psql -c 'create database test'" >/dev/null 2>&1 || true
fi
echo "services: redis and postgres answer on 127.0.0.1"
