//! TLS / SSL records (RFC 5246 §6.2, §7.4; RFC 6066 §3 for the SNI; SSLv2's CLIENT-HELLO):
//! protocol detection, the `tls.sni` buffer, Snort's `ssl_state` / `ssl_version` and the EVE
//! `tls` object.
//!
//! # Model
//!
//! Per inspected TCP segment, its own payload (not the stream window): the TLS records that
//! start at the payload's first byte and follow each other, the last one possibly cut by the
//! segment end. No TLS state is kept across segments, so a handshake message is only seen in
//! the segment that holds its start, and one split over two records or two segments is parsed
//! as far as it is present (a ClientHello cut before its server_name extension has no
//! `tls.sni`). Snort accumulates `ssl_state`/`ssl_version` flags over the session; here they are
//! the flags of the one payload:
//!
//! - `ssl_state`: `client_hello` (handshake type 1, or an SSLv2 CLIENT-HELLO), `server_hello`
//!   (2), `client_keyx` (16), `server_keyx` (12), `unknown` (any other handshake type outside
//!   the RFC 5246/8446 list, e.g. an encrypted Finished read as a type byte).
//! - `ssl_version`: from every record's version and each hello's version field: 3.0 `sslv3`,
//!   3.1 `tls1.0`, 3.2 `tls1.1`, 3.3 `tls1.2` (TLS 1.3 hellos carry 3.3 as legacy version);
//!   an SSLv2 CLIENT-HELLO sets the flag of the version it offers (0.2 `sslv2`).
//!
//! A payload that does not start with a record header (content type 20-24, version 3.0-3.4) or
//! an SSLv2 CLIENT-HELLO is not TLS: rules with `ssl_state`, `ssl_version` or `tls.sni` do not
//! match it, even with only `!` flags.
//!
//! `tls.sni` is the first `host_name` entry of the ClientHello's server_name extension, as
//! sent (a slice of the payload). EVE `version` is the ServerHello's version when the payload
//! has one, else the ClientHello's, in Suricata's spelling (`TLS 1.2`, `TLSv1`, `SSLv3`, ...).
//!
//! # Bounds
//!
//! At most [`MAX_RECORDS`] records and [`MAX_HANDSHAKES`] handshake messages per payload and
//! [`MAX_EXTENSIONS`] extensions per hello are looked at; every read is checked against its
//! enclosing length and the payload. Nothing here allocates or panics on any input.

/// Records looked at per payload.
pub const MAX_RECORDS: usize = 64;
/// Handshake messages looked at per payload.
pub const MAX_HANDSHAKES: usize = 64;
/// Extensions looked at per hello.
pub const MAX_EXTENSIONS: usize = 128;

/// `ssl_state` bits (order of [`super::rules::SSL_STATES`]).
pub mod state {
    /// `client_hello`.
    pub const CLIENT_HELLO: u8 = 1;
    /// `server_hello`.
    pub const SERVER_HELLO: u8 = 2;
    /// `client_keyx`.
    pub const CLIENT_KEYX: u8 = 4;
    /// `server_keyx`.
    pub const SERVER_KEYX: u8 = 8;
    /// `unknown`.
    pub const UNKNOWN: u8 = 16;
}

/// `ssl_version` bits (order of [`super::rules::SSL_VERSIONS`]).
pub mod version {
    /// `sslv2`.
    pub const SSLV2: u8 = 1;
    /// `sslv3`.
    pub const SSLV3: u8 = 2;
    /// `tls1.0`.
    pub const TLS1_0: u8 = 4;
    /// `tls1.1`.
    pub const TLS1_1: u8 = 8;
    /// `tls1.2`.
    pub const TLS1_2: u8 = 16;
}

/// What one payload holds of TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsView {
    /// The payload starts with a TLS record (or SSLv2 CLIENT-HELLO).
    pub is_tls: bool,
    /// `ssl_state` flags ([`state`]).
    pub states: u8,
    /// `ssl_version` flags ([`version`]).
    pub versions: u8,
    /// Payload range of the SNI host name.
    sni: Option<(u32, u32)>,
    /// ClientHello version.
    pub client_version: Option<u16>,
    /// ServerHello version.
    pub server_version: Option<u16>,
}

impl TlsView {
    /// The SNI host name (`p`: the payload parsed).
    pub fn sni<'a>(&self, p: &'a [u8]) -> Option<&'a [u8]> {
        let (a, b) = self.sni?;
        p.get(a as usize..b as usize)
    }

    /// The hello version for EVE: the server's, else the client's.
    pub fn version(&self) -> Option<u16> {
        self.server_version.or(self.client_version)
    }
}

/// Suricata's EVE spelling of a protocol version.
pub fn version_name(v: u16) -> Option<&'static str> {
    Some(match v {
        0x0002 => "SSLv2",
        0x0300 => "SSLv3",
        0x0301 => "TLSv1",
        0x0302 => "TLS 1.1",
        0x0303 => "TLS 1.2",
        0x0304 => "TLS 1.3",
        _ => return None,
    })
}

fn version_flag(v: u16) -> u8 {
    match v {
        0x0002 => version::SSLV2,
        0x0300 => version::SSLV3,
        0x0301 => version::TLS1_0,
        0x0302 => version::TLS1_1,
        0x0303 => version::TLS1_2,
        _ => 0,
    }
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

fn be24(p: &[u8], at: usize) -> Option<usize> {
    Some(
        usize::from(*p.get(at)?) << 16
            | usize::from(*p.get(at + 1)?) << 8
            | usize::from(*p.get(at + 2)?),
    )
}

/// Whether `p` starts with a TLS record header: content type 20-24 (change_cipher_spec, alert,
/// handshake, application_data, heartbeat) and version 3.0-3.4.
fn record_header(p: &[u8]) -> bool {
    matches!(p, [20..=24, 3, 0..=4, _, _, ..])
}

/// Whether `p` starts with an SSLv2 CLIENT-HELLO: a 2-byte header with the top bit set,
/// message type 1, then a version of 0.2 or 3.x.
fn sslv2_client_hello(p: &[u8]) -> Option<u16> {
    match p {
        [h, _, 1, maj, min, ..] if h & 0x80 != 0 && matches!((maj, min), (0, 2) | (3, 0..=3)) => {
            Some(u16::from_be_bytes([*maj, *min]))
        }
        _ => None,
    }
}

/// Whether `p` looks like TLS (protocol detection; see the module doc).
pub fn looks_like(p: &[u8]) -> bool {
    record_header(p) || sslv2_client_hello(p).is_some()
}

/// Parses the records at the start of `p`.
pub fn parse(p: &[u8]) -> TlsView {
    let mut v = TlsView::default();
    if let Some(ver) = sslv2_client_hello(p) {
        v.is_tls = true;
        v.states |= state::CLIENT_HELLO;
        v.versions |= version_flag(ver);
        v.client_version = Some(ver);
        return v;
    }
    let mut pos = 0;
    let mut handshakes = 0;
    for _ in 0..MAX_RECORDS {
        let Some(hdr) = p.get(pos..pos + 5).filter(|h| record_header(h)) else {
            break;
        };
        v.is_tls = true;
        let ver = u16::from_be_bytes([hdr[1], hdr[2]]);
        v.versions |= version_flag(ver);
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        let start = pos + 5;
        let end = (start + len).min(p.len());
        if hdr[0] == 22 {
            handshake_messages(p, start, end, &mut v, &mut handshakes);
        }
        pos = start + len;
    }
    v
}

/// The handshake messages in `p[start..end]` (one record's fragment).
fn handshake_messages(p: &[u8], start: usize, end: usize, v: &mut TlsView, count: &mut usize) {
    let mut pos = start;
    while pos + 4 <= end && *count < MAX_HANDSHAKES {
        *count += 1;
        let Some(len) = be24(p, pos + 1) else { return };
        let body = pos + 4;
        let body_end = body.saturating_add(len).min(end);
        match p[pos] {
            1 => {
                v.states |= state::CLIENT_HELLO;
                if let Some(ver) = be16(p, body).filter(|_| body + 2 <= body_end) {
                    v.versions |= version_flag(ver);
                    v.client_version.get_or_insert(ver);
                }
                if v.sni.is_none() {
                    v.sni = client_hello_sni(p, body, body_end);
                }
            }
            2 => {
                v.states |= state::SERVER_HELLO;
                if let Some(ver) = be16(p, body).filter(|_| body + 2 <= body_end) {
                    v.versions |= version_flag(ver);
                    v.server_version.get_or_insert(ver);
                }
            }
            16 => v.states |= state::CLIENT_KEYX,
            12 => v.states |= state::SERVER_KEYX,
            // hello_request, new_session_ticket, end_of_early_data, encrypted_extensions,
            // certificate, certificate_request, server_hello_done, certificate_verify,
            // finished, certificate_url, certificate_status, key_update, message_hash.
            0 | 4 | 5 | 8 | 11 | 13 | 14 | 15 | 20 | 21 | 22 | 24 | 254 => {}
            _ => v.states |= state::UNKNOWN,
        }
        pos = body.saturating_add(len);
    }
}

/// The payload range of the first host_name of the server_name extension of the ClientHello
/// body `p[body..end]`.
fn client_hello_sni(p: &[u8], body: usize, end: usize) -> Option<(u32, u32)> {
    let get8 = |at: usize| p.get(at).copied().filter(|_| at < end).map(usize::from);
    let get16 = |at: usize| be16(p, at).filter(|_| at + 2 <= end).map(usize::from);
    // version(2) random(32) session_id<0..32>
    let mut pos = body + 34;
    pos += 1 + get8(pos)?;
    pos += 2 + get16(pos)?; // cipher_suites
    pos += 1 + get8(pos)?; // compression_methods
    let ext_end = (pos + 2 + get16(pos)?).min(end);
    pos += 2;
    for _ in 0..MAX_EXTENSIONS {
        if pos + 4 > ext_end {
            return None;
        }
        let (typ, len) = (get16(pos)?, get16(pos + 2)?);
        let data = pos + 4;
        if typ == 0 {
            // ServerNameList: list length, then (type, length, name) entries.
            let list_end = (data + 2 + get16(data)?).min(data + len).min(ext_end);
            let mut e = data + 2;
            while e + 3 <= list_end {
                let (kind, n) = (get8(e)?, get16(e + 1)?);
                let name = e + 3;
                if kind == 0 && name + n <= list_end {
                    return Some((name as u32, (name + n) as u32));
                }
                e = name + n;
            }
            return None;
        }
        pos = data + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// A TLS 1.2 record holding a ClientHello with the given SNI.
    pub(crate) fn client_hello(sni: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        // An unrelated extension first (ec_point_formats).
        ext.extend_from_slice(&[0, 11, 0, 2, 1, 0]);
        let entry_len = 3 + sni.len();
        ext.extend_from_slice(&[0, 0]);
        ext.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(entry_len as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(sni);
        let mut body = alloc::vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = alloc::vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = alloc::vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sni_states_versions() {
        let p = client_hello(b"evil.example");
        let v = parse(&p);
        assert!(v.is_tls && looks_like(&p));
        assert_eq!(v.sni(&p), Some(&b"evil.example"[..]));
        assert_eq!(v.states, state::CLIENT_HELLO);
        assert_eq!(v.versions, version::TLS1_0 | version::TLS1_2);
        assert_eq!(v.version().and_then(version_name), Some("TLS 1.2"));
        // ServerHello + ServerKeyExchange in one record, version 3.2.
        let sh = [
            22, 3, 2, 0, 14, 2, 0, 0, 2, 3, 2, 12, 0, 0, 0, 0xF0, 0, 0, 0,
        ];
        let v = parse(&sh);
        assert_eq!(
            v.states,
            state::SERVER_HELLO | state::SERVER_KEYX | state::UNKNOWN
        );
        assert_eq!(v.server_version, Some(0x0302));
    }

    #[test]
    fn truncated_and_malformed_never_panic() {
        let p = client_hello(b"host.test");
        for cut in 0..p.len() {
            let v = parse(&p[..cut]);
            if let Some(s) = v.sni(&p[..cut]) {
                assert_eq!(s, b"host.test");
            }
        }
        // The SNI present only when the whole name is.
        assert_eq!(parse(&p[..p.len() - 1]).sni(&p), None);
        // Every byte flipped to every value in a short prefix.
        for i in 0..p.len() {
            for b in [0u8, 1, 0x7F, 0x80, 0xFF] {
                let mut q = p.clone();
                q[i] = b;
                let v = parse(&q);
                let _ = v.sni(&q);
            }
        }
        assert!(!looks_like(b"GET / HTTP/1.1\r\n"));
        assert!(!parse(b"\x16\x02\x00\x00\x00").is_tls);
        assert!(!parse(b"").is_tls);
    }

    #[test]
    fn sslv2_hello() {
        let p = [0x80, 0x2E, 1, 0, 2, 0, 0x15, 0, 0, 0, 0x10];
        let v = parse(&p);
        assert!(v.is_tls);
        assert_eq!(v.versions, version::SSLV2);
        assert_eq!(v.states, state::CLIENT_HELLO);
        let p = [0x80, 0x2E, 1, 3, 1];
        assert_eq!(parse(&p).versions, version::TLS1_0);
    }
}
