//! Application-protocol detection by payload, for Suricata's protocol headers (`alert http`,
//! `alert dns`, `alert tls`, `alert smtp`, `alert ssh`): a rule with such a header matches only
//! traffic detected as its protocol, on any port.
//!
//! Detection looks at one payload (a TCP segment's own payload, or a UDP payload), with O(1)
//! prefix checks except DNS (its questions are parsed, bounded as in [`super::dns`]):
//!
//! - **http**: `HTTP/1.` or `HTTP/2` at the start (a response), or a method token (1-20
//!   upper-case letters, `-` or `_`) and a space, with ` HTTP/` on the same first line within
//!   [`HTTP_LINE`] bytes (a request).
//! - **tls**: a TLS record header or an SSLv2 CLIENT-HELLO ([`super::tls::looks_like`]).
//! - **ssh**: `SSH-` at the start (the version banner, RFC 4253 §4.2).
//! - **smtp**: a client command at the start (`EHLO `, `HELO `, `MAIL FROM:`, `RCPT TO:`,
//!   `STARTTLS`, case-insensitive) or a server `220` greeting whose first line names `SMTP`.
//! - **dns**: a DNS message as [`super::dns`] parses it (UDP; TCP after the length prefix).
//!
//! **Per flow**: the engine records the first protocol detected on a flow of its flow table
//! (TCP flows whose handshake it saw, UDP flows) and keeps it: a later payload of that flow (an
//! HTTP body segment, TLS application data) counts as that protocol too. A payload also counts
//! as whatever it is itself detected as, so without a flow entry (mid-stream TCP, a full table)
//! detection is per payload.

use super::dns::{self, DnsView};
use super::rules::AppProto;
use super::tls;

/// Bytes of a request's first line searched for ` HTTP/`.
pub const HTTP_LINE: usize = 2048;

fn http(p: &[u8]) -> bool {
    if p.starts_with(b"HTTP/1.") || p.starts_with(b"HTTP/2") {
        return true;
    }
    let method = p
        .iter()
        .take(21)
        .take_while(|b| b.is_ascii_uppercase() || matches!(b, b'-' | b'_'))
        .count();
    if method == 0 || method > 20 || p.get(method) != Some(&b' ') {
        return false;
    }
    let line = &p[..p.len().min(HTTP_LINE)];
    let line = match memchr::memchr(b'\n', line) {
        Some(n) => &line[..n],
        None => line,
    };
    memchr::memmem::find(line, b" HTTP/").is_some()
}

fn smtp(p: &[u8]) -> bool {
    let starts = |w: &[u8]| p.len() >= w.len() && p[..w.len()].eq_ignore_ascii_case(w);
    if [
        &b"EHLO "[..],
        b"HELO ",
        b"MAIL FROM:",
        b"RCPT TO:",
        b"STARTTLS",
    ]
    .iter()
    .any(|w| starts(w))
    {
        return true;
    }
    if !(starts(b"220 ") || starts(b"220-")) {
        return false;
    }
    let line = &p[..p.len().min(512)];
    let line = match memchr::memchr(b'\n', line) {
        Some(n) => &line[..n],
        None => line,
    };
    line.windows(4).any(|w| w.eq_ignore_ascii_case(b"SMTP"))
}

/// The TCP-only protocol `payload` is detected as (everything but DNS).
pub fn detect_tcp(payload: &[u8]) -> Option<AppProto> {
    if payload.starts_with(b"SSH-") {
        Some(AppProto::Ssh)
    } else if tls::looks_like(payload) {
        Some(AppProto::Tls)
    } else if http(payload) {
        Some(AppProto::Http)
    } else if smtp(payload) {
        Some(AppProto::Smtp)
    } else {
        None
    }
}

/// The protocol `payload` is detected as (`tcp`: a TCP payload, else UDP); `scratch` is reused
/// for the DNS parse.
pub fn detect(payload: &[u8], tcp: bool, scratch: &mut DnsView) -> Option<AppProto> {
    if payload.is_empty() {
        return None;
    }
    let on_tcp = if tcp { detect_tcp(payload) } else { None };
    on_tcp.or_else(|| dns::parse(payload, tcp, scratch).then_some(AppProto::Dns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(p: &[u8], tcp: bool) -> Option<AppProto> {
        detect(p, tcp, &mut DnsView::default())
    }

    #[test]
    fn detects_each_protocol() {
        assert_eq!(
            d(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", true),
            Some(AppProto::Http)
        );
        assert_eq!(d(b"HTTP/1.0 200 OK\r\n", true), Some(AppProto::Http));
        assert_eq!(d(b"SSH-2.0-OpenSSH_9.6\r\n", true), Some(AppProto::Ssh));
        assert_eq!(d(b"EHLO mail.example\r\n", true), Some(AppProto::Smtp));
        assert_eq!(d(b"mail from:<a@b>\r\n", true), Some(AppProto::Smtp));
        assert_eq!(
            d(b"220 mx.example ESMTP Postfix\r\n", true),
            Some(AppProto::Smtp)
        );
        assert_eq!(
            d(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", true),
            Some(AppProto::Tls)
        );
        let q = b"\xAB\xCD\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01";
        assert_eq!(d(q, false), Some(AppProto::Dns));
        let mut t = (q.len() as u16).to_be_bytes().to_vec();
        t.extend_from_slice(q);
        assert_eq!(d(&t, true), Some(AppProto::Dns));
    }

    #[test]
    fn rejects_lookalikes() {
        assert_eq!(d(b"", true), None);
        assert_eq!(d(b"GET /x\r\n HTTP/1.1", true), None); // HTTP/ not on the first line
        assert_eq!(d(b"get /x HTTP/1.1\r\n", true), None);
        assert_eq!(d(b"220 ftp.example FTP server ready\r\n", true), None);
        assert_eq!(d(b"SSH-2.0-x", false), None); // SSH only over TCP
        assert_eq!(d(b"hello world, nothing here", false), None);
        assert_eq!(d(b"\x17\x03\x09\x00\x01", true), None);
    }
}
