//! Rule variables (`$HOME_NET`, `$HTTP_PORTS`, ...).
//!
//! A variables file has one definition per line, in either of two forms:
//!
//! ```text
//! ipvar HOME_NET [10.0.0.0/8,192.168.0.0/16]     # Snort 2 style (`ipvar`, `portvar`, `var`)
//! HTTP_PORTS = '80 8080 [8000:8100]'             # Snort 3 Lua style (quoted or bare value)
//! ```
//!
//! `#` starts a comment. In a Snort 3 style value, whitespace-separated items form a list, as in
//! Snort 3's `snort_defaults.lua`. Values may refer to other variables; they are expanded when a
//! rule uses them (the rule's header parser decides whether the value is an address or a port).

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// Error in a variables file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VarsError {
    /// A line is neither `ipvar|portvar|var NAME VALUE` nor `NAME = VALUE`.
    BadLine { line: usize, text: String },
    /// A variable name has characters other than letters, digits and `_`.
    BadName { line: usize, name: String },
}

impl fmt::Display for VarsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VarsError::BadLine { line, text } => write!(
                f,
                "variables line {line}: expected `ipvar|portvar|var NAME VALUE` or `NAME = VALUE`, got `{text}`"
            ),
            VarsError::BadName { line, name } => {
                write!(f, "variables line {line}: bad variable name `{name}` (use letters, digits, _)")
            }
        }
    }
}

/// Variable table: name (without `$`) to raw value text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vars {
    map: BTreeMap<String, String>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Vars {
    /// An empty table: every `$VAR` in a rule is then an error.
    pub fn new() -> Vars {
        Vars::default()
    }

    /// The defaults of Snort 3's `snort_defaults.lua` for the variables the community ruleset
    /// uses: every network `any`, ports as Snort ships them. Used when no variables file is given.
    pub fn snort_defaults() -> Vars {
        let mut v = Vars::new();
        const HTTP_PORTS: &str = "[80,81,311,383,591,593,901,1220,1414,1741,1830,2301,2381,2809,\
3037,3128,3702,4343,4848,5250,6988,7000,7001,7144,7145,7510,7777,7779,8000,8008,8014,8028,8080,\
8085,8088,8090,8118,8123,8180,8181,8243,8280,8300,8800,8888,8899,9000,9060,9080,9090,9091,9443,\
9999,11371,34443,34444,41080,50002,55555]";
        for (k, val) in [
            ("HOME_NET", "any"),
            ("EXTERNAL_NET", "any"),
            ("DNS_SERVERS", "$HOME_NET"),
            ("SMTP_SERVERS", "$HOME_NET"),
            ("HTTP_SERVERS", "$HOME_NET"),
            ("SQL_SERVERS", "$HOME_NET"),
            ("TELNET_SERVERS", "$HOME_NET"),
            ("SSH_SERVERS", "$HOME_NET"),
            ("FTP_SERVERS", "$HOME_NET"),
            ("SIP_SERVERS", "$HOME_NET"),
            ("HTTP_PORTS", HTTP_PORTS),
            ("FILE_DATA_PORTS", "[$HTTP_PORTS,110,143]"),
            ("ORACLE_PORTS", "1024:"),
            ("SSH_PORTS", "22"),
            ("FTP_PORTS", "[21,2100,3535]"),
            ("SIP_PORTS", "[5060,5061,5600]"),
            ("SHELLCODE_PORTS", "!80"),
            ("GTP_PORTS", "[2123,2152,3386]"),
        ] {
            v.map.insert(k.to_string(), val.to_string());
        }
        v
    }

    /// Defines or replaces `name`.
    pub fn set(&mut self, name: &str, value: &str) {
        self.map.insert(name.to_string(), value.to_string());
    }

    /// Raw value of `name` (without `$`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// Parses a variables file on top of `self` (later definitions replace earlier ones).
    pub fn parse_into(&mut self, text: &str) -> Result<(), VarsError> {
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (name, value) = if let Some((n, v)) = line.split_once('=') {
                let v = v.trim().trim_end_matches(',').trim();
                let v = v
                    .strip_prefix('\'')
                    .and_then(|x| x.strip_suffix('\''))
                    .or_else(|| v.strip_prefix('"').and_then(|x| x.strip_suffix('"')))
                    .unwrap_or(v);
                (n.trim(), lua_list(v))
            } else {
                let mut parts = line.splitn(3, char::is_whitespace);
                let kw = parts.next().unwrap_or("");
                let (Some(n), Some(v)) = (parts.next(), parts.next()) else {
                    return Err(VarsError::BadLine {
                        line: line_no,
                        text: raw.to_string(),
                    });
                };
                if !matches!(kw, "ipvar" | "portvar" | "var") {
                    return Err(VarsError::BadLine {
                        line: line_no,
                        text: raw.to_string(),
                    });
                }
                (n.trim(), v.trim().to_string())
            };
            if !valid_name(name) {
                return Err(VarsError::BadName {
                    line: line_no,
                    name: name.to_string(),
                });
            }
            self.map.insert(name.to_string(), value);
        }
        Ok(())
    }
}

/// Snort 3 writes lists as whitespace-separated items (`'80 8080 [8000:8100]'`); turn that into
/// the bracketed comma form the header parser reads.
fn lua_list(v: &str) -> String {
    let items: Vec<&str> = v.split_whitespace().collect();
    if items.len() <= 1 {
        return v.to_string();
    }
    let mut s = String::from("[");
    s.push_str(&items.join(","));
    s.push(']');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_styles() {
        let mut v = Vars::new();
        v.parse_into(
            "# comment\nipvar HOME_NET [10.0.0.0/8,192.168.0.0/16]\nportvar P 80\n\
             HTTP_PORTS = '80 8080'\nX = \"any\"\n",
        )
        .unwrap();
        assert_eq!(v.get("HOME_NET"), Some("[10.0.0.0/8,192.168.0.0/16]"));
        assert_eq!(v.get("P"), Some("80"));
        assert_eq!(v.get("HTTP_PORTS"), Some("[80,8080]"));
        assert_eq!(v.get("X"), Some("any"));
    }

    #[test]
    fn errors_name_line() {
        let e = Vars::new().parse_into("\nfoo bar\n").unwrap_err();
        assert_eq!(
            e,
            VarsError::BadLine {
                line: 2,
                text: "foo bar".into()
            }
        );
        let e = Vars::new().parse_into("ipvar BAD-NAME any").unwrap_err();
        assert!(e.to_string().contains("BAD-NAME"));
    }
}
