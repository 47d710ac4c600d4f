//! `ally-tools` as a library, shared by the `ally-tools` command and the runner: the rules
//! compiler (`ally-run demo --rules`), the management-stream splitter and the pcap format
//! (the runner splits every Ally run's COM2 into eve.json and a pcap of dropped frames).

pub mod compile;
pub mod eve;
pub mod pcap;
