//! Reproducible synthetic traffic: HTTP, DNS, TLS-like and random-payload flows, 64–1500-byte
//! frames, with a controlled share of data frames carrying a rule literal.

/// xorshift64* generator: small, fast, and reproducible across platforms for a given seed.
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator (any seed, including 0, is valid).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

/// Generator settings.
#[derive(Clone, Debug)]
pub struct TrafficConfig {
    /// Seed.
    pub seed: u64,
    /// Approximate number of frames (whole flows are emitted).
    pub frames: usize,
    /// Share of data frames that carry one of `literals`.
    pub hit_share: f64,
    /// Every data frame exactly this many bytes (handshakes stay small).
    pub fixed_size: Option<usize>,
    /// Literals planted in hitting frames (e.g. the rules' fast patterns).
    pub literals: Vec<Vec<u8>>,
}

/// One generated frame.
#[derive(Clone, Debug)]
pub struct GenFrame {
    /// Microseconds since the epoch.
    pub ts_us: u64,
    /// Client → server.
    pub to_server: bool,
    /// Carries a payload (not a handshake frame).
    pub data: bool,
    /// A literal was planted.
    pub hit: bool,
    /// Ethernet frame.
    pub bytes: Vec<u8>,
}

pub(crate) const ETH_IP: usize = 14 + 20;
const MIN_FRAME: usize = 60; // Ethernet minimum without FCS
const MAX_FRAME: usize = 1514; // 1500-byte MTU + Ethernet header

pub(crate) fn ipv4_frame(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    ipv4_fragment(src, dst, proto, 0, 0x4000, l4, payload)
}

/// An IPv4 frame with identification `id` and the flags/fragment-offset word `frag` (RFC 791
/// §3.1: 0x4000 = don't fragment, 0x2000 = more fragments, low 13 bits the offset / 8).
pub(crate) fn ipv4_fragment(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
    frag: u16,
    l4: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_IP + l4.len() + payload.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let total = (20 + l4.len() + payload.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&frag.to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    // IPv4 header checksum (RFC 791 §3.1) so captures open cleanly in other tools.
    let mut sum = 0u32;
    for c in f[14..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(l4);
    f.extend_from_slice(payload);
    if f.len() < MIN_FRAME {
        f.resize(MIN_FRAME, 0);
    }
    f
}

pub(crate) fn tcp_hdr(sp: u16, dp: u16, seq: u32, ack: u32, flags: u8) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sp.to_be_bytes());
    h[2..4].copy_from_slice(&dp.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 0x50;
    h[13] = flags;
    h[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    h
}

pub(crate) fn udp_hdr(sp: u16, dp: u16, len: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0..2].copy_from_slice(&sp.to_be_bytes());
    h[2..4].copy_from_slice(&dp.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    h
}

pub(crate) const WORDS: &[&str] = &[
    "the", "network", "packet", "server", "client", "data", "value", "index", "page", "content",
    "session", "user", "items", "list", "table", "row", "html", "div", "class", "span", "script",
];

pub(crate) fn text(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        match rng.below(10) {
            0 => v.extend_from_slice(b"<div class=\"row\">"),
            1 => v.extend_from_slice(b"</div>\n"),
            _ => {
                v.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
                v.push(b' ');
            }
        }
    }
    v.truncate(n);
    v
}

pub(crate) fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Dns,
    Tls,
    Random,
}

struct Gen<'a> {
    cfg: &'a TrafficConfig,
    rng: Rng,
    out: Vec<GenFrame>,
    ts: u64,
}

impl Gen<'_> {
    fn payload_len(&mut self, proto_hdr: usize, lo: usize, hi: usize) -> usize {
        match self.cfg.fixed_size {
            Some(s) => s
                .clamp(MIN_FRAME, MAX_FRAME)
                .saturating_sub(ETH_IP + proto_hdr),
            None => self.rng.range(lo, hi).min(MAX_FRAME - ETH_IP - proto_hdr),
        }
    }

    fn plant(&mut self, payload: &mut [u8]) -> bool {
        if self.cfg.literals.is_empty() || !self.rng.chance(self.cfg.hit_share) {
            return false;
        }
        let lit = &self.cfg.literals[self.rng.below(self.cfg.literals.len())];
        if lit.len() > payload.len() {
            return false;
        }
        let at = self.rng.below(payload.len() - lit.len() + 1);
        payload[at..at + lit.len()].copy_from_slice(lit);
        true
    }

    fn push(&mut self, to_server: bool, data: bool, hit: bool, bytes: Vec<u8>) {
        self.ts += 10;
        self.out.push(GenFrame {
            ts_us: self.ts,
            to_server,
            data,
            hit,
            bytes,
        });
    }

    fn flow(&mut self, kind: Kind) {
        let r = self.rng.next_u64();
        let client = [10, 0, (r >> 8) as u8, (r >> 16) as u8 | 1];
        let server = [192, 0, 2, (r >> 24) as u8 | 1];
        let cport = 1024 + (r >> 32) as u16 % 60000;
        let (sport, proto) = match kind {
            Kind::Http => (80, 6),
            Kind::Dns => (53, 17),
            Kind::Tls => (443, 6),
            Kind::Random => (
                1024 + (r >> 48) as u16 % 60000,
                if r & 1 == 0 { 6 } else { 17 },
            ),
        };
        if proto == 6 {
            let (mut cseq, mut sseq) = (r as u32, (r >> 32) as u32);
            let syn = ipv4_frame(
                client,
                server,
                6,
                &tcp_hdr(cport, sport, cseq, 0, 0x02),
                b"",
            );
            self.push(true, false, false, syn);
            let synack = ipv4_frame(
                server,
                client,
                6,
                &tcp_hdr(sport, cport, sseq, cseq + 1, 0x12),
                b"",
            );
            self.push(false, false, false, synack);
            cseq += 1;
            sseq += 1;
            let ack = ipv4_frame(
                client,
                server,
                6,
                &tcp_hdr(cport, sport, cseq, sseq, 0x10),
                b"",
            );
            self.push(true, false, false, ack);
            let n = self.rng.range(2, 12);
            for i in 0..n {
                let to_server = i == 0 || self.rng.below(4) == 0;
                let len = self.payload_len(20, 10, 1460);
                let mut p = match (kind, to_server) {
                    (Kind::Http, true) => {
                        let mut p = format!(
                            "GET /{}/{}.html HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\n\r\n",
                            WORDS[self.rng.below(WORDS.len())],
                            self.rng.below(100000)
                        )
                        .into_bytes();
                        p.resize(len.max(p.len().min(len)), b' ');
                        p.truncate(len);
                        p
                    }
                    (Kind::Http, false) if i == 1 => {
                        let mut p = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 4096\r\n\r\n".to_vec();
                        let rest = len.saturating_sub(p.len());
                        p.extend(text(&mut self.rng, rest));
                        p.truncate(len);
                        p
                    }
                    (Kind::Http, false) => text(&mut self.rng, len),
                    (Kind::Tls, _) => {
                        let mut p = random_bytes(&mut self.rng, len);
                        let hdr: &[u8] = if i < 2 {
                            &[0x16, 0x03, 0x01]
                        } else {
                            &[0x17, 0x03, 0x03]
                        };
                        let k = hdr.len().min(p.len());
                        p[..k].copy_from_slice(&hdr[..k]);
                        p
                    }
                    _ => random_bytes(&mut self.rng, len),
                };
                let hit = self.plant(&mut p);
                let (src, dst, sp, dp, seq, ack) = if to_server {
                    (client, server, cport, sport, cseq, sseq)
                } else {
                    (server, client, sport, cport, sseq, cseq)
                };
                let f = ipv4_frame(src, dst, 6, &tcp_hdr(sp, dp, seq, ack, 0x18), &p);
                if to_server {
                    cseq = cseq.wrapping_add(p.len() as u32);
                } else {
                    sseq = sseq.wrapping_add(p.len() as u32);
                }
                self.push(to_server, true, hit, f);
            }
        } else {
            let n = if matches!(kind, Kind::Dns) {
                2
            } else {
                self.rng.range(1, 6)
            };
            for i in 0..n {
                let to_server = i % 2 == 0;
                let len = match kind {
                    Kind::Dns if self.cfg.fixed_size.is_none() => {
                        if to_server {
                            self.rng.range(30, 80)
                        } else {
                            self.rng.range(60, 400)
                        }
                    }
                    _ => self.payload_len(8, 10, 1472),
                };
                let mut p = match kind {
                    Kind::Dns => {
                        let mut p = vec![
                            (r >> 8) as u8,
                            r as u8,
                            if to_server { 0x01 } else { 0x81 },
                            0x00,
                            0,
                            1,
                            0,
                            u8::from(!to_server),
                            0,
                            0,
                            0,
                            0,
                        ];
                        for label in ["www", WORDS[self.rng.below(WORDS.len())], "example", "com"] {
                            p.push(label.len() as u8);
                            p.extend_from_slice(label.as_bytes());
                        }
                        p.extend_from_slice(&[0, 0, 1, 0, 1]);
                        let fill = len.saturating_sub(p.len());
                        p.extend(random_bytes(&mut self.rng, fill));
                        p.truncate(len.max(12));
                        p
                    }
                    _ => random_bytes(&mut self.rng, len),
                };
                let hit = self.plant(&mut p);
                let (src, dst, sp, dp) = if to_server {
                    (client, server, cport, sport)
                } else {
                    (server, client, sport, cport)
                };
                let f = ipv4_frame(src, dst, 17, &udp_hdr(sp, dp, p.len()), &p);
                self.push(to_server, true, hit, f);
            }
        }
    }
}

/// Generates the mix: 35% HTTP, 15% DNS, 30% TLS-like, 20% random-payload flows.
pub fn generate(cfg: &TrafficConfig) -> Vec<GenFrame> {
    let mut g = Gen {
        cfg,
        rng: Rng::new(cfg.seed),
        out: Vec::new(),
        ts: 1_795_449_600_000_000,
    };
    while g.out.len() < cfg.frames {
        let kind = match g.rng.below(100) {
            0..35 => Kind::Http,
            35..50 => Kind::Dns,
            50..80 => Kind::Tls,
            _ => Kind::Random,
        };
        g.flow(kind);
    }
    g.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64) -> TrafficConfig {
        TrafficConfig {
            seed,
            frames: 2000,
            hit_share: 0.1,
            fixed_size: None,
            literals: vec![b"EVILSTRING".to_vec()],
        }
    }

    #[test]
    fn reproducible_and_varied() {
        let a = generate(&cfg(7));
        let b = generate(&cfg(7));
        let c = generate(&cfg(8));
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.bytes == y.bytes));
        assert!(a.len() != c.len() || a.iter().zip(&c).any(|(x, y)| x.bytes != y.bytes));
        let sizes: Vec<usize> = a.iter().map(|f| f.bytes.len()).collect();
        assert!(sizes.iter().all(|&s| (60..=1514).contains(&s)));
        assert!(*sizes.iter().max().unwrap() > 1400);
        let data = a.iter().filter(|f| f.data).count();
        let hits = a.iter().filter(|f| f.hit).count();
        let share = hits as f64 / data as f64;
        assert!((0.05..0.15).contains(&share), "hit share {share}");
        let planted = a
            .iter()
            .filter(|f| f.bytes.windows(10).any(|w| w == b"EVILSTRING"))
            .count();
        assert!(planted >= hits);
    }

    #[test]
    fn fixed_size_frames() {
        let mut c = cfg(1);
        c.fixed_size = Some(1514);
        let a = generate(&c);
        assert!(a.iter().filter(|f| f.data).all(|f| f.bytes.len() == 1514));
    }
}
