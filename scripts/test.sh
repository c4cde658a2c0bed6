#!/usr/bin/env bash
# One command on a fresh machine: make a venv, install the package with its dev extras,
# then lint (ruff), type-check (mypy) and test (pytest). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "==> installing .[dev] into $VENV (the package, plus pytest, ruff, mypy and the test tools)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[dev]'

# promtool (Prometheus' rule checker) for the monitoring tests: installed when running as
# root with apt-get (as CI does), else the one command to get it is printed and pytest
# skips those tests, saying why. See scripts/ensure-promtool.sh.
bash scripts/ensure-promtool.sh || true
# Chromium and chromedriver for the console's browser test, the same way: installed as
# root with apt-get, else the command is printed and that test is skipped, saying why.
# See scripts/ensure-chromium.sh.
bash scripts/ensure-chromium.sh || true

echo "==> ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "==> mypy"
"$VENV/bin/mypy"
echo "==> pytest"
# pytest exits 5 when it collected no tests: that is a failure here, as set -e makes it.
"$VENV/bin/pytest" "$@"
