//! ally-runner: builds everything a run of Ally needs (the Ally image, a GRUB boot ISO, a
//! guest disk with Debian's kernel and a busybox initramfs), boots it under Bochs (or QEMU with
//! KVM on hosts with nested VT-x), captures the guest console (COM1) and Ally's log (COM2),
//! and judges the run from their marker lines.
//!
//! ```no_run
//! use ally_runner::{run, Mode, RunOptions};
//! let result = run(&RunOptions::new(Mode::Ally, "demo")).expect("run");
//! println!("{result}");
//! assert!(result.passed());
//! ```

pub mod attack;
pub mod bochs;
pub mod checks;
pub mod cpio;
pub mod emulator;
pub mod endpoints;
pub mod guest;
pub mod inspect;
pub mod iso;
pub mod markers;
pub mod rules;
pub mod run;
pub mod tool;
pub mod wire;

pub use checks::Check;
pub use emulator::{Emulator, EmulatorChoice};
pub use markers::{AllyReport, GuestReport};
pub use rules::{RulesExpect, RulesInput};
pub use run::{run, Mode, Outcome, RunError, RunOptions, RunResult};
