//! The controller's YAML configuration.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `host:port` for HTTP (REST, /metrics, /agent websocket).
    #[serde(default = "listen")]
    pub listen: String,
    pub data_dir: PathBuf,
    /// Where `{model}.json` manifests live (board-images/models).
    pub models_dir: PathBuf,
    /// When set, the listener speaks TLS only (https + wss).
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub tokens: Tokens,
    #[serde(default)]
    pub boards: Vec<BoardConfig>,
    #[serde(default)]
    pub timing: Timing,
}

fn listen() -> String {
    "127.0.0.1:8080".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Board id -> the token its agent presents in Hello.
    #[serde(default)]
    pub boards: BTreeMap<String, String>,
    #[serde(default)]
    pub users: Vec<UserToken>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ReadOnly,
    Operator,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserToken {
    pub name: String,
    pub token: String,
    pub role: Role,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardConfig {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Serial console device (e.g. /dev/ttyUSB1, or the emulator's pty).
    #[serde(default)]
    pub console: Option<PathBuf>,
    #[serde(default = "baud")]
    pub console_baud: u32,
    #[serde(default)]
    pub power: Option<PowerConfig>,
}

fn baud() -> u32 {
    115_200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "driver", rename_all = "snake_case")]
pub enum PowerConfig {
    /// A shell command; `{action}` becomes on/off/status and `{board}` the board id.
    Command {
        command: String,
        #[serde(default = "min_off")]
        min_off_ms: u64,
    },
    /// An HTTP PDU; `{action}`/`{board}` in the URL are substituted, POSTed.
    Http {
        url: String,
        #[serde(default = "min_off")]
        min_off_ms: u64,
    },
    /// The emulated board's power socket (line protocol on/off/cycle/status).
    Sim {
        /// `host:port` or a unix socket path.
        addr: String,
        #[serde(default = "min_off")]
        min_off_ms: u64,
    },
}

fn min_off() -> u64 {
    2000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    #[serde(default = "hb")]
    pub heartbeat_ms: u32,
    /// A board with no frame for this long is offline (its health shows as unknown).
    #[serde(default = "offline")]
    pub offline_after_ms: u64,
    /// How long a lost board's agent may take to come back before power-cycling.
    #[serde(default = "reconnect")]
    pub reconnect_wait_ms: u64,
    /// After power-on, how long to wait for the agent.
    #[serde(default = "boot")]
    pub boot_wait_ms: u64,
    #[serde(default = "max_rec")]
    pub max_failed_recoveries: u32,
    /// Trials per chunk sent to a board.
    #[serde(default = "chunk")]
    pub chunk_size: usize,
    /// Attempts per trial for infrastructure errors.
    #[serde(default = "attempts")]
    pub max_attempts: u32,
    /// Added to the golden-derived deadline of a chunk before the board is suspected hung.
    #[serde(default = "slack")]
    pub stall_slack_ms: u64,
    /// Group commit: most records per store transaction.
    #[serde(default = "batch")]
    pub store_batch: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: hb(),
            offline_after_ms: offline(),
            reconnect_wait_ms: reconnect(),
            boot_wait_ms: boot(),
            max_failed_recoveries: max_rec(),
            chunk_size: chunk(),
            max_attempts: attempts(),
            stall_slack_ms: slack(),
            store_batch: batch(),
        }
    }
}

fn hb() -> u32 {
    1000
}
fn offline() -> u64 {
    5000
}
fn reconnect() -> u64 {
    8000
}
fn boot() -> u64 {
    60_000
}
fn max_rec() -> u32 {
    3
}
fn chunk() -> usize {
    16
}
fn attempts() -> u32 {
    3
}
fn slack() -> u64 {
    30_000
}
fn batch() -> usize {
    20_000
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Yaml(#[from] proto::yaml::YamlError),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let c: Config = proto::yaml::from_path(path)?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_str(origin: &str, text: &str) -> Result<Config, ConfigError> {
        let c: Config = proto::yaml::from_str(origin, text)?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for b in &self.boards {
            if !ids.insert(&b.id) {
                return Err(ConfigError::Invalid(format!(
                    "boards: {} is listed twice",
                    b.id
                )));
            }
        }
        let mut toks = std::collections::HashSet::new();
        for u in &self.tokens.users {
            if u.token.len() < 8 {
                return Err(ConfigError::Invalid(format!(
                    "tokens.users: token of {} is shorter than 8 characters",
                    u.name
                )));
            }
            if !toks.insert(&u.token) {
                return Err(ConfigError::Invalid(format!(
                    "tokens.users: token of {} is reused",
                    u.name
                )));
            }
        }
        if self.timing.heartbeat_ms == 0
            || self.timing.chunk_size == 0
            || self.timing.max_attempts == 0
        {
            return Err(ConfigError::Invalid(
                "timing: heartbeat_ms, chunk_size and max_attempts must be positive".into(),
            ));
        }
        Ok(())
    }

    pub fn board(&self, id: &str) -> Option<&BoardConfig> {
        self.boards.iter().find(|b| b.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_example() {
        let c = Config::from_str(
            "c.yaml",
            "data_dir: /tmp/x\nmodels_dir: m\ntokens:\n  boards: {b0: s3cret}\n  users:\n    - {name: ann, token: abcdefgh1, role: operator}\nboards:\n  - id: b0\n    labels: {type: kv260}\n    power: {driver: sim, addr: '127.0.0.1:9'}\n",
        )
        .unwrap();
        assert_eq!(c.tokens.boards["b0"], "s3cret");
        assert!(matches!(c.boards[0].power, Some(PowerConfig::Sim { .. })));
    }

    #[test]
    fn rejects_unknown_and_duplicates() {
        let e =
            Config::from_str("c.yaml", "data_dir: x\nmodels_dir: m\nlisten_addr: y\n").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        let e = Config::from_str(
            "c.yaml",
            "data_dir: x\nmodels_dir: m\nboards: [{id: a}, {id: a}]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
