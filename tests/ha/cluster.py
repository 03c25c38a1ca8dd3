"""The HA test cluster on this machine: etcd, three Patroni nodes of PostgreSQL 15 (a leader and two
standbys, synchronous replication in strict mode) and HAProxy in front of them as the one endpoint.

    /usr/bin/python3 tests/ha/cluster.py up [--env-file F]  # install what is missing, start, wait until healthy
    /usr/bin/python3 tests/ha/cluster.py down     # stop everything and remove the runtime data
    /usr/bin/python3 tests/ha/cluster.py status   # patronictl list; exit 1 unless healthy
    /usr/bin/python3 tests/ha/cluster.py running  # exit 0 if any part of the cluster is running

`up` ends with two lines, DATABASE_URL=<the HAProxy endpoint> and PATRONI_URLS=<node REST URLs>.
The tests import this module too (standard library only), to kill, start and watch nodes.

Everything listens on 127.0.0.1, on ports from HA_PORT_BASE (25400): HAProxy +0 (its stats page +9),
PostgreSQL +11..+13, Patroni's REST API +21..+23, etcd +79 (peers +80). Runtime data (data directories,
rendered configs, logs, pid files) goes to HA_DIR (/tmp/message_broker-ha). Nodes run as the postgres
OS user, Patroni with Debian's /usr/bin/python3 (whose packages it needs), etcd and HAProxy as root.
The Patroni timings come from HA_TTL, HA_LOOP_WAIT, HA_RETRY_TIMEOUT (10, 2, 3) when the cluster is
first initialised."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"  # Debian's Python: Patroni's dependencies are Debian packages
PATRONI = "/usr/bin/patroni"
PATRONICTL = "/usr/bin/patronictl"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
NODE_USER = "postgres"
NODES = ("node1", "node2", "node3")


@dataclass(frozen=True)
class Node:
    name: str
    index: int  # 1, 2, 3
    pg_port: int
    rest_port: int
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def log(self) -> Path:
        return self.dir / "patroni.log"


class Layout:
    """Ports and paths, from the environment."""

    def __init__(self) -> None:
        self.dir = Path(os.environ.get("HA_DIR", "/tmp/message_broker-ha"))
        base = int(os.environ.get("HA_PORT_BASE", "25400"))
        self.haproxy_port = base
        self.stats_port = base + 9
        self.etcd_port = base + 79
        self.etcd_peer_port = base + 80
        self.nodes = [
            Node(name, i, base + 10 + i, base + 20 + i, self.dir / name) for i, name in enumerate(NODES, start=1)
        ]
        self.ttl = int(os.environ.get("HA_TTL", "10"))
        self.loop_wait = int(os.environ.get("HA_LOOP_WAIT", "2"))
        self.retry_timeout = int(os.environ.get("HA_RETRY_TIMEOUT", "3"))

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.haproxy_port}/postgres"

    @property
    def patroni_urls(self) -> list[str]:
        return [node.rest_url for node in self.nodes]

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)


# -- processes -------------------------------------------------------------------------------------


def alive(pid: int | None) -> bool:
    """True if `pid` runs (a zombie does not: killed processes can linger unreaped here)."""
    if not pid:
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.M)
    return state is not None and state.group(1) not in ("Z", "X")


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:`port` (from `ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"pid=(\d+)", out)
    return int(match.group(1)) if match else None


def postmaster_pid(node: Node) -> int | None:
    """The postmaster's pid from postmaster.pid in the node's data directory, if it runs."""
    try:
        pid = int((node.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def _pid_file(layout: Layout, name: str) -> Path:
    return layout.dir / f"{name}.pid"


def _read_pid(layout: Layout, name: str) -> int | None:
    try:
        pid = int(_pid_file(layout, name).read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def _spawn(layout: Layout, name: str, argv: list[str], log: Path, *, as_node_user: bool = False) -> int:
    """Start a daemon in its own session, output to `log`; its pid goes to HA_DIR/<name>.pid."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": str(log.parent)}
    user: dict[str, Any] = {}
    if as_node_user:
        entry = pwd.getpwnam(NODE_USER)
        user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with log.open("ab") as out:
        out.write(f"---- {time.strftime('%H:%M:%S')} start {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            start_new_session=True,
            **user,
        )
    _pid_file(layout, name).write_text(f"{proc.pid}\n")
    return proc.pid


def _signal(pid: int | None, sig: signal.Signals) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_for(probe: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `probe()` until truthy, or raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s (last: {result!r})")
        time.sleep(interval)


# -- HTTP ----------------------------------------------------------------------------------------------


def http_json(url: str, timeout: float = 1.0) -> tuple[int, Any] | None:
    """(status, parsed JSON body) of a GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return None


def cluster_members(layout: Layout) -> list[dict[str, Any]] | None:
    """Patroni's view of the cluster (GET /cluster) from the first node that answers."""
    for node in layout.nodes:
        answer = http_json(node.rest_url + "/cluster")
        if answer is not None and answer[0] == 200 and isinstance(answer[1], dict):
            return list(answer[1].get("members", []))
    return None


def leader_name(layout: Layout) -> str | None:
    members = cluster_members(layout) or []
    return next((m["name"] for m in members if m.get("role") == "leader" and m.get("state") == "running"), None)


def sync_standbys(layout: Layout) -> list[str]:
    members = cluster_members(layout) or []
    return [
        m["name"] for m in members if m.get("role") == "sync_standby" and m.get("state") in ("running", "streaming")
    ]


def healthy(layout: Layout, members: int = 3) -> bool:
    """A running leader, a synchronous standby and `members` running members, on one timeline."""
    found = cluster_members(layout)
    if not found or len(found) != members:
        return False
    if any(m.get("state") not in ("running", "streaming") for m in found):
        return False
    timelines = {m.get("timeline") for m in found}
    return (
        sum(m.get("role") == "leader" for m in found) == 1
        and any(m.get("role") == "sync_standby" for m in found)
        and len(timelines) == 1
    )


def endpoint_is_primary(layout: Layout) -> bool:
    """A connection through HAProxy reaches a primary (not in recovery)."""
    out = subprocess.run(
        [
            str(PG_BIN / "psql"),
            "-X",
            "-At",
            "-d",
            layout.database_url + "?connect_timeout=3",
            "-c",
            "SELECT pg_is_in_recovery()",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    return out.returncode == 0 and out.stdout.strip() == "f"


# -- starting ----------------------------------------------------------------------------------------


def render(layout: Layout) -> None:
    layout.dir.mkdir(parents=True, exist_ok=True)
    layout.dir.chmod(0o755)
    entry = pwd.getpwnam(NODE_USER)
    template = string.Template((HERE / "patroni.yml.in").read_text())
    for node in layout.nodes:
        node.dir.mkdir(exist_ok=True)
        (node.dir / "log").mkdir(exist_ok=True)
        for path in (node.dir, node.dir / "log"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
            path.chmod(0o700)
        node.config.write_text(
            template.substitute(
                name=node.name,
                dir=layout.dir,
                node_dir=node.dir,
                rest_port=node.rest_port,
                pg_port=node.pg_port,
                etcd_port=layout.etcd_port,
                ttl=layout.ttl,
                loop_wait=layout.loop_wait,
                retry_timeout=layout.retry_timeout,
            )
        )
        os.chown(node.config, entry.pw_uid, entry.pw_gid)
    servers = "\n".join(
        f"    server {node.name} 127.0.0.1:{node.pg_port} check port {node.rest_port}" for node in layout.nodes
    )
    (layout.dir / "haproxy.cfg").write_text(
        string.Template((HERE / "haproxy.cfg.in").read_text()).substitute(
            haproxy_port=layout.haproxy_port, stats_port=layout.stats_port, servers=servers
        )
    )


def etcd_healthy(layout: Layout) -> bool:
    answer = http_json(f"http://127.0.0.1:{layout.etcd_port}/health")
    return answer is not None and answer[0] == 200 and str(answer[1].get("health")) == "true"


def start_etcd(layout: Layout) -> None:
    if _read_pid(layout, "etcd") or listening_pid(layout.etcd_port):
        return
    client = f"http://127.0.0.1:{layout.etcd_port}"
    peer = f"http://127.0.0.1:{layout.etcd_peer_port}"
    _spawn(
        layout,
        "etcd",
        [
            "/usr/bin/etcd",
            "--name=ha",
            f"--data-dir={layout.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=ha={peer}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=message_broker_ha",
        ],
        layout.dir / "etcd.log",
    )


def patroni_pid(node: Node) -> int | None:
    """Patroni's pid, found by its REST port (its postmaster is detached: a child of PID 1)."""
    return listening_pid(node.rest_port)


def start_node(layout: Layout, name: str) -> int | None:
    """Start the node's Patroni unless it runs; returns the new pid (None if it was running)."""
    node = layout.node(name)
    if _read_pid(layout, name) or patroni_pid(node):
        return None
    return _spawn(layout, name, [PYTHON, PATRONI, str(node.config)], node.log, as_node_user=True)


def start_haproxy(layout: Layout) -> None:
    if _read_pid(layout, "haproxy") or listening_pid(layout.haproxy_port):
        return
    _spawn(
        layout,
        "haproxy",
        ["/usr/sbin/haproxy", "-db", "-f", str(layout.dir / "haproxy.cfg")],
        layout.dir / "haproxy.log",
    )


def running(layout: Layout) -> bool:
    return bool(
        _read_pid(layout, "etcd")
        or listening_pid(layout.etcd_port)
        or any(patroni_pid(node) or postmaster_pid(node) for node in layout.nodes)
    )


def up(layout: Layout, timeout: float = 180.0) -> None:
    subprocess.run(["bash", str(HERE / "install.sh")], check=True)
    render(layout)
    start_etcd(layout)
    wait_for(lambda: etcd_healthy(layout), 30, "etcd healthy")
    for node in layout.nodes:
        start_node(layout, node.name)
    start_haproxy(layout)
    print(f"waiting for a leader and a synchronous standby (logs under {layout.dir})", flush=True)
    wait_healthy(layout, timeout)
    patronictl(layout, "list")


def wait_healthy(layout: Layout, timeout: float = 120.0) -> None:
    """Three members, a leader and a synchronous standby, and HAProxy's endpoint on the primary."""
    wait_for(lambda: healthy(layout), timeout, "a healthy cluster", interval=0.5)
    wait_for(lambda: endpoint_is_primary(layout), 30, f"the primary through HAProxy on {layout.haproxy_port}")


# -- faults and changes the tests make -------------------------------------------------------------------


def kill_node(layout: Layout, name: str) -> dict[str, int | None]:
    """kill -9 the node's Patroni and its postmaster (Patroni 3 detaches the postmaster, so both)."""
    node = layout.node(name)
    patroni = patroni_pid(node)
    postmaster = postmaster_pid(node)
    _signal(patroni, signal.SIGKILL)
    _signal(postmaster, signal.SIGKILL)
    wait_for(lambda: not alive(patroni) and not alive(postmaster), 10, f"{name} dead")
    return {"patroni": patroni, "postmaster": postmaster}


def patronictl(layout: Layout, *args: str, check: bool = True) -> str:
    out = subprocess.run(
        [PYTHON, PATRONICTL, "-c", str(layout.nodes[0].config), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(layout.dir)},
    )
    text = out.stdout + out.stderr
    print(text, end="", flush=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"patronictl {' '.join(args)} failed ({out.returncode}):\n{text}")
    return text


# -- stopping ----------------------------------------------------------------------------------------


def down(layout: Layout) -> None:
    """Stop everything (no need to be gentle: the data is removed) and remove HA_DIR."""
    patronis = [_read_pid(layout, n.name) or patroni_pid(n) for n in layout.nodes]
    for pid in patronis:
        _signal(pid, signal.SIGKILL)  # first, so that nobody restarts or promotes a PostgreSQL
    postmasters = [postmaster_pid(n) for n in layout.nodes]
    for pid in postmasters:
        _signal(pid, signal.SIGQUIT)  # immediate shutdown: the postmaster ends its children too
    others = [_read_pid(layout, "haproxy") or listening_pid(layout.haproxy_port)]
    others.append(_read_pid(layout, "etcd") or listening_pid(layout.etcd_port))
    for pid in others:
        _signal(pid, signal.SIGTERM)
    everything = [p for p in (*patronis, *postmasters, *others) if p]
    try:
        wait_for(lambda: not any(alive(p) for p in everything), 15, "every process stopped")
    except TimeoutError:
        for pid in everything:
            _signal(pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in everything), 10, "every process killed")
    # Backends of a killed postmaster exit when they notice; wait for the ports to be free.
    ports = [layout.haproxy_port, layout.etcd_port, *(n.pg_port for n in layout.nodes)]
    ports += [n.rest_port for n in layout.nodes]
    wait_for(lambda: not any(listening_pid(p) for p in ports), 15, "the cluster's ports free")
    if layout.dir.exists():
        shutil.rmtree(layout.dir)
    print(f"stopped; removed {layout.dir}")


def main(argv: list[str]) -> int:
    layout = Layout()
    command = argv[1] if len(argv) > 1 else "status"
    if command == "up":
        up(layout)
        lines = f"DATABASE_URL={layout.database_url}\nPATRONI_URLS={','.join(layout.patroni_urls)}\n"
        if argv[2:3] == ["--env-file"] and len(argv) > 3:
            Path(argv[3]).write_text(lines)  # for `make faults-ha`, which runs the tests with them
        print(lines, end="")
        return 0
    if command == "down":
        down(layout)
        return 0
    if command == "running":
        return 0 if running(layout) else 1
    if command == "status":
        if not running(layout):
            print("not running")
            return 1
        patronictl(layout, "list", check=False)
        return 0 if healthy(layout) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
