//! The agent's own config file (YAML, parsed with `proto::yaml`). Everything about the
//! hardware lives in the board file it points to; this file only says where things are.
//! Relative paths are resolved against the config file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `ws://` or `wss://` URL of the controller's agent endpoint (`.../v1/agent`).
    pub controller_url: String,
    /// This board's id, as the controller knows it.
    pub board_id: String,
    /// File holding the per-board token (first line, whitespace trimmed).
    pub token_file: PathBuf,
    /// Board description file (`board-images/boards/kv260.yaml`).
    pub board_file: PathBuf,
    /// Root against which relative paths in the board file are resolved (`/` on a
    /// board, the emulator's state dir otherwise).
    #[serde(default = "default_hw_root")]
    pub hw_root: PathBuf,
    /// Directory with `{model}.json`, `{model}.safetensors`, `testset-{size}.safetensors`.
    pub models_dir: PathBuf,
    /// Durable state: the record spool and the job in progress.
    pub state_dir: PathBuf,
    /// Bound on unacked spooled data; the trial loop waits when it is reached.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Extra PEM CA certificates for `wss://` (besides the webpki roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Without any frame from the controller for this long, nominal voltages are
    /// restored and the job pauses until it is back.
    #[serde(default = "default_grace_ms")]
    pub controller_grace_ms: u64,
    /// Telemetry frames per second while connected.
    #[serde(default = "default_telemetry_hz")]
    pub telemetry_hz: f32,
    /// Records of finished trials are committed to the spool (one fsync) at least this
    /// often; trials that finish within one interval share the fsync.
    #[serde(default = "default_commit_ms")]
    pub commit_interval_ms: u64,
    /// Identifies the current boot of the board, to tell a board crash (new boot id)
    /// from an agent restart after a trial was interrupted. Relative to `hw_root`.
    #[serde(default = "default_boot_id")]
    pub boot_id_path: PathBuf,
}

fn default_hw_root() -> PathBuf {
    PathBuf::from("/")
}
fn default_spool_max_bytes() -> u64 {
    256 << 20
}
fn default_grace_ms() -> u64 {
    10_000
}
fn default_telemetry_hz() -> f32 {
    2.0
}
fn default_commit_ms() -> u64 {
    20
}
fn default_boot_id() -> PathBuf {
    PathBuf::from("/proc/sys/kernel/random/boot_id")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Yaml(#[from] proto::yaml::YamlError),
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("token file {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = proto::yaml::from_path(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut c.token_file,
            &mut c.board_file,
            &mut c.hw_root,
            &mut c.models_dir,
            &mut c.state_dir,
        ] {
            *p = proto::board::resolve(base, p);
        }
        if let Some(ca) = c.ca_file.as_mut() {
            *ca = proto::board::resolve(base, ca);
        }
        c.validate().map_err(|message| ConfigError::Invalid {
            origin: path.display().to_string(),
            message,
        })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        if !(self.controller_url.starts_with("ws://") || self.controller_url.starts_with("wss://"))
        {
            errs.push(format!(
                "controller_url {:?} must start with ws:// or wss://",
                self.controller_url
            ));
        }
        if self.board_id.is_empty() || self.board_id.len() > 128 {
            errs.push("board_id must be 1..=128 characters".to_string());
        }
        if !(self.telemetry_hz > 0.0 && self.telemetry_hz <= 50.0) {
            errs.push(format!(
                "telemetry_hz {} must be in (0, 50]",
                self.telemetry_hz
            ));
        }
        if self.controller_grace_ms == 0 {
            errs.push("controller_grace_ms must be > 0".into());
        }
        if self.spool_max_bytes < 1 << 20 {
            errs.push("spool_max_bytes must be at least 1 MiB".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    pub fn token(&self) -> Result<String, ConfigError> {
        let t = std::fs::read_to_string(&self.token_file).map_err(|source| ConfigError::Token {
            path: self.token_file.clone(),
            source,
        })?;
        Ok(t.lines().next().unwrap_or("").trim().to_string())
    }

    pub fn boot_id(&self) -> String {
        let p = proto::board::resolve(&self.hw_root, &self.boot_id_path);
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_resolves_relative_paths() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.yaml");
        std::fs::write(
            &p,
            "controller_url: ws://127.0.0.1:1/v1/agent\nboard_id: b1\ntoken_file: token\n\
             board_file: kv260.yaml\nmodels_dir: models\nstate_dir: /var/lib/x\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.token_file, d.path().join("token"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(c.hw_root, PathBuf::from("/"));
        assert_eq!(c.controller_grace_ms, 10_000);
    }

    #[test]
    fn bad_values_are_all_reported() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.yaml");
        std::fs::write(
            &p,
            "controller_url: http://x\nboard_id: ''\ntoken_file: t\nboard_file: b\n\
             models_dir: m\nstate_dir: s\ntelemetry_hz: 0\n",
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("controller_url") && e.contains("board_id") && e.contains("telemetry_hz"),
            "{e}"
        );
        std::fs::write(&p, "controller_url: ws://x\nbogus: 1\n").unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("bogus"));
    }
}
