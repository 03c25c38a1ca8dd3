#!/usr/bin/env bash
# Install what the HA test cluster needs, from Debian's packages (as root): Patroni, etcd, HAProxy and
# PostgreSQL 15. A policy-rc.d that exits 101 keeps the packages from starting their own daemons
# (an etcd on 2379, an HAProxy, a PostgreSQL cluster on 5432): tests/ha/cluster.py runs its own.
set -euo pipefail

need=()
[ -x /usr/bin/patroni ] || need+=(patroni)
[ -x /usr/bin/etcd ] || need+=(etcd-server)
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/psql ] || need+=(postgresql-client-15)
command -v ss >/dev/null || need+=(iproute2)  # cluster.py finds Patroni by its REST port with ss -ltnp
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${need[*]}: run as root (apt-get install)" >&2
    exit 1
fi
echo "installing ${need[*]}"
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
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
