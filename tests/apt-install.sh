#!/usr/bin/env bash
# Install Debian packages (as root) for the heavier suites, without letting them start their own
# daemons: a policy-rc.d that exits 101 keeps an etcd on 2379, an HAProxy, a PostgreSQL cluster on
# 5432 or a pgbouncer on 6432 from starting; the suites run their own. Usage: apt-install.sh PKG...
set -euo pipefail

[ $# -gt 0 ] || exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing $*: run as root (apt-get install $*)" >&2
    exit 1
fi
echo "installing $*"
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
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
