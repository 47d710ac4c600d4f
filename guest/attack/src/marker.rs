//! The marker line each attack prints: `ALLYTEST <name> INFO key=value ...` (guest/init's
//! format; the runner's `attack` module parses it). Values never contain spaces.

use std::fmt::{self, Display};
use std::io::Write;

/// One marker line being built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    name: String,
    fields: Vec<(String, String)>,
}

/// A value as one word: whitespace and `=` become `_` (the runner splits on both).
fn word(v: &str) -> String {
    let w: String = v
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if w.is_empty() {
        "none".into()
    } else {
        w
    }
}

impl Marker {
    pub fn new(name: &str) -> Marker {
        Marker {
            name: word(name),
            fields: Vec::new(),
        }
    }

    /// Appends `key=value`.
    pub fn field(&mut self, key: &str, value: impl Display) -> &mut Marker {
        self.fields.push((word(key), word(&value.to_string())));
        self
    }

    /// Appends `key=0x..` (lower-case hex).
    pub fn hex(&mut self, key: &str, value: u64) -> &mut Marker {
        self.field(key, format_args!("{value:#x}"))
    }

    /// Appends `raw`, already `key=value` words (from the command line), word by word.
    pub fn raw(&mut self, raw: &str) -> &mut Marker {
        for w in raw.split_whitespace() {
            match w.split_once('=') {
                Some((k, v)) if !k.is_empty() => self.field(k, v),
                _ => self.field("note", w),
            };
        }
        self
    }

    /// Prints the line on stdout and flushes it (a reset may follow at once).
    pub fn print(&self) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{self}");
        let _ = out.flush();
    }
}

impl Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ALLYTEST {} INFO", self.name)?;
        for (k, v) in &self.fields {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format_and_single_word_values() {
        let mut m = Marker::new("attack-msr");
        m.field("0x560", "EIO")
            .hex("value", 0x100000)
            .field("error", "open /dev/mem: x=y")
            .field("empty", "")
            .raw("boot=2 ping_received=3 stray");
        assert_eq!(
            m.to_string(),
            "ALLYTEST attack-msr INFO 0x560=EIO value=0x100000 error=open_/dev/mem:_x_y empty=none boot=2 ping_received=3 note=stray"
        );
    }
}
