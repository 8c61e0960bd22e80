#!/usr/bin/env python3
"""Generate the Grafana dashboards (grafana/dashboards/*.json) from this one file.

Dashboards as code, stdlib only: edit the panels here, run `python3 grafana/generate.py`,
commit both. tools/check_dashboards.py fails when the JSON and this generator disagree,
so hand edits to the JSON cannot drift silently.

Metric names are the controller's (crates/controller/src/metrics/); see docs/operating.md.
"""
import json
import sys
from pathlib import Path

DS_UID = "hil-prometheus"  # must match grafana/provisioning/datasources/prometheus.yaml
DS = {"type": "prometheus", "uid": DS_UID}
OUT = Path(__file__).resolve().parent / "dashboards"

# Outcome::is_failure in crates/proto/src/wire.rs (the paper's criterion: any pixel differs).
FAIL = 'outcome=~"sdc_tolerable|sdc_critical|non_finite|improved|hang|crash"'
# Refused and infra errors are not trial outcomes: they never enter a failure rate.
COUNTED = 'outcome!~"refused|infra_error"'


def wilson(f, n, side):
    """PromQL for one bound of the Wilson 95% interval of f/n (z = Phi^-1(0.975) = 1.959964,
    as the controller's report uses).

    centre = (p + z²/2n) / (1 + z²/n), half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n);
    the same formula as the controller's report, so the panel and `hilctl report` agree.
    """
    p = f"(({f}) / ({n}))"
    centre = f"({p} + 1.920729 / ({n})) / (1 + 3.841459 / ({n}))"
    half = f"1.959964 * sqrt({p} * (1 - {p}) / ({n}) + 0.960365 / (({n}) * ({n}))) / (1 + 3.841459 / ({n}))"
    return f"{centre} {'-' if side == 'lower' else '+'} {half}"


class Dash:
    def __init__(self, uid, title, description, tags, variables=()):
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.variables = list(variables)
        self.panels = []
        self.x = self.y = self.row_h = 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({
            "id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def panel(self, ptype, title, targets, w=12, h=8, unit=None, description="",
              options=None, field_defaults=None, transformations=None, overrides=None):
        defaults = dict(field_defaults or {})
        if unit:
            defaults["unit"] = unit
        tgts = []
        for i, t in enumerate(targets):
            t = dict(t) if isinstance(t, dict) else {"expr": t}
            tgt = {"refId": chr(ord("A") + i), "datasource": DS, "expr": t.pop("expr"),
                   "legendFormat": t.pop("legend", "__auto"), "range": True, "instant": False,
                   "format": "time_series"}
            if t.pop("instant", False):
                tgt.update(range=False, instant=True, format="table")
            tgt.update(t)
            tgts.append(tgt)
        self.panels.append({
            "id": len(self.panels) + 1, "type": ptype, "title": title, "description": description,
            "datasource": DS, "gridPos": self._place(w, h), "targets": tgts,
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": options or {}, "transformations": transformations or [],
        })

    def text(self, title, content, w=24, h=4):
        self.panels.append({
            "id": len(self.panels) + 1, "type": "text", "title": title, "datasource": DS,
            "gridPos": self._place(w, h), "options": {"mode": "markdown", "content": content},
        })

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["hil", "kv260"] + self.tags, "timezone": "utc", "editable": True,
            "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "fiscalYearStartMonth": 0,
            "liveNow": False, "weekStart": "",
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts", "type": "dashboard"}]},
            "links": [{"title": "HIL lab", "type": "dashboards", "tags": ["hil"], "asDropdown": True}],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def var(name, label, query, multi=True):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
        "refresh": 2, "multi": multi, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "options": [],
    }


TS = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
      "tooltip": {"mode": "multi", "sort": "desc"}}
STAT = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
        "orientation": "auto"}
BARGAUGE = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True}


def lab_overview():
    d = Dash("hil-lab-overview", "HIL lab: overview",
             "Every board in the rack: connectivity, health, power, temperatures, rail voltages.",
             ["lab"], [var("board", "Board", "label_values(hil_board_up, board)")])
    B = 'board=~"$board"'
    d.row("Rack")
    d.panel("stat", "Boards up", ["sum(hil_board_up)"], w=4, h=4, options=STAT,
            description="Agents connected with a fresh heartbeat.")
    d.panel("stat", "Boards down", ["count(hil_board_up == 0) or vector(0)"], w=4, h=4,
            options=STAT, field_defaults={"thresholds": {"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "red", "value": 1}]}},
            description="Registered boards whose agent is not connected.")
    d.panel("stat", "Boards bad", ['sum(hil_boards{health="bad"})'], w=4, h=4, options=STAT,
            field_defaults={"thresholds": {"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "red", "value": 1}]}},
            description="Boards taken out of service after repeated failed recoveries: see docs/operating.md.")
    d.panel("piechart", "Boards by health", [{"expr": "sum by (health) (hil_boards)", "legend": "{{health}}"}],
            w=6, h=8, options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                               "pieType": "donut", "legend": {"displayMode": "table", "placement": "right",
                                                              "showLegend": True, "values": ["value"]}})
    d.panel("bargauge", "Boards by scheduling state", [{"expr": "sum by (state) (hil_boards)", "legend": "{{state}}"}],
            w=6, h=8, options=BARGAUGE)
    d.panel("state-timeline", "Up / down", [{"expr": f"hil_board_up{{{B}}}", "legend": "{{board}}"}],
            w=12, h=8, options={"mergeValues": True, "showValue": "never", "alignValue": "left",
                                "rowHeight": 0.9, "legend": {"showLegend": False, "displayMode": "list",
                                                             "placement": "bottom"}},
            field_defaults={"mappings": [{"type": "value", "options": {
                "0": {"text": "down", "color": "red", "index": 0},
                "1": {"text": "up", "color": "green", "index": 1}}}],
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                             {"color": "green", "value": 1}]}})
    d.panel("table", "Boards now: connected, bad alert", [
        {"expr": f"hil_board_up{{{B}}}", "instant": True},
        # The controller sets the alert series only once a board went bad: 0 otherwise.
        {"expr": f"hil_board_bad_alert{{{B}}} or hil_board_up{{{B}}} * 0", "instant": True}],
        w=12, h=8, description=("Connectivity and the bad alert per board. Health by board: `hilctl boards`; "
                                "the health mix of the rack is the pie chart."),
        transformations=[{"id": "merge", "options": {}},
                         {"id": "organize", "options": {
                             "excludeByName": {"Time": True, "__name__": True, "instance": True, "job": True},
                             "renameByName": {"Value #A": "connected", "Value #B": "bad alert"}}}])
    d.row("Power and environment")
    d.panel("timeseries", "Board power (INA260)", [{"expr": f"hil_board_power_watts{{{B}}}", "legend": "{{board}}"}],
            unit="watt", options=TS)
    d.panel("timeseries", "Temperatures (AMS)", [
        {"expr": f"hil_board_temperature_celsius{{{B}}}", "legend": "{{board}} {{sensor}}"}],
        unit="celsius", options=TS)
    d.panel("timeseries", "Rail voltages (read-back)", [
        {"expr": f"hil_board_rail_volts{{{B}}}", "legend": "{{board}} {{rail}}"}],
        w=24, unit="volt", options=TS, description=(
            "Read back through the AMS monitor. Undervolting campaigns move VCCINT on purpose, "
            "never outside the board file's hard limits (docs/operating.md, Voltage limits)."))
    d.row("Recovery")
    d.panel("timeseries", "Recoveries by action and result", [
        {"expr": "sum by (action, result) (increase(hil_recoveries_total[$__rate_interval])) or vector(0)",
         "legend": "{{action}} {{result}}"}],
        w=24, unit="short", options=TS, field_defaults={"custom": {"drawStyle": "bars"}},
        description=("Wait for reconnect, power cycle, health check, lab-wide (0 when none happened). "
                     "Repeated failures turn a board bad; per-board incidents: GET /api/incidents."))
    return d


def campaign():
    C = 'campaign=~"$campaign"'
    M = 'model=~"$model"'
    d = Dash("hil-campaign", "HIL lab: campaign",
             "A fault-injection campaign: progress, outcomes, failure rates with Wilson 95% intervals, "
             "vulnerable layers, failures vs voltage, latency and power.",
             ["campaign"],
             [var("campaign", "Campaign", "label_values(hil_campaign_trials_planned, campaign)"),
              var("model", "Model", "label_values(hil_inference_outcomes_total, model)")])
    d.row("Progress")
    d.panel("bargauge", "Progress", [
        {"expr": f"hil_campaign_progress_ratio{{{C}}}", "legend": "{{campaign}}"}],
        w=12, h=6, unit="percentunit", options=BARGAUGE, field_defaults={"min": 0, "max": 1})
    d.panel("stat", "Trials done / planned", [
        f"sum(hil_campaign_trials_done{{{C}}})", f"sum(hil_campaign_trials_planned{{{C}}})"],
        w=6, h=6, options=STAT)
    d.panel("stat", "Trial rate", [f"sum(deriv(hil_campaign_trials_done{{{C}}}[$__rate_interval]))"],
            w=6, h=6, unit="short", options=STAT, description="Trials per second, all boards.")
    d.panel("timeseries", "Inference outcome rates (campaign)", [
        {"expr": f"sum by (outcome) (rate(hil_campaign_inference_outcomes_total{{{C}}}[$__rate_interval]))",
         "legend": "{{outcome}}"}],
        w=12, unit="short", options=TS,
        field_defaults={"custom": {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 30}},
        description="Inferences per second by outcome, for the selected campaigns.")
    d.panel("timeseries", "Inference outcome rates by model (all work)", [
        {"expr": f"sum by (model, outcome) (rate(hil_inference_outcomes_total{{{M},outcome!=\"masked\"}}[$__rate_interval]))",
         "legend": "{{model}} {{outcome}}"}],
        w=12, unit="short", options=TS,
        description="Every committed inference, masked ones left out so the failures are visible.")
    d.row("Failure rates (the paper's criterion: any pixel's class differs from golden)")
    # activation and stage come from the model name ({size}-{activation}-{stage}).
    src = (f'label_replace(label_replace(hil_inference_outcomes_total{{{M},OUTCOMES}}, '
           f'"activation", "$1", "model", "[^-]+-([^-]+)-.*"), "stage", "$1", "model", ".*-([^-]+)")')
    for by, title in [("activation, stage", "Failure rate per inference by activation and stage"),
                      ("model", "Failure rate per inference by model")]:
        f = f"(sum by ({by}) ({src.replace('OUTCOMES', FAIL)}) or sum by ({by}) ({src.replace('OUTCOMES', COUNTED)}) * 0)"
        n = f"sum by ({by}) ({src.replace('OUTCOMES', COUNTED)})"
        d.panel("table", title + " (Wilson 95%)", [
            {"expr": f"{f} / {n}", "instant": True},
            {"expr": wilson(f, n, "lower"), "instant": True},
            {"expr": wilson(f, n, "upper"), "instant": True},
            {"expr": n, "instant": True}],
            w=12, h=9, unit="percentunit",
            description=("Every committed inference of the time range, all campaigns (the controller's "
                         "counter hil_inference_outcomes_total). `hilctl report` counts per trial instead: a "
                         "trial fails when any of its inputs does, so its rates are higher."),
            transformations=[{"id": "merge", "options": {}},
                             {"id": "organize", "options": {
                                 "excludeByName": {"Time": True},
                                 "renameByName": {"Value #A": "failure rate", "Value #B": "95% low",
                                                  "Value #C": "95% high", "Value #D": "inferences"}}}],
            overrides=[{"matcher": {"id": "byName", "options": "inferences"},
                        "properties": [{"id": "unit", "value": "short"}]}])
    d.panel("heatmap", "Per-layer vulnerability (failure rate of faults in the layer)", [
        {"expr": f"sum by (model, layer) (hil_campaign_layer_failures_total{{{C},{M}}}) / "
                 f"sum by (model, layer) (hil_campaign_layer_trials_total{{{C},{M}}})",
         "legend": "{{model}} {{layer}}"}],
        w=24, h=12, options={"calculate": False, "cellGap": 1, "color": {
            "mode": "scheme", "scheme": "Reds", "steps": 64, "exponent": 0.5, "fill": "dark-red",
            "reverse": False, "scale": "exponential"},
            "yAxis": {"axisPlacement": "left", "reverse": False}, "rowsFrame": {"layout": "auto"},
            "cellValues": {"unit": "percentunit"}, "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
            "exemplars": {"color": "rgba(255,0,255,0.7)"}},
        description="Rows are (model, layer); colour is the cumulative failure rate of trials whose fault hit "
                    "a parameter of that layer. Pick one model for a readable map.")
    d.panel("barchart", "Failure rate vs voltage", [
        {"expr": f"sum by (model, millivolts) (hil_campaign_voltage_failures_total{{{C},{M}}}) / "
                 f"sum by (model, millivolts) (hil_campaign_voltage_trials_total{{{C},{M}}})",
         "instant": True}],
        w=24, h=9, unit="percentunit",
        options={"orientation": "vertical", "xTickLabelRotation": 0, "showValue": "never",
                 "groupWidth": 0.7, "barWidth": 0.97, "stacking": "none",
                 "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                 "tooltip": {"mode": "multi", "sort": "none"}},
        description="Set-point of the trial (mV, x) vs failure rate, one bar per model. The emulated board's "
                    "timing starts failing below ~570 mV; a real KV260's threshold must be measured.",
        transformations=[{"id": "groupingToMatrix", "options": {
            "columnField": "model", "rowField": "millivolts", "valueField": "Value"}},
            {"id": "convertFieldType", "options": {"conversions": [
                {"targetField": "millivolts\\model", "destinationType": "string"}]}}])
    d.text("Per bit",
           "The per-bit breakdown (and every breakdown with its Wilson interval) comes from the stored "
           "records: `hilctl report <campaign>` (group `model_bit` in `--format json`), or "
           "`hilctl export <campaign> --format parquet`.", h=3)
    d.row("Latency and power")
    d.panel("heatmap", "Inference latency distribution", [
        {"expr": f"sum by (le) (increase(hil_inference_latency_seconds_bucket{{{M}}}[$__rate_interval]))",
         "format": "heatmap", "legend": "{{le}}"}],
        options={"calculate": False, "yAxis": {"unit": "s", "axisPlacement": "left"},
                 "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                 "cellGap": 1, "rowsFrame": {"layout": "auto"}, "legend": {"show": True},
                 "tooltip": {"mode": "single", "yHistogram": True}})
    d.panel("timeseries", "Inference latency p50 / p99", [
        {"expr": f"histogram_quantile(0.5, sum by (le, model) (rate(hil_inference_latency_seconds_bucket{{{M}}}[$__rate_interval])))",
         "legend": "p50 {{model}}"},
        {"expr": f"histogram_quantile(0.99, sum by (le, model) (rate(hil_inference_latency_seconds_bucket{{{M}}}[$__rate_interval])))",
         "legend": "p99 {{model}}"}], unit="s", options=TS)
    d.panel("histogram", "Board power distribution (samples in the time range)", [
        {"expr": "hil_board_power_watts", "legend": "{{board}}"}],
        unit="watt", options={"bucketSize": 0.05, "combine": True,
                              "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        description="INA260 input power of every board, idle and busy; the right-hand mode is inference.")
    d.panel("timeseries", "Board power", [
        {"expr": "hil_board_power_watts", "legend": "{{board}}"}], unit="watt", options=TS)
    return d


def field():
    B = 'board=~"$board"'
    d = Dash("hil-field", "HIL lab: field robustness",
             "Boards deployed in products run periodic canary inferences against golden outputs "
             "(no injection): a mismatch means the hardware, not the model, changed an answer.",
             ["field"], [var("board", "Board", "label_values(hil_board_up, board)")])
    d.panel("stat", "Boards with canary mismatches (time range)", [
        f"count(increase(hil_field_canary_mismatches_total{{{B}}}[$__range]) > 0) or vector(0)"],
        w=6, h=5, options=STAT, field_defaults={"thresholds": {"mode": "absolute", "steps": [
            {"color": "green", "value": None}, {"color": "red", "value": 1}]}})
    d.panel("stat", "Canary runs (time range)", [
        f"sum(increase(hil_field_canary_runs_total{{{B}}}[$__range])) or vector(0)"], w=6, h=5, options=STAT)
    d.panel("bargauge", "Mismatch ratio per board (time range)", [
        {"expr": f"(sum by (board) (increase(hil_field_canary_mismatches_total{{{B}}}[$__range])) / "
                 f"sum by (board) (increase(hil_field_canary_runs_total{{{B}}}[$__range]))) or vector(0)",
         "legend": "{{board}}"}], w=12, h=5, unit="percentunit", options=BARGAUGE,
        field_defaults={"min": 0})
    d.panel("timeseries", "Canary mismatches per board over time", [
        {"expr": f"sum by (board) (increase(hil_field_canary_mismatches_total{{{B}}}[$__rate_interval])) or vector(0)",
         "legend": "{{board}}"}], w=24, unit="short", options=TS,
        field_defaults={"custom": {"drawStyle": "bars", "fillOpacity": 80}})
    d.panel("timeseries", "Canary runs per second", [
        {"expr": f"sum by (board) (rate(hil_field_canary_runs_total{{{B}}}[$__rate_interval])) or vector(0)",
         "legend": "{{board}}"}], unit="short", options=TS)
    d.panel("timeseries", "VCCINT and temperature of field boards", [
        {"expr": f'hil_board_rail_volts{{{B},rail="vccint"}}', "legend": "{{board}} VCCINT"},
        {"expr": f"max by (board) (hil_board_temperature_celsius{{{B}}})", "legend": "{{board}} max temp"}],
        unit="volt", options=TS,
        overrides=[{"matcher": {"id": "byRegexp", "options": ".*max temp"},
                    "properties": [{"id": "unit", "value": "celsius"},
                                   {"id": "custom.axisPlacement", "value": "right"}]}],
        description="Context for a mismatch: a sagging rail or a hot die often comes first.")
    return d


DASHBOARDS = {"lab-overview.json": lab_overview, "campaign.json": campaign, "field-robustness.json": field}


def render():
    return {name: json.dumps(f().json(), indent=2, sort_keys=False) + "\n" for name, f in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}", file=sys.stderr)
