//! `ally-attack`: the test guest's attacker (issue 11). One subcommand per attack; each prints
//! one marker line `ALLYTEST attack-<name> INFO key=value ...` with what it tried and saw, and
//! exits 0 whatever happened: the runner judges Ally's side.
//!
//! It writes I/O ports, MSRs, the local APIC and the NIC as root: it runs only inside the test
//! guest, and refuses to run where the kernel command line has no `ally.attacks=` or
//! `ally.resets=` (any machine but the test guest).
//!
//! ```text
//! ally-attack sleep | msr [--target ADDR] | pci-race [--iterations N] [--seconds S]
//!             | ipi-logical | swxoff | eeprom | tucso --port P [--gw-mac MAC]
//!             | alert-storm --port P [--count N] | split-upload --port P | ooo-upload --port P
//!             | rst-split --port P | frag-udp --port P | dma [--target ADDR]
//!             | reset METHOD [key=value ...]
//! ```

mod acpi;
mod ahci;
mod attacks;
mod dma;
mod e1000;
mod marker;
mod pci;
mod port;
mod sys;

use marker::Marker;

/// `--name value` options after the subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options(Vec<(String, String)>);

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a
                .strip_prefix("--")
                .ok_or(format!("unexpected_argument_{a}"))?;
            let v = it.next().ok_or(format!("option_{a}_needs_a_value"))?;
            out.push((name.to_string(), v.clone()));
        }
        Ok(Options(out))
    }

    fn number(&self, name: &str, default: Option<u64>) -> Result<u64, String> {
        match self.0.iter().find(|(k, _)| k == name) {
            None => default.ok_or(format!("missing_--{name}")),
            Some((_, v)) => {
                let parsed = match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16).ok(),
                    None => v.parse().ok(),
                };
                parsed.ok_or(format!("bad_--{name}_{v}"))
            }
        }
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether the kernel command line is the test guest's (the runner puts `ally.attacks=` or
/// `ally.resets=` on it).
fn is_test_guest(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w.starts_with("ally.attacks=") || w.starts_with("ally.resets="))
}

fn port(o: &Options) -> Result<u16, String> {
    let p = o.number("port", None)?;
    u16::try_from(p).map_err(|_| format!("bad_--port_{p}"))
}

fn run(sub: &str, rest: &[String]) -> Result<Option<Marker>, String> {
    if sub == "reset" {
        let method = rest.first().ok_or("reset_needs_a_method")?;
        attacks::reset(method, &rest[1..].join(" "));
        return Ok(None);
    }
    let o = Options::parse(rest)?;
    Ok(Some(match sub {
        "sleep" => attacks::sleep(),
        "msr" => attacks::msr(o.number("target", Some(0x10_0000))?),
        "pci-race" => attacks::pci_race(
            o.number("iterations", Some(200_000))?,
            o.number("seconds", Some(2))?,
        ),
        "ipi-logical" => attacks::ipi_logical(),
        "swxoff" => attacks::swxoff(),
        "eeprom" => attacks::eeprom(),
        "tucso" => {
            let mac = match o.text("gw-mac") {
                None => [0xff; 6],
                Some(s) => e1000::parse_mac(s).ok_or(format!("bad_--gw-mac_{s}"))?,
            };
            attacks::tucso(port(&o)?, mac)
        }
        "alert-storm" => attacks::alert_storm(port(&o)?, o.number("count", Some(2000))?),
        "split-upload" => attacks::split_upload(port(&o)?),
        "ooo-upload" => attacks::ooo_upload(port(&o)?),
        "rst-split" => attacks::rst_split(port(&o)?),
        "frag-udp" => attacks::frag_udp(port(&o)?),
        "exit-cost" => attacks::exit_cost(o.number("reads", Some(2000))?),
        "dma" => dma::dma(match o.text("target") {
            Some(_) => Some(o.number("target", None)?),
            None => None,
        }),
        "udp-sink" => attacks::udp_sink(port(&o)?, o.number("count", Some(2000))?),
        other => return Err(format!("unknown_attack_{other}")),
    }))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sub = args.first().cloned().unwrap_or_default();
    let name = if sub == "reset" {
        "reset-attack".to_string()
    } else {
        format!("attack-{sub}")
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !is_test_guest(&cmdline) {
        Marker::new(&name)
            .field("refused", "not_the_test_guest")
            .print();
        std::process::exit(2);
    }
    match run(&sub, args.get(1..).unwrap_or(&[])) {
        Ok(Some(m)) => m.print(),
        Ok(None) => {}
        Err(e) => Marker::new(&name).field("error", e).print(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options() {
        let o = Options::parse(&strings(&["--port", "5555", "--target", "0x100000"])).unwrap();
        assert_eq!(o.number("port", None), Ok(5555));
        assert_eq!(o.number("target", None), Ok(0x10_0000));
        assert_eq!(o.number("count", Some(7)), Ok(7));
        assert_eq!(o.number("missing", None), Err("missing_--missing".into()));
        assert!(Options::parse(&strings(&["--port"])).is_err());
        assert!(Options::parse(&strings(&["port"])).is_err());
        let o = Options::parse(&strings(&["--port", "70000"])).unwrap();
        assert_eq!(port(&o), Err("bad_--port_70000".into()));
    }

    #[test]
    fn only_the_test_guest() {
        assert!(is_test_guest("console=ttyS0 ally.attacks=msr,sleep\n"));
        assert!(is_test_guest("ally.resets=kbc-output"));
        assert!(!is_test_guest("BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet"));
        assert!(!is_test_guest("xally.attacks=1"));
    }

    #[test]
    fn unknown_attacks_are_errors_not_actions() {
        assert_eq!(
            run("frobnicate", &[]).unwrap_err(),
            "unknown_attack_frobnicate"
        );
        assert!(run("tucso", &strings(&["--gw-mac", "zz"])).is_err());
    }
}
