//! Engine semantics, rule by rule: each modifier with a positive and a negative case, backtracking,
//! pcre flags, dsize, flow, verdict order, rate limiting, blob verification, EVE format.

use ally_dpi::engine::blob::{self, BlobError};
use ally_dpi::engine::eve::{parse_mgmt_line, MgmtLine};
use ally_dpi::engine::rules::{parse_rule, parse_rules, RuleError};
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    Direction, Engine, EngineConfig, Inspector, MgmtWriter, NullSink, Timestamp, Verdict,
};
use std::net::IpAddr;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;

fn frame(src: &str, dst: &str, proto: u8, l4: &[u8], payload: &[u8]) -> Vec<u8> {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let body = l4.len() + payload.len();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            f.extend_from_slice(&((20 + body) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(body as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    f.extend_from_slice(l4);
    f.extend_from_slice(payload);
    f
}

fn tcp_hdr(sp: u16, dp: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sp.to_be_bytes());
    h.extend_from_slice(&dp.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

fn tcp(sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    frame(
        "10.0.0.1",
        "10.0.0.2",
        6,
        &tcp_hdr(sp, dp, PSH_ACK),
        payload,
    )
}

fn udp(sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sp.to_be_bytes());
    h.extend_from_slice(&dp.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    frame("10.0.0.1", "10.0.0.2", 17, &h, payload)
}

mod support;
use support::Collect;

fn engine(rules: &str) -> Engine {
    let p = parse_rules(rules, &Vars::snort_defaults());
    assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected);
    Engine::new(p.rules, EngineConfig::default()).unwrap()
}

/// Whether a single `alert tcp any any -> any any (<opts>; sid:1;)` rule fires on `payload`.
fn hits(opts: &str, payload: &[u8]) -> bool {
    let mut e = engine(&format!("alert tcp any any -> any any ({opts}; sid:1;)"));
    e.inspect(
        &tcp(1234, 80, payload),
        Direction::ToWire,
        Timestamp(0),
        &mut NullSink,
    ) == Verdict::Alert
}

fn refused(opts: &str) -> RuleError {
    parse_rule(
        &format!("alert tcp any any -> any any ({opts}; sid:1;)"),
        &Vars::new(),
    )
    .unwrap_err()
}

#[test]
fn content_plain_hex_escapes() {
    assert!(hits(r#"content:"evil""#, b"some evil here"));
    assert!(!hits(r#"content:"evil""#, b"some EVIL here"));
    assert!(hits(r#"content:"a|00 FF|b""#, b"xa\x00\xffbx"));
    assert!(!hits(r#"content:"a|00 FF|b""#, b"xa\x00\xfeb"));
    assert!(hits(r#"content:"q\"t\;s\\""#, b"q\"t;s\\"));
    assert!(matches!(
        refused(r#"content:"ab|0""#),
        RuleError::BadOption { .. }
    ));
    assert!(matches!(
        refused(r#"content:"a\nb""#),
        RuleError::BadOption { .. }
    ));
}

#[test]
fn nocase() {
    assert!(hits(r#"content:"EvIl",nocase"#, b"some eViL here"));
    assert!(hits(r#"content:"EvIl"; nocase"#, b"EVIL"));
    assert!(!hits(r#"content:"EvIl",nocase"#, b"some evi1 here"));
}

#[test]
fn offset_and_depth() {
    // Window [2, 2+5): "cdefg".
    assert!(hits(r#"content:"def",offset 2,depth 5"#, b"abcdefgh"));
    assert!(hits(r#"content:"efg",offset 2,depth 5"#, b"abcdefgh"));
    assert!(!hits(r#"content:"fgh",offset 2,depth 5"#, b"abcdefgh")); // ends past the window
    assert!(!hits(r#"content:"abc",offset 1"#, b"abcdefgh")); // starts before offset
    assert!(hits(r#"content:"abc"; depth:3"#, b"abcdefgh"));
    assert!(!hits(r#"content:"bcd"; depth:3"#, b"abcdefgh"));
    assert!(matches!(
        refused(r#"content:"abcd",depth 3"#),
        RuleError::BadOption { .. }
    ));
    assert!(matches!(
        refused(r#"content:"ab",offset -1"#),
        RuleError::BadOption { .. }
    ));
}

#[test]
fn distance_and_within() {
    assert!(hits(r#"content:"ab"; content:"ef",distance 2"#, b"abcdef"));
    assert!(!hits(r#"content:"ab"; content:"ef",distance 3"#, b"abcdef"));
    assert!(hits(r#"content:"ab"; content:"cd",within 2"#, b"abcdef"));
    assert!(!hits(r#"content:"ab"; content:"de",within 2"#, b"abcdef"));
    // distance + within: window [end+1, end+1+3) = "def" region of "abXdefg".
    assert!(hits(
        r#"content:"ab"; content:"def",distance 1,within 3"#,
        b"abXdefg"
    ));
    assert!(!hits(
        r#"content:"ab"; content:"efg",distance 1,within 3"#,
        b"abXdefg"
    ));
    // Snort 2 style separate modifiers.
    assert!(hits(
        r#"content:"ab"; content:"ef"; distance:2; within:2"#,
        b"abcdef"
    ));
    assert!(matches!(
        refused(r#"content:"a"; content:"bcd",within 2"#),
        RuleError::BadOption { .. }
    ));
    assert!(matches!(
        refused(r#"content:"a"; content:"b",offset 1,distance 1"#),
        RuleError::BadOption { .. }
    ));
}

#[test]
fn negative_distance() {
    // "cd" must start at or after end("ef") - 4 = 2: "abcdef".
    assert!(hits(
        r#"content:"ef"; content:"cd",distance -4,within 4"#,
        b"abcdef"
    ));
    assert!(!hits(
        r#"content:"ef"; content:"ab",distance -3,within 3"#,
        b"abcdef"
    ));
    // Clamped at the buffer start.
    assert!(hits(
        r#"content:"ef"; content:"ab",distance -100"#,
        b"abcdef"
    ));
}

#[test]
fn negated_content() {
    assert!(hits(r#"content:"GET"; content:!"admin""#, b"GET /index"));
    assert!(!hits(r#"content:"GET"; content:!"admin""#, b"GET /admin"));
    // Relative negation: "admin" may appear, but not within 6 bytes after "GET".
    assert!(hits(
        r#"content:"GET"; content:!"admin",within 7"#,
        b"GET /xxxxxxx/admin"
    ));
    assert!(!hits(
        r#"content:"GET"; content:!"admin",within 7"#,
        b"GET /admin"
    ));
    assert!(hits(
        r#"content:"GET"; content:!"admin",within 6"#,
        b"GET /admin"
    ));
    // A negated content does not move the cursor.
    assert!(hits(
        r#"content:"ab"; content:!"zz"; content:"cd",within 2"#,
        b"abcd"
    ));
}

#[test]
fn backtracking_contents() {
    // The first "a" is followed by "x", the second by "b": only backtracking finds it.
    let rule = r#"content:"a"; content:"b",distance 0,within 1"#;
    assert!(hits(rule, b"ax ab"));
    assert!(!hits(rule, b"ax ax"));
    // Three steps, the failing third forces the first to move twice.
    let rule3 = r#"content:"k="; content:"1",within 1; content:"!",within 1"#;
    assert!(hits(rule3, b"k=2 k=1? k=1!"));
    assert!(!hits(rule3, b"k=2 k=1? k=1?"));
}

#[test]
fn backtracking_pcre_relative() {
    let rule = r#"content:"id="; pcre:"/^[0-9]+;/R""#;
    assert!(hits(rule, b"id=x; id=42;"));
    assert!(!hits(rule, b"id=x; id=4x;"));
    // pcre followed by a relative content: later pcre matches are tried.
    let rule2 = r#"pcre:"/v[0-9]/"; content:"!",within 1"#;
    assert!(hits(rule2, b"v1 v2!"));
    assert!(!hits(rule2, b"v1 v2?"));
}

#[test]
fn pcre_flags() {
    assert!(hits(r#"pcre:"/evil/i""#, b"xEVILx"));
    assert!(!hits(r#"pcre:"/evil/""#, b"xEVILx"));
    assert!(hits(r#"pcre:"/a.b/s""#, b"a\nb"));
    assert!(!hits(r#"pcre:"/a.b/""#, b"a\nb"));
    assert!(hits(r#"pcre:"/^line2/m""#, b"line1\nline2"));
    assert!(!hits(r#"pcre:"/^line2/""#, b"line1\nline2"));
    assert!(hits(r#"pcre:"/a b c # comment/x""#, b"xabcx"));
    assert!(hits(r#"pcre:!"/evil/""#, b"good"));
    assert!(!hits(r#"pcre:!"/evil/""#, b"evil"));
    assert!(hits(r#"pcre:"/\x00\xff/""#, b"a\x00\xffb"));
    assert!(hits(r#"pcre:"/^GET/A""#, b"GET /"));
    assert!(!hits(r#"pcre:"/GET/A""#, b" GET /"));
}

#[test]
fn pcre_dollar_like_pcre() {
    // PCRE's `$` (no m flag) matches at the end and before a final newline.
    assert!(hits(r#"pcre:"/end$/""#, b"the end"));
    assert!(hits(r#"pcre:"/end$/""#, b"the end\n"));
    assert!(!hits(r#"pcre:"/end$/""#, b"the end\n\n"));
    assert!(!hits(r#"pcre:"/end$/""#, b"the end."));
    // E: only the very end.
    assert!(!hits(r#"pcre:"/end$/E""#, b"the end\n"));
}

#[test]
fn pcre_dollar_inside_the_pattern() {
    // Community rule 25271's shape: `$` in an alternative, followed by more pattern.
    let opts = r#"pcre:"/uid=[a-f0-9]{4}($|&)x?/""#;
    assert!(hits(opts, b"GET /?uid=beef"));
    assert!(hits(opts, b"GET /?uid=beef\n"));
    assert!(hits(opts, b"GET /?uid=beef&x=1"));
    assert!(!hits(opts, b"GET /?uid=beef\n\n"));
    assert!(!hits(opts, b"GET /?uid=beefz"));
    // Before a final newline, `$` is followed by that newline.
    assert!(hits(r#"pcre:"/end$\n/""#, b"the end\n"));
    assert!(!hits(r#"pcre:"/end$\n/""#, b"the end"));
    // Nothing but a newline can follow a `$` that is not at the end.
    assert!(!hits(r#"pcre:"/a$b/""#, b"a\nb"));
    assert!(!hits(r#"pcre:"/a$b/""#, b"ab"));
    // Two `$`, one in a lookahead (rule 27680's shape).
    let opts = r#"pcre:"/(?=^[a-z]{3,}\.php$).*?\.php$/""#;
    assert!(hits(opts, b"abcd.php"));
    assert!(hits(opts, b"abcd.php\n"));
    assert!(!hits(opts, b"ab1d.php"));
    assert!(!hits(opts, b"abcd.php.x"));
    // E and m keep their meanings wherever `$` is.
    assert!(!hits(r#"pcre:"/d($|x)/E""#, b"end\n"));
    assert!(hits(r#"pcre:"/d($|x)/E""#, b"end"));
    assert!(hits(r#"pcre:"/d($|x)y?/m""#, b"end\nmore"));
    assert!(!hits(r#"pcre:"/d($|x)y?/""#, b"end\nmore"));
    // R: the subject starts at the cursor and still ends at the buffer end.
    assert!(hits(r#"content:"k="; pcre:"/^\d+($|&)/R""#, b"?k=12\n"));
    assert!(!hits(r#"content:"k="; pcre:"/^\d+($|&)/R""#, b"?k=12 "));
}

#[test]
fn pcre_refused_not_approximated() {
    for (opts, what) in [
        (r#"pcre:"/(?<=a+)b/""#, "unbounded lookbehind"),
        (r#"pcre:"/(a)\2/""#, "reference to a missing group"),
        (r#"pcre:"/a++b/""#, "possessive quantifier"),
        (r#"pcre:"/x/U""#, "uri flag"),
    ] {
        let e = refused(opts);
        assert!(
            matches!(e, RuleError::BadOption { .. } | RuleError::Unsupported(_)),
            "{what}: {e:?}"
        );
    }
}

/// Backreferences load and match (bounded backtracking matcher); a payload that runs a
/// catastrophic pattern out of steps is dropped by a `drop` rule, passed by an `alert` rule,
/// and counted either way.
#[test]
fn pcre_backreferences_and_step_bound() {
    assert!(hits(r#"pcre:"/(\w+)=\1/i""#, b"x ab=AB y"));
    assert!(!hits(r#"pcre:"/(\w+)=\1;/""#, b"x ab=AB; y"));
    let rules = "drop tcp any any -> any any (content:\"aaaa\"; pcre:\"/(a+)+\\1b/\"; sid:1;)\n\
                 alert tcp any any -> any any (content:\"aaaa\"; pcre:\"/(a+)+\\1c/\"; sid:2;)";
    let mut e = engine(rules);
    // `xbc` gets the payload past the linear prefilter (`a+.*b`), not past the patterns.
    let mut evil = vec![b'a'; 3000];
    evil.extend_from_slice(b"xbc");
    let evil = tcp(1234, 80, &evil);
    let mut sink = Collect::default();
    let v = e.inspect(&evil, Direction::ToWire, Timestamp(0), &mut sink);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(sink.alerts, vec![(1, "blocked", 0)]);
    assert_eq!(e.stats().pcre_limit, 2);
    let fine = tcp(1234, 80, b"aaaaac");
    let v = e.inspect(&fine, Direction::ToWire, Timestamp(0), &mut sink);
    assert_eq!(v, Verdict::Alert);
    assert_eq!(e.stats().pcre_limit, 2);
}

#[test]
fn isdataat_and_pkt_data() {
    // Snort 3: the byte at cursor + n must exist.
    assert!(hits(r#"content:"ab"; isdataat:1,relative"#, b"abcd"));
    assert!(!hits(r#"content:"ab"; isdataat:2,relative"#, b"abcd"));
    assert!(hits(r#"content:"ab"; isdataat:!5"#, b"abcd"));
    assert!(hits(
        r#"content:"cd"; pkt_data; content:"ab",within 2"#,
        b"abcd"
    ));
}

#[test]
fn dsize() {
    assert!(hits("dsize:4", b"abcd"));
    assert!(!hits("dsize:4", b"abc"));
    assert!(hits("dsize:>3", b"abcd"));
    assert!(!hits("dsize:<4", b"abcd"));
    assert!(hits("dsize:2<>5", b"abcd"));
    assert!(!hits("dsize:2<>4", b"abcd"));
    assert!(hits("dsize:2<=>4", b"abcd"));
}

#[test]
fn header_addresses_ports_vars() {
    let mut vars = Vars::new();
    vars.parse_into("ipvar HOME_NET [10.0.0.0/24,!10.0.0.9]\nportvar WEB [80,8000:8100]\n")
        .unwrap();
    let p = parse_rules(
        "alert tcp any any -> $HOME_NET $WEB (content:\"x\"; sid:1;)\n\
         alert tcp any any -> !$HOME_NET any (content:\"x\"; sid:2;)\n\
         alert tcp 10.0.0.2 80 <> 10.0.0.1 any (content:\"x\"; sid:3;)\n\
         alert udp any any -> any ![53,5353] (content:\"x\"; sid:4;)\n",
        &vars,
    );
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    let mut e = Engine::new(p.rules, EngineConfig::default()).unwrap();
    let mut run = |f: &[u8]| {
        let mut c = Collect::default();
        e.inspect(f, Direction::FromWire, Timestamp(0), &mut c);
        let mut s: Vec<u32> = c.alerts.iter().map(|a| a.0).collect();
        s.sort();
        s
    };
    assert_eq!(run(&tcp(1234, 80, b"x")), vec![1, 3]);
    assert_eq!(run(&tcp(1234, 8050, b"x")), vec![1]);
    assert_eq!(run(&tcp(1234, 22, b"x")), Vec::<u32>::new());
    let to_nine = frame("10.0.0.1", "10.0.0.9", 6, &tcp_hdr(1, 80, PSH_ACK), b"x");
    assert_eq!(run(&to_nine), vec![2]);
    assert_eq!(run(&udp(1, 53, b"x")), Vec::<u32>::new());
    assert_eq!(run(&udp(1, 54, b"x")), vec![4]);
    let v6 = frame(
        "2001:db8::1",
        "2001:db8::2",
        6,
        &tcp_hdr(1, 80, PSH_ACK),
        b"x",
    );
    assert_eq!(run(&v6), vec![2]);
}

#[test]
fn snort2_and_snort3_styles_are_equal() {
    let v = Vars::snort_defaults();
    let s2 = parse_rule(
        r#"alert tcp $EXTERNAL_NET any -> $HOME_NET 80 (msg:"x"; content:"GET"; depth:3; nocase; content:"/a"; distance:1; within:10; fast_pattern; sid:5; rev:2;)"#,
        &v,
    )
    .unwrap();
    let s3 = parse_rule(
        r#"alert tcp $EXTERNAL_NET any -> $HOME_NET 80 (msg:"x"; content:"GET",depth 3,nocase; content:"/a",distance 1,within 10,fast_pattern; sid:5; rev:2;)"#,
        &v,
    )
    .unwrap();
    assert_eq!(s2, s3);
    // Canonical text parses back to the same rule.
    assert_eq!(parse_rule(&s3.to_string(), &Vars::new()).unwrap(), s3);
}

#[test]
fn fast_pattern_choice() {
    let v = Vars::new();
    let r = parse_rule(r#"alert tcp any any -> any any (content:"ab"; content:"longest"; content:!"negatedlonger"; sid:1;)"#, &v).unwrap();
    assert_eq!(r.fast_pattern().unwrap().bytes, b"longest");
    let r = parse_rule(
        r#"alert tcp any any -> any any (content:"ab",fast_pattern; content:"longest"; sid:1;)"#,
        &v,
    )
    .unwrap();
    assert_eq!(r.fast_pattern().unwrap().bytes, b"ab");
    let r = parse_rule(r#"alert tcp any any -> any any (content:"abcdef",fast_pattern,fast_pattern_offset 1,fast_pattern_length 3; sid:1;)"#, &v).unwrap();
    assert_eq!(r.fast_pattern().unwrap().bytes, b"bcd");
    let r = parse_rule(r#"alert tcp any any -> any any (content:!"x"; sid:1;)"#, &v).unwrap();
    assert!(r.fast_pattern().is_none());
    // Rules without content are candidates anyway.
    assert!(hits("dsize:3", b"abc"));
}

#[test]
fn unsupported_options_reported_with_sid() {
    let text = "alert tcp any any -> any any (msg:\"a\"; tag:session,10,packets; content:\"a\"; sid:10;)\n\
                alert tcp any any -> any any (msg:\"b\"; replace:\"x\"; content:\"a\"; dce_opnum:1; sid:11;)\n\
                alert ftp any any -> any any (msg:\"c\"; sid:12;)\n\
                alert tcp any any -> any any (msg:\"ok\"; content:\"a\"; sid:13;)\n";
    let p = parse_rules(text, &Vars::new());
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rejected.len(), 3);
    assert_eq!(p.rejected[0].sid, Some(10));
    assert_eq!(
        p.rejected[0].error,
        RuleError::Unsupported(vec!["tag".into()])
    );
    assert_eq!(
        p.rejected[1].error,
        RuleError::Unsupported(vec!["replace".into(), "dce_opnum".into()])
    );
    assert_eq!(p.rejected[2].sid, Some(12));
    let summary = p.summary();
    assert!(summary.contains(&("tag".into(), 1)));
    assert!(summary.contains(&("dce_opnum".into(), 1)));
    assert!(p.rejected[1].to_string().contains("sid 11"));
}

fn handshake(e: &mut Engine, sp: u16, dp: u16) {
    let c = "10.0.0.1";
    let s = "10.0.0.2";
    for (src, dst, a, b, fl) in [
        (c, s, sp, dp, SYN),
        (s, c, dp, sp, SYN | ACK),
        (c, s, sp, dp, ACK),
    ] {
        let f = frame(src, dst, 6, &tcp_hdr(a, b, fl), b"");
        e.inspect(&f, Direction::ToWire, Timestamp(0), &mut NullSink);
    }
}

#[test]
fn flow_direction_and_established() {
    let rules = "alert tcp any any -> any any (content:\"req\"; flow:to_server,established; sid:1;)\n\
                 alert tcp any any -> any any (content:\"resp\"; flow:to_client,established; sid:2;)\n\
                 alert tcp any any -> any any (content:\"any\"; flow:stateless; sid:3;)\n";
    // Mid-stream (no handshake seen): direction/established rules do not match.
    let mut e = engine(rules);
    let mut c = Collect::default();
    e.inspect(
        &tcp(4000, 80, b"req any"),
        Direction::ToWire,
        Timestamp(0),
        &mut c,
    );
    assert_eq!(c.alerts.iter().map(|a| a.0).collect::<Vec<_>>(), vec![3]);
    // After the handshake.
    let mut e = engine(rules);
    handshake(&mut e, 4000, 80);
    let mut c = Collect::default();
    e.inspect(
        &tcp(4000, 80, b"req resp"),
        Direction::ToWire,
        Timestamp(1),
        &mut c,
    );
    assert_eq!(c.alerts.iter().map(|a| a.0).collect::<Vec<_>>(), vec![1]);
    let back = frame(
        "10.0.0.2",
        "10.0.0.1",
        6,
        &tcp_hdr(80, 4000, PSH_ACK),
        b"req resp",
    );
    let mut c = Collect::default();
    e.inspect(&back, Direction::FromWire, Timestamp(2), &mut c);
    assert_eq!(c.alerts.iter().map(|a| a.0).collect::<Vec<_>>(), vec![2]);
    assert_eq!(e.flow_stats().created, 1);
}

#[test]
fn verdict_order_pass_drop_alert() {
    let rules = "alert tcp any any -> any any (content:\"x\"; sid:1;)\n\
                 drop tcp any any -> any any (content:\"bad\"; sid:2;)\n\
                 pass tcp any any -> any any (content:\"trusted\"; sid:3;)\n";
    let mut e = engine(rules);
    let mut run = |p: &[u8]| {
        let mut c = Collect::default();
        let v = e.inspect(&tcp(1, 80, p), Direction::ToWire, Timestamp(0), &mut c);
        (v, c.alerts, c.dropped)
    };
    assert_eq!(run(b"x"), (Verdict::Alert, vec![(1, "allowed", 0)], 0));
    assert_eq!(
        run(b"x bad"),
        (Verdict::Drop, vec![(2, "blocked", 0), (1, "allowed", 0)], 1)
    );
    assert_eq!(run(b"x bad trusted"), (Verdict::Pass, vec![], 0));
    assert_eq!(run(b"nothing"), (Verdict::Pass, vec![], 0));
    let s = e.stats();
    assert_eq!(s.frames, s.not_ip + s.passed + s.alerted + s.dropped);
    assert_eq!((s.alerted, s.dropped, s.pass_rule), (1, 1, 1));
}

#[test]
fn drop_applies_in_both_directions() {
    let mut e = engine("drop tcp any any -> any any (content:\"X5O!\"; sid:9;)");
    let to = tcp(1, 80, b"..X5O!..");
    let from = frame(
        "10.0.0.2",
        "10.0.0.1",
        6,
        &tcp_hdr(80, 1, PSH_ACK),
        b"..X5O!..",
    );
    assert_eq!(
        e.inspect(&to, Direction::ToWire, Timestamp(0), &mut NullSink),
        Verdict::Drop
    );
    assert_eq!(
        e.inspect(&from, Direction::FromWire, Timestamp(0), &mut NullSink),
        Verdict::Drop
    );
}

#[test]
fn rate_limit_counts_suppressed() {
    let p = parse_rules(
        "alert tcp any any -> any any (content:\"x\"; sid:1;)",
        &Vars::new(),
    );
    let cfg = EngineConfig {
        alerts_per_rule_per_sec: 2,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(p.rules, cfg).unwrap();
    let mut c = Collect::default();
    for i in 0..5 {
        let v = e.inspect(&tcp(1, 80, b"x"), Direction::ToWire, Timestamp(i), &mut c);
        assert_eq!(v, Verdict::Alert); // the verdict never depends on the limit
    }
    e.inspect(
        &tcp(1, 80, b"x"),
        Direction::ToWire,
        Timestamp(2_000_000),
        &mut c,
    );
    assert_eq!(
        c.alerts,
        vec![(1, "allowed", 0), (1, "allowed", 0), (1, "allowed", 3)]
    );
    assert_eq!(e.stats().alerts_suppressed, 3);
}

#[test]
fn eve_and_pcap_lines() {
    let rules = "drop tcp any any -> any any (msg:\"EICAR \\\"test\\\"\"; content:\"X5O\"; classtype:trojan-activity; sid:7; rev:3;)";
    let mut e = engine(rules);
    let mut w = MgmtWriter::new(String::new());
    let f = tcp(1234, 80, b"X5O!P%@AP");
    // 2026-11-23T16:03:30.000123Z
    let ts = Timestamp(1_795_449_810_000_123);
    assert_eq!(
        e.inspect(&f, Direction::FromWire, ts, &mut w),
        Verdict::Drop
    );
    let lines: Vec<&str> = w.out.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        "ALLY eve {\"timestamp\":\"2026-11-23T16:03:30.000123+0000\",\"event_type\":\"alert\",\
         \"src_ip\":\"10.0.0.1\",\"src_port\":1234,\"dest_ip\":\"10.0.0.2\",\"dest_port\":80,\
         \"proto\":\"TCP\",\"direction\":\"from_wire\",\"alert\":{\"action\":\"blocked\",\"gid\":1,\
         \"signature_id\":7,\"rev\":3,\"signature\":\"EICAR \\\"test\\\"\",\
         \"category\":\"A Network Trojan was detected\",\"severity\":1,\"suppressed\":0}}"
    );
    match parse_mgmt_line(lines[1]).unwrap() {
        MgmtLine::Pcap {
            ts_us,
            dir,
            orig_len,
            data,
        } => {
            assert_eq!(ts_us, ts.0);
            assert_eq!(dir, Direction::FromWire);
            assert_eq!(orig_len as usize, f.len());
            assert_eq!(data, f);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse_mgmt_line(lines[0]).unwrap(),
        MgmtLine::Eve(_)
    ));
    assert!(parse_mgmt_line("ALLY pcap 1 sideways 3 00").is_err());
}

#[test]
fn blob_round_trip_and_errors() {
    let p = parse_rules(
        "alert tcp any any -> any 80 (msg:\"a;b\"; content:\"x|00|\"; pcre:\"/y+/i\"; sid:1;)\n\
         drop udp [1.2.3.0/24,!1.2.3.4] any -> any [53,!54] (content:\"q\",nocase; dsize:>2; sid:2;)\n",
        &Vars::new(),
    );
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    let b = blob::encode(&p.rules);
    assert_eq!(blob::decode(&b).unwrap(), p.rules);
    assert_eq!(
        Engine::from_blob(&b, EngineConfig::default())
            .unwrap()
            .rule_count(),
        2
    );

    let mut bad = b.clone();
    bad[0] = b'X';
    assert_eq!(blob::decode(&bad), Err(BlobError::BadMagic));
    let mut bad = b.clone();
    bad[8] = 9;
    assert_eq!(
        blob::decode(&bad),
        Err(BlobError::BadVersion {
            found: 9,
            supported: 1
        })
    );
    let mut bad = b.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x20;
    assert!(matches!(
        blob::decode(&bad),
        Err(BlobError::Checksum { .. })
    ));
    assert!(matches!(
        blob::decode(&b[..b.len() - 1]),
        Err(BlobError::Truncated { .. })
    ));
    assert!(matches!(
        blob::decode(&b[..10]),
        Err(BlobError::Truncated { .. })
    ));
    // A record that does not parse, with a valid checksum: named by index.
    let mut rules = p.rules.clone();
    rules[1].msg = "x".into();
    let mut b2 = blob::encode(&rules);
    let pos = b2.windows(5).position(|w| w == b"udp [").unwrap();
    b2[pos..pos + 3].copy_from_slice(b"xyz");
    let plen = b2.len() - 24;
    let crc = {
        // Recompute the checksum over the edited payload the way the encoder does.
        let mut h = 0xffff_ffffu32;
        for &byte in &b2[24..24 + plen] {
            h ^= u32::from(byte);
            for _ in 0..8 {
                h = if h & 1 != 0 {
                    (h >> 1) ^ 0xedb8_8320
                } else {
                    h >> 1
                };
            }
        }
        !h
    };
    b2[20..24].copy_from_slice(&crc.to_le_bytes());
    match blob::decode(&b2) {
        Err(BlobError::CorruptRecord { index, reason }) => {
            assert_eq!(index, 1);
            assert!(reason.contains("protocol"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Empty rule set: valid blob, pass-all engine.
    let empty = blob::encode(&[]);
    let mut e = Engine::from_blob(&empty, EngineConfig::default()).unwrap();
    assert_eq!(e.rule_count(), 0);
    assert_eq!(
        e.inspect(
            &tcp(1, 2, b"x"),
            Direction::ToWire,
            Timestamp(0),
            &mut NullSink
        ),
        Verdict::Pass
    );
}

#[test]
fn garbage_frames_never_panic() {
    let mut e = engine("alert ip any any -> any any (content:\"a\"; sid:1;)\nalert tcp any any -> any any (flow:established; pcre:\"/b/R\"; sid:2;)\nalert tcp any any -> any any (content:\"a\"; byte_jump:2,-1,relative,multiplier 3,align; byte_test:1,>,7,0,relative; isdataat:!3,relative; content:\"c\",distance -2,within 3; sid:3;)\nalert ip any any -> any any (byte_test:4,=,1,-1,relative,string,hex; byte_jump:10,2,string,oct,from_end,post_offset -20; pcre:\"/c$/\"; sid:4;)");
    let base = tcp(1, 80, b"abcabc");
    let mut x = 0x9e37_79b9u32;
    for round in 0..3000 {
        let mut f = base.clone();
        f.truncate(base.len() - (round % 20));
        for b in f.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if x.is_multiple_of(11) {
                *b = x as u8;
            }
        }
        let _ = e.inspect(
            &f,
            Direction::FromWire,
            Timestamp(round as u64),
            &mut NullSink,
        );
    }
    assert_eq!(e.stats().frames, 3000);
}

#[test]
fn byte_test_binary_and_string() {
    // 2 bytes big endian at offset 1: 0x0102 = 258.
    let p = b"\x00\x01\x02\x03";
    assert!(hits("byte_test:2,=,258,1", p));
    assert!(!hits("byte_test:2,=,258,0", p));
    assert!(hits("byte_test:2,=,0x201,1,little", p));
    assert!(hits("byte_test:2,>,257,1", p));
    assert!(!hits("byte_test:2,>,258,1", p));
    assert!(hits("byte_test:2,!>,258,1", p));
    assert!(hits("byte_test:1,&,0x02,2", p));
    assert!(!hits("byte_test:1,&,0x04,2", p));
    assert!(hits("byte_test:1,^,0x01,2", p));
    assert!(!hits("byte_test:4,=,0,1", p)); // runs past the buffer
                                            // bitmask: 0x0102 & 0x0f00 = 0x0100, shifted by 8 = 1.
    assert!(hits("byte_test:2,=,1,1,bitmask 0x0f00", p));
    // Relative to the cursor, negative offsets allowed.
    assert!(hits(r#"content:"|02|"; byte_test:1,=,3,0,relative"#, p));
    assert!(hits(r#"content:"|02|"; byte_test:1,=,1,-2,relative"#, p));
    // Strings: at most `bytes` characters, strtoul-like.
    assert!(hits("byte_test:4,>,1000,4,string,dec", b"LEN=2048;"));
    assert!(!hits("byte_test:4,>,3000,4,string,dec", b"LEN=2048;"));
    assert!(hits("byte_test:2,=,20,4,string,dec", b"LEN=2048;"));
    assert!(hits("byte_test:3,=,0x1f,0,string,hex", b"1fz"));
    assert!(!hits("byte_test:3,=,0,0,string,dec", b"abc"));
    assert!(matches!(
        refused("byte_test:5,=,1,0"),
        RuleError::BadOption { .. }
    ));
    assert!(matches!(
        refused("byte_test:2,=,1,0,dce"),
        RuleError::Unsupported(_)
    ));
    // A name that no earlier byte_extract/byte_math defines.
    assert!(matches!(
        refused("byte_test:2,=,var,0"),
        RuleError::BadOption { .. }
    ));
}

#[test]
fn byte_jump_moves_the_cursor() {
    // Length-prefixed record: len=3, "abc", then "END".
    let p = b"\x00\x03abcEND";
    assert!(hits(r#"byte_jump:2,0; content:"END",within 3"#, p));
    assert!(!hits(r#"byte_jump:2,0; content:"abc",within 3"#, p));
    // from_beginning: cursor = 5.
    assert!(hits(
        r#"byte_jump:2,0,from_beginning; content:"END",within 3"#,
        b"\x00\x05abcEND"
    ));
    // align: 3 rounds up to 4.
    assert!(hits(r#"byte_jump:2,0,align; content:"ND",within 2"#, p));
    // multiplier and post_offset.
    assert!(hits(
        r#"byte_jump:1,1,multiplier 2,post_offset -2; content:"cEND",within 4"#,
        b"\x00\x02abcEND"
    ));
    // Jump past the end fails.
    assert!(!hits("byte_jump:2,0", b"\x00\x09abc"));
    // Relative to a content match.
    assert!(hits(
        r#"content:"L="; byte_jump:1,0,relative; content:"!",within 1"#,
        b"xxL=\x02ab!"
    ));
    assert!(!hits(
        r#"content:"L="; byte_jump:1,0,relative; content:"!",within 1"#,
        b"xxL=\x03ab!"
    ));
    // String form.
    assert!(hits(
        r#"byte_jump:1,0,string,dec; content:"Z",within 1"#,
        b"3abcZ"
    ));
    // Backtracking over the content before a relative byte_jump.
    assert!(hits(
        r#"content:"L="; byte_jump:1,0,relative; content:"!",within 1"#,
        b"L=\x05L=\x01a!"
    ));
}

fn icmp_frame(itype: u8, code: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![itype, code, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    frame("10.0.0.1", "10.0.0.2", 1, &h, payload)
}

#[test]
fn icmp_options() {
    let mut e = engine(
        "alert icmp any any -> any any (itype:8; icode:0; content:\"ping\"; sid:1;)\n\
         alert icmp any any -> any any (itype:>10; sid:2;)\n\
         alert icmp any any -> any any (icmp_id:77; icmp_seq:5; sid:3;)\n\
         alert ip any any -> any any (itype:3; sid:4;)\n",
    );
    let mut run = |f: Vec<u8>| {
        let mut c = Collect::default();
        e.inspect(&f, Direction::FromWire, Timestamp(0), &mut c);
        let mut v: Vec<u32> = c.alerts.iter().map(|a| a.0).collect();
        v.sort();
        v
    };
    assert_eq!(run(icmp_frame(8, 0, 77, 5, b"ping")), vec![1, 3]);
    assert_eq!(run(icmp_frame(8, 1, 77, 6, b"ping")), Vec::<u32>::new());
    assert_eq!(run(icmp_frame(13, 0, 77, 5, b"")), vec![2]); // timestamp: not echo, no id/seq
    assert_eq!(run(icmp_frame(3, 1, 0, 0, b"")), vec![4]);
    assert_eq!(run(tcp(1, 80, b"ping")), Vec::<u32>::new());
}

#[test]
fn new_options_round_trip_through_canonical_text() {
    let v = Vars::new();
    for r in [
        r#"alert tcp any any -> any any (content:"a"; byte_test:4,!&,0x10,-2,relative,little,string,hex,bitmask 0xff; sid:1;)"#,
        r#"alert tcp any any -> any any (byte_jump:2,1,relative,little,multiplier 4,align,from_beginning,post_offset -2; sid:2;)"#,
        r#"alert icmp any any -> any any (itype:3<>5; icode:!1; icmp_id:9; icmp_seq:10; sid:3;)"#,
    ] {
        let a = parse_rule(r, &v).unwrap();
        assert_eq!(parse_rule(&a.to_string(), &v).unwrap(), a, "{a}");
    }
}

#[test]
fn byte_jump_huge_values_fail_cleanly() {
    let p = b"\xff\xff\xff\xffabc";
    assert!(!hits(
        "byte_jump:4,0,multiplier 4294967295,align,post_offset 2147483647",
        p
    ));
    assert!(!hits("byte_jump:4,0,from_end,post_offset -2147483648", p));
    // 10 digits of 9s saturate like strtoul and then truncate to 32 bits, without panicking.
    assert!(hits("byte_test:10,>,0,0,string,dec", b"9999999999"));
}

#[test]
fn flowbits_across_packets_of_a_flow() {
    let rules = "alert tcp any any -> any any (msg:\"login\"; content:\"USER admin\"; flowbits:set,admin; flowbits:noalert; sid:1;)\n\
                 alert tcp any any -> any any (msg:\"admin cmd\"; content:\"DELETE\"; flowbits:isset,admin; sid:2;)\n\
                 alert tcp any any -> any any (msg:\"anon cmd\"; content:\"DELETE\"; flowbits:isnotset,admin; sid:3;)\n\
                 alert tcp any any -> any any (msg:\"logout\"; content:\"QUIT\"; flowbits:unset,admin; flowbits:noalert; sid:4;)\n";
    let mut e = engine(rules);
    handshake(&mut e, 4000, 21);
    let mut send = |p: &[u8]| {
        let mut c = Collect::default();
        let v = e.inspect(&tcp(4000, 21, p), Direction::ToWire, Timestamp(5), &mut c);
        (v, c.alerts.iter().map(|a| a.0).collect::<Vec<_>>())
    };
    assert_eq!(send(b"DELETE x"), (Verdict::Alert, vec![3]));
    assert_eq!(send(b"USER admin"), (Verdict::Pass, vec![])); // noalert
    assert_eq!(send(b"DELETE x"), (Verdict::Alert, vec![2]));
    // Set and check on the same packet: the setter runs first.
    assert_eq!(send(b"QUIT"), (Verdict::Pass, vec![]));
    assert_eq!(send(b"USER admin DELETE"), (Verdict::Alert, vec![2]));
    // Another flow does not see the bit.
    let mut c = Collect::default();
    e.inspect(
        &tcp(4001, 21, b"DELETE"),
        Direction::ToWire,
        Timestamp(6),
        &mut c,
    );
    assert_eq!(c.alerts.iter().map(|a| a.0).collect::<Vec<_>>(), vec![3]);
}

#[test]
fn flowbits_isset_without_setter_is_refused() {
    let p = parse_rules(
        "alert tcp any any -> any any (content:\"a\"; flowbits:isset,never; sid:1;)\n\
         alert tcp any any -> any any (content:\"a\"; flowbits:isset,x|never; sid:2;)\n\
         alert tcp any any -> any any (content:\"b\"; flowbits:set,x; flowbits:isset,y; sid:3;)\n\
         alert tcp any any -> any any (content:\"c\"; flowbits:isset,y&z; sid:4;)\n\
         alert tcp any any -> any any (content:\"c\"; flowbits:set,y; sid:5;)\n",
        &Vars::new(),
    );
    let loaded: Vec<u32> = p.rules.iter().map(|r| r.sid).collect();
    let refused: Vec<u32> = p.rejected.iter().filter_map(|r| r.sid).collect();
    // 1: `never` is never set; 4: `z` is never set; 3 needs y (set by 5) so it stays, and 2
    // needs x or never: x is set by 3.
    assert_eq!(loaded, vec![2, 3, 5]);
    assert_eq!(refused, vec![1, 4]);
    assert!(
        p.rejected[0].to_string().contains("never"),
        "{}",
        p.rejected[0]
    );
    assert!(matches!(
        refused_text("flowbits:reset"),
        RuleError::Unsupported(_)
    ));
}

fn refused_text(opts: &str) -> RuleError {
    refused(opts)
}

#[test]
fn boot_summary_line() {
    assert_eq!(
        Engine::pass_all().summary().to_string(),
        "rules: none loaded, every frame passes uninspected by rules"
    );
    let e = engine(
        "drop tcp any any -> any any (content:\"a\"; sid:1;)\n\
         alert tcp any any -> any any (content:\"b\"; sid:2;)\n\
         alert udp any any -> any 53 (content:\"c\"; sid:3;)\n",
    );
    let s = e.summary();
    assert_eq!((s.rules, s.drop, s.alert, s.pass), (3, 1, 2, 0));
    assert!(
        s.to_string()
            .starts_with("rules: 3 loaded (1 drop, 2 alert, 0 pass) in "),
        "{s}"
    );
}

#[test]
fn tcp_flags_modes() {
    let with = |flags_opt: &str, fl: u8| {
        let mut e = engine(&format!(
            "alert tcp any any -> any any (flags:{flags_opt}; sid:1;)"
        ));
        let f = frame("10.0.0.1", "10.0.0.2", 6, &tcp_hdr(1, 2, fl), b"");
        e.inspect(&f, Direction::ToWire, Timestamp(0), &mut NullSink) == Verdict::Alert
    };
    assert!(with("S", SYN));
    assert!(!with("S", SYN | ACK));
    assert!(with("SA", SYN | ACK));
    assert!(with("S+", SYN | ACK));
    assert!(!with("S+", ACK));
    assert!(with("FRS*", 0x04)); // any of F, R, S
    assert!(!with("FRS*", ACK));
    assert!(with("!R", ACK));
    assert!(!with("!R", 0x04 | ACK));
    assert!(with("S,12", SYN | 0xc0)); // CWR/ECE ignored
    assert!(!with("S", SYN | 0xc0));
    assert!(with("0", 0));
    assert!(matches!(refused("flags:SX"), RuleError::BadOption { .. }));
}

#[test]
fn detection_filter_counts_per_host() {
    let mut e = engine(
        "alert tcp any any -> any any (content:\"login failed\"; detection_filter:track by_src,count 2,seconds 10; sid:1;)",
    );
    let from = |src: &str| frame(src, "10.0.0.2", 6, &tcp_hdr(1, 2, PSH_ACK), b"login failed");
    let mut v = Vec::new();
    for (t, src) in [
        (0, "1.1.1.1"),
        (1, "1.1.1.1"),
        (2, "2.2.2.2"),
        (3, "1.1.1.1"),
        (4, "1.1.1.1"),
    ] {
        v.push(e.inspect(
            &from(src),
            Direction::FromWire,
            Timestamp(t * 1_000_000),
            &mut NullSink,
        ));
    }
    // Third and later matches from 1.1.1.1 within 10 s alert; 2.2.2.2 has one match.
    assert_eq!(
        v,
        [
            Verdict::Pass,
            Verdict::Pass,
            Verdict::Pass,
            Verdict::Alert,
            Verdict::Alert
        ]
    );
    // After the window the count starts again.
    let v = e.inspect(
        &from("1.1.1.1"),
        Direction::FromWire,
        Timestamp(20_000_000),
        &mut NullSink,
    );
    assert_eq!(v, Verdict::Pass);
}

#[test]
fn flags_and_filter_round_trip() {
    let v = Vars::new();
    for r in [
        r#"alert tcp any any -> any any (flags:FRS*,12; detection_filter:track by_dst,count 30,seconds 60; sid:1;)"#,
        r#"alert tcp any any -> any any (flags:!0; sid:2;)"#,
    ] {
        let a = parse_rule(r, &v).unwrap();
        assert_eq!(parse_rule(&a.to_string(), &v).unwrap(), a, "{a}");
    }
}

#[test]
fn no_stream_holds_for_every_packet() {
    // Without reassembly every inspected packet is a wire packet.
    assert!(hits(r#"content:"x"; flow:stateless,no_stream"#, b"x"));
    let r = parse_rule(
        r#"alert udp any any -> any 1900 (flow:to_server,no_stream,no_frag; content:"N"; sid:1;)"#,
        &Vars::new(),
    )
    .unwrap();
    assert_eq!(parse_rule(&r.to_string(), &Vars::new()).unwrap(), r);
    // only_stream: segments the stream tracker accepted; without a tracker, never.
    assert!(!hits(r#"content:"x"; flow:only_stream"#, b"x"));
    let r = parse_rule(
        r#"alert tcp any any -> any 443 (flow:to_server,established,only_stream; content:"|18 03|",depth 2; sid:1;)"#,
        &Vars::new(),
    )
    .unwrap();
    assert!(r.flow.only_stream);
    assert_eq!(parse_rule(&r.to_string(), &Vars::new()).unwrap(), r);
}

/// Reference semantics written straight from the definitions (no memo, no shortcuts): does some
/// assignment of match positions satisfy contents `ops[i..]` with the cursor at `cursor`?
fn reference(ops: &[ally_dpi::engine::rules::Content], cursor: usize, buf: &[u8]) -> bool {
    let Some(c) = ops.first() else { return true };
    let n = buf.len() as i64;
    let m = c.pattern.len() as i64;
    let (lo, hi) = if c.is_relative() {
        let base = cursor as i64 + i64::from(c.distance.unwrap_or(0));
        (
            base.max(0),
            c.within.map_or(n, |w| base + i64::from(w)).min(n),
        )
    } else {
        let lo = i64::from(c.offset.unwrap_or(0));
        (lo, c.depth.map_or(n, |d| lo + i64::from(d)).min(n))
    };
    let eq = |s: usize| {
        let w = &buf[s..s + c.pattern.len()];
        if c.nocase {
            w.eq_ignore_ascii_case(&c.pattern)
        } else {
            w == &c.pattern[..]
        }
    };
    let starts: Vec<usize> = (lo.max(0)..=hi - m)
        .map(|s| s as usize)
        .filter(|&s| eq(s))
        .collect();
    if c.negated {
        return starts.is_empty() && reference(&ops[1..], cursor, buf);
    }
    starts
        .into_iter()
        .any(|s| reference(&ops[1..], s + c.pattern.len(), buf))
}

#[test]
fn contents_match_the_reference_semantics() {
    use ally_dpi::engine::matcher::{Memo, Program};
    use ally_dpi::engine::rules::PayloadOp;
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut memo = Memo::default();
    let (mut positives, mut total) = (0, 0);
    for _ in 0..3000 {
        let k = 1 + rnd(4) as usize;
        let mut opts = String::new();
        for j in 0..k {
            let len = 1 + rnd(3) as usize;
            let pat: String = (0..len)
                .map(|_| if rnd(2) == 0 { 'a' } else { 'b' })
                .collect();
            let neg = if j > 0 && rnd(5) == 0 { "!" } else { "" };
            opts.push_str(&format!("content:{neg}\"{pat}\""));
            if j > 0 && rnd(3) != 0 {
                opts.push_str(&format!(",distance {}", rnd(7) as i64 - 3));
                if rnd(2) == 0 {
                    opts.push_str(&format!(",within {}", len as u64 + rnd(4)));
                }
            } else if rnd(3) == 0 {
                opts.push_str(&format!(",offset {}", rnd(4)));
                if rnd(2) == 0 {
                    opts.push_str(&format!(",depth {}", len as u64 + rnd(5)));
                }
            }
            opts.push_str("; ");
        }
        let text = format!("alert tcp any any -> any any ({opts}sid:1;)");
        let rule = parse_rule(&text, &Vars::new()).unwrap_or_else(|e| panic!("{text}: {e}"));
        let contents: Vec<_> = rule
            .ops
            .iter()
            .map(|o| match o {
                PayloadOp::Content(c) => c.clone(),
                _ => unreachable!(),
            })
            .collect();
        let mut prog = Program::new(&rule).unwrap();
        for _ in 0..5 {
            let len = rnd(12) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| if rnd(2) == 0 { b'a' } else { b'b' })
                .collect();
            let want = reference(&contents, 0, &buf);
            assert_eq!(
                prog.matches(&buf, &mut memo),
                want,
                "{text} on {:?}",
                String::from_utf8_lossy(&buf)
            );
            positives += usize::from(want);
            total += 1;
        }
    }
    // Both outcomes are well represented.
    assert!(
        positives > total / 10 && positives < total * 9 / 10,
        "{positives}/{total}"
    );
}

/// Mutated rules never panic the parser, and whatever parses survives the canonical-text round
/// trip (the blob format) and compiles.
#[test]
fn mutated_rules_parse_or_fail_cleanly() {
    let seeds = [
        r#"alert tcp $EXTERNAL_NET any -> $HOME_NET [80,8080:8090] (msg:"a \"q\" b"; flow:to_server,established; content:"GET |20|/x",depth 16,nocase; content:!"zz",distance -2,within 9; pcre:"/a[bc]+$/Ri"; sid:1; rev:2;)"#,
        r#"drop udp [10.0.0.0/8,!10.1.0.0/16] !53 <> any :1024 (msg:"d"; dsize:2<>9; byte_test:2,!&,0x10,-1,relative,little; byte_jump:1,0,align,post_offset 2; isdataat:!3,relative; sid:2;)"#,
        r#"alert icmp any any -> 2001:db8::/32 any (msg:"ü"; itype:>3; icode:0; icmp_id:7; flowbits:isset,a|b; flowbits:noalert; detection_filter:track by_src,count 3,seconds 5; sid:3;)"#,
        r#"pass tcp any any -> any any (content:"ab"; fast_pattern:only; content:"cd"; offset:3; depth:4; flags:S+,12; sid:4;)"#,
    ];
    let alphabet: Vec<char> = " ,;:!\"|\\()[]<>-$/0123456789abcdefxyzAX_.*+^?\u{e9}\u{1f600}"
        .chars()
        .collect();
    let mut x = 0x0123_4567_89ab_cdefu64;
    let mut rnd = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let mut vars = Vars::new();
    vars.parse_into("ipvar HOME_NET 10.0.0.0/8\nipvar EXTERNAL_NET !$HOME_NET\n")
        .unwrap();
    for s in seeds {
        parse_rule(s, &vars).unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    let (mut ok, mut total) = (0, 0);
    for round in 0..20_000 {
        let mut chars: Vec<char> = seeds[round % seeds.len()].chars().collect();
        for _ in 0..1 + rnd(3) {
            let at = rnd(chars.len() + 1);
            match rnd(3) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 if at < chars.len() => chars[at] = alphabet[rnd(alphabet.len())],
                _ => chars.insert(at, alphabet[rnd(alphabet.len())]),
            }
        }
        let text: String = chars.into_iter().collect();
        total += 1;
        let Ok(rule) = parse_rule(&text, &vars) else {
            continue;
        };
        ok += 1;
        let again = parse_rule(&rule.to_string(), &Vars::new())
            .unwrap_or_else(|e| panic!("canonical text of `{text}` does not parse: {e}\n{rule}"));
        assert_eq!(again, rule, "round trip of `{text}`");
        ally_dpi::engine::matcher::Program::new(&rule).unwrap();
    }
    // Most mutants break the syntax; enough survive to exercise the round trip.
    assert!(ok > total / 50, "{ok}/{total} mutants parsed");
}

/// CRC-32 (IEEE, reflected), as the blob uses, so tests can forge blobs with a valid checksum.
fn crc32(data: &[u8]) -> u32 {
    let mut h = 0xffff_ffffu32;
    for &byte in data {
        h ^= u32::from(byte);
        for _ in 0..8 {
            h = if h & 1 != 0 {
                (h >> 1) ^ 0xedb8_8320
            } else {
                h >> 1
            };
        }
    }
    !h
}

/// Corrupted blobs (with and without a fixed-up checksum) are refused with an error, never a
/// panic, and never load something other than what was encoded.
#[test]
fn corrupted_blobs_never_panic() {
    let p = parse_rules(
        "alert tcp any any -> any 80 (msg:\"a\"; content:\"x|00|\"; pcre:\"/y+/i\"; sid:1;)\n\
         drop udp any any -> any 53 (content:\"q\",nocase; dsize:>2; byte_test:1,>,3,0; sid:2;)\n",
        &Vars::new(),
    );
    let good = blob::encode(&p.rules);
    let mut x = 0xdead_beef_cafe_f00du64;
    let mut rnd = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let (mut refused, mut accepted) = (0, 0);
    for round in 0..5000 {
        let mut b = good.clone();
        for _ in 0..1 + rnd(3) {
            let at = rnd(b.len());
            b[at] = rnd(256) as u8;
        }
        if round % 3 == 0 {
            b.truncate(rnd(b.len() + 1));
        }
        if round % 2 == 0 && b.len() >= 24 {
            let plen = (b.len() - 24) as u32;
            b[16..20].copy_from_slice(&plen.to_le_bytes());
            let c = crc32(&b[24..]);
            b[20..24].copy_from_slice(&c.to_le_bytes());
        }
        match blob::decode(&b) {
            Ok(rules) => {
                accepted += 1;
                // Only a mutation that keeps every record parseable can load; it must then
                // build an engine.
                Engine::new(rules, EngineConfig::default()).unwrap();
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    assert!(refused > 4000, "{refused} refused, {accepted} accepted");
}

/// A TSO super-frame has IP length 0 (the NIC fills it in per segment); a bogus length must not
/// hide bytes either: both are inspected to the end of the frame.
#[test]
fn tso_and_bogus_ip_lengths_are_still_inspected() {
    let mut e = engine("drop tcp any any -> any any (content:\"SECRET-UPLOAD\"; sid:1;)");
    let mut payload = vec![b'x'; 30_000];
    payload[25_000..25_013].copy_from_slice(b"SECRET-UPLOAD");
    let mut v4 = frame(
        "10.0.0.1",
        "10.0.0.2",
        6,
        &tcp_hdr(1, 80, PSH_ACK),
        &payload,
    );
    v4[16..18].copy_from_slice(&0u16.to_be_bytes()); // IPv4 total length 0 (TSO)
    assert_eq!(
        e.inspect(&v4, Direction::ToWire, Timestamp(0), &mut NullSink),
        Verdict::Drop
    );
    let mut long = tcp(1, 80, b"....SECRET-UPLOAD....");
    long[16..18].copy_from_slice(&9000u16.to_be_bytes()); // claims more than the frame
    assert_eq!(
        e.inspect(&long, Direction::ToWire, Timestamp(0), &mut NullSink),
        Verdict::Drop
    );
    let mut v6 = frame(
        "2001:db8::1",
        "2001:db8::2",
        6,
        &tcp_hdr(1, 80, PSH_ACK),
        &payload,
    );
    v6[18..20].copy_from_slice(&0u16.to_be_bytes()); // IPv6 payload length 0 (TSO)
    assert_eq!(
        e.inspect(&v6, Direction::ToWire, Timestamp(0), &mut NullSink),
        Verdict::Drop
    );
}

#[test]
fn ip_and_tcp_header_fields() {
    // The test frames carry TTL 64, id 0, DF set, TCP seq 1 and ack 1.
    let f = tcp(1, 80, b"x");
    for (opts, want) in [
        ("ttl:64", true),
        ("ttl:<10", false),
        ("ttl:60<>70", true),
        ("id:0", true),
        ("id:1", false),
        ("ip_proto:6", true),
        ("ip_proto:tcp", true),
        ("ip_proto:!6", false),
        ("fragbits:D", true),
        ("fragbits:M", false),
        ("fragbits:M+", false),
        ("fragbits:!M", true),
        ("fragbits:*MD", true),
        ("seq:1", true),
        ("ack:2", false),
        ("ack:>0", true),
    ] {
        let mut e = engine(&format!("alert ip any any -> any any ({opts}; sid:1;)"));
        let got = e.inspect(&f, Direction::ToWire, Timestamp(0), &mut NullSink) == Verdict::Alert;
        assert_eq!(got, want, "{opts}");
    }
    // seq/ack never match non-TCP packets.
    let mut e = engine("alert ip any any -> any any (seq:0; sid:1;)");
    assert_eq!(
        e.inspect(
            &udp(1, 2, b"x"),
            Direction::ToWire,
            Timestamp(0),
            &mut NullSink
        ),
        Verdict::Pass
    );
    let v = Vars::new();
    let r = parse_rule("alert ip any any -> any any (ttl:<5; id:!7; ip_proto:udp; fragbits:+MD; seq:9; ack:1<>3; sid:2;)", &v).unwrap();
    assert_eq!(parse_rule(&r.to_string(), &v).unwrap(), r);
    assert!(matches!(refused("fragbits:X"), RuleError::BadOption { .. }));
}

/// `ip` rules with `ip_proto` are only placed in the groups of that protocol (and of packets
/// whose L4 header did not decode); they must still match those packets.
#[test]
fn ip_proto_rules_reach_their_packets() {
    let mut e = engine(
        "alert ip any any -> any any (ip_proto:2; sid:1;)\n\
         alert ip any any -> any any (ip_proto:6; content:\"zz\"; sid:2;)\n\
         alert ip any any -> any any (ip_proto:17; sid:3;)\n",
    );
    let mut sids = |f: &[u8]| {
        let mut c = Collect::default();
        e.inspect(f, Direction::FromWire, Timestamp(0), &mut c);
        let mut v: Vec<u32> = c.alerts.iter().map(|a| a.0).collect();
        v.sort();
        v
    };
    let igmp = frame(
        "10.0.0.1",
        "224.0.0.1",
        2,
        &[0x11, 0, 0, 0, 0, 0, 0, 0],
        b"",
    );
    assert_eq!(sids(&igmp), vec![1]);
    assert_eq!(sids(&tcp(1, 2, b"zz")), vec![2]);
    assert_eq!(sids(&udp(1, 2, b"zz")), vec![3]);
    // A TCP packet whose header is cut short lands in the "other" class; ip_proto:6 still sees it.
    let cut = frame("10.0.0.1", "10.0.0.2", 6, &[0, 1, 0, 2, 0, 0], b"zz");
    assert_eq!(sids(&cut), vec![2]);
}
