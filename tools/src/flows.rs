//! Realistic flows for benchmarking the boot configuration (stream tracking and IP reassembly):
//! interleaved TCP connections with a handshake, data both ways with consistent sequence and
//! acknowledgment numbers, receiver ACKs every second segment and a FIN close; HTTP/1.1
//! keep-alive transactions (Content-Length, chunked and gzip bodies), TLS-like and opaque TCP;
//! DNS and other UDP, some of it in IP fragments.

use miniz_oxide::deflate::compress_to_vec;

use crate::traffic::{
    ipv4_fragment, random_bytes, tcp_hdr, text, udp_hdr, GenFrame, Rng, TrafficConfig, WORDS,
};

/// TCP payload bytes per full segment (1500-byte MTU).
pub const MSS: usize = 1460;
/// IP payload bytes per fragment (a multiple of 8, 1500-byte MTU).
const FRAG_PAYLOAD: usize = 1480;
/// Flows open at once.
const CONCURRENT: usize = 64;

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// The frames of one flow, in their order on the wire (before interleaving).
struct Script {
    frames: Vec<GenFrame>,
}

impl Script {
    fn push(&mut self, to_server: bool, data: bool, hit: bool, bytes: Vec<u8>) {
        self.frames.push(GenFrame {
            ts_us: 0,
            to_server,
            data,
            hit,
            bytes,
        });
    }
}

/// A TCP connection being scripted; index 0 is the client, 1 the server.
struct Tcp {
    addr: [[u8; 4]; 2],
    port: [u16; 2],
    /// Next sequence number each side sends.
    next: [u32; 2],
    /// Full segments each side has received since it last sent an ACK.
    unacked: [usize; 2],
    script: Script,
}

impl Tcp {
    fn new(rng: &mut Rng, addr: [[u8; 4]; 2], port: [u16; 2]) -> Tcp {
        let r = rng.next_u64();
        let mut t = Tcp {
            addr,
            port,
            next: [r as u32, (r >> 32) as u32],
            unacked: [0; 2],
            script: Script { frames: Vec::new() },
        };
        t.segment(0, SYN, b"", false);
        t.segment(1, SYN | ACK, b"", false);
        t.segment(0, ACK, b"", false);
        t
    }

    /// One segment from `side`: sequence number advanced by the payload and SYN/FIN, the ACK
    /// field the peer's next sequence number (zero on the first SYN).
    fn segment(&mut self, side: usize, flags: u8, payload: &[u8], hit: bool) {
        let peer = 1 - side;
        let ack = if flags & ACK != 0 { self.next[peer] } else { 0 };
        let hdr = tcp_hdr(
            self.port[side],
            self.port[peer],
            self.next[side],
            ack,
            flags,
        );
        let f = ipv4_fragment(
            self.addr[side],
            self.addr[peer],
            6,
            0,
            0x4000,
            &hdr,
            payload,
        );
        self.next[side] = self.next[side]
            .wrapping_add(payload.len() as u32)
            .wrapping_add(u32::from(flags & (SYN | FIN) != 0));
        self.unacked[side] = 0; // every segment but the first SYN carries an ACK
        self.script.push(side == 0, !payload.is_empty(), hit, f);
    }

    /// Sends `data` from `side` in segments of at most `mss` bytes (PSH on the last); the
    /// receiver ACKs every second segment. `planted`: offsets in `data` where a literal begins.
    fn send(&mut self, side: usize, data: &[u8], mss: usize, planted: &[usize]) {
        let peer = 1 - side;
        let mut at = 0;
        while at < data.len() {
            let end = (at + mss).min(data.len());
            let flags = if end == data.len() { PSH | ACK } else { ACK };
            let hit = planted.iter().any(|&p| (at..end).contains(&p));
            self.segment(side, flags, &data[at..end], hit);
            self.unacked[peer] += 1;
            if self.unacked[peer] >= 2 {
                self.segment(peer, ACK, b"", false);
            }
            at = end;
        }
    }

    /// FIN from `first`, FIN-ACK from the peer, final ACK.
    fn close(mut self, first: usize) -> Script {
        self.segment(first, FIN | ACK, b"", false);
        self.segment(1 - first, FIN | ACK, b"", false);
        self.segment(first, ACK, b"", false);
        self.script
    }
}

/// CRC-32 (IEEE 802.3, reflected), for the gzip trailer (RFC 1952 §2.3.1).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A gzip member (RFC 1952) holding `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.extend(compress_to_vec(data, 6));
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// `data` in chunked transfer coding (RFC 9112 §7.1), chunks of 500-8000 bytes.
fn chunked(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 500 * 8 + 8);
    for c in data.chunks(rng.range(500, 8000)) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Start of every generated HTML body (tests find it in the decoded `file_data`).
pub const BODY_START: &[u8] = b"<!doctype html><html><body>";

struct FlowGen<'a> {
    cfg: &'a TrafficConfig,
    rng: Rng,
    mss: usize,
    next_ip_id: u16,
}

impl FlowGen<'_> {
    /// Plants a literal into about `hit_share` of the `mss`-sized blocks of `data` (at
    /// `base` in its stream); returns the offsets planted at, relative to `data`.
    fn plant(&mut self, data: &mut [u8]) -> Vec<usize> {
        let mut out = Vec::new();
        if self.cfg.literals.is_empty() {
            return out;
        }
        let mut block = 0;
        while block < data.len() {
            let end = (block + self.mss).min(data.len());
            if self.rng.chance(self.cfg.hit_share) {
                let lit = &self.cfg.literals[self.rng.below(self.cfg.literals.len())];
                if lit.len() <= end - block {
                    let at = block + self.rng.below(end - block - lit.len() + 1);
                    data[at..at + lit.len()].copy_from_slice(lit);
                    out.push(at);
                }
            }
            block = end;
        }
        out
    }

    /// Body size: log-uniform between `lo` and `hi` bytes.
    fn log_size(&mut self, lo: usize, hi: usize) -> usize {
        let x = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo as f64) * (hi as f64 / lo as f64).powf(x)) as usize
    }

    fn endpoints(&mut self, sport: u16) -> ([[u8; 4]; 2], [u16; 2]) {
        let r = self.rng.next_u64();
        (
            [
                [10, 0, (r >> 8) as u8, (r >> 16) as u8 | 1],
                [192, 0, 2, (r >> 24) as u8 | 1],
            ],
            [1024 + (r >> 32) as u16 % 60000, sport],
        )
    }

    fn http(&mut self) -> Script {
        let (addr, port) = self.endpoints(80);
        let mut t = Tcp::new(&mut self.rng, addr, port);
        for _ in 0..self.rng.range(1, 3) {
            let n = self.rng.below(1_000_000);
            let word = WORDS[self.rng.below(WORDS.len())];
            let post = self.rng.chance(0.15);
            let form = if post {
                let len = self.rng.range(20, 3000);
                let mut body = format!("user={word}&id={n}&data=").into_bytes();
                body.extend(text(&mut self.rng, len));
                for b in &mut body[12..] {
                    if *b == b' ' {
                        *b = b'+';
                    }
                }
                body
            } else {
                Vec::new()
            };
            let mut req = format!(
                "{} /{word}/{n}.html?id={n}&q={word} HTTP/1.1\r\nHost: www{}.example.com\r\n\
                 User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
                 Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\n\
                 Accept-Encoding: gzip, deflate\r\nCookie: session={:016x}\r\nConnection: keep-alive\r\n",
                if post { "POST" } else { "GET" },
                n % 50,
                self.rng.next_u64()
            )
            .into_bytes();
            if post {
                req.extend_from_slice(
                    format!(
                        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                        form.len()
                    )
                    .as_bytes(),
                );
            }
            req.extend_from_slice(b"\r\n");
            let head = req.len();
            req.extend(form);
            let planted = self.plant(&mut req[head..]);
            let planted: Vec<usize> = planted.iter().map(|p| p + head).collect();
            t.send(0, &req, self.mss, &planted);

            let size = self.log_size(200, 200_000);
            let mut body = BODY_START.to_vec();
            body.extend(text(&mut self.rng, size.saturating_sub(BODY_START.len())));
            let kind = self.rng.below(100);
            let mut planted = if kind < 75 {
                self.plant(&mut body[BODY_START.len()..])
            } else {
                self.plant(&mut body[BODY_START.len()..]);
                Vec::new() // compressed: the literal is not on the wire
            };
            let mut resp = b"HTTP/1.1 200 OK\r\nServer: nginx/1.26.1\r\n\
                Date: Tue, 01 Dec 2026 12:00:00 GMT\r\nContent-Type: text/html; charset=utf-8\r\n\
                Cache-Control: max-age=600\r\nConnection: keep-alive\r\n"
                .to_vec();
            let payload = match kind {
                0..50 => {
                    resp.extend(format!("Content-Length: {}\r\n", body.len()).bytes());
                    body
                }
                50..75 => {
                    resp.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
                    planted.clear(); // offsets shift with the chunk lines
                    chunked(&mut self.rng, &body)
                }
                75..90 => {
                    let z = gzip(&body);
                    resp.extend(
                        format!("Content-Encoding: gzip\r\nContent-Length: {}\r\n", z.len())
                            .bytes(),
                    );
                    z
                }
                _ => {
                    resp.extend_from_slice(
                        b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                    );
                    let z = gzip(&body);
                    chunked(&mut self.rng, &z)
                }
            };
            resp.extend_from_slice(b"\r\n");
            let head = resp.len();
            resp.extend(payload);
            let planted: Vec<usize> = planted.iter().map(|p| p + head).collect();
            t.send(1, &resp, self.mss, &planted);
        }
        let first = self.rng.below(2);
        t.close(first)
    }

    fn tls_record(&mut self, kind: u8, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 5);
        let mut left = len;
        while left > 0 {
            let n = left.min(16384);
            v.extend_from_slice(&[kind, 3, 3]);
            v.extend_from_slice(&(n as u16).to_be_bytes());
            v.extend(random_bytes(&mut self.rng, n));
            left -= n;
        }
        v
    }

    fn client_hello(&mut self) -> Vec<u8> {
        let host = format!("www{}.example.net", self.rng.below(1000));
        let mut ext = Vec::new();
        // server_name (RFC 6066 §3).
        let name_len = host.len() as u16;
        ext.extend_from_slice(&[0, 0]);
        ext.extend_from_slice(&(name_len + 5).to_be_bytes());
        ext.extend_from_slice(&(name_len + 3).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&name_len.to_be_bytes());
        ext.extend_from_slice(host.as_bytes());
        let mut body = vec![3, 3];
        body.extend(random_bytes(&mut self.rng, 32));
        body.push(32);
        body.extend(random_bytes(&mut self.rng, 32));
        body.extend_from_slice(&[0, 6, 0x13, 1, 0x13, 2, 0xc0, 0x2f, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    fn tls(&mut self) -> Script {
        let (addr, port) = self.endpoints(443);
        let mut t = Tcp::new(&mut self.rng, addr, port);
        let hello = self.client_hello();
        t.send(0, &hello, self.mss, &[]);
        let len = self.rng.range(2500, 4500);
        let server = self.tls_record(0x16, len);
        t.send(1, &server, self.mss, &[]);
        let fin = self.tls_record(0x14, 1);
        t.send(0, &fin, self.mss, &[]);
        for _ in 0..self.rng.range(1, 4) {
            let len = self.rng.range(100, 2000);
            let mut c = self.tls_record(0x17, len);
            let p = self.plant(&mut c);
            t.send(0, &c, self.mss, &p);
            let len = self.log_size(500, 100_000);
            let mut s = self.tls_record(0x17, len);
            let p = self.plant(&mut s);
            t.send(1, &s, self.mss, &p);
        }
        let first = self.rng.below(2);
        t.close(first)
    }

    fn opaque_tcp(&mut self) -> Script {
        let sport = 1024 + self.rng.below(60000) as u16;
        let (addr, port) = self.endpoints(sport);
        let mut t = Tcp::new(&mut self.rng, addr, port);
        for _ in 0..self.rng.range(1, 5) {
            let side = self.rng.below(2);
            let len = self.log_size(50, 30_000);
            let mut d = random_bytes(&mut self.rng, len);
            let p = self.plant(&mut d);
            t.send(side, &d, self.mss, &p);
        }
        t.close(0)
    }

    fn dns(&mut self) -> Script {
        let (addr, port) = self.endpoints(53);
        let mut s = Script { frames: Vec::new() };
        let id = self.rng.next_u64() as u16;
        let name = format!("www.{}.example.com", WORDS[self.rng.below(WORDS.len())]);
        for side in 0..2 {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(if side == 0 { &[1, 0] } else { &[0x81, 0x80] });
            p.extend_from_slice(&[0, 1, 0, side as u8, 0, 0, 0, 0]);
            for label in name.split('.') {
                p.push(label.len() as u8);
                p.extend_from_slice(label.as_bytes());
            }
            p.extend_from_slice(&[0, 0, 1, 0, 1]);
            if side == 1 {
                // One A record, name compressed to the question (RFC 1035 §4.1.4).
                p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4, 192, 0, 2]);
                p.push(self.rng.next_u64() as u8);
            }
            let hit = !self.plant(&mut p[12..]).is_empty();
            let f = ipv4_fragment(
                addr[side],
                addr[1 - side],
                17,
                0,
                0,
                &udp_hdr(port[side], port[1 - side], p.len()),
                &p,
            );
            s.push(side == 0, true, hit, f);
        }
        s
    }

    /// Datagrams both ways; larger ones than the MTU go in IP fragments (first fragment first).
    fn udp(&mut self, fragmented: bool) -> Script {
        let sport = 1024 + self.rng.below(60000) as u16;
        let (addr, port) = self.endpoints(sport);
        let mut s = Script { frames: Vec::new() };
        for i in 0..self.rng.range(1, 6) {
            let side = i % 2;
            let len = if fragmented {
                self.rng.range(2000, 8000)
            } else {
                self.rng.range(20, 1472)
            };
            let mut p = random_bytes(&mut self.rng, len);
            let hit = !self.plant(&mut p).is_empty();
            let mut dgram = udp_hdr(port[side], port[1 - side], p.len()).to_vec();
            dgram.extend(p);
            self.next_ip_id = self.next_ip_id.wrapping_add(1);
            let mut off = 0;
            while off < dgram.len() {
                let end = (off + FRAG_PAYLOAD).min(dgram.len());
                let more = if end < dgram.len() { 0x2000 } else { 0 };
                let frag = more | (off / 8) as u16;
                let f = ipv4_fragment(
                    addr[side],
                    addr[1 - side],
                    17,
                    self.next_ip_id,
                    frag,
                    &[],
                    &dgram[off..end],
                );
                s.push(side == 0, true, hit, f);
                off = end;
            }
        }
        s
    }

    fn flow(&mut self) -> Script {
        match self.rng.below(100) {
            0..40 => self.http(),
            40..65 => self.tls(),
            65..85 => self.dns(),
            85..92 => self.udp(false),
            92..95 => self.udp(true),
            _ => self.opaque_tcp(),
        }
    }
}

/// Generates about `cfg.frames` frames of whole flows (40% HTTP, 25% TLS, 20% DNS, 10% other
/// UDP of which 3 in 10 fragmented, 5% opaque TCP), up to 64 open at once, their frames
/// interleaved at random. `cfg.fixed_size` is ignored (segments are full-size up to the MSS).
pub fn generate_flows(cfg: &TrafficConfig) -> Vec<GenFrame> {
    generate_flows_with(cfg, CONCURRENT)
}

/// [`generate_flows`] with up to `concurrent` flows open at once.
pub fn generate_flows_with(cfg: &TrafficConfig, concurrent: usize) -> Vec<GenFrame> {
    let mut g = FlowGen {
        cfg,
        rng: Rng::new(cfg.seed ^ 0x666c_6f77),
        mss: MSS,
        next_ip_id: 1,
    };
    let mut order = Rng::new(cfg.seed.wrapping_add(1));
    let mut open: Vec<(Script, usize)> = Vec::new();
    let mut out = Vec::new();
    let mut ts = 1_795_449_600_000_000u64;
    let mut started = 0usize;
    loop {
        while open.len() < concurrent.max(1) && started < cfg.frames {
            let s = g.flow();
            started += s.frames.len();
            open.push((s, 0));
        }
        if open.is_empty() {
            break;
        }
        let i = order.below(open.len());
        let (s, at) = &mut open[i];
        let mut f = s.frames[*at].clone();
        ts += 1 + order.below(20) as u64;
        f.ts_us = ts;
        out.push(f);
        *at += 1;
        if *at == s.frames.len() {
            open.swap_remove(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ally_dpi::engine::http::{HttpParser, HttpView};
    use ally_dpi::engine::packet::{decode, Decoded, L4};
    use ally_dpi::engine::rules::HttpBuffer;
    use ally_dpi::engine::{Direction, Engine, Timestamp, Verdict};
    use ally_dpi::rules_module::{engine_config, TableKeys};
    use std::collections::BTreeMap;

    fn cfg(seed: u64, frames: usize) -> TrafficConfig {
        TrafficConfig {
            seed,
            frames,
            hit_share: 0.02,
            fixed_size: None,
            literals: vec![b"EVILSTRING".to_vec()],
        }
    }

    const KEYS: TableKeys = TableKeys {
        stream: [5, 6],
        defrag: [7, 8],
        flows: [9, 10],
    };

    /// An engine in the boot configuration with one rule that never matches the traffic, so
    /// every verdict is the stream tracker's or the reassembler's.
    fn boot_engine() -> Engine {
        let p = ally_dpi::engine::rules::parse_rules(
            "alert tcp any any -> any any (msg:\"x\"; content:\"NEVER-IN-TRAFFIC\"; sid:1;)\n",
            &ally_dpi::engine::vars::Vars::new(),
        );
        Engine::new(p.rules, engine_config(KEYS)).unwrap()
    }

    #[test]
    fn crc32_and_gzip_are_standard() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let z = gzip(b"hello hello hello");
        assert_eq!(&z[..3], &[0x1f, 0x8b, 8]);
        let raw = miniz_oxide::inflate::decompress_to_vec(&z[10..z.len() - 8]).unwrap();
        assert_eq!(raw, b"hello hello hello");
    }

    #[test]
    fn flows_pass_the_stream_tracker_and_reassembler_without_a_drop() {
        let frames = generate_flows(&cfg(3, 20_000));
        assert!(frames.len() >= 20_000);
        let mut e = boot_engine();
        for f in &frames {
            let dir = if f.to_server {
                Direction::ToWire
            } else {
                Direction::FromWire
            };
            let v = crate::bench::inspect_and_forward(&mut e, &f.bytes, dir, Timestamp(f.ts_us));
            assert_ne!(v, Verdict::Drop, "{:?}", e.stream_stats().drops);
        }
        let s = e.stats();
        let st = e.stream_stats();
        assert_eq!(s.dropped, 0);
        assert_eq!(st.drops, Default::default());
        assert_eq!(st.midstream, 0);
        assert_eq!(st.untracked, 0);
        // Every connection closed with its FINs; fragments were reassembled.
        assert!(st.created > 300, "{st:?}");
        assert_eq!(st.closed, st.created, "{st:?}");
        assert_eq!(st.active, 0);
        assert!(s.frag_forwarded > 20, "{s:?}");
        let d = e.defrag_stats();
        assert!(d.completed > 10, "{d:?}");
    }

    /// Reassembles each TCP direction by sequence number and checks it is gap-free.
    type Key = ([u8; 4], u16, [u8; 4], u16);

    fn streams(frames: &[GenFrame]) -> BTreeMap<Key, Vec<u8>> {
        let mut next: BTreeMap<Key, u32> = BTreeMap::new();
        let mut out: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
        for f in frames {
            let Decoded::Ip(p) = decode(&f.bytes) else {
                panic!("not IP")
            };
            let L4::Tcp {
                sport,
                dport,
                seq,
                flags,
                ..
            } = p.l4
            else {
                continue;
            };
            let ip = |a: &[u8]| -> [u8; 4] { a[..4].try_into().unwrap() };
            let key = (ip(&f.bytes[26..30]), sport, ip(&f.bytes[30..34]), dport);
            if flags & SYN != 0 {
                next.insert(key, seq.wrapping_add(1));
                continue;
            }
            let n = next.get_mut(&key).expect("segment before its SYN");
            assert_eq!(seq, *n, "gap or overlap in {key:?}");
            *n = n.wrapping_add(p.payload.len() as u32);
            *n = n.wrapping_add(u32::from(flags & FIN != 0));
            out.entry(key).or_default().extend_from_slice(p.payload);
        }
        out
    }

    #[test]
    fn http_bodies_parse_with_every_framing() {
        let frames = generate_flows(&cfg(9, 6000));
        let mut parser = HttpParser::new();
        let mut view = HttpView::default();
        let (mut responses, mut gzipped, mut chunked) = (0, 0, 0);
        for ((_, sport, _, _), bytes) in streams(&frames) {
            if sport != 80 {
                continue;
            }
            parser.parse(&bytes, 0, &mut view);
            for m in view.messages().iter().filter(|m| !m.request) {
                responses += 1;
                let head = &bytes[m.start..m.end.min(m.start + 600)];
                let has = |s: &[u8]| head.windows(s.len()).any(|w| w == s);
                gzipped += usize::from(has(b"gzip\r\n"));
                chunked += usize::from(has(b"chunked"));
                let body = view
                    .buffer(m, HttpBuffer::FileData, &bytes)
                    .expect("a response body");
                assert!(
                    body.starts_with(BODY_START),
                    "{:?}",
                    &body[..body.len().min(40)]
                );
            }
        }
        assert!(responses > 50, "{responses}");
        assert!(
            gzipped > 5 && chunked > 5,
            "{gzipped} gzip, {chunked} chunked"
        );
    }
}
