//! byte_extract and byte_math variables (in content offset/depth/distance/within, byte_test,
//! byte_jump, isdataat, byte_math), base64_decode/base64_data: positive and negative cases,
//! backtracking through a variable, guest values out of range, malformed options, the
//! evaluation bound.

use ally_dpi::engine::rules::{parse_rule, parse_rules, RuleError};
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{Direction, Engine, EngineConfig, Inspector, NullSink, Timestamp, Verdict};

mod support;
use support::{seg, Collect, CISN, PSH_ACK, SISN};

fn engine(rules: &str) -> Engine {
    let p = parse_rules(rules, &Vars::snort_defaults());
    assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected);
    Engine::new(p.rules, EngineConfig::default()).unwrap()
}

/// Whether a single `alert tcp any any -> any any (<opts>; sid:1;)` rule fires on `payload`.
fn hits(opts: &str, payload: &[u8]) -> bool {
    let mut e = engine(&format!("alert tcp any any -> any any ({opts}; sid:1;)"));
    let frame = seg(true, PSH_ACK, CISN, SISN, payload);
    e.inspect(&frame, Direction::ToWire, Timestamp(0), &mut NullSink) == Verdict::Alert
}

/// The error of a rule with `opts` that must not load.
fn refused(opts: &str) -> RuleError {
    parse_rule(
        &format!("alert tcp any any -> any any ({opts}; sid:1;)"),
        &Vars::new(),
    )
    .unwrap_err()
}

/// The option a refusal names.
fn refused_option(opts: &str) -> String {
    match refused(opts) {
        RuleError::BadOption { option, .. } => option,
        RuleError::Unsupported(o) => o.join(","),
        e => panic!("`{opts}`: unexpected {e:?}"),
    }
}

#[test]
fn byte_extract_in_content_modifiers() {
    // within: the length prefix bounds the match.
    let opts = r#"byte_extract:2,0,len; content:"hello",within len"#;
    assert!(hits(opts, b"\x00\x05hello world"));
    assert!(!hits(opts, b"\x00\x04hello world"));
    // offset (and a literal depth with it).
    let opts = r#"byte_extract:1,1,n; content:"o",offset n,depth 1"#;
    assert!(hits(opts, b"\x00\x06hello"));
    assert!(!hits(opts, b"\x00\x05hello"));
    // depth.
    let opts = r#"byte_extract:1,0,n; content:"hello",depth n"#;
    assert!(hits(opts, b"\x07\x00hello"));
    assert!(!hits(opts, b"\x06\x00hello"));
    // distance: the cursor is after the byte read.
    let opts = r#"byte_extract:1,0,skip; content:"XYZ",distance skip,within 3"#;
    assert!(hits(opts, b"\x03abcXYZ"));
    assert!(!hits(opts, b"\x02abcXYZ"));
    // Snort 2 style modifiers take variables too.
    let opts = r#"byte_extract:1,0,skip; content:"XYZ"; distance:skip; within:3"#;
    assert!(hits(opts, b"\x03abcXYZ"));
    assert!(!hits(opts, b"\x01abcXYZ"));
}

#[test]
fn byte_extract_in_byte_options_and_isdataat() {
    // byte_test value and offset.
    assert!(hits(
        "byte_extract:1,0,v; byte_test:1,=,v,3",
        b"\x07\x02\x00\x07"
    ));
    assert!(!hits(
        "byte_extract:1,0,v; byte_test:1,=,v,3",
        b"\x07\x02\x00\x08"
    ));
    assert!(hits(
        "byte_extract:1,0,o; byte_test:1,=,9,o",
        b"\x03\x00\x00\x09"
    ));
    assert!(!hits(
        "byte_extract:1,0,o; byte_test:1,=,9,o",
        b"\x02\x00\x00\x09"
    ));
    // byte_jump offset.
    let opts = r#"byte_extract:1,0,o; byte_jump:1,o; content:"Z",distance 0,within 1"#;
    assert!(hits(opts, b"\x02\x00\x01.Z"));
    assert!(!hits(opts, b"\x01\x00\x01.Z"));
    // isdataat, as community rule 46076 uses it: a length that runs past the end.
    let rule = "byte_extract:1,0,len,relative; isdataat:!len,relative; isdataat:len";
    assert!(hits(rule, b"\x03abc"));
    assert!(!hits(rule, b"\x02abc"));
    // relative + the cursor moving past the bytes read.
    let opts = r#"content:"L"; byte_extract:2,0,n,relative,little; byte_test:1,=,n,0,relative"#;
    assert!(hits(opts, b"xL\x05\x00\x05"));
    assert!(!hits(opts, b"xL\x05\x00\x06"));
}

#[test]
fn byte_extract_modifiers() {
    // multiplier, then align (round up).
    assert!(hits(
        "byte_extract:1,0,v,multiplier 2,align 4; byte_test:1,=,v,1",
        b"\x03\x08"
    ));
    assert!(!hits(
        "byte_extract:1,0,v,multiplier 2; byte_test:1,=,v,1",
        b"\x03\x08"
    ));
    assert!(hits(
        "byte_extract:1,0,v,multiplier 2; byte_test:1,=,v,1",
        b"\x03\x06"
    ));
    // bitmask (shifted down by its trailing zeros).
    assert!(hits(
        "byte_extract:1,0,v,bitmask 0xF0; byte_test:1,=,v,1",
        b"\xF3\x0F"
    ));
    // string, dec / hex.
    assert!(hits(
        "byte_extract:2,0,n,string,dec; isdataat:!n",
        b"12:abc"
    ));
    assert!(!hits(
        "byte_extract:2,0,n,string,dec; isdataat:!n",
        b"05:abc"
    ));
    assert!(hits(
        "byte_extract:2,0,n,string,hex; isdataat:n",
        b"0Aabcdefghijk"
    ));
    // Suricata's `dec` without a preceding `string` is refused with the option's name.
    assert_eq!(refused_option("byte_extract:2,0,n,dec"), "byte_extract");
}

#[test]
fn extracted_values_out_of_range_fail_without_panicking() {
    let max = b"\xff\xff\xff\xffabc";
    // The multiplied value does not fit 32 bits: no match (wrapping would make `!v` hold).
    assert!(!hits("byte_extract:4,0,v,multiplier 2; isdataat:!v", max));
    assert!(hits("byte_extract:4,0,v; isdataat:!v", max));
    assert!(!hits("byte_extract:4,0,v,align 4; isdataat:!v", max));
    // Huge windows: no match, or the window clamped to the buffer.
    assert!(!hits(
        r#"byte_extract:4,0,d; content:"abc",distance d"#,
        max
    ));
    assert!(!hits(r#"byte_extract:4,0,d; content:"abc",offset d"#, max));
    assert!(hits(r#"byte_extract:4,0,d; content:"abc",depth d"#, max));
    assert!(hits(r#"byte_extract:4,0,d; content:"abc",within d"#, max));
    assert!(!hits("byte_extract:4,0,d; byte_test:1,=,0,d", max));
    assert!(!hits("byte_extract:4,0,d; byte_jump:1,d", max));
    assert!(!hits("byte_extract:4,0,d; isdataat:d,relative", max));
    // Bytes outside the buffer.
    assert!(!hits("byte_extract:4,5,v", max));
    assert!(!hits(r#"content:"a"; byte_extract:1,-9,v,relative"#, max));
    assert!(!hits("byte_extract:3,0,v,string,dec", b"abc"));
}

/// A retry of an earlier content re-extracts the variable and re-evaluates every later step
/// with its new value.
#[test]
fn backtracking_re_extracts_variables() {
    let opts = r#"content:"L"; byte_extract:1,0,n,relative; content:"XY",distance 0,within n"#;
    assert!(hits(opts, b"L\x01abcdefgL\x02XY"));
    assert!(!hits(opts, b"L\x01abcdefgL\x01XY"));
    // The step after `B` is reached at the same cursor with n = 1, then n = 9: a memo of
    // (step, cursor) alone would wrongly remember the first failure.
    let opts =
        r#"content:"A"; byte_extract:1,0,n,relative; content:"B"; content:"C",distance 0,within n"#;
    assert!(hits(opts, b"A\x01xxA\x09xxB..C"));
    assert!(!hits(opts, b"A\x01xxA\x02xxB..C"));
}

#[test]
fn byte_math_operators() {
    let p = b"\x00\x03abcdef"; // 8 bytes, value 3
    let m = |oper: &str, rvalue: &str| {
        format!("byte_math:bytes 2, offset 0, oper {oper}, rvalue {rvalue}, result r")
    };
    assert!(hits(&format!("{}; isdataat:r", m("+", "4")), p));
    assert!(!hits(&format!("{}; isdataat:r", m("+", "5")), p));
    assert!(hits(&format!("{}; isdataat:!r", m("*", "3")), p));
    assert!(hits(&format!("{}; isdataat:!r", m("<<", "3")), p));
    assert!(hits(&format!("{}; isdataat:r", m(">>", "1")), p));
    assert!(hits(&format!("{}; isdataat:r", m("/", "3")), p));
    assert!(hits(&format!("{}; isdataat:r", m("-", "1")), p));
    // Below zero, above 32 bits, division by a variable 0: no match either way.
    assert!(!hits(&format!("{}; isdataat:!r", m("-", "4")), p));
    assert!(!hits(&format!("{}; isdataat:r", m("-", "4")), p));
    let big = b"\xff\xff\xff\xff\x00";
    let wide = "byte_math:bytes 4,offset 0,oper <<,rvalue 1,result r; isdataat:!r";
    assert!(!hits(wide, big));
    let wide = "byte_math:bytes 4,offset 0,oper +,rvalue 1,result r; isdataat:!r";
    assert!(!hits(wide, big));
    let div0 =
        "byte_extract:1,4,z; byte_math:bytes 1,offset 0,oper /,rvalue z,result r; isdataat:!r";
    assert!(!hits(div0, big));
    let shift = "byte_extract:1,0,z; byte_math:bytes 1,offset 1,oper >>,rvalue z,result r";
    assert!(!hits(shift, b"\x40\x01"));
    assert!(hits(shift, b"\x1f\x01"));
    // The result in content and byte_test; relative, endian, string, bitmask.
    let opts = r#"content:"K"; byte_math:bytes 1,offset 0,oper +,rvalue 1,result r,relative; content:"Z",distance r,within 1"#;
    assert!(hits(opts, b"K\x02..Z"));
    assert!(!hits(opts, b"K\x03..Z"));
    let opts =
        "byte_math:bytes 2,offset 0,oper -,rvalue 1,result r,endian little; byte_test:1,=,r,2";
    assert!(hits(opts, b"\x05\x00\x04"));
    let opts = "byte_math:bytes 2,offset 0,oper *,rvalue 2,result r,string dec; byte_test:1,=,r,2";
    assert!(hits(opts, b"12\x18"));
    let opts =
        "byte_math:bytes 1,offset 0,oper +,rvalue 0x10,result r,bitmask 0x0c; byte_test:1,=,r,1";
    assert!(hits(opts, b"\x0f\x13"));
}

#[test]
fn variables_per_rule_and_their_errors() {
    // Community rule 45977's shape: two variables, the same name defined again (36611).
    let opts = "byte_extract:1,0,a; byte_extract:1,1,b; byte_test:1,=,a,2; byte_test:1,=,b,3";
    assert!(hits(opts, b"\x01\x02\x01\x02"));
    assert!(!hits(opts, b"\x01\x02\x02\x01"));
    let again = r#"byte_extract:1,0,n; content:"x",distance n,within 1; byte_extract:1,0,n,relative; content:"y",distance n,within 1"#;
    assert!(hits(again, b"\x01.x\x01.y"));
    assert!(!hits(again, b"\x01.x\x02.y"));
    // The bound.
    let five = "byte_extract:1,0,a; byte_extract:1,0,b; byte_extract:1,0,c; byte_extract:1,0,d; byte_math:bytes 1,offset 0,oper +,rvalue 1,result e";
    match refused(five) {
        RuleError::BadOption { option, reason } => {
            assert_eq!(option, "byte_math");
            assert!(reason.contains("more than 4"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    let four = "byte_extract:1,0,a; byte_extract:1,0,b; byte_extract:1,0,c; byte_extract:1,0,d; isdataat:d";
    assert!(hits(four, b"\x01\x02"));
    // A name used before (or without) its definition names the option that uses it.
    assert_eq!(
        refused_option(r#"content:"a",within n; byte_extract:1,0,n"#),
        "within"
    );
    assert_eq!(refused_option("byte_test:1,=,nope,0"), "byte_test");
    assert_eq!(refused_option("byte_jump:1,nope"), "byte_jump");
    assert_eq!(refused_option("isdataat:nope"), "isdataat");
    assert_eq!(refused_option(r#"content:"a",offset nope"#), "offset");
    assert_eq!(refused_option(r#"content:"a"; depth:nope"#), "depth");
    // Variables where only numbers are allowed.
    assert_eq!(
        refused_option("byte_extract:1,0,n; byte_jump:1,0,post_offset n"),
        "byte_jump"
    );
    // Absolute and relative variables mixed on one content.
    assert_eq!(
        refused_option(r#"byte_extract:1,0,n; content:"a",offset n,distance 1"#),
        "content"
    );
}

#[test]
fn malformed_byte_extract_and_byte_math_are_refused() {
    for (opts, option) in [
        ("byte_extract:5,0,x", "byte_extract"),
        ("byte_extract:0,0,x", "byte_extract"),
        ("byte_extract:11,0,x,string", "byte_extract"),
        ("byte_extract:2,0", "byte_extract"),
        ("byte_extract:2,0,1x", "byte_extract"),
        ("byte_extract:2,0,x-y", "byte_extract"),
        ("byte_extract:2,zz,x", "byte_extract"),
        ("byte_extract:2,0,x,align 3", "byte_extract"),
        ("byte_extract:2,0,x,multiplier 0", "byte_extract"),
        ("byte_extract:2,0,x,multiplier 65536", "byte_extract"),
        ("byte_extract:2,0,x,bitmask 0x10000", "byte_extract"),
        ("byte_extract:2,0,x,frobnicate", "byte_extract"),
        ("byte_extract:2,0,x,dce", "byte_extract:dce"),
        (
            "byte_math:bytes 2,offset 0,oper %,rvalue 1,result r",
            "byte_math",
        ),
        ("byte_math:bytes 2,offset 0,oper +,rvalue 1", "byte_math"),
        (
            "byte_math:bytes 5,offset 0,oper +,rvalue 1,result r",
            "byte_math",
        ),
        (
            "byte_math:bytes 2,offset 0,oper /,rvalue 0,result r",
            "byte_math",
        ),
        (
            "byte_math:bytes 2,offset 0,oper <<,rvalue 32,result r",
            "byte_math",
        ),
        (
            "byte_math:bytes 2,offset 0,oper +,rvalue -1,result r",
            "byte_math",
        ),
        (
            "byte_math:bytes 2,offset 0,oper +,rvalue 1,result r,endian middle",
            "byte_math",
        ),
        (
            "byte_math:bytes 2,offset 0,oper +,rvalue 1,result r,string bin",
            "byte_math",
        ),
        (
            "byte_math:bytes 2,offset 0,oper +,rvalue 1,result r,dce",
            "byte_math:dce",
        ),
        (
            "byte_math:bytes 2,offset 0,oper +,rvalue 1,result r,x 1",
            "byte_math",
        ),
        ("base64_decode:bytes 0", "base64_decode"),
        ("base64_decode:bytes x", "base64_decode"),
        ("base64_decode:offset -1", "base64_decode"),
        ("base64_decode:sideways", "base64_decode"),
        ("base64_data", "base64_data"),
        ("base64_decode; base64_data:1", "base64_data"),
    ] {
        assert_eq!(refused_option(opts), option, "{opts}");
    }
}

const LOG4J: &[u8] =
    b"GET / HTTP/1.1\r\nAuthorization: Basic JHtqbmRpOmxkYXA6Ly94fQ==\r\nHost: a\r\n\r\n";

#[test]
fn base64_decode_and_data() {
    // Community rule 58795's shape: decode after a header prefix, match in the decoded bytes.
    let opts = r#"content:"Basic "; base64_decode:relative; base64_data; content:"${jndi:ldap""#;
    assert!(hits(opts, LOG4J));
    assert!(!hits(
        opts,
        b"GET / HTTP/1.1\r\nAuthorization: Basic dXNlcjpodW50ZXIy\r\n\r\n"
    ));
    // The decoded buffer starts at 0 for depth; pkt_data goes back to the packet.
    assert!(hits(
        r#"content:"Basic "; base64_decode:relative; base64_data; content:"${",depth 2; pkt_data; content:"Host""#,
        LOG4J
    ));
    assert!(!hits(
        r#"content:"Basic "; base64_decode:relative; base64_data; content:"jndi",depth 4"#,
        LOG4J
    ));
    // bytes and offset bound the text read.
    assert!(hits(
        r#"content:"Basic "; base64_decode:bytes 4,relative; base64_data; content:"${j""#,
        LOG4J
    ));
    assert!(!hits(
        r#"content:"Basic "; base64_decode:bytes 4,relative; base64_data; content:"${jn""#,
        LOG4J
    ));
    assert!(hits(
        r#"base64_decode:offset 2; base64_data; content:"secret""#,
        b"::dGhlIHNlY3JldA=="
    ));
    // White space and line breaks inside the text are skipped; padding is optional.
    assert!(hits(
        r#"base64_decode; base64_data; content:"the secret""#,
        b"dGhl IHNl\r\n Y3JldA"
    ));
    assert!(hits(
        r#"base64_decode; base64_data; content:"abcd""#,
        b"YWJjZA"
    ));
    // The text ends at the first byte outside the alphabet.
    assert!(!hits(
        r#"base64_decode; base64_data; content:"abcd""#,
        b"YW!JjZA"
    ));
    // Nothing decoded: the step fails (even before a negated content).
    assert!(!hits(
        r#"base64_decode; base64_data; content:!"x""#,
        b"!!!!"
    ));
    assert!(!hits(
        r#"base64_decode:offset 9; base64_data; content:!"x""#,
        b"YWJjZA"
    ));
    // A variable extracted from the decoded bytes.
    assert!(hits(
        r#"base64_decode; base64_data; byte_extract:1,0,n,string,dec; content:"d",distance n,within 1"#,
        b"M2FiY2Q=" // "3abcd"
    ));
    assert!(!hits(
        r#"base64_decode; base64_data; byte_extract:1,0,n,string,dec; content:"d",distance n,within 1"#,
        b"MmFiY2Q=" // "2abcd"
    ));
}

/// A rule whose only content is in the decoded bytes is a candidate for every packet (the
/// prefilter cannot see decoded bytes); with another content that one is the fast pattern.
#[test]
fn base64_contents_are_not_fast_patterns() {
    let r = parse_rule(
        r#"alert tcp any any -> any any (base64_decode; base64_data; content:"the secret",fast_pattern; sid:1;)"#,
        &Vars::new(),
    )
    .unwrap();
    assert!(r.fast_pattern().is_none());
    let r = parse_rule(
        r#"alert tcp any any -> any any (content:"Basic "; base64_decode:relative; base64_data; content:"the long secret"; sid:1;)"#,
        &Vars::new(),
    )
    .unwrap();
    assert_eq!(r.fast_pattern().unwrap().bytes, b"Basic ");
    assert!(hits(
        r#"base64_decode; base64_data; content:"the secret",fast_pattern"#,
        b"dGhlIHNlY3JldA=="
    ));
}

#[test]
fn new_options_round_trip_through_canonical_text() {
    let v = Vars::new();
    for r in [
        r#"alert tcp any any -> any any (content:"a"; byte_extract:2,-1,len,relative,little,multiplier 4,align 2,bitmask 0x7ff0; content:"b",distance len,within len; sid:1;)"#,
        r#"alert tcp any any -> any any (byte_extract:3,0,o,string,hex; content:"b",offset o,depth o; byte_test:2,>=,o,o,relative; byte_jump:1,o; isdataat:!o,relative; sid:2;)"#,
        r#"alert tcp any any -> any any (byte_extract:1,0,x; byte_math:bytes 4,offset x,oper <<,rvalue x,result y,relative,endian little,string oct,bitmask 0xff; isdataat:y; sid:3;)"#,
        r#"alert tcp any any -> any any (content:"Basic "; base64_decode:bytes 10,offset 2,relative; base64_data; content:"x"; pkt_data; base64_decode; sid:4;)"#,
    ] {
        let a = parse_rule(r, &v).unwrap();
        let text = a.to_string();
        assert_eq!(parse_rule(&text, &v).unwrap(), a, "{text}");
    }
}

/// Steps between a variable and its last use are not memoised, so their work is bounded by the evaluation
/// budget instead: a payload that makes the search explode is decided by the rule's action
/// (drop: matches) and counted as `pcre_limit`, like a pcre that runs out of steps.
#[test]
fn variable_steps_are_bounded_by_the_evaluation_budget() {
    let body = r#"content:"a"; byte_extract:1,0,n,relative; content:"a",distance 0; content:"a",distance 0; content:"b",distance 0,within n"#;
    let rules = format!(
        "drop tcp any any -> any any ({body}; sid:1;)\nalert tcp any any -> any any ({body}; sid:2;)"
    );
    let mut e = engine(&rules);
    let mut sink = Collect::default();
    // A `b` before the run gets past the check that every content is somewhere in the payload.
    let mut evil = vec![b'b'];
    evil.extend_from_slice(&[b'a'; 1399]);
    let evil = seg(true, PSH_ACK, CISN, SISN, &evil);
    let start = std::time::Instant::now();
    let v = e.inspect(&evil, Direction::ToWire, Timestamp(0), &mut sink);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(sink.sid_actions(), vec![(1, "blocked")]);
    assert_eq!(e.stats().pcre_limit, 2);
    assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
    // The same rules decide ordinary traffic normally and count nothing more.
    let fine = seg(true, PSH_ACK, CISN + 1400, SISN, b"a\x01aab");
    let v = e.inspect(&fine, Direction::ToWire, Timestamp(0), &mut sink);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(e.stats().pcre_limit, 2);
    let none = seg(true, PSH_ACK, CISN + 1405, SISN, b"a\x01aac");
    assert_eq!(
        e.inspect(&none, Direction::ToWire, Timestamp(0), &mut sink),
        Verdict::Pass
    );
}
