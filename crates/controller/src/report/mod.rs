//! Reports, computed from the store only (the stored list + stored records), with the
//! same trial rules the scheduler applies ([`crate::scheduling::trial`]).
//!
//! A trial is one injection; it fails by the paper's criterion when any pixel of any
//! of its inferences differs from golden (every outcome except masked and refused).

pub mod export;

use crate::campaign::sizing::{Z95, wilson};
use crate::scheduling::trial::{self, TrialStatus};
use crate::store::{Store, StoreError};
use proto::wire::Outcome;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub key: String,
    pub model: String,
    pub layer: Option<String>,
    pub tensor_kind: Option<String>,
    pub bit: Option<u8>,
    pub voltages: Vec<(String, u32)>,
    pub population: u64,
    pub planned: u64,
    pub trials: u64,
    pub failures: u64,
    pub failure_rate: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub outcomes: BTreeMap<String, u64>,
    /// Refused or abandoned trials (not in `trials`).
    pub excluded: u64,
    pub early_stopped_at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub campaign_id: u64,
    pub name: String,
    pub hash: String,
    pub state: String,
    pub trials: u64,
    pub failures: u64,
    pub strata: Vec<Row>,
    /// Aggregates over strata: by model, model x layer, model x bit, model x voltage.
    pub groups: BTreeMap<String, Vec<Row>>,
}

#[derive(Default, Clone)]
struct Acc {
    trials: u64,
    failures: u64,
    outcomes: BTreeMap<String, u64>,
    excluded: u64,
}

impl Acc {
    fn add(&mut self, o: Outcome) {
        if trial::counts(o) {
            self.trials += 1;
            if o.is_failure() {
                self.failures += 1;
            }
        } else {
            self.excluded += 1;
        }
        *self.outcomes.entry(o.as_str().to_string()).or_default() += 1;
    }
}

fn row(key: String, model: String, acc: &Acc) -> Row {
    let (lo, hi) = wilson(acc.failures, acc.trials, Z95);
    Row {
        key,
        model,
        layer: None,
        tensor_kind: None,
        bit: None,
        voltages: vec![],
        population: 0,
        planned: 0,
        trials: acc.trials,
        failures: acc.failures,
        failure_rate: if acc.trials == 0 {
            0.0
        } else {
            acc.failures as f64 / acc.trials as f64
        },
        ci95_low: lo,
        ci95_high: hi,
        outcomes: acc.outcomes.clone(),
        excluded: acc.excluded,
        early_stopped_at: None,
    }
}

pub fn build(store: &Store, campaign: u64, max_attempts: u32) -> Result<Report, StoreError> {
    let c = store
        .campaign_blocking(campaign)?
        .ok_or_else(|| StoreError::Data(format!("no campaign {campaign}")))?;
    let strata = store.strata_blocking(campaign)?;
    let injections = store.injections_blocking(campaign)?;
    let mut recs: Vec<Vec<(u32, u32, Outcome)>> = vec![Vec::new(); injections.len()];
    for (t, a, i, o) in store.outcomes_blocking(campaign)? {
        if let Some(v) = recs.get_mut(t as usize) {
            v.push((a, i, o));
        }
    }
    let n_inputs = c.plan.inputs.len();
    let finals: Vec<Option<Outcome>> = recs
        .iter()
        .map(|r| match trial::status(r, n_inputs, max_attempts) {
            TrialStatus::Final { outcome, .. } => Some(outcome),
            TrialStatus::Abandoned => Some(Outcome::InfraError),
            _ => None,
        })
        .collect();
    // Early stop: a stratum counts only the prefix up to its stop point.
    let mut by_stratum: Vec<Vec<u64>> = vec![Vec::new(); strata.len()];
    for inj in &injections {
        if let Some(v) = by_stratum.get_mut(inj.stratum as usize) {
            v.push(inj.trial_id);
        }
    }
    let mut counted = vec![false; injections.len()];
    let mut stops = vec![None; strata.len()];
    for (s, ids) in by_stratum.iter().enumerate() {
        let stop = c
            .plan
            .early_stop
            .and_then(|es| trial::early_stop_point(ids.iter().map(|t| finals[*t as usize]), &es));
        stops[s] = stop;
        let mut n = 0u64;
        for t in ids {
            if let Some(k) = stop
                && n >= k
            {
                break;
            }
            if let Some(o) = finals[*t as usize] {
                counted[*t as usize] = true;
                if trial::counts(o) {
                    n += 1;
                }
            }
        }
    }
    let mut per_stratum = vec![Acc::default(); strata.len()];
    let mut groups: BTreeMap<(String, String), (String, Acc)> = BTreeMap::new();
    let mut total = Acc::default();
    for inj in &injections {
        let t = inj.trial_id as usize;
        let Some(o) = finals[t].filter(|_| counted[t]) else {
            continue;
        };
        per_stratum[inj.stratum as usize].add(o);
        total.add(o);
        let v: Vec<String> = inj
            .voltages
            .iter()
            .map(|(r, mv)| format!("{r}={mv}mV"))
            .collect();
        let keys = [
            ("model".to_string(), format!("model={}", inj.model)),
            (
                "model_layer".to_string(),
                format!("model={},layer={}", inj.model, inj.layer),
            ),
            (
                "model_bit".to_string(),
                format!("model={},bit={:02}", inj.model, inj.bit),
            ),
            (
                "model_voltage".to_string(),
                format!(
                    "model={},{}",
                    inj.model,
                    if v.is_empty() {
                        "nominal".into()
                    } else {
                        v.join(",")
                    }
                ),
            ),
        ];
        for (dim, key) in keys {
            groups
                .entry((dim, key))
                .or_insert_with(|| (inj.model.clone(), Acc::default()))
                .1
                .add(o);
        }
    }
    let rows: Vec<Row> = strata
        .iter()
        .zip(&per_stratum)
        .map(|(s, acc)| {
            let mut r = row(s.key.clone(), s.model.clone(), acc);
            r.layer = s.layer.clone();
            r.tensor_kind = s.tensor_kind.clone();
            r.bit = s.bit;
            r.voltages = s.voltages.clone();
            r.population = s.population;
            r.planned = s.planned;
            r.early_stopped_at = stops[s.idx as usize];
            r
        })
        .collect();
    let mut g: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for ((dim, key), (model, acc)) in groups {
        g.entry(dim).or_default().push(row(key, model, &acc));
    }
    Ok(Report {
        campaign_id: campaign,
        name: c.name,
        hash: c.hash,
        state: c.state,
        trials: total.trials,
        failures: total.failures,
        strata: rows,
        groups: g,
    })
}

impl Report {
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "stratum,model,layer,tensor_kind,bit,voltages,population,planned,trials,failures,failure_rate,ci95_low,ci95_high,excluded,early_stopped_at,outcomes\n",
        );
        for r in &self.strata {
            let v: Vec<String> = r.voltages.iter().map(|(a, b)| format!("{a}={b}")).collect();
            let o: Vec<String> = r.outcomes.iter().map(|(k, n)| format!("{k}={n}")).collect();
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{:.6},{:.6},{:.6},{},{},{}",
                csv_field(&r.key),
                csv_field(&r.model),
                csv_field(r.layer.as_deref().unwrap_or("")),
                csv_field(r.tensor_kind.as_deref().unwrap_or("")),
                r.bit.map(|b| b.to_string()).unwrap_or_default(),
                csv_field(&v.join(";")),
                r.population,
                r.planned,
                r.trials,
                r.failures,
                r.failure_rate,
                r.ci95_low,
                r.ci95_high,
                r.excluded,
                r.early_stopped_at
                    .map(|b| b.to_string())
                    .unwrap_or_default(),
                csv_field(&o.join(";")),
            );
        }
        out
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "campaign {} ({}) state={} hash={}\n{} trials, {} failures (any pixel differs from golden)\n",
            self.campaign_id,
            self.name,
            self.state,
            &self.hash[..self.hash.len().min(12)],
            self.trials,
            self.failures
        );
        let width = self
            .strata
            .iter()
            .map(|r| r.key.len())
            .max()
            .unwrap_or(7)
            .max(7);
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:>7}  {:>8}  {:>8}  {:>17}  outcomes",
            "stratum", "planned", "trials", "failures", "rate", "95% CI (Wilson)"
        );
        for r in &self.strata {
            let o: Vec<String> = r.outcomes.iter().map(|(k, n)| format!("{k}={n}")).collect();
            let _ = writeln!(
                out,
                "{:<width$}  {:>7}  {:>7}  {:>8}  {:>7.2}%  [{:>6.2}%, {:>6.2}%]  {}",
                r.key,
                r.planned,
                r.trials,
                r.failures,
                r.failure_rate * 100.0,
                r.ci95_low * 100.0,
                r.ci95_high * 100.0,
                o.join(" ")
            );
        }
        out
    }
}

pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
