//! The GRUB boot ISO (grub-mkrescue) and the Ally image it carries.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tool::{self, ToolError};

/// What GRUB boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootTarget {
    /// `multiboot2 /boot/ally <options>`: Ally, which then boots the first hard disk itself;
    /// with `rules`, that blob goes in as `module2 /boot/rules.blob rules`.
    Ally {
        image: PathBuf,
        options: String,
        rules: Option<PathBuf>,
    },
    /// The baseline: GRUB chainloads the first hard disk's MBR, no Ally.
    Disk,
}

/// An error building the ISO or the Ally image.
#[derive(Debug)]
pub enum IsoError {
    /// Ally options that GRUB would misparse (a newline, or a character GRUB treats specially).
    BadOptions {
        options: String,
        reason: &'static str,
    },
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Tool(ToolError),
    /// cargo succeeded but the image is not where it should be.
    MissingImage(PathBuf),
}

impl fmt::Display for IsoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IsoError::BadOptions { options, reason } => {
                write!(f, "Ally options `{options}`: {reason}")
            }
            IsoError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            IsoError::Tool(e) => e.fmt(f),
            IsoError::MissingImage(p) => {
                write!(
                    f,
                    "the Ally image was built but is missing at {}",
                    p.display()
                )
            }
        }
    }
}

impl std::error::Error for IsoError {}

impl From<ToolError> for IsoError {
    fn from(e: ToolError) -> Self {
        IsoError::Tool(e)
    }
}

/// Where the rules blob lies on the ISO.
pub const RULES_ISO_PATH: &str = "/boot/rules.blob";

/// Checks that `options` reach Ally as typed: GRUB's script lexer treats quotes, `$`,
/// `\`, `;`, `|`, `&`, `<`, `>`, `{`, `}` and `#` specially, and a newline ends the command.
pub fn validate_options(options: &str) -> Result<(), IsoError> {
    let bad = |reason| IsoError::BadOptions {
        options: options.to_string(),
        reason,
    };
    if options.contains(['\n', '\r']) {
        return Err(bad("must be one line"));
    }
    if options.contains(['"', '\'', '$', '\\', ';', '|', '&', '<', '>', '{', '}', '#']) {
        return Err(bad(
            "contains a character GRUB's script parser treats specially (quotes $ \\ ; | & < > { } #)",
        ));
    }
    if !options.is_ascii() {
        return Err(bad("must be ASCII"));
    }
    Ok(())
}

/// The grub.cfg for `target`.
pub fn grub_cfg(target: &BootTarget) -> Result<String, IsoError> {
    let mut s = String::from("set timeout=0\nset default=0\n");
    match target {
        BootTarget::Ally { options, rules, .. } => {
            validate_options(options)?;
            s += "menuentry \"Ally\" {\n";
            let options = options.trim();
            if options.is_empty() {
                s += "  multiboot2 /boot/ally\n";
            } else {
                s += &format!("  multiboot2 /boot/ally {options}\n");
            }
            if rules.is_some() {
                s += &format!("  module2 {RULES_ISO_PATH} rules\n");
            }
        }
        BootTarget::Disk => {
            s += "menuentry \"first hard disk, no Ally\" {\n";
            // chainloader passes the *root* device's BIOS number in DL, so root must be the
            // disk: with root left at (cd) the MBR reads from the CD and fails.
            s += "  set root=(hd0)\n";
            s += "  chainloader +1\n";
        }
    }
    s += "  boot\n}\n";
    Ok(s)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IsoError + '_ {
    move |source| IsoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds `iso` from a staging directory `work` (recreated).
pub fn build_iso(target: &BootTarget, work: &Path, iso: &Path) -> Result<(), IsoError> {
    let cfg = grub_cfg(target)?;
    let _ = fs::remove_dir_all(work);
    let grub_dir = work.join("boot/grub");
    fs::create_dir_all(&grub_dir).map_err(io_err(&grub_dir))?;
    let cfg_path = grub_dir.join("grub.cfg");
    fs::write(&cfg_path, cfg).map_err(io_err(&cfg_path))?;
    if let BootTarget::Ally { image, rules, .. } = target {
        let dst = work.join("boot/ally");
        fs::copy(image, &dst).map_err(io_err(image))?;
        if let Some(blob) = rules {
            let dst = work.join(RULES_ISO_PATH.trim_start_matches('/'));
            fs::copy(blob, &dst).map_err(io_err(blob))?;
        }
    }
    // Only the BIOS platform: the test machines boot with Bochs' BIOS (UEFI comes later).
    tool::run(
        Command::new("grub-mkrescue")
            .arg("--compress=no")
            .arg("-o")
            .arg(iso)
            .arg(work),
        None,
    )?;
    Ok(())
}

/// The cargo target directory: `target_dir` if given, else `$CARGO_TARGET_DIR`, else
/// `<workspace>/target`.
pub fn cargo_target_dir(workspace: &Path, target_dir: Option<&Path>) -> PathBuf {
    target_dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .map(|p| {
            if p.is_relative() {
                workspace.join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| workspace.join("target"))
}

/// Where cargo puts the Ally image: the target directory (see [`cargo_target_dir`]) +
/// `x86_64-unknown-none/release/ally`.
pub fn ally_image_path(workspace: &Path, target_dir: Option<&Path>) -> PathBuf {
    cargo_target_dir(workspace, target_dir).join("x86_64-unknown-none/release/ally")
}

/// Builds the Ally image with cargo and returns its path. Inside `cargo test`, pass a
/// `target_dir` of its own: cargo keeps its target directory locked while tests run, so a
/// nested build there would wait forever.
pub fn build_ally_image(workspace: &Path, target_dir: Option<&Path>) -> Result<PathBuf, IsoError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    if let Some(t) = target_dir {
        cmd.env("CARGO_TARGET_DIR", t);
    }
    cmd.current_dir(workspace).args([
        "build",
        "-p",
        "ally-boot",
        "--release",
        "--target",
        "x86_64-unknown-none",
    ]);
    tool::run(&mut cmd, None)?;
    let image = ally_image_path(workspace, target_dir);
    if image.is_file() {
        Ok(image)
    } else {
        Err(IsoError::MissingImage(image))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ally_cfg_passes_options() {
        let cfg = grub_cfg(&BootTarget::Ally {
            image: "/x/ally".into(),
            options: "dpi_cores=1 dpi_mem=64M".into(),
            rules: None,
        })
        .unwrap();
        assert!(cfg.starts_with("set timeout=0\n"));
        assert!(cfg.contains("  multiboot2 /boot/ally dpi_cores=1 dpi_mem=64M\n  boot\n"));
        assert!(!cfg.contains("module2"));
    }

    #[test]
    fn ally_cfg_loads_the_rules_module_after_ally() {
        let cfg = grub_cfg(&BootTarget::Ally {
            image: "/x/ally".into(),
            options: "log=info".into(),
            rules: Some("/x/rules.blob".into()),
        })
        .unwrap();
        assert!(cfg.contains(
            "  multiboot2 /boot/ally log=info\n  module2 /boot/rules.blob rules\n  boot\n"
        ));
    }

    #[test]
    fn ally_cfg_without_options() {
        let cfg = grub_cfg(&BootTarget::Ally {
            image: "/x/ally".into(),
            options: "  ".into(),
            rules: None,
        })
        .unwrap();
        assert!(cfg.contains("  multiboot2 /boot/ally\n"));
    }

    #[test]
    fn baseline_cfg_chainloads_disk_with_root_set() {
        let cfg = grub_cfg(&BootTarget::Disk).unwrap();
        assert!(cfg.contains("set root=(hd0)\n  chainloader +1\n  boot\n"));
        assert!(!cfg.contains("multiboot2"));
    }

    #[test]
    fn bad_options_are_refused() {
        for (o, frag) in [
            ("a\nb", "one line"),
            ("a;reboot", "specially"),
            ("x=$y", "specially"),
            ("x=é", "ASCII"),
        ] {
            let e = validate_options(o).unwrap_err().to_string();
            assert!(e.contains(frag), "{o}: {e}");
            assert!(e.starts_with(&format!("Ally options `{o}`")), "{e}");
        }
        validate_options("dpi_cores=1 log=debug").unwrap();
    }

    #[test]
    fn image_path_respects_target_dir() {
        let p = ally_image_path(Path::new("/ws"), Some(Path::new("/t")));
        assert_eq!(p, Path::new("/t/x86_64-unknown-none/release/ally"));
        let p = ally_image_path(Path::new("/ws"), Some(Path::new("rel")));
        assert_eq!(p, Path::new("/ws/rel/x86_64-unknown-none/release/ally"));
    }
}
