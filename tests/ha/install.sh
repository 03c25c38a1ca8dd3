#!/usr/bin/env bash
# Install what the HA test cluster needs, from Debian's packages (as root), each only if missing:
# Patroni, etcd, HAProxy and PostgreSQL 15 (tests/ha/cluster.py runs its own daemons).
set -euo pipefail

need=()
[ -x /usr/bin/patroni ] || need+=(patroni)
[ -x /usr/bin/etcd ] || need+=(etcd-server)
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/psql ] || need+=(postgresql-client-15)
command -v ss >/dev/null || need+=(iproute2)  # cluster.py finds Patroni by its REST port with ss -ltnp
exec bash "$(dirname "$0")/../apt-install.sh" "${need[@]}"
