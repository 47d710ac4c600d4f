//! `ally-tools`: host-side commands for Ally.

fn main() {
    eprintln!("usage: ally-tools <command> (no commands yet)");
    std::process::exit(2);
}
