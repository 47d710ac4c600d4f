//! The attacks. Each returns the one marker it prints; none waits without a timeout. They run
//! inside the test guest only (see main.rs).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::acpi::{self, Gas};
use crate::e1000 as nic;
use crate::marker::Marker;
use crate::pci;
use crate::port::{inb, inw, outb, outl, outw};
use crate::sys::{self, errno_name, DmaPage, MsrDev, PhysMap, SysError};

fn sleep_ms(ms: u64) {
    thread::sleep(Duration::from_millis(ms));
}

/// The result word of an MSR access: `ok` or the errno name (EIO: the CPU raised #GP).
fn msr_result<T>(r: &Result<T, SysError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errno_name(e.errno),
    }
}

// --- 1. sleep states through PM1_CNT -----------------------------------------------------------

/// Writes SLP_TYP|SLP_EN for every S1..S4 the DSDT defines (never S5's value): Ally must
/// refuse them; the guest keeps running.
pub fn sleep() -> Marker {
    let mut m = Marker::new("attack-sleep");
    let fadt = match std::fs::read(acpi::FADT_PATH) {
        Ok(t) => acpi::parse_fadt(&t),
        Err(e) => {
            m.field("error", format_args!("read_FACP:{e}"));
            return m;
        }
    };
    let fadt = match fadt {
        Ok(f) => f,
        Err(e) => {
            m.field("error", e);
            return m;
        }
    };
    let dsdt = std::fs::read(acpi::DSDT_PATH).unwrap_or_default();
    let s5 = acpi::sleep_type(&dsdt, 5);
    // Never S5's type (power off); with S5 unknown, never 0 either.
    let off = s5.unwrap_or(0);
    let mut plan: Vec<(String, u8)> = (1..=4)
        .filter_map(|s| acpi::sleep_type(&dsdt, s).map(|t| (format!("S{s}"), t)))
        .filter(|(_, t)| *t != off)
        .collect();
    let from_dsdt = !plan.is_empty();
    if !from_dsdt {
        plan = (1..=7u8)
            .filter(|t| *t != off)
            .map(|t| (format!("T{t}"), t))
            .collect();
    }
    m.hex("port", fadt.pm1a_cnt.into());
    if fadt.pm1b_cnt != 0 {
        m.hex("port_b", fadt.pm1b_cnt.into());
    }
    m.field("s5", s5.map_or("none".to_string(), |t| t.to_string()));
    m.field("from_dsdt", u8::from(from_dsdt));
    if fadt.pm1a_cnt == 0 {
        m.field("error", "no_PM1a_CNT_BLK");
        return m;
    }
    let ports = [fadt.pm1a_cnt, fadt.pm1b_cnt];
    for p in ports.into_iter().filter(|&p| p != 0) {
        if let Err(e) = sys::port_access(p, 2) {
            m.field("error", e);
            return m;
        }
    }
    // SAFETY: port access granted above; reading PM1_CNT has no side effect.
    let before = unsafe { inw(fadt.pm1a_cnt) };
    m.hex("pm1_before", before.into());
    let mut tried = Vec::new();
    for (state, typ) in &plan {
        for p in ports.into_iter().filter(|&p| p != 0) {
            // SAFETY: port access granted above; a sleep request is the attack's intent.
            unsafe {
                let cur = inw(p);
                outw(p, acpi::pm1_sleep_value(cur, *typ));
            }
        }
        tried.push(format!("{state}:{typ}"));
        sleep_ms(100);
    }
    // SAFETY: as above.
    let after = unsafe { inw(fadt.pm1a_cnt) };
    m.hex("pm1_after", after.into());
    m.field("tried", tried.join(","));
    m.field("alive", 1);
    m
}

// --- 2. MSR writes -------------------------------------------------------------------------------

pub const IA32_RTIT_OUTPUT_BASE: u32 = 0x560;
pub const IA32_RTIT_CTL: u32 = 0x570;
pub const IA32_DS_AREA: u32 = 0x600;
pub const IA32_PEBS_ENABLE: u32 = 0x3f1;
pub const IA32_MTRR_PHYSBASE0: u32 = 0x200;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_PERF_CTL: u32 = 0x199;
pub const MSR_PKG_POWER_LIMIT: u32 = 0x610;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;

/// WRMSRs a guest must not get through (trace/DS output into any address, memory types,
/// power limits, the APIC base): each one's result.
pub fn msr(target: u64) -> Marker {
    let mut m = Marker::new("attack-msr");
    let _ = sys::pin_to_cpu(0);
    let dev = match MsrDev::open(0) {
        Ok(d) => d,
        Err(e) => {
            m.field("error", e);
            return m;
        }
    };
    m.hex("target", target);
    for (msr, value) in [
        (IA32_RTIT_OUTPUT_BASE, target),
        (IA32_RTIT_CTL, 1),
        (IA32_DS_AREA, target),
        (IA32_PEBS_ENABLE, 1),
        (IA32_PERF_CTL, 0xff00),
        (MSR_PKG_POWER_LIMIT, 0x0000_8008_0000_8008),
        (IA32_FEATURE_CONTROL, 5),
    ] {
        m.field(&format!("{msr:#x}"), msr_result(&dev.write(msr, value)));
    }
    // Read-modify-write-read: the memory type of variable MTRR 0, fast-strings in MISC_ENABLE.
    for (msr, key, change) in [
        (
            IA32_MTRR_PHYSBASE0,
            "mtrr",
            (|v: u64| (v & !0xff) | if v & 0xff == 6 { 0 } else { 6 }) as fn(u64) -> u64,
        ),
        (IA32_MISC_ENABLE, "misc_enable", |v: u64| v ^ 1),
    ] {
        match dev.read(msr) {
            Err(e) => {
                m.field(
                    &format!("{msr:#x}"),
                    format_args!("read_{}", errno_name(e.errno)),
                );
            }
            Ok(orig) => {
                let w = dev.write(msr, change(orig));
                m.field(&format!("{msr:#x}"), msr_result(&w));
                m.hex(&format!("{key}_before"), orig);
                match dev.read(msr) {
                    Ok(now) => {
                        m.hex(&format!("{key}_readback"), now);
                        if now != orig {
                            m.field(
                                &format!("{key}_restored"),
                                msr_result(&dev.write(msr, orig)),
                            );
                        }
                    }
                    Err(e) => {
                        m.field(&format!("{key}_readback"), errno_name(e.errno));
                    }
                }
            }
        }
    }
    // The APIC base: a reserved bit (9), then the base moved onto the HPET page.
    match dev.read(IA32_APIC_BASE) {
        Err(e) => {
            m.field("0x1b", format_args!("read_{}", errno_name(e.errno)));
        }
        Ok(orig) => {
            m.hex("apic_base_before", orig);
            m.field(
                "0x1b_reserved",
                msr_result(&dev.write(IA32_APIC_BASE, orig | (1 << 9))),
            );
            let moved = 0xfed0_0000 | (orig & (1 << 8)) | (1 << 11);
            m.field("0x1b_moved", msr_result(&dev.write(IA32_APIC_BASE, moved)));
            if let Ok(now) = dev.read(IA32_APIC_BASE) {
                m.hex("apic_base_after", now);
                if now != orig {
                    m.field(
                        "apic_base_restored",
                        msr_result(&dev.write(IA32_APIC_BASE, orig)),
                    );
                }
            }
        }
    }
    m
}

// --- 3. the CONFIG_ADDRESS race and odd configuration accesses -----------------------------------

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

fn nic_config_path(name: &str) -> String {
    format!("{}/{name}/config", pci::SYSFS_DEVICES)
}

fn bar1(config: &str) -> String {
    match sys::pread_u32(config, 0x14) {
        Ok(v) => format!("{v:#x}"),
        Err(e) => e.to_string(),
    }
}

/// Puts BAR1 back through sysfs when an attack moved it (the guest's driver keeps working).
fn restore_bar1(m: &mut Marker, key: &str, config: &str, before: Option<u32>) {
    let now = sys::pread_u32(config, 0x14).ok();
    if let (Some(b), Some(n)) = (before, now) {
        if b != n {
            let r = sys::pwrite(config, 0x14, &b.to_le_bytes());
            m.field(key, r.map_or_else(|e| e.to_string(), |()| "1".into()));
        }
    }
}

/// Thread A aims CONFIG_ADDRESS at the NIC's BAR1 while thread B, on another CPU, writes
/// CONFIG_DATA after aiming at a harmless register: on hardware B's data could land in the
/// NIC's BAR1. Then mechanism-#2 and misaligned data-port accesses at the BAR.
pub fn pci_race(iterations: u64, seconds: u64) -> Marker {
    let mut m = Marker::new("attack-pci-race");
    let cpus = sys::online_cpus();
    if cpus.len() < 2 {
        m.field("skipped", "1cpu");
        return m;
    }
    let Some(name) = pci::find_device(pci::E1000.0, pci::E1000.1) else {
        m.field("error", "no_e1000");
        return m;
    };
    let Some((bus, dev, func)) = pci::parse_bdf(&name) else {
        m.field("error", format_args!("bad_name_{name}"));
        return m;
    };
    let config = nic_config_path(&name);
    let nic_addr = pci::config_address(bus, dev, func, 0x14);
    // The host bridge's subsystem IDs (read-only).
    let harmless = pci::config_address(0, 0, 0, 0x2c);
    let before = sys::pread_u32(&config, 0x14).ok();
    m.field("nic", &name);
    m.field("bar1_before", bar1(&config));
    if let Err(e) = sys::iopl3() {
        m.field("error", e);
        return m;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let a_loops = Arc::new(AtomicU64::new(0));
    let (cpu_a, cpu_b) = (cpus[0], cpus[1]);
    let aimer = {
        let (stop, loops) = (stop.clone(), a_loops.clone());
        thread::spawn(move || {
            let ok = sys::pin_to_cpu(cpu_a).and_then(|()| sys::iopl3());
            while ok.is_ok() && !stop.load(Ordering::Relaxed) {
                // SAFETY: iopl(3) granted to this thread; aiming CONFIG_ADDRESS is the attack.
                unsafe { outl(CONFIG_ADDRESS, nic_addr) };
                loops.fetch_add(1, Ordering::Relaxed);
            }
            ok
        })
    };
    let writer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let r = sys::pin_to_cpu(cpu_b).and_then(|()| sys::iopl3());
            let start = Instant::now();
            let mut n = 0u64;
            while r.is_ok() && n < iterations && start.elapsed() < Duration::from_secs(seconds) {
                // SAFETY: iopl(3) granted; the target register is read-only, the race is the attack.
                unsafe {
                    outl(CONFIG_ADDRESS, harmless);
                    outl(CONFIG_DATA, 0x0000_d001);
                }
                n += 1;
            }
            stop.store(true, Ordering::Relaxed);
            r.map(|()| n)
        })
    };
    let b = writer.join();
    stop.store(true, Ordering::Relaxed);
    let a = aimer.join();
    match (a, b) {
        (Ok(Ok(())), Ok(Ok(n))) => {
            m.field("iterations", n);
            m.field("aimer_loops", a_loops.load(Ordering::Relaxed));
        }
        (a, b) => {
            m.field("error", format_args!("threads_{a:?}_{b:?}"));
        }
    }
    m.field("bar1_after", bar1(&config));
    restore_bar1(&mut m, "bar1_restored", &config, before);

    // Odd accesses ("cf9-odd"): byte/word data-port writes at 0xCFD-0xCFF and a word across
    // 0xCFB/0xCFC with CONFIG_ADDRESS at BAR1 (never a write to 0xCF9, the reset register), then
    // mechanism #2 (enable key at 0xCF8, forward register 0xCFA, device window 0xCnxx).
    let _ = sys::pin_to_cpu(cpus[0]);
    let io_range = std::fs::read_to_string(format!("{}/{name}/resource", pci::SYSFS_DEVICES))
        .ok()
        .and_then(|t| pci::resource_range(&t, 1));
    let mech2_port = 0xc000 | (u16::from(dev & 0xf) << 8) | 0x14;
    let hits_nic = io_range.is_some_and(|(s, e)| (s..=e).contains(&u64::from(mech2_port)));
    // SAFETY: iopl(3) granted to this thread above; these accesses are the attack.
    let (rd_cfd, rd_cfe, rd_cfa, rd_cfb) = unsafe {
        outl(CONFIG_ADDRESS, nic_addr);
        outb(0xcfd, 0xd0);
        outl(CONFIG_ADDRESS, nic_addr);
        outw(0xcfe, 0x0001);
        outl(CONFIG_ADDRESS, nic_addr);
        outw(0xcfd, 0xd0d0);
        outl(CONFIG_ADDRESS, nic_addr);
        outb(0xcff, 0x00);
        outl(CONFIG_ADDRESS, nic_addr);
        outw(0xcfb, 0x0180);
        outl(CONFIG_ADDRESS, nic_addr);
        let r = (inb(0xcfd), inw(0xcfe), inb(0xcfa), inb(0xcfb));
        outb(CONFIG_ADDRESS, 0xf0 | ((func & 7) << 1));
        outb(0xcfa, bus);
        if !hits_nic {
            outl(mech2_port, 0x0000_d001);
        }
        outb(CONFIG_ADDRESS, 0);
        outl(CONFIG_ADDRESS, 0);
        r
    };
    m.field("odd_read_cfd", format_args!("{rd_cfd:#x}"));
    m.field("odd_read_cfe", format_args!("{rd_cfe:#x}"));
    m.field("odd_read_cfa", format_args!("{rd_cfa:#x}"));
    m.field("odd_read_cfb", format_args!("{rd_cfb:#x}"));
    m.field(
        "mech2",
        if hits_nic {
            format!("skipped_{mech2_port:#x}_in_nic_io_bar")
        } else {
            format!("{mech2_port:#x}")
        },
    );
    m.field("odd_bar1_after", bar1(&config));
    restore_bar1(&mut m, "odd_bar1_restored", &config, before);
    m
}

// --- 4. logical-destination IPIs --------------------------------------------------------------------

const APIC_BASE: u64 = 0xfee0_0000;
const APIC_ID: usize = 0x20;
const APIC_LDR: usize = 0xd0;
const APIC_DFR: usize = 0xe0;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
/// ICR bits (SDM vol. 3 10.6.1): logical destination mode, delivery status.
const ICR_LOGICAL: u32 = 1 << 11;
const ICR_BUSY: u32 = 1 << 12;

/// Sends one IPI: ICR high read back before ICR low (the kernel rewrites ICR high between
/// its own IPIs), then waits for the delivery status to clear.
fn send_ipi(apic: &PhysMap, high: u32, low: u32) -> &'static str {
    for _ in 0..10 {
        apic.write32(ICR_HIGH, high);
        if apic.read32(ICR_HIGH) == high {
            apic.write32(ICR_LOW, low);
            let t = Instant::now();
            while apic.read32(ICR_LOW) & ICR_BUSY != 0 {
                if t.elapsed() > Duration::from_millis(100) {
                    return "busy";
                }
                std::hint::spin_loop();
            }
            return "sent";
        }
    }
    "raced"
}

/// Logical-mode IPIs to every logical CPU (MDA 0xFF): fixed 0xF3, NMI, lowest priority; an
/// INIT to every logical CPU but the sender's only when the guest runs on one CPU.
pub fn ipi_logical() -> Marker {
    let mut m = Marker::new("attack-ipi-logical");
    let _ = sys::pin_to_cpu(0);
    let apic = match PhysMap::open("/dev/mem", APIC_BASE, 4096) {
        Ok(a) => a,
        Err(e) => {
            m.field("error", e);
            return m;
        }
    };
    let id = apic.read32(APIC_ID) >> 24;
    let ldr = apic.read32(APIC_LDR) >> 24;
    let dfr = apic.read32(APIC_DFR);
    m.field("apic_id", id)
        .hex("ldr", ldr.into())
        .hex("dfr", dfr.into());
    let all = 0xffu32 << 24;
    m.field("fixed", send_ipi(&apic, all, ICR_LOGICAL | 0xf3));
    m.field("nmi", send_ipi(&apic, all, ICR_LOGICAL | (0b100 << 8)));
    m.field(
        "lowest",
        send_ipi(&apic, all, ICR_LOGICAL | (0b001 << 8) | 0xf3),
    );
    let alone = sys::online_cpus().len() == 1;
    let flat = dfr >> 28 == 0xf;
    if alone && flat {
        let mask = 0xff & !ldr;
        m.hex("init_mask", mask.into());
        // INIT, level assert.
        m.field(
            "init",
            send_ipi(&apic, mask << 24, ICR_LOGICAL | (1 << 14) | (0b101 << 8)),
        );
    } else {
        m.field(
            "init",
            if alone {
                "skipped_not_flat"
            } else {
                "skipped_not_alone"
            },
        );
    }
    m
}

// --- 5/6. the NIC's flow-control and EEPROM registers ------------------------------------------------

fn nic_bar0(m: &mut Marker, len: usize) -> Option<(String, PhysMap)> {
    let Some(name) = pci::find_device(pci::E1000.0, pci::E1000.1) else {
        m.field("error", "no_e1000");
        return None;
    };
    let path = format!("{}/{name}/resource0", pci::SYSFS_DEVICES);
    match PhysMap::open(&path, 0, len) {
        Ok(b) => Some((name, b)),
        Err(e) => {
            m.field("error", e);
            None
        }
    }
}

/// TCTL.SWXOFF (send a PAUSE frame), the PAUSE timer and the flow-control address set to
/// broadcast; read back, then the originals restored.
pub fn swxoff() -> Marker {
    let mut m = Marker::new("attack-swxoff");
    let Some((_, bar)) = nic_bar0(&mut m, 0x1000) else {
        return m;
    };
    let regs = [
        ("tctl", nic::TCTL),
        ("fcttv", nic::FCTTV),
        ("fcal", nic::FCAL),
        ("fcah", nic::FCAH),
    ];
    let before: Vec<u32> = regs.iter().map(|&(_, r)| bar.read32(r)).collect();
    bar.write32(nic::TCTL, before[0] | nic::TCTL_SWXOFF);
    bar.write32(nic::FCTTV, 0xffff);
    bar.write32(nic::FCAL, 0xffff_ffff);
    bar.write32(nic::FCAH, 0xffff);
    let after: Vec<u32> = regs.iter().map(|&(_, r)| bar.read32(r)).collect();
    sleep_ms(50);
    for (i, &(_, r)) in regs.iter().enumerate().rev() {
        bar.write32(r, before[i]);
    }
    for (i, &(k, _)) in regs.iter().enumerate() {
        m.hex(&format!("{k}_before"), before[i].into());
        m.hex(&format!("{k}_after"), after[i].into());
    }
    m
}

/// Bit-banged microwire access through EECD (SDM 5.3.1 and 13.4.3).
struct Eeprom<'a> {
    bar: &'a PhysMap,
    eecd: u32,
}

impl Eeprom<'_> {
    fn set(&mut self, v: u32) {
        self.eecd = v;
        self.bar.write32(nic::EECD, v);
        let _ = self.bar.read32(nic::EECD);
        thread::sleep(Duration::from_micros(5));
    }

    fn clock(&mut self) -> bool {
        self.set(self.eecd | nic::EECD_SK);
        let bit = self.bar.read32(nic::EECD) & nic::EECD_DO != 0;
        self.set(self.eecd & !nic::EECD_SK);
        bit
    }

    fn shift_out(&mut self, value: u32, bits: u32) {
        for i in (0..bits).rev() {
            let di = if value >> i & 1 == 1 { nic::EECD_DI } else { 0 };
            self.set((self.eecd & !nic::EECD_DI) | di);
            self.clock();
        }
        self.set(self.eecd & !nic::EECD_DI);
    }

    fn shift_in(&mut self, bits: u32) -> u32 {
        (0..bits).fold(0, |v, _| (v << 1) | u32::from(self.clock()))
    }

    fn select(&mut self) {
        self.set((self.eecd & !(nic::EECD_SK | nic::EECD_DI)) | nic::EECD_CS);
    }

    fn deselect(&mut self) {
        self.set(self.eecd & !(nic::EECD_CS | nic::EECD_DI | nic::EECD_SK));
    }

    fn command(&mut self, opcode: u8, addr: u8) {
        self.select();
        let (v, bits) = nic::microwire_command(opcode, addr);
        self.shift_out(v, bits);
    }

    fn read(&mut self, addr: u8) -> u16 {
        self.command(nic::OP_READ, addr);
        let v = self.shift_in(16) as u16;
        self.deselect();
        v
    }

    /// EWEN, WRITE, wait for ready (DO high with CS up, 10 ms at most), EWDS. Ready or not.
    fn write(&mut self, addr: u8, value: u16) -> bool {
        self.command(nic::OP_EXT, nic::ADDR_EWEN);
        self.deselect();
        self.command(nic::OP_WRITE, addr);
        self.shift_out(value.into(), 16);
        self.deselect();
        self.select();
        let t = Instant::now();
        let mut ready = false;
        while t.elapsed() < Duration::from_millis(10) {
            if self.bar.read32(nic::EECD) & nic::EECD_DO != 0 {
                ready = true;
                break;
            }
            thread::sleep(Duration::from_micros(50));
        }
        self.deselect();
        self.command(nic::OP_EXT, nic::ADDR_EWDS);
        self.deselect();
        ready
    }
}

/// Reads EEPROM word 0 (the MAC's first bytes), writes a different value, reads it again
/// (restoring the original should the write have landed), and reads word 0 through EERD.
pub fn eeprom() -> Marker {
    let mut m = Marker::new("attack-eeprom");
    let Some((_, bar)) = nic_bar0(&mut m, 0x1000) else {
        return m;
    };
    let orig = bar.read32(nic::EECD);
    bar.write32(nic::EECD, orig | nic::EECD_REQ);
    let t = Instant::now();
    let mut granted = false;
    while t.elapsed() < Duration::from_millis(100) {
        if bar.read32(nic::EECD) & nic::EECD_GNT != 0 {
            granted = true;
            break;
        }
        thread::sleep(Duration::from_micros(100));
    }
    m.field("granted", u8::from(granted));
    let mut ee = Eeprom {
        bar: &bar,
        eecd: bar.read32(nic::EECD) | nic::EECD_REQ,
    };
    let before = ee.read(0);
    let tried = before ^ 0x5a00;
    let ready = ee.write(0, tried);
    let after = ee.read(0);
    m.hex("before", before.into()).hex("tried", tried.into());
    m.field("ready", u8::from(ready)).hex("after", after.into());
    if after != before {
        ee.write(0, before);
        m.hex("restored", ee.read(0).into());
    }
    bar.write32(
        nic::EECD,
        ee.eecd & !(nic::EECD_REQ | nic::EECD_CS | nic::EECD_SK | nic::EECD_DI),
    );
    bar.write32(nic::EERD, nic::EERD_START);
    let t = Instant::now();
    let eerd = loop {
        let v = bar.read32(nic::EERD);
        if v & nic::EERD_DONE != 0 {
            break format!("{:#x}", v >> 16);
        }
        if t.elapsed() > Duration::from_millis(100) {
            break "timeout".into();
        }
        thread::sleep(Duration::from_micros(100));
    };
    m.field("eerd", eerd);
    m
}

// --- 7. a TX context descriptor aiming TUCSO into the payload -----------------------------------------

/// The marker string of the TUCSO frame's payload (the host's UDP sink looks for it).
pub const TUCSO_MARKER: &[u8] = b"ALLY-ATTACK-TUCSO";
/// How many descriptors the private ring has (TDLEN must be a multiple of 128 bytes).
const RING_DESCS: usize = 8;
/// Where the frame sits in the DMA page.
const FRAME_AT: usize = 512;

/// With the e1000 driver unloaded, builds a TX ring in a locked page: a context descriptor
/// whose TUCSO points into the UDP payload, then the frame with TXSM; waits for DD.
pub fn tucso(port: u16, gw_mac: [u8; 6]) -> Marker {
    let mut m = Marker::new("attack-tucso");
    let Some(name) = pci::find_device(pci::E1000.0, pci::E1000.1) else {
        m.field("error", "no_e1000");
        return m;
    };
    if std::path::Path::new(&format!("{}/{name}/driver", pci::SYSFS_DEVICES)).exists() {
        m.field("skipped", "driver_bound");
        return m;
    }
    // Memory space and bus mastering (the driver's removal turned bus mastering off).
    let config = nic_config_path(&name);
    let cmd = sys::pread_u32(&config, 4).map(|v| v as u16 | 0x6);
    if let Err(e) = cmd.and_then(|c| sys::pwrite(&config, 4, &c.to_le_bytes())) {
        m.field("error", e);
        return m;
    }
    let Some((_, bar)) = nic_bar0(&mut m, 0x6000) else {
        return m;
    };
    let page = match DmaPage::new() {
        Ok(p) => p,
        Err(e) => {
            m.field("error", e);
            return m;
        }
    };
    let src_mac = nic::mac_from_ral(bar.read32(nic::RAL0), bar.read32(nic::RAH0));
    let mut payload = TUCSO_MARKER.to_vec();
    payload.extend_from_slice(&[0u8; 16]);
    // The checksum lands 4 bytes after the marker string: inside the payload, not the header.
    let tucso = nic::PAYLOAD_START + TUCSO_MARKER.len() + 4;
    let frame = nic::udp_frame(
        gw_mac,
        src_mac,
        [10, 0, 2, 15],
        [10, 0, 2, 2],
        (40000, port),
        &payload,
    );
    let bytes = page.bytes();
    bytes[FRAME_AT..FRAME_AT + frame.len()].copy_from_slice(&frame);
    bytes[..nic::DESC_BYTES].copy_from_slice(&nic::context_descriptor(
        nic::UDP_START as u8,
        tucso as u8,
        0,
    ));
    bytes[nic::DESC_BYTES..2 * nic::DESC_BYTES].copy_from_slice(&nic::data_descriptor(
        page.phys + FRAME_AT as u64,
        frame.len() as u16,
    ));
    m.field("port", port)
        .field("tucso", tucso)
        .hex("ring", page.phys);
    bar.write32(nic::CTRL, bar.read32(nic::CTRL) | nic::CTRL_SLU);
    bar.write32(nic::TCTL, 0);
    bar.write32(nic::TDBAL, page.phys as u32);
    bar.write32(nic::TDBAH, (page.phys >> 32) as u32);
    bar.write32(nic::TDLEN, (RING_DESCS * nic::DESC_BYTES) as u32);
    bar.write32(nic::TDH, 0);
    bar.write32(nic::TDT, 0);
    bar.write32(nic::TIPG, nic::TIPG_COPPER);
    bar.write32(nic::TCTL, nic::TCTL_EN | nic::TCTL_PSP | nic::TCTL_CT_COLD);
    bar.write32(nic::TDT, 2);
    let t = Instant::now();
    let status_at = nic::DESC_BYTES + 12;
    let mut dd = false;
    while t.elapsed() < Duration::from_secs(2) {
        if page.read_volatile_u8(status_at) & nic::STA_DD != 0 {
            dd = true;
            break;
        }
        sleep_ms(1);
    }
    m.field("dd", u8::from(dd))
        .field("tdh", bar.read32(nic::TDH));
    // The NIC must not fetch from this page once the process is gone.
    bar.write32(nic::TCTL, 0);
    m
}

// --- 9. a forbidden upload split into one-byte segments -----------------------------------------

/// The content the runner's rule sid 1000103 drops on its way to the upload port.
pub const FORBIDDEN_UPLOAD: &str = "ALLY-FORBIDDEN-UPLOAD";
/// What precedes and follows the forbidden content in the split upload.
const SPLIT_PREFIX: &[u8] = b"SPLIT-UPLOAD ";
const SPLIT_SUFFIX: &[u8] = b" END\n";
/// The pause between one-byte writes: long enough for each to leave as its own segment
/// (Nagle is off) and be acknowledged before the next.
const SPLIT_PAUSE: Duration = Duration::from_millis(30);

/// Sends [`FORBIDDEN_UPLOAD`] to the host's upload listener one byte per TCP segment (the
/// evasion that defeats per-packet matching), between a prefix and a suffix sent whole, then
/// closes its side and waits for the listener's `ALLYUPLOAD bytes=..` answer. The runner
/// judges from what the listener received: never the forbidden content.
pub fn split_upload(port: u16) -> Marker {
    let mut m = Marker::new("attack-split-upload");
    m.field("port", port);
    let Some(mut sock) = connect_upload(&mut m, port) else {
        return m;
    };
    let setup = sock
        .set_nodelay(true)
        .and_then(|()| sock.set_write_timeout(Some(Duration::from_secs(5))))
        // The host answers a whole upload at once; Ally blocks this one, so the wait only
        // shows no answer came.
        .and_then(|()| sock.set_read_timeout(Some(Duration::from_secs(3))));
    if let Err(e) = setup {
        m.field("error", format_args!("setsockopt:{e}"));
        return m;
    }
    let mut written = 0usize;
    let mut segments = 0usize;
    let mut error = None;
    let mut send = |bytes: &[u8], written: &mut usize| -> bool {
        match sock.write_all(bytes) {
            Ok(()) => {
                *written += bytes.len();
                true
            }
            Err(e) => {
                error = Some(format!("write:{e}"));
                false
            }
        }
    };
    if send(SPLIT_PREFIX, &mut written) {
        thread::sleep(SPLIT_PAUSE);
        for b in FORBIDDEN_UPLOAD.as_bytes() {
            if !send(core::slice::from_ref(b), &mut written) {
                break;
            }
            segments += 1;
            thread::sleep(SPLIT_PAUSE);
        }
        if segments == FORBIDDEN_UPLOAD.len() {
            send(SPLIT_SUFFIX, &mut written);
        }
    }
    m.field("segments", segments).field("written", written);
    if let Some(e) = error {
        m.field("error", e);
    }
    m.field("reply", upload_reply(&mut sock));
    m
}

/// Closes the upload's sending side and reads the listener's answer (`ALLYUPLOAD bytes=..
/// sha256=..` as one word), or why there was none.
fn upload_reply(sock: &mut std::net::TcpStream) -> String {
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    match sock.read_to_string(&mut answer) {
        Ok(_) if answer.starts_with("ALLYUPLOAD") => answer.trim().replace(' ', ","),
        Ok(_) => "none".into(),
        Err(e) => format!("none:{e}"),
    }
}

// --- 8. an alert storm -------------------------------------------------------------------------

/// The payload the runner's rule (sid 1000104) alerts on.
pub const STORM_MARKER: &str = "ALLY-ALERT-STORM";

/// busybox ping's reply times in ms (`time=X ms` lines), in arrival order.
pub fn ping_times(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split_once(" time=")?.1.split(' ').next()?.parse().ok())
        .collect()
}

/// busybox ping's median RTT (of its reply times: up to half the replies late do not move it,
/// where one would move the average) and the replies received. Without reply lines, the
/// average of `round-trip min/avg/max = a/b/c ms`.
pub fn parse_ping(out: &str) -> (Option<String>, Option<u32>) {
    let mut times = ping_times(out);
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).map(|t| format!("{t:.3}"));
    let rtt = median.or_else(|| {
        out.lines()
            .find_map(|l| l.split_once("min/avg/max = "))
            .and_then(|(_, v)| v.split('/').nth(1).map(str::to_string))
    });
    let received = out
        .lines()
        .find_map(|l| l.split_once(" packets received"))
        .and_then(|(l, _)| l.rsplit(' ').next()?.parse().ok());
    (rtt, received)
}

/// Seven pings 0.3 s apart (about two seconds, as long as a phase of the storm): the median
/// of seven stays put with three replies late.
fn ping_cmd() -> std::process::Command {
    let mut c = std::process::Command::new("ping");
    c.args(["-c", "7", "-i", "0.3", "-W", "3", "-w", "20", "10.0.2.2"]);
    c
}

/// The `ALLY mark` ids around the storm's phases (the guest's init uses 1..=10): the runner
/// compares the DPI core's wake-up latency between them.
pub const MARK_IDLE: u8 = 40;
pub const MARK_FLOOD: u8 = 41;
pub const MARK_STORM: u8 = 42;
pub const MARK_STORM_END: u8 = 43;

/// A datagram of the same length as a storm datagram that no rule matches.
pub const QUIET_MARKER: &str = "ALLY-QUIET-FLOOD";

/// Datagrams per burst, and the pause between bursts: about 4000 datagrams a second that leave
/// the guest's CPU time to answer pings, so that the RTT measures the path, not the sender.
const BURST: u64 = 16;
const BURST_PAUSE: Duration = Duration::from_millis(4);

/// Asks Ally for an `ALLY mark` counters snapshot: a byte to port 0x2FF, as the init script's
/// `exit_mark` does. Without Ally the port is unused.
fn exit_mark(id: u8) -> Result<(), sys::SysError> {
    sys::pwrite("/dev/port", 0x2ff, &[id])
}

/// busybox ping's output, or why it did not run.
type PingResult = std::io::Result<String>;

fn ping_output(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What one paced flood sent, how long it took, and the ping that ran meanwhile.
struct Flood {
    sent: u64,
    errors: u64,
    took: Duration,
    ping: PingResult,
}

/// Paced bursts of `prefix seq=N` datagrams for as long as a ping of the gateway runs (at
/// least `count`).
fn flood_with_ping(sock: &std::net::UdpSocket, prefix: &str, count: u64) -> Flood {
    let mut ping = ping_cmd().stdout(std::process::Stdio::piped()).spawn();
    let t = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut i = 0u64;
    loop {
        let pinging = match &mut ping {
            Ok(child) => matches!(child.try_wait(), Ok(None)),
            Err(_) => false,
        };
        if i >= count && !pinging {
            break;
        }
        for _ in 0..BURST {
            match sock.send(format!("{prefix} seq={i:06}").as_bytes()) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
            i += 1;
        }
        thread::sleep(BURST_PAUSE);
    }
    let took = t.elapsed();
    let ping = ping.and_then(|c| c.wait_with_output()).map(ping_output);
    Flood {
        sent,
        errors,
        took,
        ping,
    }
}

/// An alert storm: paced bursts of UDP datagrams, each alerted on, for as long as a ping of the
/// gateway runs (at least `count`). The same ping runs idle and during a flood of the same
/// datagrams that no rule matches, so that the runner compares the ping's RTT and the DPI
/// core's wake-up latency (from the `ALLY mark`s between the phases) with and without alerts.
pub fn alert_storm(port: u16, count: u64) -> Marker {
    let mut m = Marker::new("attack-alert-storm");
    let rtt = |p: &PingResult| match p {
        Ok(out) => parse_ping(out).0.unwrap_or_else(|| "none".into()),
        Err(e) => format!("ping_error:{e}"),
    };
    // Every reply time, for the runner's report when the medians disagree.
    let times = |p: &PingResult| match p {
        Ok(out) => {
            let t: Vec<String> = ping_times(out).iter().map(|t| format!("{t:.3}")).collect();
            if t.is_empty() {
                "none".into()
            } else {
                t.join(",")
            }
        }
        Err(_) => "none".into(),
    };
    let marks = exit_mark(MARK_IDLE);
    let idle = ping_cmd().output().map(ping_output);
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect(("10.0.2.2", port)).map(|()| s));
    let sock = match sock {
        Ok(s) => s,
        Err(e) => {
            m.field("error", format_args!("udp:{e}"));
            return m;
        }
    };
    let marks = marks.and_then(|()| exit_mark(MARK_FLOOD));
    let flood = flood_with_ping(&sock, QUIET_MARKER, count);
    let marks = marks.and_then(|()| exit_mark(MARK_STORM));
    let storm = flood_with_ping(&sock, STORM_MARKER, count);
    let marks = marks.and_then(|()| exit_mark(MARK_STORM_END));
    m.field("port", port)
        .field("sent", storm.sent)
        .field("errors", storm.errors)
        .field("flood_sent", flood.sent);
    m.field("storm_ms", storm.took.as_millis());
    m.field("rtt_idle_ms", rtt(&idle));
    m.field("rtt_flood_ms", rtt(&flood.ping));
    m.field("rtt_storm_ms", rtt(&storm.ping));
    m.field("times_idle_ms", times(&idle));
    m.field("times_flood_ms", times(&flood.ping));
    m.field("times_storm_ms", times(&storm.ping));
    m.field(
        "ping_storm_received",
        storm
            .ping
            .as_ref()
            .ok()
            .and_then(|out| parse_ping(out).1)
            .map_or("none".to_string(), |n| n.to_string()),
    );
    m.field(
        "marks",
        match marks {
            Ok(()) => format!("{MARK_IDLE},{MARK_FLOOD},{MARK_STORM},{MARK_STORM_END}"),
            Err(e) => e.to_string(),
        },
    );
    m
}

// --- 10. a forbidden datagram in IP fragments -------------------------------------------------

/// The payload the runner's drop rule (sid 1000105) refuses, sent only inside datagrams larger
/// than the MTU, so that the guest's IP layer fragments them.
pub const FRAG_SECRET: &str = "ALLY-FRAGMENTED-SECRET";
/// A datagram of the same size without it: it must reach the host, reassembled.
pub const FRAG_CONTROL: &str = "ALLY-FRAGMENTED-CONTROL";
/// Datagram size: three fragments at a 1500-byte MTU (1472 + 1480 + 48 data bytes).
const FRAG_DATAGRAM: usize = 3000;
/// Where the secret sits: across the first fragment boundary (data byte 1472), and wholly
/// inside the second fragment (which has no UDP header, so no ports).
const FRAG_SECRET_AT: [usize; 2] = [1460, 2000];

/// A `len`-byte datagram: filler with `marker` at `at`, and a sequence number up front.
pub fn frag_datagram(marker: &str, at: usize, seq: usize, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| b'a' + (i % 23) as u8).collect();
    let head = format!("FRAG seq={seq:03} ");
    d[..head.len()].copy_from_slice(head.as_bytes());
    d[at..at + marker.len()].copy_from_slice(marker.as_bytes());
    d
}

/// Datagrams bigger than the MTU to the host's UDP sink, with IP fragmentation allowed
/// (IP_PMTUDISC_DONT): control datagrams without the secret (they must arrive, reassembled),
/// then datagrams with the secret across a fragment boundary and inside a later fragment
/// (none may arrive). Each is sent three times, 50 ms apart.
pub fn frag_udp(port: u16) -> Marker {
    let mut m = Marker::new("attack-frag-udp");
    m.field("port", port);
    let sock = match std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect(("10.0.2.2", port)).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            m.field("error", format_args!("udp:{e}"));
            return m;
        }
    };
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: the socket is open for the call; the option value is a c_int of that size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&dont as *const libc::c_int).cast(),
            core::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        m.field(
            "error",
            format_args!("setsockopt:{}", std::io::Error::last_os_error()),
        );
        return m;
    }
    let (mut control, mut secret, mut errors) = (0, 0, 0);
    let mut seq = 0;
    let send = |d: &[u8]| {
        thread::sleep(Duration::from_millis(50));
        sock.send(d).is_ok()
    };
    for _ in 0..3 {
        seq += 1;
        if send(&frag_datagram(FRAG_CONTROL, 1460, seq, FRAG_DATAGRAM)) {
            control += 1;
        } else {
            errors += 1;
        }
        for at in FRAG_SECRET_AT {
            seq += 1;
            if send(&frag_datagram(FRAG_SECRET, at, seq, FRAG_DATAGRAM)) {
                secret += 1;
            } else {
                errors += 1;
            }
        }
    }
    m.field("bytes", FRAG_DATAGRAM)
        .field("control_sent", control)
        .field("secret_sent", secret)
        .field("errors", errors);
    m
}

// --- resets -------------------------------------------------------------------------------------

/// Waits until the 8042's input buffer is empty (status bit 1), 100 ms at most.
fn kbc_wait() -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(100) {
        // SAFETY: ioperm(0x60..0x65) granted by the caller; the status read has no side effect.
        if unsafe { inb(0x64) } & 2 == 0 {
            return true;
        }
        thread::sleep(Duration::from_micros(100));
    }
    false
}

/// Prints the marker and lets the console drain before the machine goes.
fn announce(m: &Marker) {
    m.print();
    // SAFETY: tcdrain on stdout only waits; it fails harmlessly when stdout is no tty.
    unsafe { libc::tcdrain(1) };
    sleep_ms(300);
}

/// Resets the machine by `method`, printing `ALLYTEST reset-attack INFO ... method=M` first.
/// Returns only when the method is unavailable or the machine kept running (the caller then
/// falls back to another reset).
pub fn reset(method: &str, extra: &str) {
    let mut m = Marker::new("reset-attack");
    m.raw(extra).field("method", method);
    let io = |m: &mut Marker, from: u16, n: u16| match sys::port_access(from, n) {
        Ok(()) => true,
        Err(e) => {
            m.field("error", e);
            announce(m);
            false
        }
    };
    match method {
        "kbc-pulse" | "kbc-output" => {
            if !io(&mut m, 0x60, 5) {
                return;
            }
            m.field("ibf_clear", u8::from(kbc_wait()));
            announce(&m);
            // SAFETY: ports granted; the reset is the intent.
            unsafe {
                if method == "kbc-pulse" {
                    outb(0x64, 0xfe);
                } else {
                    // Write output port: bit 0 (reset line) clear.
                    outb(0x64, 0xd1);
                    kbc_wait();
                    outb(0x60, 0xfe);
                }
            }
        }
        "port92-word" => {
            if !io(&mut m, 0x91, 2) {
                return;
            }
            announce(&m);
            // SAFETY: ports granted; 0x92 gets 0x01 (fast reset), 0x91 gets 0.
            unsafe { outw(0x91, 0x0100) };
        }
        "cf9-word" | "cf9-byte" => {
            if !io(&mut m, CONFIG_ADDRESS, 4) {
                return;
            }
            announce(&m);
            // SAFETY: iopl granted; 0xCF9 gets 0x06 (SYS_RST | RST_CPU), by word or byte.
            unsafe {
                if method == "cf9-word" {
                    outw(CONFIG_ADDRESS, 0x0600);
                } else {
                    outb(0xcf9, 0x06);
                }
            }
        }
        "acpi-reset-reg" => {
            let fadt = std::fs::read(acpi::FADT_PATH)
                .map_err(|e| e.to_string())
                .and_then(|t| acpi::parse_fadt(&t).map_err(|e| e.to_string()));
            match fadt.map(|f| f.reset) {
                Err(e) => {
                    m.field("skipped", e);
                    announce(&m);
                    return;
                }
                Ok(None) => {
                    m.field("skipped", "no_reset_reg");
                    announce(&m);
                    return;
                }
                Ok(Some((Gas { space, address, .. }, value))) => {
                    m.field("space", space)
                        .hex("address", address)
                        .hex("value", value.into());
                    if space == acpi::SPACE_IO && address <= 0xffff {
                        if !io(&mut m, address as u16, 1) {
                            return;
                        }
                        announce(&m);
                        // SAFETY: port granted; the firmware's reset register is the intent.
                        unsafe { outb(address as u16, value) };
                    } else if space == acpi::SPACE_MEMORY {
                        let page = address & !0xfff;
                        match PhysMap::open("/dev/mem", page, 4096) {
                            Ok(p) => {
                                announce(&m);
                                p.write8((address - page) as usize, value);
                            }
                            Err(e) => {
                                m.field("error", e);
                                announce(&m);
                                return;
                            }
                        }
                    } else {
                        m.field("skipped", "unsupported_space");
                        announce(&m);
                        return;
                    }
                }
            }
        }
        "triple-fault" => {
            // LIDT is privileged: from user space a fault is the kernel's (a SIGSEGV), never a
            // triple fault. It needs ring 0 (a kernel module).
            m.field("skipped", "needs_ring0");
            announce(&m);
            return;
        }
        "reboot" => {
            announce(&m);
            let _ = std::process::Command::new("reboot").arg("-f").status();
        }
        other => {
            m.field("skipped", format_args!("unknown_method_{other}"));
            announce(&m);
            return;
        }
    }
    // The machine should be gone; give it a few seconds.
    sleep_ms(10_000);
}

/// Issue 15's exit-path benchmark, seen from the guest: `count` reads of a register on a
/// page Ally traps (STATUS: each read is a VM exit, emulated and resumed) and as many of one
/// on a page it leaves mapped (PBA, which the device answers directly), timed with the TSC
/// and the monotonic clock. The difference per read is the round trip of one trapped access
/// through Ally (exit, decode, emulation, resume), the emulator's own MMIO cost taken out.
pub fn exit_cost(count: u64) -> Marker {
    let mut m = Marker::new("exit-cost");
    let Some((_, bar)) = nic_bar0(&mut m, 0x2000) else {
        return m;
    };
    let count = count.max(1);
    let time = |offset: usize| {
        let started = Instant::now();
        // SAFETY: RDTSC has no preconditions (CR4.TSD is clear for Linux user space).
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        for _ in 0..count {
            std::hint::black_box(bar.read32(offset));
        }
        // SAFETY: as above.
        let t1 = unsafe { core::arch::x86_64::_rdtsc() };
        (
            t1.wrapping_sub(t0) / count,
            started.elapsed().as_nanos() as u64 / count,
        )
    };
    let (trapped_tsc, trapped_ns) = time(nic::STATUS);
    let (direct_tsc, direct_ns) = time(nic::PBA);
    m.field("reads", count)
        .field("trapped_tsc", trapped_tsc)
        .field("trapped_ns", trapped_ns)
        .field("direct_tsc", direct_tsc)
        .field("direct_ns", direct_ns)
        .field("round_trip_tsc", trapped_tsc.saturating_sub(direct_tsc))
        .field("round_trip_ns", trapped_ns.saturating_sub(direct_ns));
    m
}

/// Issue 15's bulk receive: counts the datagrams of the host's UDP flood arriving at `port`
/// (slirp forwards it there), from the first one until `count` came or none for a second
/// (at most 60 s in all; 20 s for the first).
pub fn udp_sink(port: u16, count: u64) -> Marker {
    let mut m = Marker::new("udp-flood");
    let sock = match std::net::UdpSocket::bind(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => {
            m.field("error", format!("bind_{}", e.kind()));
            return m;
        }
    };
    let mut buf = vec![0u8; 2048];
    let (mut received, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    let mut first = None;
    while received < count && started.elapsed() < Duration::from_secs(60) {
        let wait = if first.is_none() { 20 } else { 1 };
        let _ = sock.set_read_timeout(Some(Duration::from_secs(wait)));
        match sock.recv(&mut buf) {
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                received += 1;
                bytes += n as u64;
            }
            Err(_) => break,
        }
    }
    let seconds = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    m.field("port", port)
        .field("received", received)
        .field("bytes", bytes)
        .field("seconds", format!("{seconds:.2}"));
    m
}

// --- 10. out-of-order segments injected into a live upload --------------------------------------

/// The benign upload's three pieces; the host must receive exactly their concatenation
/// ([`OOO_UPLOAD_PIECES`] joined: the runner knows it too).
pub const OOO_UPLOAD_PIECES: [&str; 3] = [
    "OOO-UPLOAD piece-A 0123456789abcdef\n",
    "OOO-UPLOAD piece-B fedcba9876543210\n",
    "OOO-UPLOAD piece-C the-held-segment\n",
];

/// A raw `AF_PACKET` socket on `eth0` that sees every frame, outgoing ones included.
struct Tap {
    fd: libc::c_int,
    ifindex: libc::c_int,
}

impl Tap {
    fn open() -> Result<Tap, String> {
        let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
        // SAFETY: plain socket(2) call; the descriptor is owned by the returned Tap.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            return Err(format!("af_packet:{}", std::io::Error::last_os_error()));
        }
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) } as libc::c_int;
        let tap = Tap { fd, ifindex };
        if ifindex == 0 {
            return Err("no_eth0".into());
        }
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { core::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = ifindex;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: the socket is open; the option values are of the sizes given.
        let ok = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                core::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ) == 0
                && libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    core::mem::size_of::<libc::timeval>() as libc::socklen_t,
                ) == 0
        };
        if !ok {
            return Err(format!(
                "af_packet_bind:{}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(tap)
    }

    /// The next frame, or `None` after the receive timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { core::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the frame and the address are valid for the sizes given.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                core::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        n == frame.len() as isize
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// A connection to the host's upload listener on `port`, or `None` with the reason in `m`'s
/// `error` field.
fn connect_upload(m: &mut Marker, port: u16) -> Option<std::net::TcpStream> {
    let addr = std::net::SocketAddr::from(([10, 0, 2, 2], port));
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(s) => Some(s),
        Err(e) => {
            m.field("error", format_args!("connect:{e}"));
            None
        }
    }
}

/// The tap, or `None` with the reason in `m`'s `error` field.
fn open_tap(m: &mut Marker) -> Option<Tap> {
    match Tap::open() {
        Ok(t) => Some(t),
        Err(e) => {
            m.field("error", e);
            None
        }
    }
}

/// RFC 1071 checksum of `b`.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The guest's own outgoing TCP/IPv4 frame to `port` carrying `payload` (seen on the tap
/// within two seconds): the template for a forged segment of the same connection.
fn sniff_segment(tap: &Tap, port: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let Some(n) = tap.recv(&mut buf) else {
            continue;
        };
        let f = &buf[..n];
        if n < 54 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
            continue;
        }
        let ihl = usize::from(f[14] & 0x0F) * 4;
        let tcp = 14 + ihl;
        if n < tcp + 20 || u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]) != port {
            continue;
        }
        let data = tcp + usize::from(f[tcp + 12] >> 4) * 4;
        if f.get(data..) == Some(payload) {
            return Some(f.to_vec());
        }
    }
    None
}

/// `template` (a frame of the connection) carrying `payload` at sequence number offset
/// `ahead` bytes past the template's own data, with its IP identification bumped and both
/// checksums computed.
fn forge_segment(template: &[u8], ahead: u32, payload: &[u8]) -> Vec<u8> {
    let ihl = usize::from(template[14] & 0x0F) * 4;
    let tcp = 14 + ihl;
    let data = tcp + usize::from(template[tcp + 12] >> 4) * 4;
    let own = (template.len() - data) as u32;
    let mut f = template[..data].to_vec();
    f.extend_from_slice(payload);
    let total = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    let id = u16::from_be_bytes([f[18], f[19]]).wrapping_add(7);
    f[18..20].copy_from_slice(&id.to_be_bytes());
    f[24..26].fill(0);
    let sum = checksum(&f[14..tcp]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    let seq = u32::from_be_bytes(f[tcp + 4..tcp + 8].try_into().unwrap_or([0; 4]));
    f[tcp + 4..tcp + 8].copy_from_slice(&seq.wrapping_add(own + ahead).to_be_bytes());
    fill_tcp_checksum(&mut f, tcp);
    f
}

/// The TCP checksum of the TCP/IPv4 frame `f` whose TCP header starts at `tcp` (RFC 9293
/// §3.1, the IPv4 pseudo-header).
fn fill_tcp_checksum(f: &mut [u8], tcp: usize) {
    f[tcp + 16..tcp + 18].fill(0);
    let mut pseudo = Vec::with_capacity(12 + f.len() - tcp);
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((f.len() - tcp) as u16).to_be_bytes());
    pseudo.extend_from_slice(&f[tcp..]);
    let sum = checksum(&pseudo);
    f[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
}

/// An RST of `template`'s connection at exactly the next sequence number (the one Ally
/// accepts) with a broken IPv4 header checksum: an RST that goes astray. slirp, the test
/// network's receiver, drops it as a router would (its `ip_input` checks the header), so the
/// host's end of the connection never sees it; so are RSTs sent to another MAC address or
/// with a TTL that expires on the way.
fn forge_astray_rst(template: &[u8]) -> Vec<u8> {
    let mut f = forge_segment(template, 0, b"");
    let tcp = 14 + usize::from(f[14] & 0x0F) * 4;
    // RST|ACK: the acknowledgement of the template's segment stays.
    f[tcp + 13] = 0x14;
    fill_tcp_checksum(&mut f, tcp);
    f[24] ^= 0x5a;
    f
}

/// The two halves of the upload the RST is sent between: the forbidden content is cut in two
/// (the runner's rule sid 1000103 drops it whole).
fn rst_split_halves() -> (Vec<u8>, Vec<u8>) {
    let (a, b) = FORBIDDEN_UPLOAD
        .as_bytes()
        .split_at(FORBIDDEN_UPLOAD.len() / 2);
    ([b"RST-SPLIT ", a].concat(), [b, b" END\n"].concat())
}

/// A forbidden upload split around an RST that goes astray (issue 12): the first half of the
/// forbidden content through the socket, then (on the tap) an exact RST of the connection that
/// its receiver drops (a bad IPv4 header checksum), then the second half. An inspector that ends the
/// flow at the RST and picks the rest up midstream matches neither half; the host, which never
/// got the RST, receives the whole. The runner judges from what the host received.
pub fn rst_split(port: u16) -> Marker {
    let mut m = Marker::new("attack-rst-split");
    m.field("port", port);
    let Some(tap) = open_tap(&mut m) else {
        return m;
    };
    let Some(mut sock) = connect_upload(&mut m, port) else {
        return m;
    };
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(3)));
    let (first, second) = rst_split_halves();
    let mut scratch = vec![0u8; 2048];
    while tap.recv(&mut scratch).is_some() {}
    if let Err(e) = sock.write_all(&first) {
        m.field("error", format_args!("write:{e}"));
        return m;
    }
    let rst_sent = match sniff_segment(&tap, port, &first) {
        Some(t) => tap.send(&forge_astray_rst(&t)),
        None => false,
    };
    m.field("rst_sent", rst_sent);
    thread::sleep(Duration::from_millis(200));
    let second_written = sock.write_all(&second).is_ok();
    m.field("second_written", second_written)
        .field("reply", upload_reply(&mut sock));
    m
}

/// One upload of [`OOO_UPLOAD_PIECES`] with a forged segment injected ahead of the stream:
/// piece A through the socket, then (on the tap) `injected` at the place of piece C, then
/// pieces B and C through the socket. Returns the host's reply and whether the forged
/// segment was sent.
fn ooo_one(tap: &Tap, port: u16, injected: &[u8]) -> (String, bool) {
    let addr = std::net::SocketAddr::from(([10, 0, 2, 2], port));
    let mut sock = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => return (format!("none:connect:{e}"), false),
    };
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(3)));
    let [a, b, c] = OOO_UPLOAD_PIECES.map(str::as_bytes);
    // Drain what the tap saw so far, then send A and find it.
    let mut scratch = vec![0u8; 2048];
    while tap.recv(&mut scratch).is_some() {}
    if sock.write_all(a).is_err() {
        return ("none:write".into(), false);
    }
    let injected_ok = match sniff_segment(tap, port, a) {
        Some(t) => tap.send(&forge_segment(&t, b.len() as u32, injected)),
        None => false,
    };
    thread::sleep(Duration::from_millis(200));
    let _ = sock.write_all(b);
    thread::sleep(Duration::from_millis(200));
    let _ = sock.write_all(c);
    (upload_reply(&mut sock), injected_ok)
}

/// Out-of-order segments forged into live uploads (issue 12's hold and re-inject): on one
/// upload a copy of its own third piece sent ahead of the second (Ally must hold it, send it
/// once the second piece fills the gap, and the host must receive the upload intact); on
/// another the forbidden content in that place (Ally holds it, judges it when the gap fills and
/// drops it: the host must never receive it).
pub fn ooo_upload(port: u16) -> Marker {
    let mut m = Marker::new("attack-ooo-upload");
    m.field("port", port);
    let Some(tap) = open_tap(&mut m) else {
        return m;
    };
    let (reply, sent) = ooo_one(&tap, port, OOO_UPLOAD_PIECES[2].as_bytes());
    m.field("copy_injected", sent).field("copy_reply", reply);
    let (reply, sent) = ooo_one(&tap, port, FORBIDDEN_UPLOAD.as_bytes());
    m.field("forbidden_injected", sent)
        .field("forbidden_reply", reply);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet, IPv4 (20), TCP with 12 bytes of options (timestamps), 5 data bytes.
    fn tcp_template() -> Vec<u8> {
        let mut t = vec![0u8; 14 + 20 + 32 + 5];
        t[12..14].copy_from_slice(&[0x08, 0x00]);
        t[14] = 0x45;
        t[16..18].copy_from_slice(&((20 + 32 + 5) as u16).to_be_bytes());
        t[22] = 64;
        t[23] = 6;
        t[26..30].copy_from_slice(&[10, 0, 2, 15]);
        t[30..34].copy_from_slice(&[10, 0, 2, 2]);
        t[34..36].copy_from_slice(&40000u16.to_be_bytes());
        t[36..38].copy_from_slice(&9u16.to_be_bytes());
        t[38..42].copy_from_slice(&1000u32.to_be_bytes());
        t[46] = 8 << 4;
        t[47] = 0x18;
        t[54..66].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        t[66..].copy_from_slice(b"hello");
        t
    }

    /// The astray RST: the template's connection at exactly its next sequence number, RST and
    /// ACK set, a valid TCP checksum and a broken IPv4 header checksum.
    #[test]
    fn the_astray_rst_is_exact_with_a_broken_ip_checksum() {
        let template = forge_segment(&tcp_template(), 0, b"RST-SPLIT ALLY-FORBI");
        let untagged = forge_astray_rst(&template);
        let tcp = 14 + usize::from(untagged[14] & 0x0F) * 4;
        assert_eq!(untagged[tcp + 13], 0x14);
        assert_ne!(checksum(&untagged[14..tcp]), 0);
        let seq = |f: &[u8]| u32::from_be_bytes(f[tcp + 4..tcp + 8].try_into().unwrap());
        let data = tcp + usize::from(template[tcp + 12] >> 4) * 4;
        assert_eq!(
            seq(&untagged),
            seq(&template) + (template.len() - data) as u32
        );
        assert_eq!(untagged.len(), data);
        let mut pseudo = untagged[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((untagged.len() - tcp) as u16).to_be_bytes());
        pseudo.extend_from_slice(&untagged[tcp..]);
        assert_eq!(checksum(&pseudo), 0);
        let (a, b) = rst_split_halves();
        let whole = [a, b].concat();
        assert!(whole
            .windows(FORBIDDEN_UPLOAD.len())
            .any(|w| w == FORBIDDEN_UPLOAD.as_bytes()));
    }

    /// A forged segment continues the template's connection `ahead` bytes past its data, with
    /// valid IPv4 and TCP checksums and the template's options.
    #[test]
    fn forged_segments_are_valid_tcp() {
        let t = tcp_template();
        let f = forge_segment(&t, 30, b"later bytes");
        assert_eq!(f.len(), 14 + 20 + 32 + 11);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(
            u32::from_be_bytes(f[38..42].try_into().unwrap()),
            1000 + 5 + 30
        );
        assert_eq!(f[54..66], t[54..66]);
        assert_eq!(&f[66..], b"later bytes");
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((f.len() - 34) as u16).to_be_bytes());
        pseudo.extend_from_slice(&f[34..]);
        assert_eq!(checksum(&pseudo), 0);
    }

    #[test]
    fn busybox_ping_output() {
        let out = "PING 10.0.2.2 (10.0.2.2): 56 data bytes\n64 bytes from 10.0.2.2: seq=0 ttl=255 time=0.512 ms\n\n--- 10.0.2.2 ping statistics ---\n3 packets transmitted, 3 packets received, 0% packet loss\nround-trip min/avg/max = 0.512/0.640/0.768 ms\n";
        assert_eq!(parse_ping(out), (Some("0.512".into()), Some(3)));
        let three = "64 bytes from 10.0.2.2: seq=0 ttl=255 time=1.300 ms\n\
                     64 bytes from 10.0.2.2: seq=1 ttl=255 time=36.000 ms\n\
                     64 bytes from 10.0.2.2: seq=2 ttl=255 time=1.400 ms\n\
                     3 packets transmitted, 3 packets received, 0% packet loss\n\
                     round-trip min/avg/max = 1.300/12.900/36.000 ms\n";
        assert_eq!(parse_ping(three), (Some("1.400".into()), Some(3)));
        assert_eq!(ping_times(three), [1.3, 36.0, 1.4]);
        let summary_only = "3 packets transmitted, 3 packets received, 0% packet loss\n\
                            round-trip min/avg/max = 0.512/0.640/0.768 ms\n";
        assert_eq!(parse_ping(summary_only), (Some("0.640".into()), Some(3)));
        assert_eq!(
            parse_ping("3 packets transmitted, 0 packets received, 100% packet loss\n"),
            (None, Some(0))
        );
    }

    #[test]
    fn fragmented_datagrams_place_the_secret_across_and_after_the_first_fragment() {
        // A 1500-byte MTU: 1480 bytes of IP payload per fragment, 8 of them the UDP header.
        let first_data = 1480 - 8;
        let across = frag_datagram(FRAG_SECRET, FRAG_SECRET_AT[0], 1, FRAG_DATAGRAM);
        let at = FRAG_SECRET_AT[0];
        assert!(at < first_data && at + FRAG_SECRET.len() > first_data);
        assert_eq!(&across[at..at + FRAG_SECRET.len()], FRAG_SECRET.as_bytes());
        assert!(FRAG_SECRET_AT[1] >= first_data + 8);
        assert!(FRAG_SECRET_AT[1] + FRAG_SECRET.len() <= first_data + 1480);
        let control = frag_datagram(FRAG_CONTROL, 1460, 1, FRAG_DATAGRAM);
        assert!(!control
            .windows(FRAG_SECRET.len())
            .any(|w| w == FRAG_SECRET.as_bytes()));
        assert!(control.len() > 2 * 1480);
    }

    #[test]
    fn the_quiet_flood_matches_the_storm_datagrams_in_size() {
        assert_eq!(QUIET_MARKER.len(), STORM_MARKER.len());
        assert!(!QUIET_MARKER.contains(STORM_MARKER));
    }

    #[test]
    fn tucso_lands_in_the_payload() {
        let tucso = nic::PAYLOAD_START + TUCSO_MARKER.len() + 4;
        assert!(tucso > nic::PAYLOAD_START + TUCSO_MARKER.len());
        assert!(tucso + 2 <= nic::PAYLOAD_START + TUCSO_MARKER.len() + 16);
        assert!(tucso < 256, "TUCSO is a byte");
    }
}
