//! What the demo shows: live progress while the campaign runs, and the report tables at
//! the end. Everything shown is read from the controller's API (the report from the
//! stored records), never from the demo's own bookkeeping.

use serde_json::Value;
use std::fmt::Write;

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn ci(r: &Value) -> String {
    format!(
        "[{:>5}, {:>5}]",
        pct(r["ci95_low"].as_f64().unwrap_or(0.0)),
        pct(r["ci95_high"].as_f64().unwrap_or(1.0))
    )
}

/// `model=tiny-relu-int8,layer=enc0.conv0` -> value of `name`.
fn field<'a>(key: &'a str, name: &str) -> Option<&'a str> {
    key.split(',')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// `tiny-relu-int8` -> ("relu", "int8") by the model naming rule `{size}-{activation}-{stage}`.
pub fn activation_stage(model: &str) -> (String, String) {
    let mut parts = model.rsplitn(3, '-');
    let stage = parts.next().unwrap_or("").to_string();
    let act = parts.next().unwrap_or("").to_string();
    (act, stage)
}

fn rows<'a>(report: &'a Value, group: &str) -> Vec<&'a Value> {
    report["groups"][group]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default()
}

fn n_of(r: &Value, k: &str) -> u64 {
    r[k].as_u64().unwrap_or(0)
}

fn model_of(r: &Value) -> &str {
    field(r["key"].as_str().unwrap_or(""), "model").unwrap_or("")
}

/// The set-points of the `model_voltage` rows (`vccint=850mV`), highest first: from
/// nominal down into the faulty region.
fn voltage_points(volt: &[&Value]) -> Vec<String> {
    let mut points: Vec<String> = volt
        .iter()
        .filter_map(|r| {
            r["key"]
                .as_str()?
                .split_once(',')
                .map(|(_, v)| v.to_string())
        })
        .collect();
    let mv = |p: &str| -> i64 {
        p.rsplit('=')
            .next()
            .and_then(|x| x.trim_end_matches("mV").parse().ok())
            .unwrap_or(i64::MAX)
    };
    points.sort_by_key(|p| std::cmp::Reverse(mv(p)));
    points.dedup();
    points
}

fn rate(r: &Value) -> f64 {
    r["failure_rate"].as_f64().unwrap_or(0.0)
}

/// The report tables: failure rate per activation function and stage, the most
/// vulnerable layers and bits, failures vs voltage.
pub fn report_tables(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Campaign {} \"{}\" ({}): {} trials counted, {} failures. A failure: any pixel's class differs from golden.\n\
         Intervals are Wilson 95%; rates whose intervals overlap are not shown to differ by this run.\n",
        report["campaign_id"],
        report["name"].as_str().unwrap_or(""),
        report["state"].as_str().unwrap_or(""),
        report["trials"],
        report["failures"],
    );

    // 1. Activation function x stage (the paper's comparison): at the nominal (highest)
    // set-point, where only the injected bit flips act, and over every set-point.
    let mut by_model = rows(report, "model");
    let order = |a: &str| match a {
        "relu" => 0,
        "sigmoid" => 1,
        "hardsigmoid" => 2,
        _ => 3,
    };
    by_model.sort_by_key(|r| {
        let (a, s) = activation_stage(model_of(r));
        (order(&a), s)
    });
    let volt = rows(report, "model_voltage");
    let points = voltage_points(&volt);
    let nominal = points.first().cloned();
    let _ = writeln!(
        out,
        "Failure rate by activation function and stage (weight bit flips)"
    );
    let _ = writeln!(
        out,
        "  {:<12} {:<6} | {:^41} | {:^32} | outcomes (all set-points)",
        "",
        "",
        format!("at {}", nominal.as_deref().unwrap_or("nominal")),
        "all set-points",
    );
    let _ = writeln!(
        out,
        "  {:<12} {:<6} | {:>6} {:>8} {:>7}  {:<16} | {:>6} {:>7}  {:<16} |",
        "activation", "stage", "trials", "failures", "rate", "95% CI", "trials", "rate", "95% CI"
    );
    for r in &by_model {
        let m = model_of(r);
        let (a, s) = activation_stage(m);
        let nom = nominal.as_ref().and_then(|p| {
            let key = format!("model={m},{p}");
            volt.iter()
                .find(|v| v["key"].as_str() == Some(key.as_str()))
        });
        let nom_cols = match nom {
            Some(n) => format!(
                "{:>6} {:>8} {:>7}  {:<16}",
                n_of(n, "trials"),
                n_of(n, "failures"),
                pct(rate(n)),
                ci(n)
            ),
            None => format!("{:>6} {:>8} {:>7}  {:<16}", "-", "-", "-", ""),
        };
        let outcomes: Vec<String> = r["outcomes"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| k.as_str() != "masked")
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<12} {:<6} | {} | {:>6} {:>7}  {:<16} | {}",
            a,
            s,
            nom_cols,
            n_of(r, "trials"),
            pct(rate(r)),
            ci(r),
            outcomes.join(" ")
        );
    }

    // 2. Failures vs voltage: one row per set-point, one column per model.
    if !volt.is_empty() {
        let models: Vec<String> = by_model
            .iter()
            .filter_map(|r| field(r["key"].as_str()?, "model").map(str::to_string))
            .collect();
        let _ = writeln!(out, "\nFailure rate vs voltage (failures/trials per model)");
        let _ = write!(out, "  {:<14}", "set-point");
        for m in &models {
            let (a, s) = activation_stage(m);
            let _ = write!(out, " {:>17}", format!("{a}-{s}"));
        }
        let _ = writeln!(out);
        for p in &points {
            let _ = write!(out, "  {p:<14}");
            for m in &models {
                let key = format!("model={m},{p}");
                let cell = volt
                    .iter()
                    .find(|r| r["key"].as_str() == Some(key.as_str()))
                    .filter(|r| n_of(r, "trials") > 0)
                    .map(|r| {
                        format!(
                            "{} {}/{}",
                            pct(rate(r)),
                            n_of(r, "failures"),
                            n_of(r, "trials")
                        )
                    })
                    .unwrap_or_else(|| "-".into());
                let _ = write!(out, " {cell:>17}");
            }
            let _ = writeln!(out);
        }
    }

    // 3 and 4. The most vulnerable layers and bits.
    for (group, what, name, n) in [
        ("model_layer", "layers", "layer", 10usize),
        ("model_bit", "bit positions", "bit", 10usize),
    ] {
        let mut v = rows(report, group);
        v.retain(|r| r["trials"].as_u64().unwrap_or(0) > 0);
        v.sort_by(|a, b| {
            rate(b)
                .total_cmp(&rate(a))
                .then(
                    b["ci95_low"]
                        .as_f64()
                        .unwrap_or(0.0)
                        .total_cmp(&a["ci95_low"].as_f64().unwrap_or(0.0)),
                )
                .then(a["key"].as_str().cmp(&b["key"].as_str()))
        });
        let _ = writeln!(
            out,
            "\nMost vulnerable {what} (top {n} of {} by failure rate)",
            v.len()
        );
        let _ = writeln!(
            out,
            "  {:<24} {:<12} {:>7} {:>9} {:>7}  {:<16}",
            "model", name, "trials", "failures", "rate", "95% CI"
        );
        for r in v.iter().take(n) {
            let key = r["key"].as_str().unwrap_or("");
            let _ = writeln!(
                out,
                "  {:<24} {:<12} {:>7} {:>9} {:>7}  {:<16}",
                field(key, "model").unwrap_or(""),
                field(key, name).unwrap_or(""),
                n_of(r, "trials"),
                n_of(r, "failures"),
                pct(rate(r)),
                ci(r)
            );
        }
    }
    out
}

/// One status line per board, for the live view.
pub fn board_line(b: &Value) -> String {
    let rail = |name: &str| {
        b["rails_mv"].as_array().and_then(|rs| {
            rs.iter()
                .find(|r| r[0].as_str() == Some(name))
                .and_then(|r| r[1].as_f64())
        })
    };
    let temp = b["temps_c"]
        .as_array()
        .and_then(|t| t.iter().filter_map(|x| x[1].as_f64()).reduce(f64::max));
    format!(
        "{:<8} {:<8} {:<10} {:<8} {:>7} {:>7} {:>13}",
        b["id"].as_str().unwrap_or("?"),
        b["connectivity"].as_str().unwrap_or("?"),
        b["state"].as_str().unwrap_or("?"),
        b["health"].as_str().unwrap_or("?"),
        b["power_w"]
            .as_f64()
            .map(|p| format!("{p:.2} W"))
            .unwrap_or("-".into()),
        temp.map(|t| format!("{t:.1} C")).unwrap_or("-".into()),
        rail("vccint")
            .map(|v| format!("VCCINT {v:.0} mV"))
            .unwrap_or("-".into()),
    )
}

/// `masked=12 sdc_critical=3 ...` in a fixed order, zeros left out.
pub fn outcome_counts(live: &Value) -> String {
    let o = &live["inference_outcomes"];
    proto::wire::Outcome::ALL
        .iter()
        .filter_map(|x| {
            let n = o[x.as_str()].as_u64().unwrap_or(0);
            (n > 0).then(|| format!("{}={n}", x.as_str()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_model_names() {
        assert_eq!(
            activation_stage("tiny-hardsigmoid-int8"),
            ("hardsigmoid".into(), "int8".into())
        );
        assert_eq!(
            activation_stage("small-relu-fp32"),
            ("relu".into(), "fp32".into())
        );
        assert_eq!(
            field("model=a-b-c,layer=enc0.conv0", "layer"),
            Some("enc0.conv0")
        );
        assert_eq!(field("model=a-b-c,vccint=560mV", "vccint"), Some("560mV"));
    }

    fn row(key: &str, n: u64, k: u64) -> Value {
        let (lo, hi) = crate::campaign::sizing::wilson(k, n, crate::campaign::sizing::Z95);
        json!({"key": key, "trials": n, "failures": k, "failure_rate": k as f64 / n as f64,
               "ci95_low": lo, "ci95_high": hi, "outcomes": {"masked": n - k, "sdc_critical": k}})
    }

    #[test]
    fn tables_show_every_model_voltage_and_the_worst_layer_first() {
        let r = json!({
            "campaign_id": 1, "name": "af", "state": "done", "trials": 40, "failures": 7,
            "groups": {
                "model": [row("model=tiny-sigmoid-fp32", 20, 5), row("model=tiny-relu-int8", 20, 2)],
                "model_voltage": [row("model=tiny-relu-int8,vccint=850mV", 10, 0), row("model=tiny-relu-int8,vccint=560mV", 10, 2),
                                   row("model=tiny-sigmoid-fp32,vccint=850mV", 10, 1), row("model=tiny-sigmoid-fp32,vccint=560mV", 10, 4)],
                "model_layer": [row("model=tiny-relu-int8,layer=head", 10, 0), row("model=tiny-relu-int8,layer=enc0.conv0", 10, 2)],
                "model_bit": [row("model=tiny-sigmoid-fp32,bit=30", 5, 5), row("model=tiny-sigmoid-fp32,bit=01", 15, 0)],
            }
        });
        let t = report_tables(&r);
        // ReLU sorts before Sigmoid whatever the report's order.
        assert!(
            t.find("relu ").unwrap() < t.find("sigmoid ").unwrap(),
            "{t}"
        );
        // Nominal first, then the undervolted point; cells are rate k/n.
        assert!(
            t.find("vccint=850mV").unwrap() < t.find("vccint=560mV").unwrap(),
            "{t}"
        );
        assert!(t.contains("20.0% 2/10"), "{t}");
        assert!(
            t.find("enc0.conv0").unwrap() < t.find(" head ").unwrap(),
            "{t}"
        );
        assert!(t.contains("100.0%"), "{t}");
    }
}
