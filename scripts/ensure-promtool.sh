#!/usr/bin/env bash
# Make sure promtool is on PATH for the tests, or say how to get it.
#
# Why: tests/deploy/test_monitoring.py checks the Prometheus alert rules, their unit tests
# (alerts_test.yml), the scrape config and every query of the Grafana dashboard with
# promtool, and runs a real Prometheus server against a real worker. Debian's `prometheus`
# package brings both binaries.
#
# - promtool already on PATH: nothing to do (exit 0).
# - root with apt-get (CI: .ci/run runs as root): install the `prometheus` package,
#   saying so (exit 0, or 1 if that failed).
# - otherwise (a non-root user, no apt-get): print the one command that gets it and
#   exit 1; pytest then skips the tests that need it, saying why (unless
#   REQUIRE_PROMTOOL=1, which .ci/run sets so CI can never skip them).
#
# Called by scripts/test.sh; tests/deploy/test_ensure_promtool.py pins its messages.
set -uo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing Debian's prometheus package (apt-get install prometheus): promtool"
  echo "    checks the alert rules, the scrape config and the dashboard queries, and the"
  echo "    Prometheus server scrapes a real worker in tests/deploy/test_monitoring.py"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null \
    && command -v promtool >/dev/null 2>&1; then
    exit 0
  fi
  echo "warning: could not install the prometheus package (another apt-get or dpkg running?)" >&2
fi

echo "promtool not found: the tests that need it (tests/deploy/test_monitoring.py) will be skipped." >&2
echo "To run them, install it (it brings promtool and the Prometheus server):" >&2
echo "    sudo apt-get install -y prometheus" >&2
echo "or, without apt-get, unpack a release from https://prometheus.io/download/ and put its" >&2
echo "promtool and prometheus on PATH." >&2
exit 1
