#!/usr/bin/env python3
"""Recompute a campaign report from its Parquet export and compare it with the report
the controller produced (`hilctl report ID --format json`, or the demo's report.json).

usage: recompute_report.py RECORDS.parquet REPORT.json

Reads the per-inference records with pandas/pyarrow only; nothing from the controller's
code is reused. The trial rules are the documented ones (README "Reading the results",
crates/controller/src/scheduling/trial.rs):
  - a trial's records are grouped by attempt, lowest first; an attempt with a crash is
    final (crash); an attempt with an infra_error is skipped; otherwise, once every input
    has a record, the trial's outcome is `refused` if any input was refused, else the most
    severe outcome (crash > hang > non_finite > sdc_critical > sdc_tolerable > improved >
    masked); all attempts infra errors = abandoned (excluded);
  - refused and abandoned trials are excluded; a trial fails when its outcome is not masked;
  - Wilson score interval, z = Phi^-1(0.975).
Compares trials, failures, rate and interval of every row of the `model`, `model_layer`,
`model_bit` and `model_voltage` groups, the per-stratum rows, and the totals. Exit 1 on
any difference (rates to 1e-9), printing each.
"""
import json
import math
import sys
from statistics import NormalDist

import pandas as pd

SEVERITY = {"crash": 9, "hang": 8, "non_finite": 7, "sdc_critical": 6, "sdc_tolerable": 5,
            "improved": 4, "masked": 3, "refused": 2, "infra_error": 1}
# The controller uses Phi^-1(0.975), not the rounded 1.96.
Z = NormalDist().inv_cdf(0.975)


def wilson(k, n):
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = Z * Z
    d = 1 + z2 / n
    c = (p + z2 / (2 * n)) / d
    h = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def trial_outcome(g, n_inputs):
    for _, a in sorted(g.groupby("attempt"), key=lambda x: x[0]):
        outs = set(a["outcome"])
        if "crash" in outs:
            return "crash"
        if "infra_error" in outs:
            continue
        if a["input"].nunique() < n_inputs:
            return None  # pending
        if "refused" in outs:
            return "refused"
        return max(outs, key=SEVERITY.get)
    return "infra_error"  # every attempt failed: abandoned


def voltage_key(v):
    pts = json.loads(v) if v else []
    return ",".join(f"{r}={mv}mV" for r, mv in pts) if pts else "nominal"


def main(parquet, report_path):
    df = pd.read_parquet(parquet)
    report = json.load(open(report_path))
    if df.empty:
        sys.exit(f"{parquet}: no records")
    n_inputs = df.groupby(["trial_id", "attempt"])["input"].nunique().max()
    per_trial = (df.groupby("trial_id")
                 .apply(lambda g: pd.Series({
                     "outcome": trial_outcome(g, n_inputs),
                     "model": g["model"].iat[0], "layer": g["layer"].iat[0], "bit": int(g["bit"].iat[0]),
                     "stratum": int(g["stratum"].iat[0]), "voltages": g["voltages"].iat[0]}),
                        include_groups=False)
                 .reset_index())
    t = per_trial[per_trial["outcome"].notna()].copy()
    t = t[~t["outcome"].isin(["refused", "infra_error"])]
    t["failure"] = t["outcome"] != "masked"
    t["k_model"] = "model=" + t["model"]
    t["k_model_layer"] = "model=" + t["model"] + ",layer=" + t["layer"]
    t["k_model_bit"] = "model=" + t["model"] + ",bit=" + t["bit"].map(lambda b: f"{b:02d}")
    t["k_model_voltage"] = "model=" + t["model"] + "," + t["voltages"].map(voltage_key)

    problems = []

    def compare(where, rows_by_key, ours):
        keys = set(rows_by_key) | set(ours.index)
        for key in sorted(keys):
            r = rows_by_key.get(key)
            if r is None:
                problems.append(f"{where} {key}: in the records but not in the report")
                continue
            n, k = (int(ours.loc[key, "n"]), int(ours.loc[key, "k"])) if key in ours.index else (0, 0)
            lo, hi = wilson(k, n)
            rate = k / n if n else 0.0
            got = (r["trials"], r["failures"])
            if got != (n, k):
                problems.append(f"{where} {key}: report trials/failures {got}, records give {(n, k)}")
            for name, mine in (("failure_rate", rate), ("ci95_low", lo), ("ci95_high", hi)):
                if abs(r[name] - mine) > 1e-9:
                    problems.append(f"{where} {key}: report {name} {r[name]!r}, records give {mine!r}")

    def agg(col):
        return t.groupby(col)["failure"].agg(n="count", k="sum")

    groups = report.get("groups", {})
    for dim in ("model", "model_layer", "model_bit", "model_voltage"):
        rows = {r["key"]: r for r in groups.get(dim, [])}
        compare(f"group {dim}:", rows, agg(f"k_{dim}"))
    strata = {str(i): r for i, r in enumerate(report.get("strata", []))}
    ours = t.groupby(t["stratum"].astype(str))["failure"].agg(n="count", k="sum")
    # Strata with no counted trial appear in the report with zeros only.
    strata = {k: r for k, r in strata.items() if r["trials"] or k in ours.index}
    compare("stratum", strata, ours)
    if (report.get("trials"), report.get("failures")) != (len(t), int(t["failure"].sum())):
        problems.append(f"totals: report {(report.get('trials'), report.get('failures'))}, "
                        f"records give {(len(t), int(t['failure'].sum()))}")
    if problems:
        print(f"report differs from the records in {len(problems)} place(s):", file=sys.stderr)
        for p in problems[:50]:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"report matches the records: {len(df)} inference records, {len(t)} counted trials, "
          f"{int(t['failure'].sum())} failures, {sum(len(groups.get(d, [])) for d in groups)} group rows, "
          f"{len(strata)} strata")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
