#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need on a fresh Debian
# machine when it is missing, then runs the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v fdtoverlay >/dev/null 2>&1 || need_apt+=(device-tree-compiler)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# Python with pandas + pyarrow for the test that re-reads the Parquet export.
PYENV=target/pyenv
if [ ! -x "$PYENV/bin/python" ] || ! "$PYENV/bin/python" -c 'import pandas, pyarrow' 2>/dev/null; then
  python3 -m venv "$PYENV"
  "$PYENV/bin/pip" install -q --disable-pip-version-check pandas pyarrow
fi
export HIL_PYTHON="$PWD/$PYENV/bin/python"
# In CI a missing tool is a failure, never a skipped test.
export HIL_CI=1

# Prometheus config, alert rules and their unit tests, dashboards, systemd units.
tools/check-deploy.sh

command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
cargo nextest run --workspace --no-fail-fast "$@"
