//! Campaigns: the YAML file, its validation, and compilation into an immutable,
//! content-hashed injection list. The list is computed once, stored, and is the only
//! thing the scheduler and the reports look at afterwards, so a resumed or re-run
//! campaign cannot drift from what was submitted.

pub mod cron;
pub mod sizing;
pub mod spec;

use proto::manifest::{Manifest, TensorKind};
use proto::wire::{FaultKind, FaultSpec, FaultTarget, Persistence};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use spec::*;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error(transparent)]
    Yaml(#[from] proto::yaml::YamlError),
    /// A value that parsed but makes no sense; `line` is 0 when the value was defaulted.
    #[error("{origin}: line {line}: {field}: {message}")]
    Invalid {
        origin: String,
        line: u64,
        field: String,
        message: String,
    },
    #[error("{origin}: model {model:?}: {message}")]
    Model {
        origin: String,
        model: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EarlyStop {
    pub margin: f64,
    pub min_trials: u64,
    pub check_every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stratum {
    pub idx: u32,
    pub key: String,
    pub model: String,
    pub layer: Option<String>,
    pub tensor_kind: Option<String>,
    pub bit: Option<u8>,
    pub voltages: Vec<(String, u32)>,
    /// N: possible single faults (elements x bits) in the stratum.
    pub population: u64,
    /// n: injections planned.
    pub planned: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Injection {
    pub trial_id: u64,
    pub stratum: u32,
    pub model: String,
    pub layer: String,
    pub tensor_kind: String,
    /// First (sampled) bit of the fault, for per-bit breakdowns.
    pub bit: u8,
    pub faults: Vec<FaultSpec>,
    pub voltages: Vec<(String, u32)>,
}

/// What the scheduler needs about a campaign besides its list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub seed: u64,
    pub priority: u32,
    pub selector: BoardSelector,
    pub models: Vec<String>,
    pub inputs: Vec<u32>,
    pub outcomes: OutcomeThresholds,
    pub early_stop: Option<EarlyStop>,
    pub schedule: Option<String>,
    pub time_limit_s: Option<u64>,
}

impl PartialEq for OutcomeThresholds {
    fn eq(&self, o: &Self) -> bool {
        self.critical_iou == o.critical_iou
            && self.timeout_factor == o.timeout_factor
            && self.golden_every == o.golden_every
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub plan: Plan,
    /// sha256 over the plan's semantics and the full list.
    pub hash: String,
    pub strata: Vec<Stratum>,
    pub injections: Vec<Injection>,
}

struct Ctx<'a> {
    origin: &'a str,
}

impl Ctx<'_> {
    fn err<T>(&self, at: &Spanned<T>, field: &str, message: impl Into<String>) -> CampaignError {
        CampaignError::Invalid {
            origin: self.origin.to_string(),
            line: at.referenced.line(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

type Group = (
    String,
    Option<String>,
    Option<String>,
    Option<u8>,
    Vec<(Unit, Vec<u8>)>,
);

/// One fault-space unit: a tensor (or region) and the bits allowed in it.
#[derive(Clone)]
struct Unit {
    target: UnitTarget,
    layer: String,
    kind: String,
    elements: u64,
    bits: Vec<u8>,
}

#[derive(Clone)]
enum UnitTarget {
    Tensor(String),
    Region(String),
}

/// Parse, validate and compile a campaign file. `models_dir` holds `{model}.json`.
pub fn compile(origin: &str, yaml: &str, models_dir: &Path) -> Result<Compiled, CampaignError> {
    let spec: CampaignSpec = proto::yaml::from_str(origin, yaml)?;
    let cx = Ctx { origin };

    let name = spec.name.value.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(cx.err(
            &spec.name,
            "name",
            "must be non-empty and use only A-Z a-z 0-9 . _ -",
        ));
    }
    if spec.models.value.is_empty() {
        return Err(cx.err(&spec.models, "models", "at least one model is required"));
    }
    let mut seen = HashSet::new();
    for m in &spec.models.value {
        if !seen.insert(m) {
            return Err(cx.err(&spec.models, "models", format!("{m:?} is listed twice")));
        }
        if m.contains('/') || m.contains("..") {
            return Err(cx.err(&spec.models, "models", format!("{m:?} is not a model name")));
        }
    }
    if spec.inputs.value.is_empty() {
        return Err(cx.err(
            &spec.inputs,
            "inputs",
            "at least one input index is required",
        ));
    }
    if spec.inputs.value.iter().collect::<HashSet<_>>().len() != spec.inputs.value.len() {
        return Err(cx.err(&spec.inputs, "inputs", "input indices must be unique"));
    }
    if spec.priority.value > 100 {
        return Err(cx.err(&spec.priority, "priority", "must be 0..=100"));
    }
    let schedule = match &spec.schedule {
        Some(s) => {
            cron::Cron::parse(&s.value).map_err(|m| cx.err(s, "schedule", m))?;
            Some(s.value.clone())
        }
        None => None,
    };
    let time_limit_s = match &spec.time_limit {
        Some(s) => Some(parse_duration(&s.value).map_err(|m| cx.err(s, "time_limit", m))?),
        None => None,
    };

    // Strata dimensions.
    let dims = &spec.strata.value;
    let mut dim_seen = HashSet::new();
    for d in dims {
        if !dim_seen.insert(*d) {
            return Err(cx.err(&spec.strata, "strata", format!("{d:?} is listed twice")));
        }
    }
    let volts = &spec.voltages.value;
    if dims.contains(&StratumDim::Voltage) && volts.is_empty() {
        return Err(cx.err(
            &spec.strata,
            "strata",
            "impossible strata: `voltage` needs voltage points under `voltages`",
        ));
    }
    for (rail, pts) in volts {
        if pts.is_empty() {
            return Err(cx.err(
                &spec.voltages,
                &format!("voltages.{rail}"),
                "no set-points given",
            ));
        }
        if pts.iter().any(|v| *v == 0 || *v > 5000) {
            return Err(cx.err(
                &spec.voltages,
                &format!("voltages.{rail}"),
                "set-points must be 1..=5000 mV",
            ));
        }
    }

    // Sizing.
    let sz = &spec.sizing;
    let e = sz.margin.value;
    if !(e > 0.0 && e < 1.0) {
        return Err(cx.err(&sz.margin, "sizing.margin", "must be in (0, 1)"));
    }
    if !(sz.t.value > 0.0 && sz.t.value.is_finite()) {
        return Err(cx.err(&sz.t, "sizing.t", "must be positive"));
    }
    if !(sz.p.value > 0.0 && sz.p.value < 1.0) {
        return Err(cx.err(&sz.p, "sizing.p", "must be in (0, 1)"));
    }
    let fixed = match (sz.method, &sz.count) {
        (SizingMethod::Fixed, Some(c)) if c.value >= 1 => Some(c),
        (SizingMethod::Fixed, Some(c)) => {
            return Err(cx.err(c, "sizing.count", "must be at least 1"));
        }
        (SizingMethod::Fixed, None) => {
            return Err(cx.err(&sz.margin, "sizing.count", "`method: fixed` needs `count`"));
        }
        (SizingMethod::Leveugle, Some(c)) => {
            return Err(cx.err(c, "sizing.count", "only valid with `method: fixed`"));
        }
        (SizingMethod::Leveugle, None) => None,
    };
    if sz.early_stop && (sz.check_every == 0 || sz.min_trials == 0) {
        return Err(cx.err(
            &sz.margin,
            "sizing",
            "min_trials and check_every must be at least 1",
        ));
    }

    // Fault model.
    let f = &spec.fault;
    let k = f.bits_per_fault.value;
    if !(1..=8).contains(&k) {
        return Err(cx.err(&f.bits_per_fault, "fault.bits_per_fault", "must be 1..=8"));
    }
    let kinds: Option<Vec<String>> = match &f.targets.tensor_kinds {
        Some(ks) => {
            for s in &ks.value {
                if serde_json::from_value::<TensorKind>(serde_json::Value::String(s.clone()))
                    .is_err()
                {
                    return Err(cx.err(
                        ks,
                        "fault.targets.tensor_kinds",
                        format!("unknown tensor kind {s:?} (weight, bias, bn_gamma, bn_beta, bn_mean, bn_var, multiplier, shift, lut)"),
                    ));
                }
            }
            Some(ks.value.clone())
        }
        None => None,
    };
    if let Some(b) = &f.targets.bits
        && (b.value.is_empty() || b.value.iter().any(|x| *x >= 32))
    {
        return Err(cx.err(
            b,
            "fault.targets.bits",
            "bit positions must be 0..=31 and not empty",
        ));
    }

    // Load manifests and build the fault space per model.
    let mut manifests = BTreeMap::new();
    for m in &spec.models.value {
        let path = models_dir.join(format!("{m}.json"));
        let man = Manifest::load(&path).map_err(|e| CampaignError::Model {
            origin: origin.into(),
            model: m.clone(),
            message: e.to_string(),
        })?;
        manifests.insert(m.clone(), man);
    }
    if let Some(layers) = &f.targets.layers {
        for l in &layers.value {
            if !manifests
                .values()
                .any(|m| m.tensors.iter().any(|t| &t.layer == l))
            {
                return Err(cx.err(
                    layers,
                    "fault.targets.layers",
                    format!("impossible strata: no model has parameters in layer {l:?}"),
                ));
            }
        }
    }

    let mut voltage_combos: Vec<Vec<(String, u32)>> = vec![vec![]];
    for (rail, pts) in volts {
        let mut next = Vec::new();
        for c in &voltage_combos {
            for p in pts {
                let mut c2 = c.clone();
                c2.push((rail.clone(), *p));
                next.push(c2);
            }
        }
        voltage_combos = next;
    }

    let mut strata: Vec<Stratum> = Vec::new();
    let mut members: Vec<Vec<(Unit, Vec<u8>)>> = Vec::new();
    for m in &spec.models.value {
        let man = &manifests[m];
        let mut units: Vec<Unit> = Vec::new();
        for t in &man.tensors {
            if let Some(ls) = &f.targets.layers
                && !ls.value.contains(&t.layer)
            {
                continue;
            }
            if let Some(ks) = &kinds
                && !ks.iter().any(|k| k == t.kind.as_str())
            {
                continue;
            }
            let width = t.dtype.bits() as u8;
            let bits: Vec<u8> = match &f.targets.bits {
                Some(b) => b.value.iter().copied().filter(|b| *b < width).collect(),
                None => (0..width).collect(),
            };
            if bits.is_empty() || t.elements() == 0 {
                continue;
            }
            units.push(Unit {
                target: UnitTarget::Tensor(t.name.clone()),
                layer: t.layer.clone(),
                kind: t.kind.as_str().to_string(),
                elements: t.elements() as u64,
                bits,
            });
        }
        for r in &f.targets.regions {
            let bits: Vec<u8> = match &f.targets.bits {
                Some(b) => b.value.iter().copied().filter(|b| *b < 8).collect(),
                None => (0..8).collect(),
            };
            if r.bytes > 0 && !bits.is_empty() {
                units.push(Unit {
                    target: UnitTarget::Region(r.name.clone()),
                    layer: format!("region:{}", r.name),
                    kind: "region".into(),
                    elements: r.bytes,
                    bits,
                });
            }
        }
        if units.is_empty() {
            return Err(CampaignError::Model {
                origin: origin.into(),
                model: m.clone(),
                message: "impossible strata: no parameter matches fault.targets".into(),
            });
        }
        if units.iter().any(|u| (u.bits.len() as u32) < k) {
            return Err(cx.err(
                &f.bits_per_fault,
                "fault.bits_per_fault",
                format!(
                    "{k} bits per fault, but model {m} has elements with fewer targetable bits"
                ),
            ));
        }
        // Group units (and bits) into strata keys, in manifest order.
        let mut groups: Vec<Group> = Vec::new();
        for u in &units {
            let layer = dims.contains(&StratumDim::Layer).then(|| u.layer.clone());
            let kind = dims
                .contains(&StratumDim::TensorKind)
                .then(|| u.kind.clone());
            let bit_sets: Vec<(Option<u8>, Vec<u8>)> = if dims.contains(&StratumDim::Bit) {
                u.bits.iter().map(|b| (Some(*b), vec![*b])).collect()
            } else {
                vec![(None, u.bits.clone())]
            };
            for (bit, bits) in bit_sets {
                let mut key = format!("model={m}");
                if let Some(l) = &layer {
                    key.push_str(&format!(",layer={l}"));
                }
                if let Some(k) = &kind {
                    key.push_str(&format!(",kind={k}"));
                }
                if let Some(b) = bit {
                    key.push_str(&format!(",bit={b:02}"));
                }
                match groups.iter_mut().find(|g| g.0 == key) {
                    Some(g) => g.4.push((u.clone(), bits)),
                    None => groups.push((
                        key,
                        layer.clone(),
                        kind.clone(),
                        bit,
                        vec![(u.clone(), bits)],
                    )),
                }
            }
        }
        for vc in &voltage_combos {
            for (key, layer, kind, bit, mem) in &groups {
                let mut key = key.clone();
                for (r, v) in vc {
                    key.push_str(&format!(",{r}={v}mV"));
                }
                let population: u64 = mem.iter().map(|(u, b)| u.elements * b.len() as u64).sum();
                let planned = match fixed {
                    Some(c) => {
                        if c.value > population {
                            return Err(cx.err(
                                c,
                                "sizing.count",
                                format!("impossible strata: {key} has only {population} possible faults, fewer than count {}", c.value),
                            ));
                        }
                        c.value
                    }
                    None => sizing::leveugle(population, e, sz.t.value, sz.p.value),
                };
                strata.push(Stratum {
                    idx: strata.len() as u32,
                    key,
                    model: m.clone(),
                    layer: layer.clone(),
                    tensor_kind: kind.clone(),
                    bit: *bit,
                    voltages: vc.clone(),
                    population,
                    planned,
                });
                members.push(mem.clone());
            }
        }
    }

    let fault_kind = match f.kind {
        FaultKindSpec::BitFlip => FaultKind::BitFlip,
        FaultKindSpec::StuckAt0 => FaultKind::StuckAt0,
        FaultKindSpec::StuckAt1 => FaultKind::StuckAt1,
    };
    let persistence = match f.persistence {
        PersistenceSpec::Transient => Persistence::Transient,
        PersistenceSpec::Permanent => Persistence::Permanent,
    };

    // Sample each stratum from its own seeded stream, so adding a stratum never changes
    // the faults of the others.
    let mut per_stratum: Vec<Vec<(FaultSpec, String, String, u8)>> = Vec::new();
    for (s, mem) in strata.iter().zip(&members) {
        let mut h = Sha256::new();
        h.update(spec.seed.to_le_bytes());
        h.update(s.key.as_bytes());
        let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
        let picks = floyd_sample(&mut rng, s.population, s.planned);
        let mut out = Vec::with_capacity(picks.len());
        for idx in picks {
            let (u, bits, local) = locate(mem, idx);
            let nb = bits.len() as u64;
            let element = local / nb;
            let first = bits[(local % nb) as usize];
            let mut fbits = vec![first];
            if k > 1 {
                let mut rest: Vec<u8> = u.bits.iter().copied().filter(|b| *b != first).collect();
                rest.shuffle(&mut rng);
                fbits.extend(rest.into_iter().take(k as usize - 1));
            }
            let target = match &u.target {
                UnitTarget::Tensor(n) => FaultTarget::Tensor {
                    name: n.clone(),
                    element,
                },
                UnitTarget::Region(n) => FaultTarget::Region {
                    name: n.clone(),
                    offset: element,
                },
            };
            out.push((
                FaultSpec {
                    target,
                    bits: fbits,
                    kind: fault_kind,
                    persistence,
                },
                u.layer.clone(),
                u.kind.clone(),
                first,
            ));
        }
        per_stratum.push(out);
    }

    // Interleave strata round-robin so every stratum advances together (early stop and
    // partial results stay meaningful at any point of the run).
    let mut injections = Vec::new();
    let max_len = per_stratum.iter().map(|v| v.len()).max().unwrap_or(0);
    for i in 0..max_len {
        for (s, list) in strata.iter().zip(&per_stratum) {
            if let Some((fault, layer, kind, bit)) = list.get(i) {
                injections.push(Injection {
                    trial_id: injections.len() as u64,
                    stratum: s.idx,
                    model: s.model.clone(),
                    layer: layer.clone(),
                    tensor_kind: kind.clone(),
                    bit: *bit,
                    faults: vec![fault.clone()],
                    voltages: s.voltages.clone(),
                });
            }
        }
    }

    let plan = Plan {
        name: name.to_string(),
        seed: spec.seed,
        priority: spec.priority.value,
        selector: spec.boards.clone(),
        models: spec.models.value.clone(),
        inputs: spec.inputs.value.clone(),
        outcomes: spec.outcomes,
        early_stop: sz.early_stop.then_some(EarlyStop {
            margin: e,
            min_trials: sz.min_trials,
            check_every: sz.check_every,
        }),
        schedule,
        time_limit_s,
    };
    let mut h = Sha256::new();
    h.update(
        serde_json::to_vec(&(
            &plan.models,
            &plan.inputs,
            &plan.outcomes,
            &plan.early_stop,
            plan.seed,
        ))
        .unwrap_or_default(),
    );
    h.update(serde_json::to_vec(&strata).unwrap_or_default());
    h.update(serde_json::to_vec(&injections).unwrap_or_default());
    let hash = hex::encode(h.finalize());
    Ok(Compiled {
        plan,
        hash,
        strata,
        injections,
    })
}

fn locate(mem: &[(Unit, Vec<u8>)], mut idx: u64) -> (&Unit, &[u8], u64) {
    for (u, bits) in mem {
        let n = u.elements * bits.len() as u64;
        if idx < n {
            return (u, bits, idx);
        }
        idx -= n;
    }
    // Unreachable: idx < population by construction; fall back to the last unit.
    let (u, bits) = mem.last().expect("strata are never empty");
    (u, bits, 0)
}

/// `n` distinct indices from 0..pop (Floyd), then shuffled so any prefix is itself a
/// uniform sample (needed for early stopping on a prefix).
fn floyd_sample(rng: &mut ChaCha20Rng, pop: u64, n: u64) -> Vec<u64> {
    let n = n.min(pop);
    let mut set = HashSet::with_capacity(n as usize);
    let mut out = Vec::with_capacity(n as usize);
    for j in (pop - n)..pop {
        let t = rng.random_range(0..=j);
        let v = if set.contains(&t) { j } else { t };
        set.insert(v);
        out.push(v);
    }
    out.shuffle(rng);
    out
}

/// `90m`, `2h`, `3600s`, `1d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90m, 2h, 3600s)"))?;
    if n == 0 {
        return Err("must be positive".into());
    }
    Ok(n * mult)
}

#[cfg(test)]
mod tests;
