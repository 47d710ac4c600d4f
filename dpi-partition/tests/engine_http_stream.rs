//! HTTP state across TCP segments: heads and bodies that span more segments than the stream
//! window covers, through `Engine::inspect` with the inline stream tracker.

use ally_dpi::engine::rules::parse_rules;
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    engine_stream_config, Direction, Engine, EngineConfig, HttpStateConfig, Inspector, Timestamp,
    Verdict,
};

mod support;
use support::{seg, Collect, ACK, CISN, PSH_ACK, SISN, SYN};

/// One connection through an engine with the stream tracker, handshake done.
struct Conn {
    e: Engine,
    c: Collect,
    /// Bytes sent by the client and by the server so far.
    sent: [u32; 2],
}

impl Conn {
    fn with(rules: &str, http: HttpStateConfig) -> Conn {
        let cfg = EngineConfig {
            stream: Some(engine_stream_config()),
            http,
            ..EngineConfig::default()
        };
        Conn::with_config(rules, cfg)
    }

    fn with_config(rules: &str, cfg: EngineConfig) -> Conn {
        let p = parse_rules(rules, &Vars::snort_defaults());
        assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected);
        let mut e = Engine::new(p.rules, cfg).unwrap();
        for f in [
            seg(true, SYN, CISN, 0, b""),
            seg(false, SYN | ACK, SISN, CISN + 1, b""),
            seg(true, ACK, CISN + 1, SISN + 1, b""),
        ] {
            assert_eq!(
                e.inspect(&f, Direction::ToWire, Timestamp(1), &mut Collect::default()),
                Verdict::Pass
            );
        }
        Conn {
            e,
            c: Collect::default(),
            sent: [0; 2],
        }
    }

    fn new(rules: &str) -> Conn {
        Conn::with(rules, HttpStateConfig::default())
    }

    /// One segment from the client (`to_server`) or the server.
    fn send(&mut self, to_server: bool, data: &[u8]) -> Verdict {
        let (me, peer, isn, peer_isn) = if to_server {
            (0, 1, CISN, SISN)
        } else {
            (1, 0, SISN, CISN)
        };
        let f = seg(
            to_server,
            PSH_ACK,
            isn + 1 + self.sent[me],
            peer_isn + 1 + self.sent[peer],
            data,
        );
        self.sent[me] += data.len() as u32;
        let dir = if to_server {
            Direction::ToWire
        } else {
            Direction::FromWire
        };
        self.e.inspect(&f, dir, Timestamp(1), &mut self.c)
    }

    /// `data` in segments of `size` bytes; the verdicts.
    fn split(&mut self, to_server: bool, data: &[u8], size: usize) -> Vec<Verdict> {
        data.chunks(size).map(|c| self.send(to_server, c)).collect()
    }
}

/// Index of the first verdict `v`, after checking that every verdict before it is Pass and
/// every one from it on is `v` (a drop blocks the flow).
fn first(verdicts: &[Verdict], v: Verdict) -> Option<usize> {
    let k = verdicts.iter().position(|&x| x == v)?;
    assert!(
        verdicts[..k].iter().all(|&x| x == Verdict::Pass),
        "{verdicts:?}"
    );
    if v == Verdict::Drop {
        assert!(verdicts[k..].iter().all(|&x| x == v), "{verdicts:?}");
    }
    Some(k)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 8, 0, 0, 0, 0, 0, 3];
    out.extend_from_slice(b"page.html\0");
    out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 6));
    out.extend_from_slice(&[0; 8]);
    out
}

/// Text that compresses poorly (letters from xorshift), `n` bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

/// `data` as a chunked body in chunks of `size` bytes, with the final chunk.
fn chunked(data: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in data.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

const GZ_DROP: &str =
    "drop tcp any 80 -> any any (msg:\"gz\"; file_data; content:\"FORBIDDEN-STRING\"; sid:1;)\n";

#[test]
fn gzip_body_forbidden_string_late_in_the_body_is_dropped() {
    let mut text = noise(6000, 7);
    text.extend_from_slice(b"<p>FORBIDDEN-STRING</p>");
    text.extend_from_slice(&noise(500, 8));
    let z = gzip(&text);
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        z.len()
    )
    .into_bytes();
    resp.extend_from_slice(&z);
    let mut c = Conn::new(GZ_DROP);
    assert_eq!(
        c.send(true, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        Verdict::Pass
    );
    let v = c.split(false, &resp, 300);
    let k = first(&v, Verdict::Drop).expect("dropped");
    // The string is decoded from segments well past the head's.
    assert!(k >= 10, "dropped at segment {k} of {}", v.len());
    assert_eq!(c.c.sid_actions(), vec![(1, "blocked")]);
    assert_eq!(c.e.stats().dropped, (v.len() - k) as u64);
    // Without the string, nothing.
    let clean = gzip(&noise(6000, 7));
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        clean.len()
    )
    .into_bytes();
    resp.extend_from_slice(&clean);
    let mut c = Conn::new(GZ_DROP);
    c.send(true, b"GET / HTTP/1.1\r\n\r\n");
    assert!(c
        .split(false, &resp, 300)
        .iter()
        .all(|&v| v == Verdict::Pass));
    assert!(c.c.alerts.is_empty());
}

#[test]
fn gzip_chunked_body_in_small_segments() {
    // Chunked framing over gzip, 7-byte segments: size lines, data and CRLFs all split.
    let mut text = noise(3000, 3);
    text.extend_from_slice(b"FORBIDDEN-STRING");
    let body = chunked(&gzip(&text), 97);
    let mut resp =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
    resp.extend_from_slice(&body);
    let mut c = Conn::new(GZ_DROP);
    c.send(true, b"GET / HTTP/1.1\r\n\r\n");
    let v = c.split(false, &resp, 7);
    let k = first(&v, Verdict::Drop).expect("dropped");
    assert!(k > 100, "{k}");
    assert_eq!(c.c.sids(), [1]);
}

#[test]
fn chunked_body_with_size_lines_split_across_segments() {
    // 3000 bytes of filler first, so the head is far outside the stream window when the
    // marker arrives; chunk sizes of 2 and 3 hex digits, lines split by 5-byte segments.
    let mut data = noise(3000, 11);
    data.extend_from_slice(b"MARK-ER-1234");
    data.extend_from_slice(&noise(100, 12));
    let mut body = Vec::new();
    let mut at = 0;
    for (k, size) in [200usize, 0x1a3, 17, 1024, 3, 900, 1000]
        .iter()
        .cycle()
        .enumerate()
    {
        if at >= data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        // A chunk extension on every other chunk.
        let ext = if k % 2 == 0 { ";name=value" } else { "" };
        body.extend_from_slice(format!("{:x}{ext}\r\n", end - at).as_bytes());
        body.extend_from_slice(&data[at..end]);
        body.extend_from_slice(b"\r\n");
        at = end;
    }
    body.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
    let mut req =
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend_from_slice(&body);
    for size in [5, 64, 1460] {
        let mut c = Conn::new(
            "alert tcp any any -> any 80 (msg:\"body\"; http_method; content:\"POST\"; http_client_body; content:\"MARK-ER-1234\"; sid:2;)\n",
        );
        let v = c.split(true, &req, size);
        let k = first(&v, Verdict::Alert).expect("alerted");
        assert!(v[k + 1..].iter().all(|&x| x == Verdict::Pass));
        assert_eq!(c.c.sids(), [2], "segments of {size}");
        // The segment that completes the marker gets the alert.
        let marker_end = req.windows(12).position(|w| w == b"MARK-ER-1234").unwrap() + 12;
        assert_eq!(k, (marker_end - 1) / size, "segments of {size}");
    }
}

#[test]
fn content_split_across_two_decoded_segments() {
    // An identity chunked body: the marker is split by the chunk framing *and* by the segment
    // boundary, far from the head.
    let mut req = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let filler = noise(2000, 5);
    req.extend_from_slice(format!("{:x}\r\n", filler.len() + 4).as_bytes());
    req.extend_from_slice(&filler);
    req.extend_from_slice(b"FORB");
    let cut = req.len();
    req.extend_from_slice(b"\r\n5\r\nIDDEN\r\n0\r\n\r\n");
    let rule =
        "drop tcp any any -> any 80 (msg:\"split\"; file_data; content:\"FORBIDDEN\"; sid:3;)\n";
    let mut c = Conn::new(rule);
    assert_eq!(c.send(true, &req[..cut]), Verdict::Pass);
    assert_eq!(c.send(true, &req[cut..]), Verdict::Drop);
    assert_eq!(c.c.sid_actions(), vec![(3, "blocked")]);
    // The stream bytes never hold the marker: a plain content rule does not see it.
    let mut c =
        Conn::new("drop tcp any any -> any 80 (msg:\"raw\"; content:\"FORBIDDEN\"; sid:4;)\n");
    assert_eq!(c.send(true, &req[..cut]), Verdict::Pass);
    assert_eq!(c.send(true, &req[cut..]), Verdict::Pass);
}

#[test]
fn header_block_over_one_byte_segments() {
    // The header to find comes first, then 2 KiB of other headers: when the empty line
    // arrives the stream window no longer holds the start line or the header.
    let mut req = b"GET /index.html HTTP/1.1\r\nX-Evil: %79es\r\n".to_vec();
    for i in 0..60 {
        req.extend_from_slice(format!("X-Pad-{i:02}: {}\r\n", "p".repeat(30)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    assert!(req.len() > 2048);
    let rules = "alert tcp any any -> any 80 (msg:\"hdr\"; http_header; content:\"X-Evil|3A| yes\"; sid:5;)\n\
                 alert tcp any any -> any 80 (msg:\"uri+hdr\"; http_uri; content:\"/index.html\"; http_header; content:\"X-Pad-59\"; sid:6;)\n\
                 alert tcp any any -> any 80 (msg:\"uri\"; http_uri; content:\"/index.html\"; sid:7;)\n";
    let mut c = Conn::new(rules);
    let v = c.split(true, &req, 1);
    // Each rule alerts once: the URI when the request line completes, the headers on the
    // segment carrying the final LF.
    let line_end = req.iter().position(|&b| b == b'\n').unwrap();
    assert_eq!(v[line_end], Verdict::Alert);
    assert_eq!(v[req.len() - 1], Verdict::Alert);
    let alerts = v.iter().filter(|&&x| x == Verdict::Alert).count();
    assert_eq!(alerts, 2, "{v:?}");
    let mut sids = c.c.sids();
    sids.sort_unstable();
    assert_eq!(sids, [5, 6, 7]);
}

#[test]
fn pipelined_requests_each_with_their_own_buffers() {
    let body1 = noise(1500, 21);
    let mut data2 = noise(2500, 22);
    data2.extend_from_slice(b"MARKER-TWO");
    let mut req = format!(
        "POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body1.len()
    )
    .into_bytes();
    req.extend_from_slice(&body1);
    req.extend_from_slice(
        b"POST /second HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    req.extend_from_slice(&chunked(&data2, 500));
    req.extend_from_slice(b"GET /third HTTP/1.1\r\nHost: c\r\n\r\n");
    let rules = "alert tcp any any -> any 80 (msg:\"2\"; http_uri; content:\"/second\"; file_data; content:\"MARKER-TWO\"; sid:10;)\n\
                 alert tcp any any -> any 80 (msg:\"1\"; http_uri; content:\"/first\"; file_data; content:\"MARKER-TWO\"; sid:11;)\n\
                 alert tcp any any -> any 80 (msg:\"3\"; http_uri; content:\"/third\"; http.host; content:\"c\"; sid:12;)\n";
    for size in [100, 536, 1460] {
        let mut c = Conn::new(rules);
        c.split(true, &req, size);
        let mut sids = c.c.sids();
        sids.sort_unstable();
        assert_eq!(sids, [10, 12], "segments of {size}");
    }
}

#[test]
fn response_to_head_has_no_body() {
    // The HEAD response's Content-Length is not a body: the next response is parsed, and its
    // body (far from its head) is that response's file_data.
    let rules = "alert tcp any 80 -> any any (msg:\"body\"; http_stat_code; content:\"404\"; file_data; content:\"MARKER\"; sid:13;)\n";
    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    resp.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2010\r\n\r\n");
    resp.extend_from_slice(&noise(2000, 1));
    resp.extend_from_slice(b"MARKER....");
    let mut c = Conn::new(rules);
    c.send(true, b"HEAD /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
    c.split(false, &resp, 200);
    assert_eq!(c.c.sids(), [13]);
    // After a GET the same bytes are one 200 response with a long body.
    let mut c = Conn::new(rules);
    c.send(true, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
    c.split(false, &resp, 200);
    assert!(c.c.alerts.is_empty());
}

#[test]
fn head_over_the_bound_fails_closed() {
    let rules =
        "alert tcp any any -> any 80 (msg:\"uri\"; http_uri; content:\"/nothing\"; sid:20;)\n";
    let mut req = b"GET / HTTP/1.1\r\n".to_vec();
    while req.len() < 9000 {
        req.extend_from_slice(b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let mut c = Conn::new(rules);
    let v = c.split(true, &req, 500);
    let k = first(&v, Verdict::Drop).expect("dropped");
    // Dropped on the segment that takes the head past 8 KiB; the flow is blocked.
    assert_eq!(k, 8192 / 500);
    assert_eq!(c.e.stats().http_dropped, 1);
    assert_eq!(c.e.http_state_stats().head_too_long, 1);
    // A request line without its LF that grows past the bound too.
    let mut c = Conn::new(rules);
    let mut line = b"GET /".to_vec();
    line.extend(std::iter::repeat_n(b'a', 9000));
    assert!(first(&c.split(true, &line, 1000), Verdict::Drop).is_some());
    assert_eq!(c.e.http_state_stats().head_too_long, 1);
    // Other protocols' long lines are not heads.
    let mut c = Conn::new(rules);
    let v = c.split(true, &noise(20000, 3), 1000);
    assert!(v.iter().all(|&x| x == Verdict::Pass));
    assert_eq!(c.e.http_state_stats().head_too_long, 0);
}

#[test]
fn huge_content_length_does_not_allocate() {
    let rules =
        "alert tcp any any -> any 80 (msg:\"body\"; file_data; content:\"MARKER\"; sid:21;)\n";
    let mut c = Conn::new(rules);
    c.send(
        true,
        b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n",
    );
    for k in 0..40u64 {
        c.send(true, &noise(1000, k + 100));
    }
    c.send(true, b"..MARKER..");
    assert_eq!(c.c.sids(), [21]);
    // Nothing but the head and the body tail is kept.
    let used = c.e.http_state_stats().used_bytes;
    assert!(used <= 2 * 1024, "{used}");
    // The same with a gzip body of 2^64-1 bytes: the inflater (capped output) and the tail.
    let mut c = Conn::new(rules);
    c.send(
        false,
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 18446744073709551615\r\n\r\n",
    );
    let z = gzip(&vec![b'A'; 8 << 20]);
    for part in z.chunks(1000) {
        c.send(false, part);
    }
    // Its first segment inflates to about a MiB, past the segment's bound: a bomb, dropped
    // and the flow blocked (fail-closed), nothing kept.
    let st = c.e.http_state_stats();
    assert_eq!(st.inflate_capped, 1);
    assert!(st.used_bytes <= 2 * 1024, "{}", st.used_bytes);
    assert_eq!(c.e.stats().http_dropped, 1);
    assert_eq!(c.e.stats().dropped, z.chunks(1000).count() as u64);
}

/// A gzip body is inflated to its end: a server that pads the body with megabytes of text
/// before the forbidden string (past Snort's and Suricata's decompression depths, and the
/// 1 MiB this engine stopped at before) is still caught, in full-size segments.
#[test]
fn gzip_body_forbidden_string_after_megabytes_is_dropped() {
    let mut text = noise(3 << 20, 11);
    text.extend_from_slice(b"FORBIDDEN-STRING");
    text.extend_from_slice(&noise(2000, 12));
    let z = gzip(&text);
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        z.len()
    )
    .into_bytes();
    let head = resp.len();
    resp.extend_from_slice(&z);
    let mut c = Conn::new(GZ_DROP);
    c.send(true, b"GET /big HTTP/1.1\r\n\r\n");
    // The client acknowledges every 16th segment (the receiver's window is 64 KiB).
    let v: Vec<Verdict> = resp
        .chunks(1448)
        .enumerate()
        .map(|(i, part)| {
            if i % 16 == 15 {
                assert_eq!(c.send(true, b""), Verdict::Pass);
            }
            c.send(false, part)
        })
        .collect();
    let k = first(&v, Verdict::Drop).expect("dropped");
    assert!(
        k * 1448 > head + (z.len() * 9) / 10,
        "dropped at segment {k} of {}",
        v.len()
    );
    assert_eq!(c.c.sid_actions(), vec![(1, "blocked")]);
    let st = c.e.http_state_stats();
    assert_eq!(st.inflate_capped, 0);
}

/// A segment that inflates past its bound under the fail-open policy: the direction is no
/// longer parsed and the segment passes (counted), instead of blocking the flow.
#[test]
fn a_decompression_bomb_under_fail_open_gives_up_the_direction() {
    let cfg = EngineConfig {
        stream: Some(ally_dpi::engine::StreamConfig {
            on_limit: ally_dpi::engine::stream::LimitPolicy::FailOpen,
            ..engine_stream_config()
        }),
        ..EngineConfig::default()
    };
    let mut c = Conn::with_config(GZ_DROP, cfg);
    c.send(true, b"GET / HTTP/1.1\r\n\r\n");
    let z = gzip(&vec![b'A'; 8 << 20]);
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        z.len()
    )
    .into_bytes();
    resp.extend_from_slice(&z);
    let v = c.split(false, &resp, 1448);
    assert!(v.iter().all(|&x| x == Verdict::Pass), "{v:?}");
    let st = c.e.http_state_stats();
    assert_eq!((st.inflate_capped, st.untracked), (1, 1));
    assert_eq!(c.e.stats().http_dropped, 0);
}

#[test]
fn memory_limit_fails_closed() {
    // Room for heads and tails but not for an inflater.
    let http = HttpStateConfig {
        max_total_bytes: 16 * 1024,
    };
    let mut c = Conn::with(GZ_DROP, http);
    c.send(true, b"GET / HTTP/1.1\r\n\r\n");
    let z = gzip(&noise(5000, 9));
    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
    resp.extend_from_slice(&z);
    let v = c.split(false, &resp, 500);
    assert!(first(&v, Verdict::Drop).is_some());
    assert_eq!(c.e.http_state_stats().memory_limit, 1);
    assert_eq!(c.e.stats().http_dropped, 1);
    // Identity bodies fit.
    let mut c = Conn::with(GZ_DROP, http);
    c.send(true, b"GET / HTTP/1.1\r\n\r\n");
    let mut resp = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    resp.extend_from_slice(&noise(5000, 9));
    assert!(c
        .split(false, &resp, 500)
        .iter()
        .all(|&x| x == Verdict::Pass));
}

#[test]
fn heap_bound_counts_the_http_state() {
    let e = Engine::new(
        parse_rules(GZ_DROP, &Vars::snort_defaults()).rules,
        EngineConfig {
            stream: Some(engine_stream_config()),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let b = e.http_state_bound_bytes();
    assert!(
        b >= HttpStateConfig::default().max_total_bytes + 4096 * 256,
        "{b}"
    );
}

#[test]
fn body_match_seen_by_both_views_is_reported_once() {
    // Head and body within the stream window: the payload view and the flow view both see the
    // marker; the segment that completes it alerts, once.
    let req = b"POST /x HTTP/1.1\r\nContent-Length: 20\r\n\r\nabcSECRETdefghijklmn";
    let last = req.windows(6).position(|w| w == b"SECRET").unwrap() + 5;
    for size in [1, 2, 5, 100] {
        let mut c = Conn::new(
            "alert tcp any any -> any 80 (msg:\"b\"; file_data; content:\"SECRET\"; sid:30;)\n",
        );
        let v = c.split(true, req, size);
        assert_eq!(
            first(&v, Verdict::Alert),
            Some(last / size),
            "segments of {size}"
        );
        assert_eq!(c.c.sids(), [30], "segments of {size}");
    }
}

#[test]
fn fail_open_gives_up_the_direction() {
    let cfg = EngineConfig {
        stream: Some(ally_dpi::engine::StreamConfig {
            on_limit: ally_dpi::engine::stream::LimitPolicy::FailOpen,
            ..engine_stream_config()
        }),
        ..EngineConfig::default()
    };
    let mut c = Conn::with_config(
        "alert tcp any any -> any 80 (msg:\"uri\"; http_uri; content:\"/x\"; sid:31;)\n",
        cfg,
    );
    let mut req = b"GET /a HTTP/1.1\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'h', 9000));
    let v = c.split(true, &req, 1000);
    assert!(v.iter().all(|&x| x == Verdict::Pass), "{v:?}");
    let st = c.e.http_state_stats();
    assert_eq!((st.head_too_long, st.untracked), (1, 1));
    assert_eq!(c.e.stats().http_dropped, 0);
    // The direction is no longer parsed; the payload view still is.
    assert_eq!(
        c.send(true, b"\r\n\r\nGET /x HTTP/1.1\r\n\r\n"),
        Verdict::Alert
    );
    assert_eq!(c.e.http_state_stats().messages, 0);
}

/// A rule whose fast pattern is a header but which also reads the body is a candidate on every
/// segment that extends the body (the head is not scanned again then): the body's content 3 KiB
/// in, far past the stream window, is still found, in a plain and in a chunked body.
#[test]
fn a_header_fast_pattern_with_body_content_matches_late_in_the_body() {
    let rules = r#"drop tcp any any -> any any (msg:"hdr+body"; http_header; content:"X-Campaign-Marker-0815"; fast_pattern; file_data; content:"EVIL"; sid:9;)"#;
    for chunked in [false, true] {
        let mut c = Conn::new(rules);
        c.send(true, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
        let mut body = vec![b'a'; 3000];
        body.extend_from_slice(b"EVIL");
        body.extend_from_slice(&[b'b'; 500]);
        let framing = if chunked {
            let mut b = format!("{:x}\r\n", body.len()).into_bytes();
            b.extend_from_slice(&body);
            b.extend_from_slice(b"\r\n0\r\n\r\n");
            (String::from("Transfer-Encoding: chunked"), b)
        } else {
            (format!("Content-Length: {}", body.len()), body.clone())
        };
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nX-Campaign-Marker-0815: on\r\n{}\r\n\r\n",
            framing.0
        )
        .into_bytes();
        response.extend_from_slice(&framing.1);
        let verdicts = c.split(false, &response, 400);
        let k = first(&verdicts, Verdict::Drop).unwrap_or_else(|| panic!("{verdicts:?}"));
        assert!(
            k >= 7,
            "dropped at segment {k}, before the marker arrived: {verdicts:?}"
        );
        // The same without the header: no drop.
        let mut c = Conn::new(rules);
        c.send(true, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
        let plain = String::from_utf8_lossy(&response)
            .replace("X-Campaign-Marker-0815", "X-Other-Header-000000");
        let verdicts = c.split(false, plain.as_bytes(), 400);
        assert!(verdicts.iter().all(|&v| v == Verdict::Pass), "{verdicts:?}");
    }
}

/// Where the flow's HTTP state parses a direction, HTTP rules see the messages the receiver
/// parses: a request line inside a body of known length is body text, not a request (the
/// payload view of the stream window used to take it for one). The real request after the
/// body is matched.
#[test]
fn a_request_line_inside_a_body_is_not_a_request() {
    let rules =
        "alert tcp any any -> any 80 (msg:\"admin\"; http_uri; content:\"/admin\"; sid:32;)\n";
    let inner = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut req = format!(
        "POST /form HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        inner.len()
    )
    .into_bytes();
    req.extend_from_slice(inner);
    for size in [7, 40, req.len()] {
        let mut c = Conn::new(rules);
        let v = c.split(true, &req, size);
        assert!(
            v.iter().all(|&x| x == Verdict::Pass),
            "segments of {size}: {v:?}"
        );
        assert_eq!(
            c.send(true, b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"),
            Verdict::Alert,
            "segments of {size}"
        );
        assert_eq!(c.c.sids(), [32], "segments of {size}");
    }
}

/// A gzip member header with no optional field (FLG 0: what nginx, Apache and flate2 write)
/// in the e2e test's shape: EICAR in a gzipped, chunked response. The HTTP state took the
/// first deflate byte for an extra field that FLG did not announce, so the body never
/// inflated; only the payload view of the stream window caught it, and only while the
/// response fitted the window.
#[test]
fn gzip_without_optional_header_fields_is_decoded() {
    let eicar: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
    let mut text = b"Ally gzip test: the EICAR string follows.\n".to_vec();
    text.extend_from_slice(eicar);
    text.extend_from_slice(b"\nEnd of the test file.\n");
    for flg_os in [(0u8, 0xffu8), (2, 3), (16, 3)] {
        let mut z = vec![0x1f, 0x8b, 8, flg_os.0, 0, 0, 0, 0, 0, flg_os.1];
        match flg_os.0 {
            2 => z.extend_from_slice(&[0xab, 0xcd]),
            16 => z.extend_from_slice(b"a comment\0"),
            _ => {}
        }
        z.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(&text, 6));
        z.extend_from_slice(&[0; 8]);
        let mut r = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        r.extend_from_slice(&chunked(&z, 16));
        let rules = "drop tcp any 80 -> any any (msg:\"EICAR\"; file_data; content:\"X5O!P%@AP[4|5C|PZX54(P^)7CC)7}$EICAR\"; sid:106;)\n";
        for size in [r.len(), 100, 16] {
            let mut c = Conn::new(rules);
            c.send(
                true,
                b"GET /eicar.gz HTTP/1.1\r\nHost: 10.0.2.2\r\nConnection: close\r\n\r\n",
            );
            let v = c.split(false, &r, size);
            assert!(
                first(&v, Verdict::Drop).is_some(),
                "FLG {} in segments of {size}: {v:?}",
                flg_os.0
            );
            assert_eq!(c.c.sid_actions(), vec![(106, "blocked")]);
        }
    }
}
