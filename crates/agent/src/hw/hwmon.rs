//! hwmon devices found by their `name` attribute under a configurable root
//! (`/sys/class/hwmon` on a board, a directory on the emulator). The `hwmonN` index is
//! not stable across boots, so it is never used as an identity.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HwmonError {
    #[error("no hwmon device named {name:?} under {root} (found: {found})")]
    NotFound {
        name: String,
        root: PathBuf,
        found: String,
    },
    #[error("cannot list {root}: {source}")]
    List {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {text:?} is not an integer")]
    Parse { path: PathBuf, text: String },
}

#[derive(Debug, Clone)]
pub struct Hwmon {
    pub name: String,
    pub dir: PathBuf,
}

impl Hwmon {
    pub fn find(root: &Path, name: &str) -> Result<Hwmon, HwmonError> {
        let entries = std::fs::read_dir(root).map_err(|source| HwmonError::List {
            root: root.to_path_buf(),
            source,
        })?;
        let mut found = Vec::new();
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let Ok(n) = std::fs::read_to_string(dir.join("name")) else {
                continue;
            };
            let n = n.trim();
            if n == name {
                return Ok(Hwmon {
                    name: name.to_string(),
                    dir,
                });
            }
            found.push(n.to_string());
        }
        Err(HwmonError::NotFound {
            name: name.into(),
            root: root.to_path_buf(),
            found: if found.is_empty() {
                "none".into()
            } else {
                found.join(", ")
            },
        })
    }

    /// Raw integer attribute (`power1_input`, `in3_input`, `temp1_input`...).
    pub fn read_raw(&self, attr: &str) -> Result<i64, HwmonError> {
        let path = self.dir.join(attr);
        let text = std::fs::read_to_string(&path).map_err(|source| HwmonError::Read {
            path: path.clone(),
            source,
        })?;
        text.trim().parse::<i64>().map_err(|_| HwmonError::Parse {
            path,
            text: text.trim().chars().take(40).collect(),
        })
    }

    /// `powerN_input` is in µW.
    pub fn power_w(&self) -> Result<f32, HwmonError> {
        Ok(self.read_raw("power1_input")? as f32 / 1e6)
    }
    /// `currN_input` is in mA.
    pub fn current_a(&self) -> Result<f32, HwmonError> {
        Ok(self.read_raw("curr1_input")? as f32 / 1e3)
    }
    /// `inN_input` is in mV.
    pub fn millivolts(&self, attr: &str) -> Result<f32, HwmonError> {
        Ok(self.read_raw(attr)? as f32)
    }
    /// `tempN_input` is in m°C.
    pub fn celsius(&self, attr: &str) -> Result<f32, HwmonError> {
        Ok(self.read_raw(attr)? as f32 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(root: &Path, idx: u32, name: &str, attrs: &[(&str, &str)]) {
        let d = root.join(format!("hwmon{idx}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        for (k, v) in attrs {
            std::fs::write(d.join(k), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn finds_by_name_not_index() {
        let t = tempfile::tempdir().unwrap();
        dev(
            t.path(),
            0,
            "ams",
            &[("in3_input", "850"), ("temp3_input", "45250")],
        );
        dev(
            t.path(),
            1,
            "ina260_u14",
            &[("power1_input", "3250000"), ("curr1_input", "650")],
        );
        let p = Hwmon::find(t.path(), "ina260_u14").unwrap();
        assert!(p.dir.ends_with("hwmon1"));
        assert!((p.power_w().unwrap() - 3.25).abs() < 1e-6);
        assert!((p.current_a().unwrap() - 0.65).abs() < 1e-6);
        let a = Hwmon::find(t.path(), "ams").unwrap();
        assert_eq!(a.millivolts("in3_input").unwrap(), 850.0);
        assert!((a.celsius("temp3_input").unwrap() - 45.25).abs() < 1e-4);
        // Renumbering (as after a reboot) changes nothing.
        std::fs::rename(t.path().join("hwmon0"), t.path().join("hwmon7")).unwrap();
        assert!(
            Hwmon::find(t.path(), "ams")
                .unwrap()
                .dir
                .ends_with("hwmon7")
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let t = tempfile::tempdir().unwrap();
        dev(t.path(), 0, "ams", &[("in3_input", "banana")]);
        let e = Hwmon::find(t.path(), "ina260_u14").unwrap_err().to_string();
        assert!(e.contains("ina260_u14") && e.contains("found: ams"), "{e}");
        let a = Hwmon::find(t.path(), "ams").unwrap();
        let e = a.millivolts("in3_input").unwrap_err().to_string();
        assert!(e.contains("banana"), "{e}");
        assert!(
            a.millivolts("in9_input")
                .unwrap_err()
                .to_string()
                .contains("in9_input")
        );
        assert!(Hwmon::find(&t.path().join("nope"), "ams").is_err());
    }
}
