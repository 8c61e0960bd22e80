//! Boards on three independent axes, as LAVA keeps them: connectivity (the agent's
//! link), scheduling state (owned by the scheduler) and health (owned by health checks,
//! recovery and operators). A health measured while the board was connected is not
//! shown as current once heartbeats stop: it reads `unknown` until the board is back.

use proto::wire::{Capabilities, ControllerMsg, Telemetry};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Connectivity {
    Online,
    Offline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedState {
    Idle,
    Reserved,
    Running,
    Recovering,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Unknown,
    Good,
    Suspect,
    Bad,
    Maintenance,
    Retired,
}

impl Connectivity {
    pub const ALL: [Connectivity; 2] = [Connectivity::Online, Connectivity::Offline];
    pub fn as_str(self) -> &'static str {
        match self {
            Connectivity::Online => "online",
            Connectivity::Offline => "offline",
        }
    }
}

impl SchedState {
    pub const ALL: [SchedState; 4] = [
        SchedState::Idle,
        SchedState::Reserved,
        SchedState::Running,
        SchedState::Recovering,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SchedState::Idle => "idle",
            SchedState::Reserved => "reserved",
            SchedState::Running => "running",
            SchedState::Recovering => "recovering",
        }
    }
}

impl Health {
    pub const ALL: [Health; 6] = [
        Health::Unknown,
        Health::Good,
        Health::Suspect,
        Health::Bad,
        Health::Maintenance,
        Health::Retired,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Good => "good",
            Health::Suspect => "suspect",
            Health::Bad => "bad",
            Health::Maintenance => "maintenance",
            Health::Retired => "retired",
        }
    }
    pub fn parse(s: &str) -> Option<Health> {
        Health::ALL.into_iter().find(|h| h.as_str() == s)
    }
    /// Health set by an operator or by giving up: not cleared by a reconnect.
    pub fn is_sticky(self) -> bool {
        matches!(self, Health::Bad | Health::Maintenance | Health::Retired)
    }
}

/// The live link to a board's agent.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<ControllerMsg>,
    pub features: Vec<String>,
    pub active_job_at_hello: Option<u64>,
    pub spool_head_at_hello: u64,
}

#[derive(Debug)]
pub struct Board {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub last_seen_ms: u64,
    pub session: Option<Session>,
    pub state: SchedState,
    /// Stored health (see [`Board::shown_health`]).
    pub health: Health,
    pub health_reason: Option<String>,
    pub failed_recoveries: u32,
    pub capabilities: Option<Capabilities>,
    pub agent_version: Option<String>,
    pub last_telemetry: Option<Telemetry>,
    pub committed_upto: u64,
}

impl Board {
    pub fn new(id: &str, labels: BTreeMap<String, String>) -> Board {
        Board {
            id: id.to_string(),
            labels,
            last_seen_ms: 0,
            session: None,
            state: SchedState::Idle,
            health: Health::Unknown,
            health_reason: None,
            failed_recoveries: 0,
            capabilities: None,
            agent_version: None,
            last_telemetry: None,
            committed_upto: 0,
        }
    }

    pub fn connectivity(&self, now_ms: u64, offline_after_ms: u64) -> Connectivity {
        if self.session.is_some() && now_ms.saturating_sub(self.last_seen_ms) <= offline_after_ms {
            Connectivity::Online
        } else {
            Connectivity::Offline
        }
    }

    /// What health to show: measured health goes stale when heartbeats stop.
    pub fn shown_health(&self, now_ms: u64, offline_after_ms: u64) -> Health {
        if self.health.is_sticky()
            || self.connectivity(now_ms, offline_after_ms) == Connectivity::Online
        {
            self.health
        } else {
            Health::Unknown
        }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    pub fn send(&self, m: ControllerMsg) -> bool {
        match &self.session {
            Some(s) => s.tx.send(m).is_ok(),
            None => false,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BoardView {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub connectivity: Connectivity,
    pub last_seen_ms: u64,
    pub state: SchedState,
    pub health: Health,
    pub stored_health: Health,
    pub health_reason: Option<String>,
    pub failed_recoveries: u32,
    pub agent_version: Option<String>,
    pub board_type: Option<String>,
    pub models: Vec<String>,
    pub power_w: Option<f32>,
    pub temps_c: Vec<(String, f32)>,
    pub rails_mv: Vec<(String, f32)>,
}

impl Board {
    pub fn view(&self, now_ms: u64, offline_after_ms: u64) -> BoardView {
        BoardView {
            id: self.id.clone(),
            labels: self.labels.clone(),
            connectivity: self.connectivity(now_ms, offline_after_ms),
            last_seen_ms: self.last_seen_ms,
            state: self.state,
            health: self.shown_health(now_ms, offline_after_ms),
            stored_health: self.health,
            health_reason: self.health_reason.clone(),
            failed_recoveries: self.failed_recoveries,
            agent_version: self.agent_version.clone(),
            board_type: self.capabilities.as_ref().map(|c| c.board_type.clone()),
            models: self
                .capabilities
                .as_ref()
                .map(|c| c.models.iter().map(|m| m.name.clone()).collect())
                .unwrap_or_default(),
            power_w: self.last_telemetry.as_ref().map(|t| t.power_w),
            temps_c: self
                .last_telemetry
                .as_ref()
                .map(|t| t.temps_c.clone())
                .unwrap_or_default(),
            rails_mv: self
                .last_telemetry
                .as_ref()
                .map(|t| t.rails_mv.clone())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_health_reads_unknown() {
        let mut b = Board::new("b0", BTreeMap::new());
        b.health = Health::Good;
        let (tx, _rx) = mpsc::unbounded_channel();
        b.session = Some(Session {
            id: 1,
            tx,
            features: vec![],
            active_job_at_hello: None,
            spool_head_at_hello: 0,
        });
        b.last_seen_ms = 1000;
        assert_eq!(b.shown_health(1500, 3000), Health::Good);
        assert_eq!(b.shown_health(10_000, 3000), Health::Unknown);
        assert_eq!(b.connectivity(10_000, 3000), Connectivity::Offline);
        b.health = Health::Bad;
        assert_eq!(b.shown_health(10_000, 3000), Health::Bad);
    }
}
