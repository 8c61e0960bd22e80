#!/usr/bin/env bash
# Static checks of what we ship for deployment (called by tools/test.sh; also runnable alone):
#   Prometheus config + alert rules (promtool check), alert unit tests (promtool test rules),
#   dashboard structure (tools/check_dashboards.py), every panel query parsed as PromQL
#   (promtool check rules on a generated recording-rule file), systemd units
#   (systemd-analyze verify, warnings count as failures).
# Any failure exits non-zero with the tool's own message.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "check-deploy: FAILED: $*" >&2; exit 1; }
step() { echo "check-deploy: $*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

command -v promtool >/dev/null || fail "promtool missing (apt-get install prometheus)"

step "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml || fail "prometheus.yml"

step "promtool check rules deploy/prometheus/rules/*.yml"
promtool check rules deploy/prometheus/rules/*.yml || fail "alert rules"

step "promtool test rules deploy/prometheus/tests/*.yml"
promtool test rules deploy/prometheus/tests/*.yml || fail "alert rule unit tests"

step "dashboard structure (tools/check_dashboards.py)"
python3 tools/check_dashboards.py || fail "dashboard structure"

step "every dashboard query parses as PromQL"
python3 tools/check_dashboards.py --as-rules > "$tmp/dashboard-queries.yml" || fail "extracting dashboard queries"
promtool check rules "$tmp/dashboard-queries.yml" || fail "a dashboard query is not valid PromQL"

if command -v systemd-analyze >/dev/null; then
  for unit in deploy/*.service; do
    step "systemd-analyze verify $unit"
    # verify also checks that ExecStart exists; the binaries are not installed on a build
    # machine, so point ExecStart at an existing executable. Everything else is checked as shipped.
    sed -E 's#^(ExecStart(Pre|Post)?=[-+!@:]*)/usr/(local/)?bin/hil-[a-z-]+#\1/bin/true#; s#^(ExecStart(Pre|Post)?=[-+!@:]*)/usr/bin/xmutil#\1/bin/true#' \
      "$unit" > "$tmp/$(basename "$unit")"
    out=$(systemd-analyze verify "$tmp/$(basename "$unit")" 2>&1) || fail "$unit: $out"
    # Unknown keys and bad values are only warnings with exit status 0: treat them as errors.
    [ -z "$out" ] || fail "$unit: $out"
    systemd-analyze security --offline=yes "$tmp/$(basename "$unit")" 2>/dev/null | tail -1 || true
  done
elif [ "${HIL_CI:-0}" = 1 ]; then
  fail "systemd-analyze missing (apt-get install systemd)"
else
  echo "check-deploy: WARNING: systemd-analyze not installed, units not verified" >&2
fi

step "all deployment checks passed"
