//! `ally-tools eve split`: a captured management stream (Ally's COM2) into EVE JSON lines and
//! a pcap of the dropped-frame excerpts.

use std::io::Write;

use ally_dpi::engine::eve::{parse_mgmt_line, MgmtLine, DEFAULT_EXCERPT};

use crate::pcap;

/// Splits a captured management stream into EVE JSON lines and a pcap of dropped-frame excerpts.
pub fn split(
    stream: &str,
    eve: &mut impl Write,
    pcap: &mut impl Write,
) -> Result<(usize, usize), String> {
    pcap::write_header(pcap, DEFAULT_EXCERPT as u32).map_err(|e| e.to_string())?;
    let (mut n_eve, mut n_pcap) = (0, 0);
    for (i, line) in stream.lines().enumerate() {
        match parse_mgmt_line(line).map_err(|e| format!("line {}: {e}", i + 1))? {
            MgmtLine::Eve(json) => {
                writeln!(eve, "{json}").map_err(|e| e.to_string())?;
                n_eve += 1;
            }
            MgmtLine::Pcap {
                ts_us,
                orig_len,
                data,
                ..
            } => {
                pcap::write_record(pcap, ts_us, orig_len, &data).map_err(|e| e.to_string())?;
                n_pcap += 1;
            }
            MgmtLine::Other => {}
        }
    }
    Ok((n_eve, n_pcap))
}
