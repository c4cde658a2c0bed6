#!/usr/bin/env bash
# Make sure Chromium and its WebDriver are installed for the browser test, or say how.
#
# Why: tests/worker/api/test_console.py walks through the console (/ui/) in real headless
# Chromium driven by Selenium: log in, the campaign's node graph, a timeline, replaying a
# failure group. It uses Debian's /usr/bin/chromium and /usr/bin/chromedriver and never
# lets Selenium Manager download a browser (the machine may be offline).
#
# - chromium and chromedriver already there: nothing to do (exit 0).
# - root with apt-get (CI: .ci/run runs as root): install the `chromium` and
#   `chromium-driver` packages, saying so (exit 0, or 1 if that failed).
# - otherwise (a non-root user, no apt-get): print the one command that gets them and
#   exit 1; pytest then skips the browser test, saying why (unless REQUIRE_CHROMIUM=1,
#   which .ci/run sets so CI can never skip it).
#
# Called by scripts/test.sh, next to scripts/ensure-promtool.sh.
set -uo pipefail

have() {
  command -v "$1" >/dev/null 2>&1
}

if have chromium && have chromedriver; then
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing Debian's chromium and chromium-driver packages (apt-get install): the"
  echo "    console's browser test (tests/worker/api/test_console.py) runs headless Chromium"
  if apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
    && have chromium && have chromedriver; then
    exit 0
  fi
  echo "warning: could not install chromium and chromium-driver (another apt-get or dpkg running?)" >&2
fi

echo "chromium or chromedriver not found: the console's browser test (tests/worker/api/test_console.py) will be skipped." >&2
echo "To run it, install both:" >&2
echo "    sudo apt-get install -y chromium chromium-driver" >&2
exit 1
