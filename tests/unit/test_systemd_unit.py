"""The systemd unit in the README's "Starting and stopping" matches what the server does, and
systemd itself accepts it (where systemd-analyze is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from message_broker.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def _unit_text() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Starting and stopping") :]
    found = re.search(r"```ini\n(.*?)```", section, re.S)
    assert found, "the README's Starting and stopping has no ```ini unit"
    return found.group(1)


def _directives(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(the unit's directives, the environment its Environment= lines set)."""
    directives: dict[str, str] = {}
    environment: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", "[")):
            continue
        key, value = line.split("=", 1)
        if key == "Environment":
            environment.update(pair.split("=", 1) for pair in value.split())  # type: ignore[misc]
        else:
            directives[key] = value
    return directives, environment


def test_the_unit_matches_the_servers_behaviour() -> None:
    unit, environment = _directives(_unit_text())
    settings = Settings.from_env(environment)  # every setting it gives is valid
    assert unit["ExecStart"].endswith("/message-broker serve")
    assert unit["Type"] == "exec"
    # SIGTERM reaches the server once (mixed), or the whole group (counted as one).
    assert unit["KillMode"] in ("mixed", "control-group")
    # Exit 1 (the database not reached in time) restarts it; exit 0 after a stop does not.
    assert unit["Restart"] == "on-failure"
    # The stop's own bound: SHUTDOWN_TIMEOUT for requests, again for the loops, then the pool.
    assert float(unit["TimeoutStopSec"]) > 3 * settings.shutdown_timeout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    text = _unit_text()
    program = Path(sys.executable).parent / "message-broker"
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={program}", text)
    text = re.sub(r"(?m)^WorkingDirectory=.*$", f"WorkingDirectory={ROOT}", text)
    unit = tmp_path / "message_broker.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "message_broker.service" not in done.stdout + done.stderr, done.stdout + done.stderr
