//! HTTP sticky buffers end to end: rules parsed from text, Ethernet/IPv4/TCP frames through
//! `Engine::inspect`, verdicts and EVE records.

use ally_dpi::engine::blob;
use ally_dpi::engine::eve::{parse_mgmt_line, MgmtLine};
use ally_dpi::engine::rules::{parse_rule, parse_rules, HttpBuffer, PayloadOp};
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    engine_stream_config, Direction, Engine, EngineConfig, Inspector, MgmtWriter, NullSink,
    Timestamp, Verdict,
};

mod support;
use support::{seg, Collect, ACK, CISN, PSH_ACK, SISN, SYN};

/// A client-to-server segment judged on its own.
fn request(payload: &[u8]) -> Vec<u8> {
    seg(true, PSH_ACK, CISN + 1, SISN + 1, payload)
}

/// A server-to-client segment judged on its own.
fn response(payload: &[u8]) -> Vec<u8> {
    seg(false, PSH_ACK, SISN + 1, CISN + 1, payload)
}

fn engine_with(rules: &str, cfg: EngineConfig) -> Engine {
    let p = parse_rules(rules, &Vars::snort_defaults());
    assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected);
    // Every rule goes through the blob, as at boot.
    let back = blob::decode(&blob::encode(&p.rules)).unwrap();
    assert_eq!(back, p.rules);
    Engine::new(back, cfg).unwrap()
}

fn engine(rules: &str) -> Engine {
    engine_with(rules, EngineConfig::default())
}

/// Verdict of a one-rule engine (`alert tcp any any -> any any (<opts>; sid:1;)`) on `frame`.
fn verdict(opts: &str, frame: &[u8]) -> Verdict {
    let mut e = engine(&format!("alert tcp any any -> any any ({opts}; sid:1;)"));
    e.inspect(frame, Direction::ToWire, Timestamp(0), &mut NullSink)
}

fn hits(opts: &str, frame: &[u8]) -> bool {
    verdict(opts, frame) == Verdict::Alert
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 6));
    out.extend_from_slice(&[0; 8]);
    out
}

const GET_ENCODED: &[u8] = b"GET /cgi-bin/%61dmin/../%73ecret%2ephp?x=1 HTTP/1.1\r\n\
    Host: Example.COM:8080\r\n\
    User-Agent: Evil-Agent/2.0\r\n\
    Cookie: session=abc%21\r\n\
    X-Evil: yes\r\n\
    \r\n";

#[test]
fn uri_marker_percent_encoded_matches_http_uri() {
    let f = request(GET_ENCODED);
    assert!(hits(r#"http_uri; content:"/cgi-bin/secret.php""#, &f));
    // The fast pattern only exists in the normalized buffer: the decoded-buffer scan finds it.
    assert!(hits(
        r#"http_uri; content:"/cgi-bin/secret.php?x=1",fast_pattern"#,
        &f
    ));
    assert!(hits(r#"http.uri; content:"secret.php",nocase"#, &f));
    // Not in the raw URI nor in the packet.
    assert!(!hits(r#"http_raw_uri; content:"secret.php""#, &f));
    assert!(!hits(r#"content:"secret.php""#, &f));
    assert!(hits(r#"http_raw_uri; content:"%73ecret""#, &f));
    // Traversal spelled with encoded dots and slashes.
    let f = request(b"GET /a/b/%2e%2e%2f%2e%2e%2fetc/passwd HTTP/1.0\r\n\r\n");
    assert!(hits(r#"http_uri; content:"/etc/passwd",depth 11"#, &f));
    assert!(hits(r#"http_uri; content:"/etc/passwd"; bufferlen:11"#, &f));
    assert!(!hits(
        r#"http_uri; content:"/etc/passwd"; bufferlen:>11"#,
        &f
    ));
    assert!(hits(
        r#"http_uri; content:"/etc/"; bufferlen:6,relative"#,
        &f
    ));
}

#[test]
fn header_cookie_method_host_buffers() {
    let f = request(GET_ENCODED);
    assert!(hits(r#"http_header; content:"X-Evil|3A| yes""#, &f));
    assert!(hits(r#"http_header; content:"|0D 0A|X-Evil|3A|""#, &f));
    // Snort's http_header leaves the cookie to http_cookie.
    assert!(!hits(r#"http_header; content:"Cookie""#, &f));
    assert!(hits(r#"http_raw_header; content:"Cookie|3A| session""#, &f));
    assert!(hits(r#"http_cookie; content:"session=abc!""#, &f));
    assert!(hits(r#"http_raw_cookie; content:"session=abc%21""#, &f));
    assert!(hits(r#"http_method; content:"GET"; bufferlen:3"#, &f));
    assert!(hits(r#"http.host; content:"example.com:8080""#, &f));
    assert!(hits(
        r#"http.user_agent; content:"Evil-Agent"; http.method; content:"GET""#,
        &f
    ));
    // Sticky: content after http_method reads the method, pkt_data goes back to the message.
    assert!(!hits(r#"http_method; content:"Host""#, &f));
    assert!(hits(
        r#"http_method; content:"GET"; pkt_data; content:"Host""#,
        &f
    ));
    // A negated content on a header the request lacks.
    assert!(hits(
        r#"http_uri; content:"secret"; http_header; content:!"Referer|3A|""#,
        &f
    ));
    assert!(!hits(
        r#"http_uri; content:"secret"; http_header; content:!"X-Evil|3A|""#,
        &f
    ));
    // Request buffers do not exist in a response, and the other way round.
    assert!(!hits(r#"http_stat_code; content:"200""#, &f));
    let r = response(b"HTTP/1.1 403 Forbidden\r\nServer: x\r\nContent-Length: 0\r\n\r\n");
    assert!(hits(r#"http_stat_code; content:"403""#, &r));
    assert!(hits(r#"http_stat_msg; content:"Forbidden""#, &r));
    assert!(!hits(r#"http_uri; content:"/""#, &r));
    assert!(!hits(r#"http_method; content:!"POST""#, &r));
}

#[test]
fn chunked_body_matches_file_data() {
    let body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        6\r\n<html>\r\n5\r\nMARK-\r\n7\r\nER-1234\r\n0\r\n\r\n";
    let f = response(body);
    assert!(hits(r#"file_data; content:"MARK-ER-1234""#, &f));
    assert!(hits(r#"file.data; content:"<html>MARK",depth 10"#, &f));
    // The chunk framing splits it in the packet.
    assert!(!hits(r#"content:"MARK-ER""#, &f));
    // A request body: file_data and http_client_body (percent-decoded).
    let post = b"POST /login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        4\r\nuser\r\n9\r\n=%27 OR 1\r\n0\r\n\r\n";
    let f = request(post);
    assert!(hits(r#"http_client_body; content:"user=' OR 1""#, &f));
    assert!(hits(r#"http.request_body; content:"=' OR""#, &f));
    assert!(hits(r#"file_data; content:"user=%27""#, &f));
    assert!(hits(
        r#"http_method; content:"POST"; http_uri; content:"/login"; http_client_body; content:"OR 1""#,
        &f
    ));
}

#[test]
fn gzip_body_matches_file_data() {
    let mut text = b"<html><body>".to_vec();
    for i in 0..300 {
        text.extend_from_slice(format!("<p>paragraph {i}</p>").as_bytes());
    }
    text.extend_from_slice(b"<script>EVIL-GZIP-MARKER()</script></body></html>");
    let z = gzip(&text);
    let mut p = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        z.len()
    )
    .into_bytes();
    p.extend_from_slice(&z);
    let f = response(&p);
    assert!(hits(r#"file_data; content:"EVIL-GZIP-MARKER""#, &f));
    assert!(!hits(r#"content:"EVIL-GZIP-MARKER""#, &f));
    // A drop rule drops it.
    let mut e = engine(
        "drop tcp any 80 -> any any (msg:\"gz\"; file_data; content:\"GZIP-MARKER\"; sid:9;)",
    );
    let mut c = Collect::default();
    assert_eq!(
        e.inspect(&f, Direction::FromWire, Timestamp(0), &mut c),
        Verdict::Drop
    );
    assert_eq!(c.sids(), [9]);
}

#[test]
fn decompression_bomb_only_positive_evidence() {
    let z = gzip(&vec![b'A'; 8 << 20]);
    let mut p = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
    p.extend_from_slice(&z);
    let f = response(&p);
    assert!(hits(r#"file_data; content:"AAAAAAAA""#, &f));
    // The body was cut at the inflate cap: absence and length are unknown.
    assert!(!hits(r#"file_data; content:!"zzz""#, &f));
    assert!(!hits(r#"file_data; bufferlen:>10"#, &f));
    assert!(hits(r#"http_stat_code; content:!"404""#, &f));
}

#[test]
fn http_rules_do_not_match_non_http() {
    let ssh = request(b"SSH-2.0-OpenSSH_9.6\r\nGET /\r\n");
    assert!(!hits(r#"http_uri; content:"/""#, &ssh));
    assert!(!hits(r#"http_header; content:!"x""#, &ssh));
    assert!(!hits(r#"file_data; content:"SSH""#, &ssh));
    assert!(hits(r#"content:"SSH""#, &ssh));
    // Binary TLS record on port 80.
    let tls = request(&[
        0x16, 3, 1, 0, 0x40, 1, 0, 0, 0x3c, 3, 3, b'G', b'E', b'T', b' ',
    ]);
    assert!(!hits(r#"http_method; content:"GET""#, &tls));
    // UDP is never HTTP here.
    let mut udp = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00, 0x45, 0];
    let payload = b"GET / HTTP/1.1\r\n\r\n";
    udp.extend_from_slice(&((28 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    udp.extend_from_slice(&[0x0f, 0xa0, 0, 80]);
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut e = engine("alert udp any any -> any any (http_method; content:\"GET\"; sid:1;)");
    assert_eq!(
        e.inspect(&udp, Direction::ToWire, Timestamp(0), &mut NullSink),
        Verdict::Pass
    );
}

#[test]
fn pipelined_requests_are_each_inspected() {
    let p = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: b\r\n\r\n";
    let f = request(p);
    assert!(hits(r#"http_uri; content:"/second"; bufferlen:7"#, &f));
    assert!(hits(
        r#"http_uri; content:"/first"; http.host; content:"a""#,
        &f
    ));
    // Buffers of one message are not mixed with another's.
    assert!(!hits(
        r#"http_uri; content:"/first"; http.host; content:"b""#,
        &f
    ));
}

#[test]
fn eve_record_has_http_details() {
    let mut e = engine(
        "alert tcp any any -> any any (msg:\"uri\"; http_uri; content:\"secret\"; sid:7; rev:2;)\n\
         alert tcp any 80 -> any any (msg:\"status\"; http_stat_code; content:\"403\"; sid:8;)",
    );
    let mut w = MgmtWriter::new(String::new());
    e.inspect(
        &request(GET_ENCODED),
        Direction::ToWire,
        Timestamp(1),
        &mut w,
    );
    let r = response(b"HTTP/1.1 403 Forbidden\r\n\r\n");
    e.inspect(&r, Direction::FromWire, Timestamp(2), &mut w);
    let lines: Vec<&str> = w.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", w.out);
    let MgmtLine::Eve(json) = parse_mgmt_line(lines[0]).unwrap() else {
        panic!("not eve: {}", lines[0]);
    };
    assert!(json.contains("\"app_proto\":\"http\""), "{json}");
    assert!(
        json.contains(
            "\"http\":{\"hostname\":\"example.com\",\"url\":\"/cgi-bin/%61dmin/../%73ecret%2ephp?x=1\",\"http_user_agent\":\"Evil-Agent/2.0\",\"http_method\":\"GET\"}"
        ),
        "{json}"
    );
    let MgmtLine::Eve(json) = parse_mgmt_line(lines[1]).unwrap() else {
        panic!("not eve");
    };
    assert!(json.contains("\"http\":{\"status\":403}"), "{json}");
    // Rules without HTTP buffers keep the plain record.
    let mut e = engine("alert tcp any any -> any any (content:\"GET\"; sid:1;)");
    let mut w = MgmtWriter::new(String::new());
    e.inspect(
        &request(GET_ENCODED),
        Direction::ToWire,
        Timestamp(1),
        &mut w,
    );
    assert!(!w.out.contains("app_proto"));
}

#[test]
fn rule_text_round_trips_through_the_blob() {
    let text = r#"alert tcp $EXTERNAL_NET any -> $HOME_NET $HTTP_PORTS (msg:"all buffers"; flow:to_server,established,only_stream; content:"GET",depth 3; http_method; content:"POST"; http_uri; content:"/a.php",fast_pattern,nocase; bufferlen:<=>; http_raw_uri; content:"%2e"; bufferlen:10<=>20,relative; http_header; content:!"Referer"; http_raw_header; content:"Content-Length|3A 20|"; byte_test:10,>,95,0,relative,string,dec; http_cookie; pcre:"/^sess=\d+/"; http_raw_cookie; content:"sess"; http_client_body; content:"x="; isdataat:2,relative; file_data; content:"body"; http.host; content:"example"; http.user_agent; content:"curl"; http.uri.raw; content:"/"; http.header.raw; content:"Host"; pkt_data; content:"HTTP/1.1"; sid:1000; rev:1;)"#;
    // `bufferlen:<=>` is malformed.
    assert!(parse_rules(text, &Vars::snort_defaults()).rules.is_empty());
    let text = text.replace("bufferlen:<=>; ", "bufferlen:!=5; ");
    let p = parse_rules(&text, &Vars::snort_defaults());
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    let r = &p.rules[0];
    let bufs: Vec<HttpBuffer> = r
        .ops
        .iter()
        .filter_map(|o| match o {
            PayloadOp::Buffer(b) => Some(*b),
            _ => None,
        })
        .collect();
    assert_eq!(bufs.len(), 13);
    assert!(r.flow.only_stream);
    let fp = r.fast_pattern().unwrap();
    assert_eq!(
        (fp.bytes, fp.buffer),
        (&b"/a.php"[..], Some(HttpBuffer::Uri))
    );
    let canon = r.to_string();
    assert!(canon.contains(" http_uri; content:\"/a.php\",nocase; fast_pattern;"));
    assert!(canon.contains(" bufferlen:!5;") && canon.contains(" bufferlen:10<=>20,relative;"));
    assert_eq!(parse_rule(&canon, &Vars::new()).unwrap(), *r);
    let back = blob::decode(&blob::encode(&p.rules)).unwrap();
    assert_eq!(back, p.rules);
    // Options with arguments are refused by name, not ignored.
    for opt in [
        "http_header:field user-agent",
        "http_uri:path",
        "http_cookie:request",
    ] {
        let e = parse_rule(
            &format!("alert tcp any any -> any any ({opt}; content:\"x\"; sid:1;)"),
            &Vars::new(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(opt.split(':').next().unwrap()),
            "{e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// With the stream tracker

fn stream_engine(rules: &str) -> Engine {
    engine_with(
        rules,
        EngineConfig {
            stream: Some(engine_stream_config()),
            ..EngineConfig::default()
        },
    )
}

fn handshake(e: &mut Engine) {
    for f in [
        seg(true, SYN, CISN, 0, b""),
        seg(false, SYN | ACK, SISN, CISN + 1, b""),
        seg(true, ACK, CISN + 1, SISN + 1, b""),
    ] {
        assert_eq!(
            e.inspect(&f, Direction::ToWire, Timestamp(1), &mut NullSink),
            Verdict::Pass
        );
    }
}

/// Sends `data` from the client in segments of `size` bytes; returns the alerting sids.
fn send(e: &mut Engine, data: &[u8], size: usize) -> Vec<u32> {
    let mut c = Collect::default();
    for (k, chunk) in data.chunks(size).enumerate() {
        let f = seg(true, PSH_ACK, CISN + 1 + (k * size) as u32, SISN + 1, chunk);
        assert_ne!(
            e.inspect(&f, Direction::ToWire, Timestamp(1), &mut c),
            Verdict::Drop
        );
    }
    c.sids()
}

#[test]
fn split_request_alerts_once_in_the_stream() {
    let rules = "alert tcp any any -> any 80 (msg:\"uri\"; flow:to_server,established; http_uri; content:\"/cgi-bin/secret.php\"; sid:1;)\n\
                 alert tcp any any -> any 80 (msg:\"hdr\"; flow:to_server,established; http_uri; content:\"secret\"; http_header; content:\"X-Evil\"; sid:2;)\n\
                 alert tcp any any -> any 80 (msg:\"stream\"; flow:only_stream; http_method; content:\"GET\"; sid:3;)";
    for size in [1, 2, 7, 40, 2000] {
        let mut e = stream_engine(rules);
        handshake(&mut e);
        let mut sids = send(&mut e, GET_ENCODED, size);
        sids.sort_unstable();
        assert_eq!(sids, [1, 2, 3], "segments of {size}");
    }
    // Keep-alive: a second request on the same connection is inspected on its own.
    let mut e = stream_engine(rules);
    handshake(&mut e);
    let mut two = GET_ENCODED.to_vec();
    two.extend_from_slice(b"GET /other HTTP/1.1\r\n\r\n");
    two.extend_from_slice(GET_ENCODED);
    let sids = send(&mut e, &two, 30);
    assert_eq!(sids.iter().filter(|&&s| s == 1).count(), 2, "{sids:?}");
}

#[test]
fn split_drop_blocks_the_flow() {
    let mut e = stream_engine(
        "drop tcp any any -> any 80 (msg:\"uri\"; http_uri; content:\"/etc/passwd\"; sid:1;)",
    );
    handshake(&mut e);
    let req = b"GET /a/%2e%2e/%2e%2e/etc%2fpasswd HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut verdicts = Vec::new();
    for (k, b) in req.iter().enumerate() {
        let f = seg(true, PSH_ACK, CISN + 1 + k as u32, SISN + 1, &[*b]);
        verdicts.push(e.inspect(&f, Direction::ToWire, Timestamp(1), &mut NullSink));
    }
    let first = verdicts.iter().position(|v| *v == Verdict::Drop).unwrap();
    // Dropped once the request line is complete (its LF), and everything after it.
    assert_eq!(req[first], b'\n');
    assert!(verdicts[..first].iter().all(|v| *v == Verdict::Pass));
    assert!(verdicts[first..].iter().all(|v| *v == Verdict::Drop));
}

/// Rules shaped like the community ruleset's (method, URI with `bufferlen`, negated header
/// contents, a `byte_test` in the raw header, back to `pkt_data`), on an established flow.
#[test]
fn community_shaped_rules() {
    let rules = "alert tcp any any -> any 80 (msg:\"cnc\"; flow:to_server,established; http_method; content:\"POST\"; http_uri; content:\"/gate.php\",fast_pattern,nocase; bufferlen:9; http_header; content:!\"|0D 0A|Referer|3A|\"; http_raw_header; content:\"Content-Length|3A 20|\"; byte_test:10,>,95,0,relative,string,dec; byte_test:10,<,115,0,relative,string,dec; pkt_data; content:\"Connection|3A 20|Keep-Alive|0D 0A|\"; sid:10;)\n\
                 alert tcp any 80 -> any any (msg:\"tds\"; flow:to_client,established; http_stat_code; content:\"302\"; pkt_data; content:\"=_\"; content:\"_|5C 3B| domain=\",within 11,distance 1; http_cookie; pcre:\"/^[a-z]{5}\\d=_\\d_/\"; sid:11;)";
    let post = |uri: &str, len: usize, extra: &str| {
        let mut p = format!(
            "POST {uri} HTTP/1.1\r\nHost: c2.example\r\n{extra}Content-Length: {len}\r\nConnection: Keep-Alive\r\n\r\n"
        )
        .into_bytes();
        p.extend(std::iter::repeat_n(b'A', len));
        p
    };
    let run = |client: &[u8], server: &[u8]| {
        let mut e = stream_engine(rules);
        handshake(&mut e);
        let mut c = Collect::default();
        let f = seg(true, PSH_ACK, CISN + 1, SISN + 1, client);
        e.inspect(&f, Direction::ToWire, Timestamp(1), &mut c);
        let f = seg(
            false,
            PSH_ACK,
            SISN + 1,
            CISN + 1 + client.len() as u32,
            server,
        );
        e.inspect(&f, Direction::FromWire, Timestamp(1), &mut c);
        c.sids()
    };
    let redirect =
        b"HTTP/1.1 302 Found\r\nSet-Cookie: abcde1=_2_\\; domain=.x.example\r\nLocation: /\r\n\r\n";
    assert_eq!(run(&post("/gate.php", 100, ""), redirect), [10, 11]);
    assert_eq!(
        run(&post("/GATE.PHP", 100, ""), b"HTTP/1.1 200 OK\r\n\r\n"),
        [10]
    );
    assert!(run(&post("/gate.php", 120, ""), b"").is_empty());
    assert!(run(&post("/gate.php?x", 100, ""), b"").is_empty());
    assert!(run(&post("/gate.php", 100, "Referer: x\r\n"), b"").is_empty());
    let other = b"HTTP/1.1 302 Found\r\nSet-Cookie: ABCDE1=_2_\\; domain=.x.example\r\n\r\n";
    assert!(run(b"GET / HTTP/1.1\r\n\r\n", other).is_empty());
}
