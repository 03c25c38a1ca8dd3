#!/usr/bin/env bash
# Install Debian's pgbouncer when it is missing (tests/pgbouncer/bouncer.py runs its own).
set -euo pipefail

[ -x /usr/sbin/pgbouncer ] && exit 0
exec bash "$(dirname "$0")/../apt-install.sh" pgbouncer
