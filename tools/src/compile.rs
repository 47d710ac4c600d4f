//! Compiling a rules file (with variables) into the blob GRUB hands Ally as
//! `module2 /boot/rules.blob rules`.
//!
//! Every blob written here decodes back to exactly the rules compiled, and an engine builds
//! from it as Ally will build it at boot, so a rule Ally would refuse (a pcre that does not
//! compile, too many flowbits) is reported here, before anything boots.

use std::fmt;

use ally_dpi::engine::blob;
use ally_dpi::engine::rules::{parse_rules, ParsedRules, Rule};
use ally_dpi::engine::vars::{Vars, VarsError};
use ally_dpi::engine::{Engine, EngineConfig, EngineError, EngineSummary};

/// Why rules did not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompileError {
    /// The variables file is malformed.
    Vars(VarsError),
    /// The blob did not decode to the rules encoded (a bug in the blob code).
    RoundTrip(String),
    /// The engine refused the rules as Ally would at boot.
    Engine(EngineError),
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompileError::Vars(e) => write!(f, "{e}"),
            CompileError::RoundTrip(e) => write!(f, "internal: {e}"),
            CompileError::Engine(e) => write!(f, "the engine refuses the rules: {e}"),
        }
    }
}

impl std::error::Error for CompileError {}

/// Snort 3's default variables, overridden by `text` (a variables file) when given.
pub fn vars(text: Option<&str>) -> Result<Vars, CompileError> {
    let mut v = Vars::snort_defaults();
    if let Some(t) = text {
        v.parse_into(t).map_err(CompileError::Vars)?;
    }
    Ok(v)
}

/// Encodes `rules` and checks that the blob decodes back to them.
pub fn encode_checked(rules: &[Rule]) -> Result<Vec<u8>, CompileError> {
    let b = blob::encode(rules);
    let back = blob::decode(&b).map_err(|e| CompileError::RoundTrip(e.to_string()))?;
    if back != rules {
        return Err(CompileError::RoundTrip("blob does not round-trip".into()));
    }
    Ok(b)
}

/// A compiled rules file.
#[derive(Debug)]
pub struct Compiled {
    /// What loaded and what did not (and why).
    pub parsed: ParsedRules,
    /// The blob for `module2`.
    pub blob: Vec<u8>,
    /// What Ally will report at boot for this blob.
    pub summary: EngineSummary,
}

/// Parses `rules` (the text of a rules file) with `vars`, encodes the loaded rules and builds
/// the engine from the blob as Ally will.
pub fn compile(rules: &str, vars: &Vars) -> Result<Compiled, CompileError> {
    let parsed = parse_rules(rules, vars);
    let blob = encode_checked(&parsed.rules)?;
    let engine = Engine::from_blob(&blob, EngineConfig::default()).map_err(CompileError::Engine)?;
    Ok(Compiled {
        summary: engine.summary(),
        parsed,
        blob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_what_loads_and_reports_the_rest() {
        let text = "\
drop tcp any any -> any any (msg:\"x\"; content:\"EVIL\"; sid:1;)
alert tcp $HOME_NET any -> any $HTTP_PORTS (msg:\"y\"; content:\"GET\"; sid:2;)
alert tcp any any -> any any (msg:\"z\"; frobnicate; sid:3;)
";
        let c = compile(text, &vars(None).unwrap()).unwrap();
        assert_eq!(c.parsed.rules.len(), 2);
        assert_eq!(c.parsed.rejected.len(), 1);
        assert_eq!(c.parsed.rejected[0].sid, Some(3));
        assert_eq!(
            (c.summary.rules, c.summary.drop, c.summary.alert),
            (2, 1, 1)
        );
        assert_eq!(blob::decode(&c.blob).unwrap(), c.parsed.rules);
    }

    #[test]
    fn bad_variables_are_refused() {
        let e = vars(Some("ipvar HOME_NET")).unwrap_err();
        assert!(matches!(e, CompileError::Vars(_)), "{e:?}");
        assert!(e.to_string().starts_with("variables line 1: "), "{e}");
    }

    #[test]
    fn rules_the_engine_refuses_fail_the_compile() {
        // 129 distinct flowbit names: each rule parses, the ruleset does not build.
        let text: String = (0..129)
            .map(|i| {
                format!(
                    "alert tcp any any -> any any (msg:\"f\"; flowbits:set,fb{i}; sid:{};)\n",
                    i + 1
                )
            })
            .collect();
        let e = compile(&text, &vars(None).unwrap()).unwrap_err();
        assert!(
            matches!(
                e,
                CompileError::Engine(EngineError::TooManyFlowbits { sid: 129 })
            ),
            "{e:?}"
        );
        assert!(e
            .to_string()
            .starts_with("the engine refuses the rules: rule sid 129"));
    }
}
