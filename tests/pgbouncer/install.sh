#!/usr/bin/env bash
# Install Debian's pgbouncer (as root) when it is missing. A policy-rc.d that exits 101 keeps the
# package from starting its own daemon on 6432: tests/pgbouncer/bouncer.py runs its own.
set -euo pipefail

[ -x /usr/sbin/pgbouncer ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "pgbouncer is missing: run as root (apt-get install pgbouncer)" >&2
    exit 1
fi
echo "installing pgbouncer"
policy=/usr/sbin/policy-rc.d
saved=""
if [ -e "$policy" ]; then
    saved=$(mktemp)
    cp -p "$policy" "$saved"
fi
restore() {
    if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
}
trap restore EXIT
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 755 "$policy"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
