//! The two HTTP views agree: a whole message in one segment matches the same HTTP rules
//! through the flow's HTTP state (the stream tracker's engine, where the state replaces the
//! payload view) as through the payload view (an engine judging each frame on its own).
//!
//! Random requests and responses: methods, percent-encoded URIs, cookies, headers, bodies
//! plain, chunked, gzip (every optional header field combination) and deflate (raw and zlib),
//! with a marker in one place or none, some pipelined two to a segment. A disagreement is a
//! message one view would let pass.

use ally_dpi::engine::rules::parse_rules;
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    engine_stream_config, Direction, Engine, EngineConfig, Inspector, Timestamp,
};

mod support;
use support::{handshake, seg, Collect, Rng, CISN, PSH_ACK, SISN};

const RULES: &str = "\
alert tcp any any -> any 80 (msg:\"uri\"; http_uri; content:\"MARKu\"; sid:1;)
alert tcp any any -> any 80 (msg:\"raw uri\"; http_raw_uri; content:\"%4D%41RKr\"; sid:2;)
alert tcp any any -> any 80 (msg:\"header\"; http_header; content:\"MARKh\"; sid:3;)
alert tcp any any -> any 80 (msg:\"cookie\"; http_cookie; content:\"MARKc\"; sid:4;)
alert tcp any any -> any 80 (msg:\"client body\"; http_client_body; content:\"MARKb\"; sid:5;)
alert tcp any any -> any 80 (msg:\"method\"; http_method; content:\"PUT\"; sid:6;)
alert tcp any any -> any 80 (msg:\"host\"; http.host; content:\"markhost\"; sid:7;)
alert tcp any any -> any 80 (msg:\"ua\"; http.user_agent; content:\"MARKa\"; sid:8;)
alert tcp any 80 -> any any (msg:\"stat\"; http_stat_code; content:\"404\"; sid:9;)
alert tcp any 80 -> any any (msg:\"file\"; file_data; content:\"MARKf\"; sid:10;)
alert tcp any 80 -> any any (msg:\"resp header\"; http_header; content:\"MARKs\"; sid:11;)
alert tcp any 80 -> any any (msg:\"set-cookie\"; http_cookie; content:\"MARKk\"; sid:12;)
";

/// The generators' extra draws.
trait Draw {
    fn chance(&mut self, one_in: usize) -> bool;
    fn word(&mut self, n: usize) -> String;
}

impl Draw for Rng {
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn word(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| (b'a' + self.below(26) as u8) as char)
            .collect()
    }
}

fn engines() -> (Engine, Engine) {
    let rules = || {
        let p = parse_rules(RULES, &Vars::snort_defaults());
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        p.rules
    };
    let per_packet = Engine::new(rules(), EngineConfig::default()).unwrap();
    let stream = Engine::new(
        rules(),
        EngineConfig {
            stream: Some(engine_stream_config()),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    (per_packet, stream)
}

/// A body coded as `coding` (0 plain, 1 gzip, 2 raw deflate, 3 zlib) with its headers.
fn coded(rng: &mut Rng, body: &[u8]) -> (Vec<u8>, &'static str) {
    match rng.below(4) {
        1 => {
            let flags = (rng.below(16) * 2) as u8;
            let mut z = vec![0x1f, 0x8b, 8, flags, 0, 0, 0, 0, 0, 3];
            if flags & 4 != 0 {
                z.extend_from_slice(&[3, 0, 1, 2, 3]);
            }
            if flags & 8 != 0 {
                z.extend_from_slice(b"f.txt\0");
            }
            if flags & 16 != 0 {
                z.extend_from_slice(b"comment\0");
            }
            if flags & 2 != 0 {
                z.extend_from_slice(&[0, 0]);
            }
            z.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(body, 6));
            z.extend_from_slice(&[0; 8]);
            (z, "Content-Encoding: gzip\r\n")
        }
        2 => (
            miniz_oxide::deflate::compress_to_vec(body, 6),
            "Content-Encoding: deflate\r\n",
        ),
        3 => (
            miniz_oxide::deflate::compress_to_vec_zlib(body, 6),
            "Content-Encoding: deflate\r\n",
        ),
        _ => (body.to_vec(), ""),
    }
}

/// Framing: Content-Length, or chunked in random chunk sizes.
fn framed(rng: &mut Rng, body: &[u8]) -> (Vec<u8>, String) {
    if rng.chance(2) {
        return (body.to_vec(), format!("Content-Length: {}\r\n", body.len()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = (rng.below(200) + 1).min(rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    (out, "Transfer-Encoding: chunked\r\n".into())
}

/// A body of text with `marker` (if any) somewhere in it.
fn body_text(rng: &mut Rng, marker: Option<&str>) -> Vec<u8> {
    let n = rng.below(600);
    let mut b = rng.word(n).into_bytes();
    if let Some(m) = marker {
        let at = rng.below(b.len() + 1);
        b.splice(at..at, m.bytes());
    }
    let n = rng.below(300);
    b.extend_from_slice(rng.word(n).as_bytes());
    b
}

fn request(rng: &mut Rng) -> Vec<u8> {
    let spot = rng.below(9);
    let method = ["GET", "POST", "PUT", "DELETE"][rng.below(4)];
    let mut uri = format!("/{}/{}", rng.word(3), rng.word(5));
    match spot {
        0 => uri.push_str("/MARKu"),
        1 => uri.push_str("/%4D%41RKr"),
        _ => {}
    }
    if rng.chance(3) {
        uri.push_str(&format!("?q={}&p=%41%42", rng.word(4)));
    }
    let host = if spot == 2 {
        "markhost.example"
    } else {
        "www.example"
    };
    let mut head = format!("{method} {uri} HTTP/1.1\r\nHost: {host}\r\n");
    if spot == 3 {
        head.push_str("User-Agent: MARKa/1.0\r\n");
    } else if rng.chance(2) {
        head.push_str("User-Agent: curl/8.0\r\n");
    }
    if spot == 4 {
        head.push_str("X-Thing: MARKh\r\n");
    }
    if spot == 5 || rng.chance(3) {
        let v = if spot == 5 { "MARKc" } else { "plain" };
        head.push_str(&format!("Cookie: a=1; b={v}\r\n"));
    }
    let has_body = method == "POST" || method == "PUT";
    let mut out;
    if has_body {
        let text = body_text(rng, (spot == 6).then_some("MARKb"));
        let (framed, fh) = framed(rng, &text);
        head.push_str(&fh);
        head.push_str("\r\n");
        out = head.into_bytes();
        out.extend_from_slice(&framed);
    } else {
        head.push_str("\r\n");
        out = head.into_bytes();
    }
    out
}

fn response(rng: &mut Rng) -> Vec<u8> {
    let spot = rng.below(6);
    let status = if spot == 0 { "404 Not Found" } else { "200 OK" };
    let mut head = format!("HTTP/1.1 {status}\r\nServer: test\r\n");
    if spot == 1 {
        head.push_str("X-Resp: MARKs\r\n");
    }
    if spot == 2 {
        head.push_str("Set-Cookie: id=MARKk; Path=/\r\n");
    }
    let text = body_text(rng, (spot == 3).then_some("MARKf"));
    let (coded, ch) = coded(rng, &text);
    let (framed, fh) = framed(rng, &coded);
    head.push_str(ch);
    head.push_str(&fh);
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&framed);
    out
}

/// The sids each engine reports for the exchange, request then response, each one segment.
fn sids(req: &[u8], resp: &[u8]) -> (Vec<u32>, Vec<u32>) {
    let (mut pp, mut st) = engines();
    let (mut a, mut b) = (Collect::default(), Collect::default());
    handshake(&mut st, &mut b);
    let q = seg(true, PSH_ACK, CISN + 1, SISN + 1, req);
    let r = seg(false, PSH_ACK, SISN + 1, CISN + 1 + req.len() as u32, resp);
    for (f, d) in [(&q, Direction::ToWire), (&r, Direction::FromWire)] {
        pp.inspect(f, d, Timestamp(2), &mut a);
        st.inspect(f, d, Timestamp(2), &mut b);
    }
    let (mut x, mut y) = (a.sids(), b.sids());
    x.sort_unstable();
    y.sort_unstable();
    (x, y)
}

#[test]
fn the_flow_state_and_the_payload_view_report_the_same_rules() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut hits = 0;
    for round in 0..600 {
        let (mut req, mut resp) = (request(&mut rng), response(&mut rng));
        // Pipelined: two requests in the segment, and their two responses in the next.
        if rng.chance(4) {
            req.extend_from_slice(&request(&mut rng));
            resp.extend_from_slice(&response(&mut rng));
        }
        let (per_packet, stream) = sids(&req, &resp);
        assert_eq!(
            per_packet,
            stream,
            "round {round}: payload view vs flow state\nrequest: {:?}\nresponse: {:?}",
            String::from_utf8_lossy(&req),
            String::from_utf8_lossy(&resp)
        );
        hits += per_packet.len();
    }
    // The markers are placed often enough that most rules fire many times.
    assert!(hits > 300, "{hits}");
}

/// The sids the stream engine reports when the client sends `req` and the server `resp`, each
/// cut into random pieces of 1 to `max_piece` bytes (the client acknowledging as it goes).
fn split_sids(rng: &mut Rng, req: &[u8], resp: &[u8], max_piece: usize) -> Vec<u32> {
    let (_, mut st) = engines();
    let mut c = Collect::default();
    handshake(&mut st, &mut c);
    let mut sent = [0u32; 2];
    for (to_server, data) in [(true, req), (false, resp)] {
        let mut rest = data;
        while !rest.is_empty() {
            let n = (rng.below(max_piece) + 1).min(rest.len());
            let (me, peer) = if to_server { (0, 1) } else { (1, 0) };
            let (isn, peer_isn) = if to_server {
                (CISN, SISN)
            } else {
                (SISN, CISN)
            };
            let f = seg(
                to_server,
                PSH_ACK,
                isn + 1 + sent[me],
                peer_isn + 1 + sent[peer],
                &rest[..n],
            );
            sent[me] += n as u32;
            let dir = if to_server {
                Direction::ToWire
            } else {
                Direction::FromWire
            };
            st.inspect(&f, dir, Timestamp(2), &mut c);
            rest = &rest[n..];
        }
    }
    let mut x = c.sids();
    x.sort_unstable();
    x.dedup();
    x
}

/// The same exchanges cut into small segments: the flow's HTTP state reports what the payload
/// view finds in the whole messages (a disagreement would be an evasion by segmentation).
#[test]
fn split_messages_match_as_the_whole_ones_do() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..300 {
        let (mut req, mut resp) = (request(&mut rng), response(&mut rng));
        if rng.chance(4) {
            req.extend_from_slice(&request(&mut rng));
            resp.extend_from_slice(&response(&mut rng));
        }
        let (mut whole, _) = sids(&req, &resp);
        whole.dedup();
        let max_piece = [1, 7, 64, 700][rng.below(4)];
        let split = split_sids(&mut rng, &req, &resp, max_piece);
        assert_eq!(
            whole,
            split,
            "round {round}, pieces of up to {max_piece}: whole vs split\nrequest: {:?}\nresponse: {:?}",
            String::from_utf8_lossy(&req),
            String::from_utf8_lossy(&resp)
        );
    }
}
