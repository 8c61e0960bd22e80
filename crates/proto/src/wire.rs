//! proto v1: agent <-> controller over a websocket. Every message is one binary frame
//! holding a postcard-encoded [`AgentMsg`] or [`ControllerMsg`] (see docs/protocol.md).
//!
//! Compatibility rules: enum variants and struct fields are only ever appended, and
//! anything a newer peer may not understand is gated by a capability in
//! [`Hello::features`] / [`Welcome::features`], so a newer controller keeps working
//! with an older agent.

use serde::{Deserialize, Serialize};

pub const PROTO_VERSION: u16 = 1;
/// Oldest version this build still speaks.
pub const PROTO_MIN_VERSION: u16 = 1;
/// Frames larger than this are refused before decoding.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello(Hello),
    Heartbeat { seq: u64, unix_ms: u64 },
    Telemetry(Telemetry),
    Records(RecordBatch),
    JobState(JobState),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControllerMsg {
    Welcome(Welcome),
    /// Authentication or negotiation failed; the controller closes after sending it.
    Refused {
        reason: String,
    },
    HeartbeatAck {
        seq: u64,
    },
    Job(JobSpec),
    Trials(TrialChunk),
    /// Every record with `seq <= upto` is committed: the agent may truncate its spool.
    Ack {
        upto: u64,
    },
    Cancel {
        job_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub proto_version: u16,
    pub proto_min_version: u16,
    pub agent_version: String,
    pub board_id: String,
    pub token: String,
    pub capabilities: Capabilities,
    pub features: Vec<String>,
    /// Highest record seq in the agent's spool (0 if empty), so the controller can tell
    /// what it is about to be re-sent.
    pub spool_head: u64,
    /// Job the agent is part-way through, if any (resumed after reconnect or restart).
    pub active_job: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub board_type: String,
    pub models: Vec<ModelInfo>,
    pub regions: Vec<RegionInfo>,
    pub rails: Vec<RailInfo>,
    pub sensors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub activation: String,
    pub stage: String,
    pub params_bytes: u64,
    pub inputs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub injectable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RailInfo {
    pub name: String,
    pub nominal_mv: u32,
    pub min_mv: u32,
    pub max_mv: u32,
    pub step_mv: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub proto_version: u16,
    pub features: Vec<String>,
    pub heartbeat_ms: u32,
    /// Highest seq the controller has committed for this board: the agent resends
    /// everything after it.
    pub committed_upto: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub unix_ms: u64,
    pub power_w: f32,
    pub current_a: f32,
    pub rails_mv: Vec<(String, f32)>,
    pub temps_c: Vec<(String, f32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobMode {
    /// Fault injection: trials arrive in [`TrialChunk`]s.
    Inject,
    /// Field robustness: no injection, a canary inference every `period_ms`.
    Field { period_ms: u32, rounds: Option<u32> },
    /// Health check: every input once, fault-free, compared with the stored golden.
    Health,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: u64,
    pub campaign_id: u64,
    pub model: String,
    /// Test-set image indices each trial runs.
    pub inputs: Vec<u32>,
    pub mode: JobMode,
    /// Hang timeout = factor x p99 of the golden latencies.
    pub timeout_factor: f32,
    /// An SDC whose IoU vs golden falls below this is critical, otherwise tolerable.
    pub critical_iou: f32,
    /// Re-run golden every N trials; a mismatch marks the board suspect.
    pub golden_every: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialChunk {
    pub job_id: u64,
    pub trials: Vec<TrialSpec>,
    /// No more chunks follow for this job.
    pub last: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialSpec {
    /// Injection id within the campaign's list.
    pub trial_id: u64,
    pub attempt: u32,
    pub faults: Vec<FaultSpec>,
    /// Voltage set-points for this trial (rail, mV); absent rails stay where they are.
    pub voltages: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultTarget {
    /// Element `element` of a model parameter tensor.
    Tensor { name: String, element: u64 },
    /// A byte offset inside a named memory region (weights, activations, registers).
    Region { name: String, offset: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    BitFlip,
    StuckAt0,
    StuckAt1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Persistence {
    /// Restored after the trial.
    Transient,
    /// Kept for the rest of the job.
    Permanent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpec {
    pub target: FaultTarget,
    /// Bit positions within the element (0 = LSB of the little-endian value).
    pub bits: Vec<u8>,
    pub kind: FaultKind,
    pub persistence: Persistence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Class map identical to golden.
    Masked,
    /// Some pixel's class differs; IoU vs golden above the critical threshold.
    SdcTolerable,
    /// Some pixel's class differs; IoU vs golden at or below the critical threshold.
    SdcCritical,
    /// NaN or Inf in the output.
    NonFinite,
    /// Differs from golden but closer to the ground truth.
    Improved,
    /// The accelerator never raised ap_done within the timeout.
    Hang,
    /// The board died during the trial (reported by the controller or by the agent
    /// after restart).
    Crash,
    /// The agent refused the trial (out-of-range voltage, non-injectable target...).
    Refused,
    /// Something in the harness failed; retried by the controller, never counted.
    InfraError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Masked => "masked",
            Outcome::SdcTolerable => "sdc_tolerable",
            Outcome::SdcCritical => "sdc_critical",
            Outcome::NonFinite => "non_finite",
            Outcome::Improved => "improved",
            Outcome::Hang => "hang",
            Outcome::Crash => "crash",
            Outcome::Refused => "refused",
            Outcome::InfraError => "infra_error",
        }
    }
    /// The paper's criterion: any pixel's class differs from golden.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::SdcTolerable
                | Outcome::SdcCritical
                | Outcome::NonFinite
                | Outcome::Improved
                | Outcome::Hang
                | Outcome::Crash
        )
    }
    pub const ALL: [Outcome; 9] = [
        Outcome::Masked,
        Outcome::SdcTolerable,
        Outcome::SdcCritical,
        Outcome::NonFinite,
        Outcome::Improved,
        Outcome::Hang,
        Outcome::Crash,
        Outcome::Refused,
        Outcome::InfraError,
    ];
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordBatch {
    pub records: Vec<Record>,
}

/// One inference. `seq` is the agent's durable sequence number (monotonic per board,
/// survives restarts); the controller deduplicates on (campaign, trial, attempt, input).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub job_id: u64,
    pub campaign_id: u64,
    pub trial_id: u64,
    pub attempt: u32,
    pub input: u32,
    pub outcome: Outcome,
    pub mismatched_pixels: u32,
    pub nonfinite: u32,
    pub iou_vs_golden: f32,
    pub iou_vs_truth: f32,
    pub golden_iou_vs_truth: f32,
    pub latency_ns: u64,
    pub cycles: u64,
    pub power_w: f32,
    pub vccint_mv: f32,
    pub temp_c: f32,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub job_id: u64,
    pub state: JobPhase,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    Started,
    /// Golden runs done: p99 latency in ns, timeout in ns.
    GoldenReady {
        p99_ns: u64,
        timeout_ns: u64,
    },
    Finished,
    Cancelled,
    /// The board is no longer trustworthy (golden drift, restore checksum mismatch).
    Suspect,
    Failed,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, DecodeError> {
    if frame.is_empty() {
        return Err(DecodeError::Empty);
    }
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(frame.len()));
    }
    let (v, rest) =
        postcard::take_from_bytes::<T>(frame).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(v)
}

impl AgentMsg {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encoding to a Vec cannot fail")
    }
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        decode(frame)
    }
}

impl ControllerMsg {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encoding to a Vec cannot fail")
    }
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        decode(frame)
    }
}

/// Feature names exchanged in [`Hello::features`] / [`Welcome::features`]. The
/// session uses the intersection; a peer never sends a message or variant whose feature
/// was not negotiated.
pub mod features {
    /// `JobMode::Field` jobs (canary inferences, no injection).
    pub const FIELD_MODE: &str = "field-mode";
    /// `JobMode::Health` jobs.
    pub const HEALTH_MODE: &str = "health-mode";
    /// `ControllerMsg::Cancel`.
    pub const CANCEL: &str = "cancel";
    /// `AgentMsg::Telemetry` at a few Hz.
    pub const TELEMETRY: &str = "telemetry";
    /// Everything a v1 agent built from this crate understands.
    pub const ALL_V1: &[&str] = &[FIELD_MODE, HEALTH_MODE, CANCEL, TELEMETRY];
}

/// Version both peers speak, or why there is none. `ours` = (version, min_version) of
/// this side, `theirs` = the peer's.
pub fn negotiate_version(ours: (u16, u16), theirs: (u16, u16)) -> Result<u16, String> {
    let v = ours.0.min(theirs.0);
    if v < ours.1 || v < theirs.1 {
        return Err(format!(
            "no common protocol version: we speak {}..={}, peer speaks {}..={}",
            ours.1, ours.0, theirs.1, theirs.0
        ));
    }
    Ok(v)
}

/// Features both sides listed, in our order.
pub fn common_features(ours: &[&str], theirs: &[String]) -> Vec<String> {
    ours.iter()
        .filter(|f| theirs.iter().any(|t| t == *f))
        .map(|f| f.to_string())
        .collect()
}

impl Outcome {
    /// Inverse of [`Outcome::as_str`].
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl Record {
    /// A record for an inference that produced no measurement (refused, crashed, harness
    /// error): every measured field zero. Callers fill in the ids with struct update
    /// syntax, `Record { trial_id, input, ..Record::unmeasured(outcome, detail) }`.
    pub fn unmeasured(outcome: Outcome, detail: String) -> Record {
        Record {
            seq: 0,
            job_id: 0,
            campaign_id: 0,
            trial_id: 0,
            attempt: 0,
            input: 0,
            outcome,
            mismatched_pixels: 0,
            nonfinite: 0,
            iou_vs_golden: 0.0,
            iou_vs_truth: 0.0,
            golden_iou_vs_truth: 0.0,
            latency_ns: 0,
            cycles: 0,
            power_w: 0.0,
            vccint_mv: 0.0,
            temp_c: 0.0,
            start_unix_ns: 0,
            end_unix_ns: 0,
            detail: Some(detail),
        }
    }

    /// The controller's idempotency key: a record re-sent after a reconnect or an agent
    /// restart carries the same key (and the same `seq`).
    pub fn key(&self) -> (u64, u64, u32, u32) {
        (self.campaign_id, self.trial_id, self.attempt, self.input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(seq: u64) -> Record {
        Record {
            seq,
            job_id: 1,
            campaign_id: 2,
            trial_id: 3,
            attempt: 0,
            input: 4,
            outcome: Outcome::SdcCritical,
            mismatched_pixels: 12,
            nonfinite: 0,
            iou_vs_golden: 0.5,
            iou_vs_truth: 0.4,
            golden_iou_vs_truth: 0.9,
            latency_ns: 1_000_000,
            cycles: 300_000,
            power_w: 3.2,
            vccint_mv: 850.0,
            temp_c: 45.0,
            start_unix_ns: 1,
            end_unix_ns: 2,
            detail: None,
        }
    }

    #[test]
    fn round_trip() {
        let m = AgentMsg::Records(RecordBatch {
            records: vec![record(1), record(2)],
        });
        assert_eq!(AgentMsg::decode(&m.encode()).unwrap(), m);
        let c = ControllerMsg::Trials(TrialChunk {
            job_id: 9,
            trials: vec![TrialSpec {
                trial_id: 1,
                attempt: 2,
                faults: vec![FaultSpec {
                    target: FaultTarget::Tensor {
                        name: "enc0.conv0.weight".into(),
                        element: 17,
                    },
                    bits: vec![30],
                    kind: FaultKind::BitFlip,
                    persistence: Persistence::Transient,
                }],
                voltages: vec![("vccint".into(), 560)],
            }],
            last: true,
        });
        assert_eq!(ControllerMsg::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate_version((1, 1), (2, 1)), Ok(1));
        assert_eq!(negotiate_version((2, 2), (3, 1)), Ok(2));
        let e = negotiate_version((1, 1), (3, 2)).unwrap_err();
        assert!(e.contains("1..=1") && e.contains("2..=3"), "{e}");
        let c = common_features(features::ALL_V1, &["cancel".into(), "future".into()]);
        assert_eq!(c, vec!["cancel".to_string()]);
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(Outcome::parse("nope"), None);
    }

    #[test]
    fn rejects_empty_trailing_and_oversized() {
        assert_eq!(AgentMsg::decode(&[]), Err(DecodeError::Empty));
        let mut f = AgentMsg::Heartbeat { seq: 1, unix_ms: 2 }.encode();
        f.push(0);
        assert_eq!(AgentMsg::decode(&f), Err(DecodeError::Trailing(1)));
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            AgentMsg::decode(&big),
            Err(DecodeError::TooLarge(big.len()))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AgentMsg::decode(&bytes);
            let _ = ControllerMsg::decode(&bytes);
        }

        #[test]
        fn mutated_controller_frames_never_panic(
            muts in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
            cut in 0usize..4096,
        ) {
            let c = ControllerMsg::Trials(TrialChunk {
                job_id: 9,
                trials: (0..4)
                    .map(|i| TrialSpec {
                        trial_id: i,
                        attempt: 0,
                        faults: vec![FaultSpec {
                            target: FaultTarget::Region { name: "params".into(), offset: i * 4 },
                            bits: vec![1, 2],
                            kind: FaultKind::StuckAt1,
                            persistence: Persistence::Permanent,
                        }],
                        voltages: vec![("vccint".into(), 600)],
                    })
                    .collect(),
                last: false,
            });
            let mut f = c.encode();
            for (i, v) in muts {
                let n = f.len();
                f[i % n] = v;
            }
            f.truncate(cut % (f.len() + 1));
            match ControllerMsg::decode(&f) {
                Ok(_) => {}
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn mutated_frames_never_panic(idx in 0usize..4096, val in any::<u8>(), cut in 0usize..4096) {
            let mut f = AgentMsg::Records(RecordBatch { records: vec![record(7), record(8)] }).encode();
            let i = idx % f.len();
            f[i] = val;
            f.truncate(cut % (f.len() + 1));
            let _ = AgentMsg::decode(&f);
        }
    }
}
