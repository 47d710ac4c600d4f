//! Application protocols end to end: Suricata protocol headers (`alert http/dns/tls/smtp/ssh`),
//! `dns.query`, `tls.sni`, Snort's `ssl_state`/`ssl_version`, and their EVE records. Rules go
//! through the blob, frames through `Engine::inspect`.

use ally_dpi::engine::blob;
use ally_dpi::engine::eve::{parse_mgmt_line, MgmtLine};
use ally_dpi::engine::rules::{parse_rule, parse_rules, AppBuffer, AppProto, PayloadOp, RuleError};
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    Direction, Engine, EngineConfig, Inspector, MgmtWriter, NullSink, Timestamp, Verdict,
};

mod support;
use support::{seg, Collect, ACK, CISN, PSH_ACK, SISN, SYN};

fn engine(rules: &str) -> Engine {
    let p = parse_rules(rules, &Vars::snort_defaults());
    assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected);
    let back = blob::decode(&blob::encode(&p.rules)).unwrap();
    assert_eq!(back, p.rules);
    Engine::new(back, EngineConfig::default()).unwrap()
}

/// IPv4 10.0.0.1 -> 10.0.0.2 with an L4 header and payload.
fn ipv4(proto: u8, l4: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00, 0x45, 0];
    f.extend_from_slice(&((20 + l4.len() + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(l4);
    f.extend_from_slice(payload);
    f
}

fn udp(dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = 40000u16.to_be_bytes().to_vec();
    h.extend_from_slice(&dp.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    ipv4(17, &h, payload)
}

/// A TCP segment judged on its own (no flow), to port `dp`.
fn tcp(dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = 40000u16.to_be_bytes().to_vec();
    h.extend_from_slice(&dp.to_be_bytes());
    h.extend_from_slice(&[
        0, 0, 0, 1, 0, 0, 0, 1, 0x50, PSH_ACK, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    ipv4(6, &h, payload)
}

fn sids(e: &mut Engine, frames: &[Vec<u8>]) -> Vec<u32> {
    let mut c = Collect::default();
    for f in frames {
        e.inspect(f, Direction::ToWire, Timestamp(0), &mut c);
    }
    c.sids()
}

fn hits(rule: &str, frame: &[u8]) -> bool {
    let mut e = engine(rule);
    e.inspect(frame, Direction::ToWire, Timestamp(0), &mut NullSink) == Verdict::Alert
}

/// A DNS query message (id 0x1234, RD) with one question per wire-form name, type A class IN.
fn dns_query(names: &[&[u8]]) -> Vec<u8> {
    let mut m = vec![
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
        0,
    ];
    for n in names {
        m.extend_from_slice(n);
        m.extend_from_slice(&[0, 1, 0, 1]);
    }
    m
}

fn with_len(m: &[u8]) -> Vec<u8> {
    let mut t = (m.len() as u16).to_be_bytes().to_vec();
    t.extend_from_slice(m);
    t
}

/// A TLS record (version 3.1) with a ClientHello (version 3.3) naming `sni`.
fn client_hello(sni: &[u8]) -> Vec<u8> {
    let mut ext = vec![0, 11, 0, 2, 1, 0, 0, 0];
    ext.extend_from_slice(&((sni.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((sni.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x42; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

const EVIL: &[u8] = b"\x03www\x04evil\x07example\x00";

#[test]
fn dns_query_is_the_dotted_name_over_udp_and_tcp() {
    let r = "alert dns $HOME_NET any -> any any (msg:\"q\"; dns.query; content:\"evil.example\"; nocase; sid:1;)";
    assert!(hits(r, &udp(53, &dns_query(&[EVIL]))));
    // Any port, and DNS over TCP with its length prefix.
    assert!(hits(r, &udp(5353, &dns_query(&[EVIL]))));
    assert!(hits(r, &tcp(53, &with_len(&dns_query(&[EVIL])))));
    // Upper case in the name, nocase.
    assert!(hits(r, &udp(53, &dns_query(&[b"\x04EVIL\x07EXAMPLE\x00"]))));
    // The second question matches.
    assert!(hits(r, &udp(53, &dns_query(&[b"\x01a\x00", EVIL]))));
    // No dot between the labels: not the name.
    assert!(!hits(r, &udp(53, &dns_query(&[b"\x0bevilexample\x00"]))));
    // The words in a non-DNS payload.
    assert!(!hits(r, &udp(53, b"lookup evil.example please")));
    // TCP without the length prefix is not DNS.
    assert!(!hits(r, &tcp(53, &dns_query(&[EVIL]))));
    // The label bytes are not dotted in the payload, so a plain content does not see the name.
    assert!(!hits(
        "alert udp any any -> any any (content:\"evil.example\"; sid:1;)",
        &udp(53, &dns_query(&[EVIL]))
    ));
    // Legacy name, buffer length, and pkt_data back to the message.
    let r = "alert udp any any -> any 53 (dns_query; content:\"www.\"; bufferlen:16; pkt_data; content:\"|12 34|\"; depth:2; sid:2;)";
    assert!(hits(r, &udp(53, &dns_query(&[EVIL]))));
    assert!(!hits(r, &udp(53, &dns_query(&[b"\x03www\x01x\x00"]))));
}

#[test]
fn dns_compression_follows_backward_pointers_and_refuses_loops() {
    let r = "alert dns any any -> any any (dns.query; content:\"mail.evil.example\"; sid:1;)";
    // "mail" + pointer to the first name (offset 12).
    assert!(hits(r, &udp(53, &dns_query(&[EVIL, b"\x04mail\xC0\x10"]))));
    // A pointer to itself, a forward pointer, a loop: not DNS, no match, no panic.
    for names in [
        vec![&b"\x04mail\xC0\x11"[..]],
        vec![&b"\xC0\x0C"[..]],
        vec![&b"\x01a\xC0\x16"[..], &b"\x01b\xC0\x0C"[..]],
    ] {
        let m = dns_query(&names);
        assert!(!hits(r, &udp(53, &m)));
        assert!(!hits(
            "alert dns any any -> any any (dns.query; content:\"a\"; sid:1;)",
            &udp(53, &m)
        ));
    }
    // Truncated messages.
    let m = dns_query(&[b"\x04mail\x04evil\x07example\x00"]);
    for cut in 0..m.len() {
        assert!(!hits(r, &udp(53, &m[..cut])), "cut {cut}");
    }
}

#[test]
fn tls_sni_from_the_client_hello() {
    let r = "alert tls $HOME_NET any -> $EXTERNAL_NET any (msg:\"sni\"; flow:to_server; tls.sni; content:\"evil.example\"; sid:1;)";
    let ch = client_hello(b"cdn.evil.example");
    // flow:to_server needs a flow: the client's handshake first.
    let mut e = engine(r);
    let frames = [
        seg(true, SYN, CISN, 0, b""),
        seg(false, SYN | ACK, SISN, CISN + 1, b""),
        seg(true, ACK, CISN + 1, SISN + 1, b""),
        seg(true, PSH_ACK, CISN + 1, SISN + 1, &ch),
    ];
    assert_eq!(sids(&mut e, &frames), vec![1]);
    // Without flow: any port, legacy name.
    let r = "alert tls any any -> any any (tls_sni; content:\"evil\"; sid:2;)";
    assert!(hits(r, &tcp(8443, &ch)));
    assert!(!hits(r, &tcp(443, &client_hello(b"good.example"))));
    // Cut before the end of the name: no SNI; garbage: not TLS.
    assert!(!hits(r, &tcp(443, &ch[..ch.len() - 1])));
    assert!(!hits(r, &tcp(443, b"GET /evil HTTP/1.1\r\n\r\n")));
    // A ClientHello without SNI makes the buffer absent, even for a negated content.
    let mut no_sni = ch.clone();
    let at = no_sni.len() - (b"cdn.evil.example".len() + 9);
    no_sni[at + 1] = 0x99; // extension type 0 -> 0x0099
    assert!(!hits(
        "alert tls any any -> any any (tls.sni; content:!\"zzz\"; sid:3;)",
        &tcp(443, &no_sni)
    ));
    assert!(hits(
        "alert tls any any -> any any (tls.sni; content:!\"zzz\"; sid:3;)",
        &tcp(443, &ch)
    ));
}

#[test]
fn ssl_state_and_ssl_version_lists_and_negation() {
    let ch = tcp(443, &client_hello(b"a.example"));
    let rule = |o: &str| format!("alert tcp any any -> any 443 ({o}; sid:1;)");
    assert!(hits(&rule("ssl_state:client_hello"), &ch));
    assert!(!hits(&rule("ssl_state:server_hello"), &ch));
    assert!(hits(&rule("ssl_state:server_hello,client_hello"), &ch));
    assert!(!hits(&rule("ssl_state:!client_hello"), &ch));
    assert!(hits(&rule("ssl_state:!client_keyx"), &ch));
    assert!(hits(&rule("ssl_state:server_hello,!client_keyx"), &ch));
    // Record 3.1 and hello 3.3.
    assert!(hits(&rule("ssl_version:tls1.2"), &ch));
    assert!(hits(&rule("ssl_version:tls1.0"), &ch));
    assert!(!hits(&rule("ssl_version:sslv3,tls1.1"), &ch));
    assert!(hits(&rule("ssl_version:!sslv3"), &ch));
    assert!(!hits(&rule("ssl_version:!tls1.2"), &ch));
    // Both, with a content.
    assert!(hits(
        &rule("ssl_state:client_hello; ssl_version:tls1.2; content:\"a.example\""),
        &ch
    ));
    // Server side: ServerHello (3.3) + ServerKeyExchange in one record.
    let sh = tcp(443, &[22, 3, 3, 0, 10, 2, 0, 0, 2, 3, 3, 12, 0, 0, 0]);
    assert!(hits(&rule("ssl_state:server_keyx"), &sh));
    assert!(hits(&rule("ssl_state:!client_hello"), &sh));
    // An SSLv2 CLIENT-HELLO.
    assert!(hits(
        &rule("ssl_version:sslv2; ssl_state:client_hello"),
        &tcp(443, &[0x80, 0x2E, 1, 0, 2, 0, 0x15, 0, 0, 0, 0x10])
    ));
    // Not TLS: even negated lists do not match.
    assert!(!hits(&rule("ssl_state:!client_hello"), &tcp(443, b"hello")));
    assert!(!hits(&rule("ssl_version:!sslv2"), &tcp(443, b"hello")));
    // Bad names.
    for o in ["ssl_state:client_hi", "ssl_version:tls1.3", "ssl_state:"] {
        let e = parse_rule(&rule(o), &Vars::new()).unwrap_err();
        assert!(matches!(e, RuleError::BadOption { .. }), "{o}: {e}");
    }
}

#[test]
fn protocol_headers_match_detected_payloads_on_any_port() {
    let mut e = engine(
        "alert http any any -> any any (content:\"/x\"; sid:1;)\n\
         alert ssh any any -> any any (content:\"OpenSSH\"; sid:2;)\n\
         alert smtp any any -> any any (content:\"evil\"; nocase; sid:3;)\n\
         alert tls any any -> any any (content:\"|16 03|\"; depth:2; sid:4;)\n\
         alert dns any any -> any any (content:\"|12 34|\"; depth:2; sid:5;)\n\
         alert tcp any any -> any any (content:\"/x\"; sid:6;)",
    );
    let mut run = |f: Vec<u8>| sids(&mut e, &[f]);
    assert_eq!(run(tcp(8080, b"GET /x HTTP/1.1\r\n\r\n")), vec![1, 6]);
    assert_eq!(run(tcp(80, b"XGET /x\r\n")), vec![6]);
    assert_eq!(run(tcp(2222, b"SSH-2.0-OpenSSH_9.6\r\n")), vec![2]);
    assert_eq!(run(tcp(22, b"OpenSSH without a banner")), Vec::<u32>::new());
    assert_eq!(run(tcp(2525, b"EHLO evil.example\r\n")), vec![3]);
    assert_eq!(
        run(tcp(2525, b"220 evil.example FTP ready\r\n")),
        Vec::<u32>::new()
    );
    assert_eq!(run(tcp(4443, &client_hello(b"x"))), vec![4]);
    assert_eq!(run(udp(5300, &dns_query(&[EVIL]))), vec![5]);
    // DNS rules do not meet ICMP; the DNS bytes on a TCP port without the prefix are not DNS.
    assert_eq!(
        run(ipv4(1, &[8, 0, 0, 0, 0, 1, 0, 1], &dns_query(&[EVIL]))),
        Vec::<u32>::new()
    );
    assert_eq!(run(tcp(53, &dns_query(&[EVIL]))), Vec::<u32>::new());
}

#[test]
fn detected_protocol_is_kept_per_flow() {
    let mut e = engine("alert ssh any any -> any any (content:\"secret\"; sid:1;)");
    let hs = [
        seg(true, SYN, CISN, 0, b""),
        seg(false, SYN | ACK, SISN, CISN + 1, b""),
        seg(true, ACK, CISN + 1, SISN + 1, b""),
    ];
    let banner = b"SSH-2.0-client\r\n";
    let mut frames = hs.to_vec();
    frames.push(seg(true, PSH_ACK, CISN + 1, SISN + 1, banner));
    frames.push(seg(
        true,
        PSH_ACK,
        CISN + 1 + banner.len() as u32,
        SISN + 1,
        b"binary secret",
    ));
    assert_eq!(sids(&mut e, &frames), vec![1]);
    // The same bytes on a flow that never showed a banner, or without a flow.
    let mut e = engine("alert ssh any any -> any any (content:\"secret\"; sid:1;)");
    let mut frames = hs.to_vec();
    frames.push(seg(true, PSH_ACK, CISN + 1, SISN + 1, b"binary secret"));
    assert_eq!(sids(&mut e, &frames), Vec::<u32>::new());
    let mut e = engine("alert ssh any any -> any any (content:\"secret\"; sid:1;)");
    assert_eq!(
        sids(&mut e, &[tcp(22, b"binary secret")]),
        Vec::<u32>::new()
    );
}

fn eve_of(rule: &str, frame: &[u8]) -> String {
    let mut e = engine(rule);
    let mut w = MgmtWriter::new(String::new());
    e.inspect(frame, Direction::ToWire, Timestamp(1), &mut w);
    let line = w
        .out
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no alert for {rule}"));
    let MgmtLine::Eve(json) = parse_mgmt_line(line).unwrap() else {
        panic!("not eve: {line}");
    };
    json.to_string()
}

#[test]
fn eve_records_carry_app_proto_dns_and_tls() {
    let j = eve_of(
        "alert dns any any -> any any (dns.query; content:\"evil\"; sid:1;)",
        &udp(53, &dns_query(&[b"\x01a\x00", EVIL])),
    );
    assert!(
        j.contains(
            "\"app_proto\":\"dns\",\"dns\":{\"query\":[{\"type\":\"query\",\"id\":4660,\"rrname\":\"a\",\"rrtype\":\"A\"},{\"type\":\"query\",\"id\":4660,\"rrname\":\"www.evil.example\",\"rrtype\":\"A\"}]}"
        ),
        "{j}"
    );
    let j = eve_of(
        "alert tcp any any -> any any (tls.sni; content:\"evil\"; sid:2;)",
        &tcp(443, &client_hello(b"evil.example")),
    );
    assert!(
        j.contains(
            "\"app_proto\":\"tls\",\"tls\":{\"sni\":\"evil.example\",\"version\":\"TLS 1.2\"}"
        ),
        "{j}"
    );
    let j = eve_of(
        "alert ssh any any -> any any (content:\"SSH\"; sid:3;)",
        &tcp(22, b"SSH-2.0-x\r\n"),
    );
    assert!(
        j.contains("\"app_proto\":\"ssh\"") && !j.contains("\"dns\""),
        "{j}"
    );
    let j = eve_of(
        "alert tcp any any -> any any (content:\"SSH\"; sid:4;)",
        &tcp(22, b"SSH-2.0-x\r\n"),
    );
    assert!(!j.contains("app_proto"), "{j}");
}

#[test]
fn headers_and_buffers_are_checked_at_load() {
    let v = Vars::snort_defaults();
    for p in ["ftp", "smb", "tcp-pkt"] {
        let e = parse_rule(&format!("alert {p} any any -> any any (sid:1;)"), &v).unwrap_err();
        assert!(
            e.to_string().contains(&format!("unsupported protocol {p}")),
            "{e}"
        );
    }
    let e = parse_rule("alert foo any any -> any any (sid:1;)", &v).unwrap_err();
    assert!(
        matches!(
            e,
            RuleError::Header {
                field: "protocol",
                ..
            }
        ),
        "{e}"
    );
    for bad in [
        "alert dns any any -> any any (http.uri; content:\"a\"; sid:1;)",
        "alert tcp any any -> any any (tls.sni; content:\"a\"; dns.query; content:\"b\"; sid:1;)",
        "alert tcp any any -> any any (ssl_state:client_hello; http_uri; content:\"a\"; sid:1;)",
        "alert http any any -> any any (dns.query; content:\"a\"; sid:1;)",
        "alert tcp any any -> any any (dns.query:x; sid:1;)",
    ] {
        assert!(parse_rule(bad, &v).is_err(), "{bad}");
    }
    let r = parse_rule(
        "alert dns any any -> any 53 (dns.query; content:\"a\"; sid:1;)",
        &v,
    )
    .unwrap();
    assert_eq!(r.app_proto, Some(AppProto::Dns));
    assert!(r.to_string().starts_with("alert dns any any -> any 53 ("));
}

/// Rule lines as ET Open writes them (from emerging-*.rules, 2024), one per new option or
/// header; each loads and keeps what matters.
#[test]
fn et_open_style_lines_load() {
    let v = Vars::snort_defaults();
    let lines = [
        (
            r#"alert dns $HOME_NET any -> any any (msg:"ET INFO Observed DNS Query to .cloud TLD"; dns.query; content:".cloud"; nocase; fast_pattern; classtype:bad-unknown; sid:2027865; rev:4; metadata:affected_product Any, attack_target Client_Endpoint, created_at 2019_08_13, deployment Perimeter, former_category INFO, signature_severity Major, updated_at 2020_09_17;)"#,
            Some(AppBuffer::DnsQuery),
        ),
        (
            r#"alert udp $HOME_NET any -> any 53 (msg:"ET TROJAN Possible Zeus GameOver Related DGA NXDOMAIN Responses"; dns_query; content:"tiktak"; nocase; classtype:trojan-activity; sid:2018316; rev:3;)"#,
            Some(AppBuffer::DnsQuery),
        ),
        (
            r#"alert tls $HOME_NET any -> $EXTERNAL_NET any (msg:"ET MALWARE Observed Malicious SSL Cert"; flow:established,to_server; tls.sni; content:"evil.example"; classtype:trojan-activity; sid:2030000; rev:1;)"#,
            Some(AppBuffer::TlsSni),
        ),
        (
            r#"alert tls $EXTERNAL_NET any -> $HOME_NET any (msg:"ET POLICY TLS SNI"; flow:established,to_client; tls_sni; content:"ngrok.io"; nocase; classtype:policy-violation; sid:2028571; rev:2;)"#,
            Some(AppBuffer::TlsSni),
        ),
        (
            r#"alert tcp $EXTERNAL_NET any -> $HOME_NET 443 (msg:"GPL MISC SSLv2 Client_Hello overflow attempt"; flow:to_server,established; ssl_state:client_hello; ssl_version:sslv2; content:"|01|"; depth:1; offset:2; classtype:attempted-admin; sid:2102657; rev:5;)"#,
            None,
        ),
        (
            r#"alert tcp $EXTERNAL_NET 443 -> $HOME_NET any (msg:"ET EXPLOIT Possible OpenSSL HeartBleed"; flow:established,from_server; ssl_state:!client_hello,!server_hello; content:"|18 03|"; depth:2; classtype:bad-unknown; sid:2018377; rev:3;)"#,
            None,
        ),
        (
            r#"alert http $HOME_NET any -> $EXTERNAL_NET any (msg:"ET INFO GET to raw IP"; flow:established,to_server; http.method; content:"GET"; http.host; content:"1.2.3.4"; classtype:bad-unknown; sid:2030001; rev:1;)"#,
            None,
        ),
        (
            r#"alert smtp $EXTERNAL_NET any -> $SMTP_SERVERS 25 (msg:"ET EXPLOIT Exim"; flow:established,to_server; content:"MAIL FROM|3a|"; nocase; classtype:attempted-admin; sid:2027442; rev:2;)"#,
            None,
        ),
        (
            r#"alert ssh $EXTERNAL_NET any -> $HOME_NET any (msg:"ET SCAN libssh banner"; flow:established,to_server; content:"SSH-2.0-libssh"; depth:14; classtype:attempted-recon; sid:2026000; rev:1;)"#,
            None,
        ),
    ];
    for (line, buf) in lines {
        let r = parse_rule(line, &v).unwrap_or_else(|e| panic!("{line}: {e}"));
        if let Some(b) = buf {
            assert!(r.ops.contains(&PayloadOp::AppBuffer(b)), "{line}");
        }
        // Canonical text parses back to the same rule.
        assert_eq!(
            parse_rule(&r.to_string(), &Vars::new()).unwrap(),
            r,
            "{line}"
        );
    }
    let p = parse_rule(lines[5].0, &v).unwrap();
    assert_eq!(p.ssl_state.map(|s| (s.want, s.not)), Some((0, 3)));
}

#[test]
fn startswith_endswith_and_bsize() {
    let q = udp(53, &dns_query(&[EVIL]));
    let r = |o: &str| format!("alert dns any any -> any any (dns.query; {o}; sid:1;)");
    assert!(hits(&r("content:\"evil.example\"; endswith"), &q));
    assert!(hits(&r("content:\"evil.example\",endswith,nocase"), &q));
    assert!(!hits(&r("content:\"www.evil\"; endswith"), &q));
    assert!(hits(&r("content:\"www.evil\"; startswith"), &q));
    assert!(!hits(&r("content:\"evil\"; startswith"), &q));
    assert!(hits(
        &r("content:\"www.\"; startswith; content:\"example\"; endswith"),
        &q
    ));
    // ET's `depth` with `endswith`: the whole name, no longer than the depth.
    assert!(hits(
        &r("content:\"www.evil.example\"; depth:16; endswith"),
        &q
    ));
    assert!(!hits(
        &r("content:\"evil.example\"; depth:15; endswith"),
        &q
    ));
    // Negated: the name does not end with it.
    assert!(hits(&r("content:!\"evil\"; endswith"), &q));
    assert!(!hits(&r("content:!\"example\"; endswith"), &q));
    // Relative with endswith.
    assert!(hits(
        &r("content:\"www\"; content:\"example\"; distance:0; endswith"),
        &q
    ));
    assert!(hits(&r("content:\"www\"; bsize:16"), &q));
    assert!(!hits(&r("content:\"www\"; bsize:15"), &q));
    assert!(hits(&r("content:\"www\"; bsize:10<>20"), &q));
    assert!(hits(&r("bsize:>=16"), &q));
    assert!(parse_rule(&r("content:\"a\"; depth:3; startswith"), &Vars::new()).is_err());
    // On the stream window an endswith content is judged per segment: a request cut after
    // "evil" does not end with it once the next bytes come.
    assert!(hits(
        "alert tcp any any -> any any (content:\"evil\"; endswith; sid:1;)",
        &tcp(80, b"GET /evil")
    ));
    assert!(!hits(
        "alert tcp any any -> any any (content:\"evil\"; endswith; sid:1;)",
        &tcp(80, b"GET /evil HTTP/1.1")
    ));
}

#[test]
fn dotprefix_after_dns_query_and_tls_sni() {
    let q = udp(53, &dns_query(&[EVIL]));
    let r = "alert dns $HOME_NET any -> any any (msg:\"ET\"; dns.query; dotprefix; content:\".evil.example\"; nocase; endswith; sid:1;)";
    assert!(hits(r, &q));
    // The name itself is evil.example: matched as a whole label sequence.
    assert!(hits(r, &udp(53, &dns_query(&[b"\x04evil\x07example\x00"]))));
    // notevil.example does not end with .evil.example.
    assert!(!hits(
        r,
        &udp(53, &dns_query(&[b"\x07notevil\x07example\x00"]))
    ));
    let t = "alert tls any any -> any any (tls.sni; dotprefix; content:\".evil.example\"; endswith; fast_pattern; sid:2;)";
    assert!(hits(t, &tcp(443, &client_hello(b"evil.example"))));
    assert!(hits(t, &tcp(443, &client_hello(b"a.evil.example"))));
    assert!(!hits(t, &tcp(443, &client_hello(b"notevil.example"))));
    // Only right after dns.query / tls.sni.
    let v = Vars::new();
    for bad in [
        "alert tcp any any -> any any (http.host; dotprefix; content:\".a\"; sid:1;)",
        "alert tcp any any -> any any (tls.sni; content:\"a\"; dotprefix; sid:1;)",
        "alert tcp any any -> any any (dotprefix; sid:1;)",
    ] {
        assert!(
            matches!(parse_rule(bad, &v), Err(RuleError::Unsupported(_))),
            "{bad}"
        );
    }
    let r = parse_rule(t, &v).unwrap();
    assert!(r.ops.contains(&PayloadOp::AppBuffer(AppBuffer::TlsSniDot)));
    assert_eq!(parse_rule(&r.to_string(), &v).unwrap(), r);
}
