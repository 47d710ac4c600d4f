//! DNS messages (RFC 1035 §4): protocol detection, the `dns.query` buffer and the EVE `dns`
//! object.
//!
//! # Model
//!
//! One DNS message per inspected payload: a UDP payload is the message; a TCP segment's own
//! payload (not the stream window) starts with the 2-byte length prefix (RFC 1035 §4.2.2) and
//! then the message, possibly cut by the segment end (the questions come first, so they are
//! usually whole). A later message in the same segment is not parsed.
//!
//! A payload is DNS when the 12-byte header has an opcode in use (0-2, 4-6), 1 to
//! [`MAX_QUESTIONS`] questions, and every question parses: a name, then a type and a class that
//! is IN, CH, HS, NONE or ANY (the mDNS unicast-response bit allowed). Each question name is one
//! `dns.query` buffer (Suricata presents each query separately): its labels as sent, joined with
//! `.`, without the length bytes and without a trailing dot (the root name is empty). Labels
//! are copied raw: a label that holds a `.` or any other byte is not escaped.
//!
//! # Bounds
//!
//! Names follow compression pointers (RFC 1035 §4.1.4) only backwards, to an offset before
//! the label that holds the pointer, so a pointer loop (or a pointer to itself or forwards) makes
//! the message not DNS; a name longer than 255 bytes on the wire (RFC 1035 §3.1) is refused
//! too. Work per payload is at most [`MAX_QUESTIONS`] names of at most 127 labels each. Nothing
//! here panics on any input; the decoded names live in a buffer reused across payloads.

use alloc::vec::Vec;

/// Questions parsed per message (more: not DNS).
pub const MAX_QUESTIONS: usize = 16;
/// Longest name on the wire, length bytes and final zero included (RFC 1035 §3.1).
pub const MAX_NAME_WIRE: usize = 255;
const HEADER: usize = 12;

/// One question of a parsed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    name: (u32, u32),
    /// QTYPE.
    pub rrtype: u16,
}

/// The questions of one DNS message.
#[derive(Clone, Debug, Default)]
pub struct DnsView {
    /// Transaction id.
    pub id: u16,
    /// QR bit: a response.
    pub response: bool,
    names: Vec<u8>,
    questions: Vec<Question>,
}

impl DnsView {
    /// The questions (empty when the payload is not DNS).
    pub fn questions(&self) -> &[Question] {
        &self.questions
    }

    /// The dotted name of question `q`.
    pub fn name(&self, q: &Question) -> &[u8] {
        self.names
            .get(q.name.0 as usize..q.name.1 as usize)
            .unwrap_or(&[])
    }

    /// The name with a `.` before it (Suricata's `dotprefix` transform).
    pub fn dot_name(&self, q: &Question) -> &[u8] {
        self.names
            .get((q.name.0 as usize).saturating_sub(1)..q.name.1 as usize)
            .unwrap_or(&[])
    }

    /// Whether the last [`parse`] found a DNS message.
    pub fn is_dns(&self) -> bool {
        !self.questions.is_empty()
    }
}

/// The message of `payload`: the payload itself over UDP, after the length prefix over TCP
/// (cut to the prefix's length, or to the payload end when the message continues later).
pub fn message(payload: &[u8], tcp: bool) -> Option<&[u8]> {
    if !tcp {
        return Some(payload);
    }
    let len = usize::from(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
    let rest = payload.get(2..)?;
    Some(&rest[..len.min(rest.len())])
}

/// Parses the DNS message of `payload` ([`message`]) into `out`; false (and `out` empty) when
/// it is not DNS.
pub fn parse(payload: &[u8], tcp: bool, out: &mut DnsView) -> bool {
    out.names.clear();
    out.questions.clear();
    let ok = message(payload, tcp).is_some_and(|m| parse_message(m, out));
    if !ok {
        out.names.clear();
        out.questions.clear();
    }
    ok
}

fn be16(m: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]))
}

fn parse_message(m: &[u8], out: &mut DnsView) -> bool {
    if m.len() < HEADER {
        return false;
    }
    let (Some(id), Some(flags), Some(qd)) = (be16(m, 0), be16(m, 2), be16(m, 4)) else {
        return false;
    };
    let opcode = (flags >> 11) & 0xF;
    if !matches!(opcode, 0..=2 | 4..=6) || qd == 0 || usize::from(qd) > MAX_QUESTIONS {
        return false;
    }
    out.id = id;
    out.response = flags & 0x8000 != 0;
    let mut pos = HEADER;
    for _ in 0..qd {
        // Each name is kept after a `.`, for `dotprefix`.
        out.names.push(b'.');
        let start = out.names.len();
        let Some(after) = read_name(m, pos, &mut out.names) else {
            return false;
        };
        let (Some(rrtype), Some(class)) = (be16(m, after), be16(m, after + 2)) else {
            return false;
        };
        if !matches!(class & 0x7FFF, 1 | 3 | 4 | 254 | 255) {
            return false;
        }
        out.questions.push(Question {
            name: (start as u32, out.names.len() as u32),
            rrtype,
        });
        pos = after + 4;
    }
    true
}

/// Appends the dotted name at `pos` of message `m` to `out`; the offset after the name's bytes
/// at `pos` (after its pointer when it is compressed). `None` for a malformed name.
fn read_name(m: &[u8], mut pos: usize, out: &mut Vec<u8>) -> Option<usize> {
    let mut end = None;
    let mut wire = 0usize;
    let mut first = true;
    // Backward-only pointers: every jump lands strictly before `limit`, which then shrinks, so
    // the walk ends; wire length bounds it further.
    let mut limit = pos;
    loop {
        let len = *m.get(pos)?;
        match len & 0xC0 {
            0x00 => {
                wire += 1 + usize::from(len);
                if wire > MAX_NAME_WIRE {
                    return None;
                }
                if len == 0 {
                    return Some(end.unwrap_or(pos + 1));
                }
                let label = m.get(pos + 1..pos + 1 + usize::from(len))?;
                if !first {
                    out.push(b'.');
                }
                out.extend_from_slice(label);
                first = false;
                pos += 1 + usize::from(len);
            }
            0xC0 => {
                let target = usize::from(be16(m, pos)? & 0x3FFF);
                if target >= limit.min(pos) {
                    return None;
                }
                end.get_or_insert(pos + 2);
                limit = target;
                pos = target;
            }
            // 0x40 (extended label types, RFC 6891 obsoleted) and 0x80: not valid.
            _ => return None,
        }
    }
}

/// Suricata's name of a query type (`rrtype` in EVE); `None`: write the number.
pub fn rrtype_name(t: u16) -> Option<&'static str> {
    Some(match t {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        46 => "RRSIG",
        47 => "NSEC",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        99 => "SPF",
        252 => "AXFR",
        255 => "ANY",
        257 => "CAA",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(names: &[&[u8]]) -> Vec<u8> {
        let mut m = alloc::vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            names.len() as u8,
            0,
            0,
            0,
            0,
            0,
            0
        ];
        for n in names {
            m.extend_from_slice(n);
            m.extend_from_slice(&[0, 1, 0, 1]);
        }
        m
    }

    fn names(v: &DnsView) -> Vec<&[u8]> {
        v.questions().iter().map(|q| v.name(q)).collect()
    }

    #[test]
    fn dotted_names_and_root() {
        let mut v = DnsView::default();
        let m = query(&[b"\x03www\x07example\x03com\x00", b"\x00"]);
        assert!(parse(&m, false, &mut v));
        assert_eq!(names(&v), [&b"www.example.com"[..], b""]);
        let q = v.questions()[0];
        assert_eq!(v.dot_name(&q), b".www.example.com");
        assert_eq!(v.id, 0x1234);
        assert!(!v.response);
        assert_eq!(v.questions()[0].rrtype, 1);
    }

    #[test]
    fn backward_pointer_followed_loops_refused() {
        let mut v = DnsView::default();
        // Second name: "mail" then a pointer to the first name (offset 12).
        let m = query(&[b"\x07example\x03com\x00", b"\x04mail\xC0\x0C"]);
        assert!(parse(&m, false, &mut v));
        assert_eq!(names(&v), [&b"example.com"[..], b"mail.example.com"]);
        // A pointer to itself.
        assert!(!parse(&query(&[b"\xC0\x0C"]), false, &mut v));
        assert!(v.questions().is_empty());
        // Two names pointing at each other: the second's pointer goes back to the first,
        // whose pointer goes forward: refused.
        let mut m = query(&[b"\x01a\xC0\x16", b"\x01b\xC0\x0C"]);
        assert!(!parse(&m, false, &mut v));
        // A forward pointer.
        m = query(&[b"\xC0\x20"]);
        assert!(!parse(&m, false, &mut v));
    }

    #[test]
    fn malformed_and_truncated() {
        let mut v = DnsView::default();
        let good = query(&[b"\x03abc\x00"]);
        for cut in 0..good.len() {
            assert!(!parse(&good[..cut], false, &mut v), "cut at {cut}");
        }
        // Label runs past the end.
        assert!(!parse(&query(&[b"\x3Fabc"]), false, &mut v));
        // 0x40/0x80 label types.
        assert!(!parse(&query(&[b"\x41abc\x00"]), false, &mut v));
        // Name longer than 255 bytes on the wire.
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        assert!(!parse(&query(&[&long]), false, &mut v));
        // Zero questions, a bad opcode, a bad class.
        let mut m = query(&[b"\x00"]);
        m[5] = 0;
        assert!(!parse(&m, false, &mut v));
        let mut m = query(&[b"\x00"]);
        m[2] = 0x18; // opcode 3
        assert!(!parse(&m, false, &mut v));
        let mut m = query(&[b"\x00"]);
        let n = m.len();
        m[n - 1] = 9;
        assert!(!parse(&m, false, &mut v));
    }

    #[test]
    fn tcp_length_prefix() {
        let mut v = DnsView::default();
        let m = query(&[b"\x03abc\x00"]);
        let mut t = (m.len() as u16).to_be_bytes().to_vec();
        t.extend_from_slice(&m);
        assert!(parse(&t, true, &mut v));
        assert_eq!(names(&v), [&b"abc"[..]]);
        assert!(!parse(&m, true, &mut v));
        assert!(!parse(&[0], true, &mut v));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut v = DnsView::default();
        let mut x = 0x9E37_79B9u32;
        for len in 0..300 {
            let mut m = query(&[b"\x01a\x00"]);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                m.push(x as u8);
            }
            for i in HEADER..m.len() {
                let mut mm = m.clone();
                mm[i] = (x >> (i % 24)) as u8;
                parse(&mm, false, &mut v);
                parse(&mm, true, &mut v);
            }
        }
    }
}
