//! YAML loading with located errors.
//!
//! serde_yaml is archived; serde-saphyr is a maintained, panic-free implementation whose
//! errors carry line/column and a caret snippet. Its behaviour on YAML-1.1 idioms is
//! pinned by the tests below, because config files outlive parser upgrades.

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("{origin}: cannot read: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parse `text` (named `origin` in errors: usually the file path).
pub fn from_str<T: DeserializeOwned>(origin: &str, text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str::<T>(text).map_err(|e| YamlError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

pub fn from_path<T: DeserializeOwned>(path: &std::path::Path) -> Result<T, YamlError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| YamlError::Io {
        origin: origin.clone(),
        source,
    })?;
    from_str(&origin, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        enabled: bool,
        #[serde(default)]
        n: u32,
    }

    #[test]
    fn unknown_field_is_located() {
        let e = from_str::<T>("t.yaml", "enabled: true\nbogus: 1\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("t.yaml: "), "{s}");
        assert!(s.contains("bogus"), "{s}");
        assert!(s.contains("line 2") || s.contains("2:"), "no line in: {s}");
    }

    #[test]
    fn wrong_type_is_located() {
        let e = from_str::<T>("t.yaml", "enabled: true\nn: -3\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("line 2") || s.contains("2:"), "no line in: {s}");
    }

    /// Pinned: serde-saphyr accepts YAML 1.1 `yes` as a boolean (serde_yaml_ng does not).
    /// If an upgrade changes this, configs written with `yes` change meaning: look first.
    #[test]
    fn yaml11_yes_is_true() {
        let t: T = from_str("t.yaml", "enabled: yes\nn: 3\n").unwrap();
        assert!(t.enabled);
        assert_eq!(t.n, 3);
    }

    #[test]
    fn hex_integers_parse() {
        #[derive(Deserialize)]
        struct H {
            a: u64,
        }
        let h: H = from_str("h", "a: 0xA0000000\n").unwrap();
        assert_eq!(h.a, 0xA000_0000);
    }

    #[test]
    fn broken_yaml_is_an_error_not_a_panic() {
        assert!(from_str::<T>("t", "enabled: [true\n").is_err());
        assert!(from_str::<T>("t", "\t- :\n:::").is_err());
    }
}
