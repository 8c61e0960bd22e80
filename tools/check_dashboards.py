#!/usr/bin/env python3
"""Structure check of the Grafana dashboards (stdlib only; no Grafana server exists here).

Checks what Grafana needs to load and render a provisioned dashboard:
  - valid JSON, a unique dashboard uid, title, integer schemaVersion, panels list;
  - panel ids unique within a dashboard (row children included);
  - known panel types; gridPos with integer h/w/x/y inside the 24-column grid, no overlap;
  - every datasource (panel, target, query variable) uses the provisioned uid;
  - every non-row panel has targets, each with a refId (unique in the panel) and an expr;
  - every $variable used in an expr is a dashboard variable or a Grafana built-in;
  - the JSON equals what grafana/generate.py produces (no drift from hand edits);
  - every hil_* metric a panel or an alert rule queries is one the controller exports
    (names read from crates/controller/src/metrics/mod.rs), so a typo or a metric that
    does not exist fails here, not silently as an empty panel.

  --exprs RATE RANGE   print every panel query as JSON lines with Grafana variables
                       substituted (used by the PromQL syntax check and the panel-query test)
  --as-rules           print the queries as a Prometheus recording-rule file, so
                       `promtool check rules` parses every expression
Exit status 1 with one line per problem when anything is wrong.
"""
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DS_PROVISIONING = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"

# Core panel types of Grafana 10/11.
PANEL_TYPES = {
    "row", "timeseries", "stat", "gauge", "bargauge", "table", "piechart", "heatmap", "barchart",
    "state-timeline", "status-history", "histogram", "text", "logs", "nodeGraph", "trend",
    "xychart", "candlestick", "canvas", "geomap", "news", "dashlist", "alertlist",
    "annolist", "flamegraph", "traces", "datagrid",
}
BUILTIN_VARS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                "__range_ms", "__all", "__name", "__dashboard", "__org", "__user", "__from", "__to"}
# Grafana variables; `$1` (a PromQL label_replace capture group) is not one.
VAR_RE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")


def provisioned_uid():
    text = DS_PROVISIONING.read_text()
    uids = re.findall(r"^\s*uid:\s*['\"]?([\w-]+)", text, re.M)
    if len(uids) != 1:
        raise SystemExit(f"{DS_PROVISIONING}: expected exactly one datasource uid, found {uids}")
    return uids[0]


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []) or [])


def check_dashboard(path, dash, uid, errors):
    def err(msg):
        errors.append(f"{path.name}: {msg}")

    for key, typ in [("uid", str), ("title", str), ("schemaVersion", int), ("panels", list)]:
        if not isinstance(dash.get(key), typ):
            err(f"missing or wrong type for top-level {key!r} (want {typ.__name__})")
    if errors:
        return
    variables = set()
    for v in dash.get("templating", {}).get("list", []):
        if not isinstance(v, dict) or not v.get("name"):
            err(f"templating variable without a name: {v!r}")
            continue
        variables.add(v["name"])
        if v.get("type") == "query":
            ds = v.get("datasource") or {}
            if ds.get("uid") != uid:
                err(f"variable {v['name']}: datasource uid {ds.get('uid')!r}, provisioned is {uid!r}")
            q = v.get("query")
            if not (isinstance(q, dict) and q.get("query")) and not (isinstance(q, str) and q):
                err(f"variable {v['name']}: empty query")
    ids, cells = {}, []
    for p in all_panels(dash["panels"]):
        where = f"panel {p.get('id')!r} ({p.get('title', '?')!r})"
        pid = p.get("id")
        if not isinstance(pid, int):
            err(f"{where}: id must be an integer")
        elif pid in ids:
            err(f"{where}: duplicate id, also used by {ids[pid]!r}")
        else:
            ids[pid] = p.get("title")
        if p.get("type") not in PANEL_TYPES:
            err(f"{where}: unknown panel type {p.get('type')!r}")
        g = p.get("gridPos")
        if not isinstance(g, dict) or not all(isinstance(g.get(k), int) for k in "hwxy"):
            err(f"{where}: gridPos needs integer h, w, x, y")
        elif not (g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24):
            err(f"{where}: gridPos {g} outside the 24-column grid")
        else:
            for other, og in cells:
                if (g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"]
                        and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]):
                    err(f"{where}: gridPos overlaps {other}")
            cells.append((where, g))
        if p.get("type") == "row":
            continue
        ds = p.get("datasource") or {}
        if ds.get("uid") != uid:
            err(f"{where}: datasource uid {ds.get('uid')!r}, provisioned is {uid!r}")
        if p.get("type") == "text":
            continue
        targets = p.get("targets")
        if not isinstance(targets, list) or not targets:
            err(f"{where}: no targets")
            continue
        refs = set()
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in refs:
                err(f"{where}: missing or duplicate refId {ref!r}")
            refs.add(ref)
            tds = t.get("datasource") or ds
            if tds.get("uid") != uid:
                err(f"{where} target {ref}: datasource uid {tds.get('uid')!r}, provisioned is {uid!r}")
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                err(f"{where} target {ref}: empty expr")
                continue
            for m in VAR_RE.finditer(expr):
                name = m.group(1) or m.group(2)
                if name not in variables and name not in BUILTIN_VARS:
                    err(f"{where} target {ref}: unknown variable ${name}")


def load_all(errors):
    out = []
    uids = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        try:
            dash = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            errors.append(f"{path.name}: invalid JSON: {e}")
            continue
        u = dash.get("uid")
        if u in uids:
            errors.append(f"{path.name}: dashboard uid {u!r} also used by {uids[u]}")
        uids[u] = path.name
        out.append((path, dash))
    if not out:
        errors.append(f"no dashboards in {DASHBOARDS}")
    return out


def check_generated(errors):
    gen = GRAFANA / "generate.py"
    if not gen.exists():
        return
    spec = importlib.util.spec_from_file_location("hil_grafana_generate", gen)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rendered = mod.render()
    on_disk = {p.name for p in DASHBOARDS.glob("*.json")}
    for name in sorted(on_disk | set(rendered)):
        path = DASHBOARDS / name
        if name not in rendered:
            errors.append(f"{name}: not produced by grafana/generate.py (delete it or add it there)")
        elif not path.exists() or path.read_text() != rendered[name]:
            errors.append(f"{name}: differs from grafana/generate.py output: run python3 grafana/generate.py")


METRICS_SRC = ROOT / "crates" / "controller" / "src" / "metrics" / "mod.rs"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
METRIC_RE = re.compile(r"\bhil_[a-z0-9_]+")


def check_metric_names(dashboards, errors):
    if not METRICS_SRC.exists():
        errors.append(f"{METRICS_SRC} missing: cannot check metric names")
        return
    exported = set(re.findall(r'"(hil_[a-z0-9_]+)"', METRICS_SRC.read_text()))
    known = exported | {f"{m}_{suffix}" for m in exported for suffix in ("bucket", "sum", "count")}
    used = {}
    for path, dash in dashboards:
        for p in all_panels(dash["panels"]):
            for t in p.get("targets", []) or []:
                for m in METRIC_RE.findall(t.get("expr", "")):
                    used.setdefault(m, f"{path.name} / {p.get('title')}")
        for v in dash.get("templating", {}).get("list", []):
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            for m in METRIC_RE.findall(q):
                used.setdefault(m, f"{path.name} / variable {v.get('name')}")
    for rules in RULES:
        for m in METRIC_RE.findall(rules.read_text()):
            used.setdefault(m, f"{rules.relative_to(ROOT)}")
    for m, where in sorted(used.items()):
        if m not in known:
            errors.append(f"{where}: metric {m} is not exported by the controller ({METRICS_SRC.relative_to(ROOT)})")


def substitute(expr, rate, rng):
    expr = expr.replace("$__rate_interval", rate).replace("$__interval", rate).replace("$__range", rng)
    # Query variables are all-valued in the checks: their allValue is ".*".
    return VAR_RE.sub(".*", expr)


def queries(dashboards, rate, rng):
    for path, dash in dashboards:
        for p in all_panels(dash["panels"]):
            for t in p.get("targets", []) or []:
                yield {"dashboard": path.name, "panel": p.get("title"), "panel_type": p.get("type"),
                       "refId": t.get("refId"), "instant": bool(t.get("instant")),
                       "expr": substitute(t["expr"], rate, rng)}


def main(argv):
    errors = []
    uid = provisioned_uid()
    dashboards = load_all(errors)
    if "--exprs" in argv or "--as-rules" in argv:
        if errors:
            print("\n".join(errors), file=sys.stderr)
            return 1
        i = argv.index("--exprs") if "--exprs" in argv else None
        rate, rng = (argv[i + 1], argv[i + 2]) if i is not None else ("1m", "5m")
        qs = list(queries(dashboards, rate, rng))
        if "--as-rules" in argv:
            print("groups:\n  - name: dashboard-queries\n    rules:")
            for n, q in enumerate(qs):
                print(f"      - record: dashboard_query_{n}\n        expr: {json.dumps(q['expr'])}")
        else:
            for q in qs:
                print(json.dumps(q))
        return 0
    for path, dash in dashboards:
        check_dashboard(path, dash, uid, errors)
    check_generated(errors)
    check_metric_names(dashboards, errors)
    if errors:
        print("dashboard check FAILED:", file=sys.stderr)
        for e in dict.fromkeys(errors):
            print(f"  {e}", file=sys.stderr)
        return 1
    n = sum(1 for _, d in dashboards for p in all_panels(d["panels"]) if p.get("type") != "row")
    print(f"dashboards OK: {len(dashboards)} dashboards, {n} panels, datasource uid {uid}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
