//! PCI configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2) and the sysfs view of the
//! guest's devices.

/// CONFIG_ADDRESS (port 0xCF8) for `bus:dev.func` register `offset` (dword-aligned).
pub fn config_address(bus: u8, dev: u8, func: u8, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(bus) << 16)
        | (u32::from(dev & 0x1f) << 11)
        | (u32::from(func & 7) << 8)
        | u32::from(offset & 0xfc)
}

/// Parses a sysfs device name `DDDD:BB:DD.F` into (bus, dev, func).
pub fn parse_bdf(name: &str) -> Option<(u8, u8, u8)> {
    let mut it = name.rsplitn(3, ':');
    let df = it.next()?;
    let bus = u8::from_str_radix(it.next()?, 16).ok()?;
    let (d, f) = df.split_once('.')?;
    Some((bus, u8::from_str_radix(d, 16).ok()?, f.parse().ok()?))
}

pub const SYSFS_DEVICES: &str = "/sys/bus/pci/devices";

/// The sysfs name of the first device `vendor:device`.
pub fn find_device(vendor: u16, device: u16) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(SYSFS_DEVICES)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        let id = |f: &str| {
            crate::sys::read_text(&format!("{SYSFS_DEVICES}/{n}/{f}"))
                .and_then(|s| u16::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        };
        id("vendor") == Some(vendor) && id("device") == Some(device)
    })
}

/// The sysfs name of the first device whose 24-bit class code (`class`: base class, subclass,
/// programming interface; PCI Local Bus 3.0, 6.2.1) is `class`.
pub fn find_class(class: u32) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(SYSFS_DEVICES)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        crate::sys::read_text(&format!("{SYSFS_DEVICES}/{n}/class"))
            .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            == Some(class)
    })
}

/// `bus:dev.func` of a sysfs name (`0000:00:1f.2` -> `00:1f.2`), as Ally names devices.
pub fn short_bdf(name: &str) -> String {
    match parse_bdf(name) {
        Some((b, d, f)) => format!("{b:02x}:{d:02x}.{f:x}"),
        None => name.to_string(),
    }
}

/// The e1000 (82540EM).
pub const E1000: (u16, u16) = (0x8086, 0x100e);

/// (start, end) of BAR `n` from the sysfs `resource` file (one `start end flags` line per BAR).
pub fn resource_range(text: &str, n: usize) -> Option<(u64, u64)> {
    let line = text.lines().nth(n)?;
    let mut w = line.split_whitespace();
    let num = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some((num(w.next()?)?, num(w.next()?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(config_address(0, 2, 0, 0x14), 0x8000_1014);
        assert_eq!(config_address(0, 0, 0, 0x2c), 0x8000_002c);
        assert_eq!(config_address(1, 31, 7, 0xff), 0x8001_fffc);
    }

    #[test]
    fn bdf_and_resources() {
        assert_eq!(parse_bdf("0000:00:02.0"), Some((0, 2, 0)));
        assert_eq!(parse_bdf("0000:1a:1f.7"), Some((0x1a, 0x1f, 7)));
        assert_eq!(parse_bdf("garbage"), None);
        assert_eq!(short_bdf("0000:00:1f.2"), "00:1f.2");
        assert_eq!(short_bdf("0000:1a:03.0"), "1a:03.0");
        let r = "0x00000000febc0000 0x00000000febdffff 0x0000000000040200\n0x000000000000c000 0x000000000000c03f 0x0000000000040101\n";
        assert_eq!(resource_range(r, 0), Some((0xfebc0000, 0xfebdffff)));
        assert_eq!(resource_range(r, 1), Some((0xc000, 0xc03f)));
        assert_eq!(resource_range(r, 2), None);
    }
}
