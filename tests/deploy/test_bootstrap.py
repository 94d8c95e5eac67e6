""".ci/bootstrap touches only what it started: no process is killed by name, a PostgreSQL cluster is
stopped only when this run's install created it, and the prometheus service only through its own
manager. The functions are run from the real script (sourced) with stand-ins for the Debian tools
that record how they were called."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.deploy.support import ROOT

BOOTSTRAP = ROOT / ".ci" / "bootstrap"

# Stand-ins: pg_lsclusters prints $STATE/clusters ("version name port status ..." per line, as
# `pg_lsclusters -h` does); pg_ctlcluster answers `status` from it; every call is logged.
_STUBS = {
    "pg_lsclusters": 'cat "$STATE/clusters"\n',
    "pg_ctlcluster": (
        'echo "pg_ctlcluster $*" >> "$STATE/calls"\n'
        'if [ "$3" = status ]; then grep -q "^$1 $2 .* online " "$STATE/clusters"; exit $?; fi\n'
    ),
    "systemctl": 'echo "systemctl $*" >> "$STATE/calls"\n',
    "service": 'echo "service $*" >> "$STATE/calls"\n',
    "update-rc.d": 'echo "update-rc.d $*" >> "$STATE/calls"\n',
    # Anything else that could stop a process must not be reached.
    "pkill": 'echo "pkill $*" >> "$STATE/calls"\n',
    "killall": 'echo "killall $*" >> "$STATE/calls"\n',
    "apt-get": 'echo "apt-get $*" >> "$STATE/calls"\n',
}


ONLINE_15 = "15 main 5432 online postgres /var/lib/postgresql/15/main /var/log/x.log\n"


def _commands(script: str) -> list[str]:
    """The script's lines without comments (a `#` inside quotes does not occur in it)."""
    return [line.split("#", 1)[0] for line in script.splitlines() if line.split("#", 1)[0].strip()]


def _sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    state = tmp_path / "state"
    bin_dir = tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    for name, body in _STUBS.items():
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\n" + body)
        stub.chmod(0o755)
    (state / "calls").write_text("")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STATE": str(state),
        "PG_CONF_ROOT": str(tmp_path / "etc-postgresql"),
        "SYSTEMD_RUN_DIR": str(tmp_path / "no-systemd"),
        "PROMETHEUS_INIT_SCRIPT": str(tmp_path / "init.d-prometheus"),
    }
    return state, env


def _cluster(tmp_path: Path, version: str, name: str, start: str) -> Path:
    conf = tmp_path / "etc-postgresql" / version / name
    conf.mkdir(parents=True)
    (conf / "start.conf").write_text(f"{start}\n")
    return conf / "start.conf"


def _run(body: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # SUDO is cleared after sourcing: the stand-ins are called directly, as root would.
    script = f'source "{BOOTSTRAP}"\nSUDO=""\n{body}\n'
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_bootstrap_kills_nothing_by_name_and_needs_no_kubectl_package() -> None:
    commands = "\n".join(_commands(BOOTSTRAP.read_text()))
    assert not re.search(r"\b(pkill|killall|kill)\b", commands)
    # Only the clusters the install created are stopped: no loop over every cluster.
    assert "pg_ctlcluster" in commands and "comm -13" in commands
    # kubectl is not in Debian's main archive: it must not be asked of apt.
    apt_lines = [line for line in commands.splitlines() if "need_apt+=" in line]
    assert apt_lines and not any("kubectl" in line for line in apt_lines)


def test_only_the_cluster_created_by_the_install_is_stopped(tmp_path: Path) -> None:
    state, env = _sandbox(tmp_path)
    theirs = _cluster(tmp_path, "14", "main", "auto")
    ours = _cluster(tmp_path, "15", "main", "auto")
    before = "14 main 5432 online postgres /var/lib/postgresql/14/main /var/log/x.log\n"
    after = before + "15 main 5433 online postgres /var/lib/postgresql/15/main /var/log/y.log\n"
    (state / "clusters").write_text(before)
    result = _run(
        f'before="$(pg_clusters)"\nprintf "%s" "{after}" > "$STATE/clusters"\n'
        'quiet_clusters_created_since "$before" "$(pg_clusters)"',
        env,
    )
    assert result.returncode == 0, result.stderr
    calls = (state / "calls").read_text().splitlines()
    assert calls == ["pg_ctlcluster 15 main status", "pg_ctlcluster 15 main stop"]
    assert ours.read_text() == "manual\n"
    assert theirs.read_text() == "auto\n"


def test_nothing_is_stopped_when_the_install_created_no_cluster(tmp_path: Path) -> None:
    state, env = _sandbox(tmp_path)
    _cluster(tmp_path, "15", "main", "auto")
    (state / "clusters").write_text(ONLINE_15)
    result = _run('quiet_clusters_created_since "$(pg_clusters)" "$(pg_clusters)"', env)
    assert result.returncode == 0, result.stderr
    assert (state / "calls").read_text() == ""


def test_a_created_cluster_that_did_not_start_is_only_set_to_manual(tmp_path: Path) -> None:
    # Where services may not start during an install (a policy-rc.d, as in containers).
    state, env = _sandbox(tmp_path)
    ours = _cluster(tmp_path, "15", "main", "auto")
    (state / "clusters").write_text("15 main 5432 down postgres /var/lib/postgresql/15/main /var/log/x.log\n")
    result = _run('quiet_clusters_created_since "" "$(pg_clusters)"', env)
    assert result.returncode == 0, result.stderr
    assert (state / "calls").read_text().splitlines() == ["pg_ctlcluster 15 main status"]
    assert ours.read_text() == "manual\n"


def test_the_prometheus_service_is_stopped_through_its_manager(tmp_path: Path) -> None:
    state, env = _sandbox(tmp_path)
    init_script = Path(env["PROMETHEUS_INIT_SCRIPT"])
    init_script.write_text("#!/bin/sh\n")
    init_script.chmod(0o755)
    result = _run("quiet_installed_prometheus_service", env)
    assert result.returncode == 0, result.stderr
    assert (state / "calls").read_text().splitlines() == [
        "service prometheus stop",
        "update-rc.d prometheus disable",
    ]

    (state / "calls").write_text("")
    Path(env["SYSTEMD_RUN_DIR"]).mkdir()
    result = _run("quiet_installed_prometheus_service", env)
    assert result.returncode == 0, result.stderr
    assert (state / "calls").read_text().splitlines() == ["systemctl disable --now prometheus.service"]


def test_sourcing_the_script_runs_nothing(tmp_path: Path) -> None:
    state, env = _sandbox(tmp_path)
    result = _run("true", env)
    assert result.returncode == 0, result.stderr
    assert (state / "calls").read_text() == ""
    assert "bootstrap:" not in result.stdout + result.stderr
