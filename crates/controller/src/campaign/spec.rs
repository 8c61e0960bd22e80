//! The campaign file as users write it. Every struct denies unknown fields so a typo
//! is an error, not a silently ignored setting; fields whose values are checked after
//! parsing are `Spanned` so those errors can name the line too.

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub boards: BoardSelector,
    pub models: Spanned<Vec<String>>,
    /// Test-set image indices every trial runs.
    pub inputs: Spanned<Vec<u32>>,
    pub fault: FaultModel,
    /// Dimensions that split the fault space; voltage points always split it.
    #[serde(default = "default_strata")]
    pub strata: Spanned<Vec<StratumDim>>,
    /// Rail -> set-points in mV. Every combination is its own set of strata.
    #[serde(default = "no_voltages")]
    pub voltages: Spanned<BTreeMap<String, Vec<u32>>>,
    #[serde(default)]
    pub sizing: Sizing,
    #[serde(default)]
    pub outcomes: OutcomeThresholds,
    pub seed: u64,
    #[serde(default = "default_priority")]
    pub priority: Spanned<u32>,
    /// Cron expression (5 fields, UTC) for recurring soak runs.
    #[serde(default)]
    pub schedule: Option<Spanned<String>>,
    /// Wall-clock cap, e.g. `90m`, `2h`, `3600s`.
    #[serde(default)]
    pub time_limit: Option<Spanned<String>>,
}

fn default_strata() -> Spanned<Vec<StratumDim>> {
    unspanned(vec![StratumDim::Model, StratumDim::Layer])
}

fn no_voltages() -> Spanned<BTreeMap<String, Vec<u32>>> {
    unspanned(BTreeMap::new())
}

fn default_priority() -> Spanned<u32> {
    unspanned(50)
}

pub(crate) fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(
        value,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BoardSelector {
    /// Every label must match the board's label exactly.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// At most this many boards work on the campaign at once.
    #[serde(default)]
    pub count: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKindSpec {
    BitFlip,
    #[serde(rename = "stuck_at_0")]
    StuckAt0,
    #[serde(rename = "stuck_at_1")]
    StuckAt1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PersistenceSpec {
    Transient,
    Permanent,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultModel {
    pub kind: FaultKindSpec,
    #[serde(default = "one")]
    pub bits_per_fault: Spanned<u32>,
    #[serde(default = "transient")]
    pub persistence: PersistenceSpec,
    #[serde(default)]
    pub targets: Targets,
}

fn one() -> Spanned<u32> {
    unspanned(1)
}
fn transient() -> PersistenceSpec {
    PersistenceSpec::Transient
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Layer names (manifest `layer`); empty = every layer with parameters.
    #[serde(default)]
    pub layers: Option<Spanned<Vec<String>>>,
    /// Tensor kinds (weight, bias, bn_gamma...); empty = all.
    #[serde(default)]
    pub tensor_kinds: Option<Spanned<Vec<String>>>,
    /// Bit positions to aim at (0 = LSB); empty = every bit of the element.
    #[serde(default)]
    pub bits: Option<Spanned<Vec<u8>>>,
    /// Raw memory regions (activations, registers): byte size given here so the
    /// list does not depend on which board happens to connect first.
    #[serde(default)]
    pub regions: Vec<RegionTarget>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionTarget {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StratumDim {
    Model,
    Layer,
    TensorKind,
    Bit,
    Voltage,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sizing {
    /// `leveugle` (default) or `fixed`.
    #[serde(default = "leveugle")]
    pub method: SizingMethod,
    #[serde(default = "margin")]
    pub margin: Spanned<f64>,
    #[serde(default = "t95")]
    pub t: Spanned<f64>,
    #[serde(default = "half")]
    pub p: Spanned<f64>,
    /// Trials per stratum when `method: fixed`.
    #[serde(default)]
    pub count: Option<Spanned<u64>>,
    /// Stop a stratum once its Wilson 95% half-width is at most `margin`.
    #[serde(default)]
    pub early_stop: bool,
    /// Early stop is only checked every `check_every` trials from `min_trials` on.
    #[serde(default = "min_trials")]
    pub min_trials: u64,
    #[serde(default = "check_every")]
    pub check_every: u64,
}

impl Default for Sizing {
    fn default() -> Self {
        Sizing {
            method: SizingMethod::Leveugle,
            margin: margin(),
            t: t95(),
            p: half(),
            count: None,
            early_stop: false,
            min_trials: 30,
            check_every: 25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizingMethod {
    Leveugle,
    Fixed,
}

fn leveugle() -> SizingMethod {
    SizingMethod::Leveugle
}
fn margin() -> Spanned<f64> {
    unspanned(0.025)
}
fn t95() -> Spanned<f64> {
    unspanned(1.96)
}
fn half() -> Spanned<f64> {
    unspanned(0.5)
}
fn min_trials() -> u64 {
    30
}
fn check_every() -> u64 {
    25
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeThresholds {
    /// SDC with IoU vs golden at or below this is critical.
    #[serde(default = "critical_iou")]
    pub critical_iou: f32,
    /// Hang timeout = factor x golden p99 latency.
    #[serde(default = "timeout_factor")]
    pub timeout_factor: f32,
    /// Re-run golden every N trials to catch a drifting board.
    #[serde(default = "golden_every")]
    pub golden_every: u32,
}

impl Default for OutcomeThresholds {
    fn default() -> Self {
        OutcomeThresholds {
            critical_iou: critical_iou(),
            timeout_factor: timeout_factor(),
            golden_every: golden_every(),
        }
    }
}

fn critical_iou() -> f32 {
    0.9
}
fn timeout_factor() -> f32 {
    10.0
}
fn golden_every() -> u32 {
    100
}
