"""scripts/ensure-promtool.sh, the promtool step of scripts/test.sh, run for real with a
PATH that has no promtool: as a non-root user it prints the one command that gets it and
installs nothing; as root with apt-get (CI) it says what it installs and why, and does.

``id`` and ``apt-get`` are stand-in scripts at the front of a private PATH, so nothing is
installed on this machine and the user is whoever the stand-in says.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.deploy.test_monitoring import MISSING_PROMETHEUS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure-promtool.sh"
TEST_SH = ROOT / "scripts" / "test.sh"
BASH = "/bin/bash"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _run(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    """The script with PATH = ``bin_dir`` only (no promtool anywhere on it)."""
    return subprocess.run(
        [BASH, str(SCRIPT)],
        env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path


def test_non_root_without_promtool_is_told_the_one_command(bin_dir: Path) -> None:
    apt_log = bin_dir.parent / "apt-get.log"
    _stub(bin_dir, "id", "echo 1000\n")
    _stub(bin_dir, "apt-get", f'echo "$@" >> {apt_log}\n')
    done = _run(bin_dir)
    assert done.returncode == 1, done
    assert done.stdout == "", "nothing to install, nothing announced"
    assert done.stderr.splitlines() == [
        "promtool not found: the tests that need it (tests/deploy/test_monitoring.py) will be "
        "skipped.",
        "To run them, install it (it brings promtool and the Prometheus server):",
        "    sudo apt-get install -y prometheus",
        "or, without apt-get, unpack a release from https://prometheus.io/download/ and put its",
        "promtool and prometheus on PATH.",
    ]
    assert not apt_log.exists(), "a non-root user must not run apt-get"


def test_without_apt_get_the_message_is_the_same(bin_dir: Path) -> None:
    _stub(bin_dir, "id", "echo 0\n")
    done = _run(bin_dir)
    assert done.returncode == 1
    assert "    sudo apt-get install -y prometheus" in done.stderr.splitlines()


def test_root_with_apt_get_says_what_it_installs_and_why(bin_dir: Path) -> None:
    apt_log = bin_dir.parent / "apt-get.log"
    _stub(bin_dir, "id", "echo 0\n")
    # The stand-in "installs" the package by creating promtool on PATH.
    _stub(
        bin_dir,
        "apt-get",
        f'echo "$@" >> {apt_log}\n'
        f'case "$*" in *install*) printf "#!/bin/sh\\n" > {bin_dir}/promtool;'
        f" /bin/chmod +x {bin_dir}/promtool;; esac\n",
    )
    done = _run(bin_dir)
    assert done.returncode == 0, done
    assert done.stdout.splitlines()[0] == (
        "==> installing Debian's prometheus package (apt-get install prometheus): promtool"
    )
    assert "dashboard queries" in done.stdout and "test_monitoring.py" in done.stdout
    assert apt_log.read_text().splitlines() == ["update -qq", "install -y -qq prometheus"]
    assert done.stderr == ""


def test_root_whose_install_fails_gets_the_command_too(bin_dir: Path) -> None:
    _stub(bin_dir, "id", "echo 0\n")
    _stub(bin_dir, "apt-get", "echo 'E: Could not get lock /var/lib/dpkg/lock' >&2; exit 100\n")
    done = _run(bin_dir)
    assert done.returncode == 1
    assert "warning: could not install the prometheus package" in done.stderr
    assert "    sudo apt-get install -y prometheus" in done.stderr.splitlines()


def test_promtool_on_path_needs_nothing(bin_dir: Path) -> None:
    _stub(bin_dir, "promtool", "exit 0\n")
    _stub(bin_dir, "id", "echo 1000\n")
    done = _run(bin_dir)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_test_sh_calls_it_and_ci_requires_promtool() -> None:
    """test.sh goes on when promtool is missing (the tests skip); CI makes them required."""
    assert "bash scripts/ensure-promtool.sh || true" in TEST_SH.read_text()
    assert "apt-get" not in TEST_SH.read_text().replace("# ", "#").split("ensure-promtool")[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "export REQUIRE_PROMTOOL=1" in ci
    # The skip reason the tests give names the same command.
    assert "`sudo apt-get install -y prometheus`" in MISSING_PROMETHEUS
