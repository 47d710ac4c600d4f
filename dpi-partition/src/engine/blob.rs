//! Compiled rules blob (what GRUB hands Ally as a `module2`).
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! offset size
//!  0      8   magic "ALLYRULE"
//!  8      4   format version (BLOB_VERSION)
//! 12      4   record count N
//! 16      4   payload length P (bytes after this 24-byte header)
//! 20      4   CRC-32 (IEEE) of the payload
//! 24      P   N records: u32 length L, then L bytes of UTF-8 canonical rule text
//! ```
//!
//! A record is the rule in canonical text with variables already expanded (the host compiler
//! resolved them and dropped unsupported rules), so the loader needs no variables and parses
//! each record with the same parser. Loading checks everything and names the problem.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use super::rules::{parse_rule, Rule};
use super::vars::Vars;

/// Magic at offset 0.
pub const MAGIC: &[u8; 8] = b"ALLYRULE";
/// Current format version.
pub const BLOB_VERSION: u32 = 1;
const HEADER: usize = 24;
/// Upper bound on one record (a rule line), against corrupt lengths.
const MAX_RECORD: usize = 1 << 20;

/// Why a blob was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobError {
    /// Shorter than the header or than its declared payload.
    Truncated { needed: usize, have: usize },
    /// Not `ALLYRULE`.
    BadMagic,
    /// Unknown format version.
    BadVersion { found: u32, supported: u32 },
    /// Payload checksum mismatch.
    Checksum { stored: u32, computed: u32 },
    /// Record `index` (0-based) is malformed.
    CorruptRecord { index: u32, reason: String },
    /// Bytes after the last record.
    TrailingBytes { count: usize },
}

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobError::Truncated { needed, have } => {
                write!(f, "rules blob truncated: need {needed} bytes, have {have}")
            }
            BlobError::BadMagic => f.write_str("rules blob: bad magic (expected \"ALLYRULE\")"),
            BlobError::BadVersion { found, supported } => {
                write!(
                    f,
                    "rules blob: version {found} not supported (this build reads {supported})"
                )
            }
            BlobError::Checksum { stored, computed } => write!(
                f,
                "rules blob: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            BlobError::CorruptRecord { index, reason } => {
                write!(f, "rules blob: corrupt record at index {index}: {reason}")
            }
            BlobError::TrailingBytes { count } => {
                write!(f, "rules blob: {count} bytes after the last record")
            }
        }
    }
}

/// Serialises rules into a blob.
pub fn encode(rules: &[Rule]) -> Vec<u8> {
    let mut payload = Vec::new();
    for r in rules {
        let text = r.to_string();
        payload.extend_from_slice(&(text.len() as u32).to_le_bytes());
        payload.extend_from_slice(text.as_bytes());
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&BLOB_VERSION.to_le_bytes());
    out.extend_from_slice(&(rules.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Verifies and decodes a blob.
pub fn decode(blob: &[u8]) -> Result<Vec<Rule>, BlobError> {
    if blob.len() < 8 || &blob[..8] != MAGIC {
        return Err(if blob.len() < 8 && MAGIC.starts_with(blob) {
            BlobError::Truncated {
                needed: HEADER,
                have: blob.len(),
            }
        } else {
            BlobError::BadMagic
        });
    }
    if blob.len() < HEADER {
        return Err(BlobError::Truncated {
            needed: HEADER,
            have: blob.len(),
        });
    }
    let version = le32(blob, 8);
    if version != BLOB_VERSION {
        return Err(BlobError::BadVersion {
            found: version,
            supported: BLOB_VERSION,
        });
    }
    let count = le32(blob, 12);
    let plen = le32(blob, 16) as usize;
    let stored = le32(blob, 20);
    let needed = HEADER.saturating_add(plen);
    if blob.len() < needed {
        return Err(BlobError::Truncated {
            needed,
            have: blob.len(),
        });
    }
    let payload = &blob[HEADER..needed];
    let computed = crc32fast::hash(payload);
    if computed != stored {
        return Err(BlobError::Checksum { stored, computed });
    }
    let vars = Vars::new();
    let mut rules = Vec::new();
    let mut at = 0usize;
    for index in 0..count {
        let corrupt = |reason: &str| BlobError::CorruptRecord {
            index,
            reason: reason.to_string(),
        };
        if payload.len() - at < 4 {
            return Err(corrupt("record length runs past the payload"));
        }
        let len = le32(payload, at) as usize;
        at += 4;
        if len > MAX_RECORD || payload.len() - at < len {
            return Err(corrupt("record runs past the payload"));
        }
        let text = core::str::from_utf8(&payload[at..at + len])
            .map_err(|_| corrupt("record is not UTF-8"))?;
        at += len;
        let rule = parse_rule(text, &vars).map_err(|e| BlobError::CorruptRecord {
            index,
            reason: alloc::format!("rule does not parse: {e}"),
        })?;
        rules.push(rule);
    }
    if at != payload.len() {
        return Err(BlobError::TrailingBytes {
            count: payload.len() - at,
        });
    }
    if blob.len() > needed {
        return Err(BlobError::TrailingBytes {
            count: blob.len() - needed,
        });
    }
    Ok(rules)
}
