//! The ACPI tables the sleep and reset attacks read (/sys/firmware/acpi/tables/FACP, DSDT).
//! Offsets from the ACPI 6.5 specification, table 5.9 (FADT) and 5.2.3.2 (Generic Address
//! Structure); the `_Sx_` packages from 7.4.2 and the AML encoding of 20.2.

/// A Generic Address Structure (ACPI 5.2.3.2): address space 0 = memory, 1 = system I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub address: u64,
}

pub const SPACE_MEMORY: u8 = 0;
pub const SPACE_IO: u8 = 1;

/// The FADT fields the attacks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fadt {
    pub revision: u8,
    /// PM1a_CNT_BLK (the X_ GAS's I/O address when the table has one).
    pub pm1a_cnt: u16,
    /// PM1b_CNT_BLK, 0 when absent.
    pub pm1b_cnt: u16,
    /// RESET_REG and RESET_VALUE when the table has them and flags.RESET_REG_SUP is set.
    pub reset: Option<(Gas, u8)>,
}

/// Why a table could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcpiError {
    TooShort { table: &'static str, len: usize },
    BadSignature { table: &'static str },
}

impl std::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcpiError::TooShort { table, len } => write!(f, "{table}_too_short_{len}_bytes"),
            AcpiError::BadSignature { table } => write!(f, "{table}_bad_signature"),
        }
    }
}

fn u32_at(t: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(t[at..at + 4].try_into().expect("4 bytes"))
}

fn gas_at(t: &[u8], at: usize) -> Gas {
    Gas {
        space: t[at],
        bit_width: t[at + 1],
        address: u64::from_le_bytes(t[at + 4..at + 12].try_into().expect("8 bytes")),
    }
}

/// FADT offsets (ACPI table 5.9).
const PM1A_CNT_BLK: usize = 64;
const PM1B_CNT_BLK: usize = 68;
const FLAGS: usize = 112;
const RESET_REG: usize = 116;
const RESET_VALUE: usize = 128;
const X_PM1A_CNT_BLK: usize = 172;
const X_PM1B_CNT_BLK: usize = 184;
/// FADT flags bit 10: RESET_REG_SUP.
const RESET_REG_SUP: u32 = 1 << 10;

/// A PM1 control block from its 32-bit field, or the X_ GAS when it is in I/O space and set.
fn pm1_block(t: &[u8], legacy: usize, x: usize) -> u16 {
    if t.len() >= x + 12 {
        let g = gas_at(t, x);
        if g.space == SPACE_IO && g.address != 0 && g.address <= 0xffff {
            return g.address as u16;
        }
    }
    u32_at(t, legacy) as u16
}

/// Parses the FADT (signature `FACP`).
pub fn parse_fadt(t: &[u8]) -> Result<Fadt, AcpiError> {
    if t.len() < 36 || &t[..4] != b"FACP" {
        return Err(if t.len() < 4 {
            AcpiError::TooShort {
                table: "FACP",
                len: t.len(),
            }
        } else {
            AcpiError::BadSignature { table: "FACP" }
        });
    }
    if t.len() < FLAGS + 4 {
        return Err(AcpiError::TooShort {
            table: "FACP",
            len: t.len(),
        });
    }
    let reset = (t.len() > RESET_VALUE && u32_at(t, FLAGS) & RESET_REG_SUP != 0)
        .then(|| (gas_at(t, RESET_REG), t[RESET_VALUE]))
        .filter(|(g, _)| g.address != 0);
    Ok(Fadt {
        revision: t[8],
        pm1a_cnt: pm1_block(t, PM1A_CNT_BLK, X_PM1A_CNT_BLK),
        pm1b_cnt: pm1_block(t, PM1B_CNT_BLK, X_PM1B_CNT_BLK),
        reset,
    })
}

/// The SLP_TYPa value of `_S<state>_` in the DSDT's AML, if it defines one:
/// `NameOp (0x08) [\] _Sn_ PackageOp (0x12) PkgLength NumElements <first element>`, the first
/// element a ByteConst (0x0A nn), WordConst (0x0B nnnn), ZeroOp (0x00), OneOp (0x01).
pub fn sleep_type(dsdt: &[u8], state: u8) -> Option<u8> {
    let name = [b'_', b'S', b'0' + state, b'_'];
    let mut from = 0;
    while let Some(rel) = dsdt[from..].windows(4).position(|w| w == name) {
        let at = from + rel;
        from = at + 1;
        let named = (at >= 1 && dsdt[at - 1] == 0x08)
            || (at >= 2 && dsdt[at - 1] == b'\\' && dsdt[at - 2] == 0x08);
        if !named {
            continue;
        }
        let mut p = at + 4;
        if dsdt.get(p) != Some(&0x12) {
            continue;
        }
        p += 1;
        // PkgLength: bits 7-6 of the lead byte count the bytes that follow it.
        let lead = *dsdt.get(p)?;
        p += 1 + usize::from(lead >> 6);
        p += 1; // NumElements
        return match *dsdt.get(p)? {
            0x00 => Some(0),
            0x01 => Some(1),
            0x0a => dsdt.get(p + 1).copied(),
            0x0b => dsdt.get(p + 1).copied(),
            _ => None,
        };
    }
    None
}

/// PM1 control register bits (ACPI 4.8.4.2.1): SLP_TYP (12:10) and SLP_EN (13).
pub const SLP_TYP_MASK: u16 = 0x1c00;
pub const SLP_EN: u16 = 1 << 13;

/// The PM1_CNT value that enters sleep type `typ` from the current value.
pub fn pm1_sleep_value(current: u16, typ: u8) -> u16 {
    (current & !SLP_TYP_MASK) | ((u16::from(typ) & 7) << 10) | SLP_EN
}

pub const FADT_PATH: &str = "/sys/firmware/acpi/tables/FACP";
pub const DSDT_PATH: &str = "/sys/firmware/acpi/tables/DSDT";

#[cfg(test)]
mod tests {
    use super::*;

    fn fadt(len: usize, revision: u8) -> Vec<u8> {
        let mut t = vec![0u8; len];
        t[..4].copy_from_slice(b"FACP");
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        t[8] = revision;
        t[PM1A_CNT_BLK..PM1A_CNT_BLK + 4].copy_from_slice(&0xb004u32.to_le_bytes());
        t
    }

    #[test]
    fn revision_1_fadt_has_pm1a_only() {
        let f = parse_fadt(&fadt(116, 1)).unwrap();
        assert_eq!(
            f,
            Fadt {
                revision: 1,
                pm1a_cnt: 0xb004,
                pm1b_cnt: 0,
                reset: None
            }
        );
    }

    #[test]
    fn reset_register_needs_the_flag_and_an_address() {
        let mut t = fadt(244, 4);
        // RESET_REG: I/O space, 8 bits, at 0xCF9; RESET_VALUE 6.
        t[RESET_REG] = SPACE_IO;
        t[RESET_REG + 1] = 8;
        t[RESET_REG + 4..RESET_REG + 12].copy_from_slice(&0xcf9u64.to_le_bytes());
        t[RESET_VALUE] = 6;
        assert_eq!(parse_fadt(&t).unwrap().reset, None, "flag clear");
        t[FLAGS + 1] = (RESET_REG_SUP >> 8) as u8;
        let (g, v) = parse_fadt(&t).unwrap().reset.unwrap();
        assert_eq!(
            (g.space, g.bit_width, g.address, v),
            (SPACE_IO, 8, 0xcf9, 6)
        );
        // The X_ GAS wins when it is an I/O address.
        t[X_PM1A_CNT_BLK] = SPACE_IO;
        t[X_PM1A_CNT_BLK + 4..X_PM1A_CNT_BLK + 12].copy_from_slice(&0x604u64.to_le_bytes());
        t[X_PM1B_CNT_BLK] = SPACE_IO;
        t[X_PM1B_CNT_BLK + 4..X_PM1B_CNT_BLK + 12].copy_from_slice(&0x608u64.to_le_bytes());
        let f = parse_fadt(&t).unwrap();
        assert_eq!((f.pm1a_cnt, f.pm1b_cnt), (0x604, 0x608));
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(matches!(
            parse_fadt(b"FAC"),
            Err(AcpiError::TooShort { .. })
        ));
        assert_eq!(
            parse_fadt(&[0u8; 200]),
            Err(AcpiError::BadSignature { table: "FACP" })
        );
        assert!(matches!(
            parse_fadt(&fadt(100, 1)),
            Err(AcpiError::TooShort { .. })
        ));
    }

    #[test]
    fn sleep_packages_in_aml() {
        let mut aml = b"DSDT....".to_vec();
        // Name (\_S3_, Package (0x04) { One, One, Zero, Zero })
        aml.extend_from_slice(&[
            0x08, b'\\', b'_', b'S', b'3', b'_', 0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00,
        ]);
        // Name (_S4_, Package (0x04) { 0x02, 0x02, Zero, Zero })
        aml.extend_from_slice(&[
            0x08, b'_', b'S', b'4', b'_', 0x12, 0x08, 0x04, 0x0a, 0x02, 0x0a, 0x02, 0x00, 0x00,
        ]);
        // Name (_S5_, Package (0x04) { Zero, Zero, ... }) with a two-byte PkgLength
        aml.extend_from_slice(&[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x40, 0x00, 0x04, 0x00, 0x00,
        ]);
        // A method call mentioning _S1_ is no definition.
        aml.extend_from_slice(b"\x70_S1_\x12\x06\x04\x0a\x07");
        assert_eq!(sleep_type(&aml, 3), Some(1));
        assert_eq!(sleep_type(&aml, 4), Some(2));
        assert_eq!(sleep_type(&aml, 5), Some(0));
        assert_eq!(sleep_type(&aml, 1), None);
        assert_eq!(sleep_type(&aml, 2), None);
        // Truncated after the PackageOp.
        assert_eq!(sleep_type(&[0x08, b'_', b'S', b'3', b'_', 0x12], 3), None);
    }

    #[test]
    fn pm1_values() {
        assert_eq!(pm1_sleep_value(0x0001, 1), 0x2401);
        assert_eq!(pm1_sleep_value(0x1c01, 5), 0x3401);
        assert_eq!(pm1_sleep_value(0, 0), SLP_EN);
    }
}
