//! Bochs 2.7 configuration (Debian's build: VMX with EPT and unrestricted guest, the e1000,
//! slirp networking, the built-in debugger).

use std::path::{Path, PathBuf};

/// Everything a Bochs run needs; all paths should be absolute (Bochs resolves relative paths
/// against its working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BochsConfig {
    /// Number of emulated processors (`cpu: count=`).
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Raw guest disk (`ata0-master`, flat).
    pub disk: PathBuf,
    /// The boot ISO (`ata0-slave`, cdrom); booted first.
    pub iso: PathBuf,
    /// COM1: the guest's console.
    pub com1: PathBuf,
    /// COM2: Ally's log.
    pub com2: PathBuf,
    /// Bochs' own log.
    pub log: PathBuf,
    /// The slirp configuration file (see [`slirp_config`]).
    pub slirp_config: PathBuf,
    /// MAC address of the e1000.
    pub mac: [u8; 6],
    /// Emulated instructions per second: with `clock: sync=none` this sets how much guest time
    /// passes per instruction (a higher value means fewer timer interrupts per instruction).
    pub ips: u64,
}

/// The MAC address every run gives the e1000 (QEMU's locally administered default).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The guest's view of the slirp network: it is 10.0.2.15/24, the gateway (the host's
/// loopback, answering ping) is 10.0.2.2.
pub const SLIRP_NET: &str = "10.0.2.0";
pub const SLIRP_HOST: &str = "10.0.2.2";
pub const SLIRP_GUEST: &str = "10.0.2.15";

fn quoted(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

impl BochsConfig {
    /// The text of the bochsrc file.
    pub fn render(&self) -> String {
        let mac = self
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let mut s = String::new();
        // The sound plugins crash Debian's Bochs at start.
        s += "plugin_ctrl: speaker=false, sb16=false, es1370=false\n";
        s += "config_interface: textconfig\n";
        // Debian's Bochs has no `nogui`: the term display runs under a pseudo-terminal.
        s += "display_library: term\n";
        s += "romimage: file=/usr/share/bochs/BIOS-bochs-latest\n";
        s += "vgaromimage: file=/usr/share/vgabios/vgabios.bin\n";
        // Skylake-X: VMX with EPT, VPID and unrestricted guest.
        s += &format!(
            "cpu: model=corei7_skylake_x, count={}, ips={}, reset_on_triple_fault=0\n",
            self.cpus, self.ips
        );
        s += &format!(
            "memory: guest={}, host={}\n",
            self.memory_mib, self.memory_mib
        );
        s += "ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14\n";
        s += &format!(
            "ata0-master: type=disk, path={}, mode=flat\n",
            quoted(&self.disk)
        );
        s += &format!(
            "ata0-slave: type=cdrom, path={}, status=inserted\n",
            quoted(&self.iso)
        );
        s += "boot: cdrom\n";
        s += "floppy_bootsig_check: disabled=1\n";
        s += &format!("com1: enabled=1, mode=file, dev={}\n", quoted(&self.com1));
        s += &format!("com2: enabled=1, mode=file, dev={}\n", quoted(&self.com2));
        s += &format!(
            "e1000: enabled=1, mac={mac}, ethmod=slirp, script={}\n",
            quoted(&self.slirp_config)
        );
        s += "port_e9_hack: enabled=1\n";
        s += "clock: sync=none, time0=local\n";
        s += "mouse: enabled=0\n";
        s += &format!("log: {}\n", quoted(&self.log));
        // A Bochs panic ends the run (the runner reads bochs.log); never wait for a keypress.
        s += "panic: action=fatal\n";
        s += "error: action=report\n";
        s += "info: action=report\n";
        s += "debug: action=ignore\n";
        s
    }
}

/// The slirp configuration (Bochs requires the first line to be `# slirp config`). `pktlog`
/// records every frame, which shows whether a ping reached slirp; `udp_forward` is a UDP port
/// forwarded from the host's loopback to the guest's same port.
pub fn slirp_config(pktlog: &Path, udp_forward: Option<u16>) -> String {
    let forward = udp_forward
        .map(|p| format!("hostfwd = udp:127.0.0.1:{p}-{SLIRP_GUEST}:{p}\n"))
        .unwrap_or_default();
    format!(
        "# slirp config\n\
         # written by ally-runner: guest {SLIRP_GUEST}/24, gateway {SLIRP_HOST}\n\
         net = {SLIRP_NET}\n\
         mask = 255.255.255.0\n\
         host = {SLIRP_HOST}\n\
         dhcpstart = {SLIRP_GUEST}\n\
         pktlog = {}\n\
         {forward}",
        pktlog.display()
    )
}

/// The debugger command file (`-rc`): Debian's Bochs is built with its debugger, which would
/// otherwise stop at the first instruction.
pub const DEBUGGER_RC: &str = "continue\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BochsConfig {
        BochsConfig {
            cpus: 2,
            memory_mib: 1024,
            disk: "/o/disk.img".into(),
            iso: "/o/boot.iso".into(),
            com1: "/o/com1.log".into(),
            com2: "/o/com2.log".into(),
            log: "/o/bochs.log".into(),
            slirp_config: "/o/slirp.conf".into(),
            mac: DEFAULT_MAC,
            ips: 50_000_000,
        }
    }

    #[test]
    fn bochsrc_has_the_required_lines() {
        let s = config().render();
        for line in [
            "plugin_ctrl: speaker=false, sb16=false, es1370=false",
            "display_library: term",
            "cpu: model=corei7_skylake_x, count=2, ips=50000000, reset_on_triple_fault=0",
            "memory: guest=1024, host=1024",
            "ata0-master: type=disk, path=\"/o/disk.img\", mode=flat",
            "ata0-slave: type=cdrom, path=\"/o/boot.iso\", status=inserted",
            "boot: cdrom",
            "com1: enabled=1, mode=file, dev=\"/o/com1.log\"",
            "com2: enabled=1, mode=file, dev=\"/o/com2.log\"",
            "e1000: enabled=1, mac=52:54:00:12:34:56, ethmod=slirp, script=\"/o/slirp.conf\"",
            "port_e9_hack: enabled=1",
            "log: \"/o/bochs.log\"",
        ] {
            assert!(s.lines().any(|l| l == line), "missing `{line}` in\n{s}");
        }
    }

    #[test]
    fn slirp_config_starts_with_magic() {
        let s = slirp_config(Path::new("/o/pkt.log"), Some(4321));
        assert!(
            s.contains("\nhostfwd = udp:127.0.0.1:4321-10.0.2.15:4321\n"),
            "{s}"
        );
        assert!(s.starts_with("# slirp config\n"));
        assert!(s.contains("host = 10.0.2.2\n"));
        assert!(s.contains("pktlog = /o/pkt.log\n"));
    }
}
