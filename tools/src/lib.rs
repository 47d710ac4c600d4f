//! `ally-tools` as a library: the rules compiler, shared by the `ally-tools` command and the
//! runner (`ally-run demo --rules`).

pub mod compile;
