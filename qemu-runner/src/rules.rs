//! The rules a run gives Ally as its `rules` boot module: a rules file compiled here with the
//! rules compiler Ally's tools use, or a blob used as it is (e.g. a corrupt one, to see Ally
//! refuse it); and what Ally should then report at boot.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use ally_dpi::engine::{Engine, EngineConfig};
use ally_tools::compile::{self, CompileError};

/// Where the rules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesInput {
    /// A rules file and an optional variables file, compiled into a blob for the run.
    Compile {
        rules: PathBuf,
        vars: Option<PathBuf>,
    },
    /// A blob used as it is.
    Blob(PathBuf),
}

/// What Ally should report about its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesExpect {
    /// No rules module: `ALLY rules none: passing every frame`.
    None,
    /// `ALLY rules loaded=N`.
    Loaded(usize),
    /// The host refuses the blob (the reason): Ally must stop naming the rules module.
    Refused(String),
}

impl fmt::Display for RulesExpect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulesExpect::None => f.write_str("no rules module"),
            RulesExpect::Loaded(n) => write!(f, "{n} rules"),
            RulesExpect::Refused(reason) => write!(f, "a blob the host refuses ({reason})"),
        }
    }
}

/// Why the rules could not be prepared.
#[derive(Debug)]
pub enum RulesError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Compile {
        path: PathBuf,
        error: CompileError,
    },
    /// No rule of the file loaded (the first refusal says why).
    NothingLoaded {
        path: PathBuf,
        first_refusal: Option<String>,
    },
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulesError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            RulesError::Compile { path, error } => write!(f, "{}: {error}", path.display()),
            RulesError::NothingLoaded {
                path,
                first_refusal: Some(r),
            } => write!(f, "{}: no rule loads (first refused: {r})", path.display()),
            RulesError::NothingLoaded {
                path,
                first_refusal: None,
            } => write!(f, "{}: holds no rules", path.display()),
        }
    }
}

impl std::error::Error for RulesError {}

fn read(path: &Path) -> Result<Vec<u8>, RulesError> {
    fs::read(path).map_err(|source| RulesError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, RulesError> {
    fs::read_to_string(path).map_err(|source| RulesError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The rules ready for a run.
#[derive(Debug)]
pub struct PreparedRules {
    pub expect: RulesExpect,
    /// For the run's progress output: what compiled and which rules did not load, and why.
    pub notes: Vec<String>,
}

/// Writes the blob for `input` to `blob` and says what Ally should report.
pub fn prepare_rules(input: &RulesInput, blob: &Path) -> Result<PreparedRules, RulesError> {
    let (bytes, expect, notes) = match input {
        RulesInput::Compile { rules, vars } => {
            let text = read_text(rules)?;
            let vars_text = vars.as_deref().map(read_text).transpose()?;
            let vars =
                compile::vars(vars_text.as_deref()).map_err(|error| RulesError::Compile {
                    path: vars.clone().unwrap_or_default(),
                    error,
                })?;
            let c = compile::compile(&text, &vars).map_err(|error| RulesError::Compile {
                path: rules.clone(),
                error,
            })?;
            if c.parsed.rules.is_empty() {
                return Err(RulesError::NothingLoaded {
                    path: rules.clone(),
                    first_refusal: c.parsed.rejected.first().map(ToString::to_string),
                });
            }
            let total = c.parsed.rules.len() + c.parsed.rejected.len();
            let mut notes = vec![format!(
                "rules {}: {} of {total} loaded; {}; blob {} bytes",
                rules.display(),
                c.parsed.rules.len(),
                c.summary,
                c.blob.len()
            )];
            notes.extend(
                c.parsed
                    .rejected
                    .iter()
                    .map(|r| format!("  not loaded: {r}")),
            );
            (c.blob, RulesExpect::Loaded(c.parsed.rules.len()), notes)
        }
        RulesInput::Blob(path) => {
            let bytes = read(path)?;
            let expect = match Engine::from_blob(&bytes, EngineConfig::default()) {
                Ok(engine) => RulesExpect::Loaded(engine.rule_count()),
                Err(e) => RulesExpect::Refused(e.to_string()),
            };
            let notes = vec![format!(
                "rules blob {} ({} bytes): Ally should see {expect}",
                path.display(),
                bytes.len()
            )];
            (bytes, expect, notes)
        }
    };
    fs::write(blob, bytes).map_err(|source| RulesError::Io {
        path: blob.to_path_buf(),
        source,
    })?;
    Ok(PreparedRules { expect, notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ally-runner-rules-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn a_rules_file_compiles_into_the_blob() {
        let rules = tmp("a.rules");
        fs::write(
            &rules,
            "drop tcp any any -> any any (msg:\"x\"; content:\"EVIL\"; sid:1;)\n\
             alert tcp any any -> $HOME_NET any (msg:\"y\"; content:\"z\"; sid:2;)\n\
             alert tcp any any -> any any (msg:\"bad\"; frobnicate; sid:3;)\n",
        )
        .unwrap();
        let vars = tmp("a.vars");
        fs::write(&vars, "ipvar HOME_NET 10.0.2.0/24\n").unwrap();
        let blob = tmp("a.blob");
        let p = prepare_rules(
            &RulesInput::Compile {
                rules: rules.clone(),
                vars: Some(vars),
            },
            &blob,
        )
        .unwrap();
        assert_eq!(p.expect, RulesExpect::Loaded(2));
        assert!(p.notes[0].contains(": 2 of 3 loaded;"), "{:?}", p.notes);
        assert!(p.notes[1].contains("sid 3"), "{:?}", p.notes);
        // The blob written is one Ally accepts, and used as a blob it expects the same.
        let again = prepare_rules(&RulesInput::Blob(blob.clone()), &tmp("b.blob")).unwrap();
        assert_eq!(again.expect, RulesExpect::Loaded(2));
    }

    #[test]
    fn a_corrupt_blob_is_passed_on_and_expected_to_be_refused() {
        let src = tmp("c.blob");
        let mut bytes = ally_dpi::engine::blob::encode(&[]);
        bytes[20] ^= 1; // the stored checksum
        fs::write(&src, &bytes).unwrap();
        let out = tmp("c-out.blob");
        let p = prepare_rules(&RulesInput::Blob(src), &out).unwrap();
        assert!(
            matches!(&p.expect, RulesExpect::Refused(r) if r.contains("checksum mismatch")),
            "{:?}",
            p.expect
        );
        assert_eq!(fs::read(out).unwrap(), bytes);
    }

    #[test]
    fn bad_rules_input_is_refused_naming_the_file() {
        let rules = tmp("none.rules");
        fs::write(
            &rules,
            "alert tcp any any -> any any (msg:\"bad\"; frobnicate; sid:7;)\n",
        )
        .unwrap();
        let e = prepare_rules(
            &RulesInput::Compile {
                rules: rules.clone(),
                vars: None,
            },
            &tmp("n.blob"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: no rule loads (first refused: line 1 sid 7",
                rules.display()
            )),
            "{e}"
        );
        let vars = tmp("bad.vars");
        fs::write(&vars, "ipvar\n").unwrap();
        let e = prepare_rules(
            &RulesInput::Compile {
                rules,
                vars: Some(vars.clone()),
            },
            &tmp("n.blob"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!("{}: variables line 1", vars.display())),
            "{e}"
        );
        let missing = tmp("missing.rules");
        let e = prepare_rules(
            &RulesInput::Compile {
                rules: missing.clone(),
                vars: None,
            },
            &tmp("n.blob"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
    }
}
