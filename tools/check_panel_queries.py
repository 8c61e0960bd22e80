#!/usr/bin/env python3
"""Evaluate every Grafana panel query against a real Prometheus (stdlib only).

usage: check_panel_queries.py PROMETHEUS_URL START END [RATE_INTERVAL]

Each target's expr (Grafana variables substituted as tools/check_dashboards.py does:
query variables = ".*", $__rate_interval = RATE_INTERVAL, $__range = END-START) is run
through /api/v1/query_range over [START, END] (unix seconds), as Grafana does for a
dashboard's time range. A query fails when Prometheus returns an error or no series with
any sample. Also fails when a loaded rule group reports an evaluation error.
Exit status 1 with one line per failing query.
"""
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_dashboards  # noqa: E402


def get(base, path, params):
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}"}


def short(expr, n=240):
    return expr if len(expr) <= n else expr[:n] + " ..."


def main(argv):
    if len(argv) not in (3, 4):
        sys.exit(__doc__)
    base, start, end = argv[0], float(argv[1]), float(argv[2])
    rate = argv[3] if len(argv) == 4 else "10s"
    span = max(int(end - start), 1)
    step = max(span // 200, 1)
    errors = []
    dashboards = check_dashboards.load_all(errors)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    n = 0
    for q in check_dashboards.queries(dashboards, rate, f"{span}s"):
        n += 1
        where = f"{q['dashboard']} / {q['panel']} / {q['refId']}"
        r = get(base, "/api/v1/query_range", {"query": q["expr"], "start": start, "end": end, "step": step})
        if r.get("status") != "success":
            errors.append(f"{where}: error: {r.get('error', r)}\n    {short(q['expr'])}")
            continue
        series = [s for s in r["data"]["result"] if s.get("values")]
        if not series:
            errors.append(f"{where}: no data\n    {short(q['expr'])}")
    rules = get(base, "/api/v1/rules", {})
    groups = rules.get("data", {}).get("groups", []) if rules.get("status") == "success" else []
    if not groups:
        errors.append(f"no rule groups loaded: {rules.get('error', 'none')}")
    for g in groups:
        for rule in g.get("rules", []):
            if rule.get("health") not in ("ok", "unknown"):
                errors.append(f"rule {g['name']}/{rule.get('name')}: {rule.get('health')}: {rule.get('lastError')}")
    if errors:
        print(f"panel queries: {len(errors)} problem(s) out of {n} queries:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    print(f"panel queries OK: {n} queries returned data over {span} s; "
          f"{sum(len(g.get('rules', [])) for g in groups)} rules evaluate without error")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
