//! The host side of the guest's network workload: a minimal HTTP/1.0 server that serves
//! deterministic pseudo-random files, and an upload listener that hashes what the guest sends.
//!
//! Both listen on 127.0.0.1 at ports the OS picks (bind port 0); the emulator's user-mode
//! network (Bochs' and QEMU's slirp) connects the guest's 10.0.2.2:PORT to the host's
//! 127.0.0.1:PORT. The run starts them before the emulator and stops them after it; what they
//! saw ([`NetReport`]) is judged by `checks::network_checks`.
//!
//! Upload protocol: the guest connects (busybox `nc 10.0.2.2 PORT < file`), sends its bytes and
//! half-closes (busybox 1.35's `nc` shuts down its sending side at the end of its input and then
//! prints what the peer sends until the peer closes); the listener answers one line
//! `ALLYUPLOAD bytes=N sha256=HEX` and closes, so the guest can print the host's view.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::attack::{self, Attack, ResetMethod};

/// The sizes of the workload. The defaults are issue 4's: 16 MiB each way, 1 MiB after each
/// module reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// `big.bin`, downloaded once.
    pub big_bytes: u64,
    /// `small.bin`, downloaded after each e1000 reload; also the size of the small uploads.
    pub small_bytes: u64,
    /// The big upload.
    pub upload_bytes: u64,
    /// Concurrent streams of the parallel phase (each downloads `small.bin` and uploads it
    /// back, all at once); 0 skips it. Several TCP connections keep more frames in flight than
    /// one can through slirp's socket buffers (8 KiB in Bochs' slirp), as bulk traffic on a real
    /// link would, so the exits per frame show what Ally costs when the wire is busy.
    pub streams: u32,
    /// Frames of each pktgen burst run (`ally.pktgen=N`: 64-byte and 1500-byte frames in
    /// bursts of 32 to the UDP sink, issue 15's bulk transmit); 0 skips them.
    pub pktgen: u32,
    /// Datagrams of the host's UDP flood into the guest sent back to back before each 5 ms
    /// pause ([`UDP_FLOOD_BURST`] by default, Bochs' pace; the runner gives QEMU
    /// [`UDP_FLOOD_BURST_QEMU`]).
    pub udp_flood_burst: u64,
    /// The reset chain after the workload (`ally.resets=m1,m2,...`): boot k ends with reset
    /// method k; the last boot brings the e1000 up again and moves small.bin both ways
    /// (`checks::guest_reboot`). Empty: no reboot.
    pub resets: Vec<ResetMethod>,
    /// The guest-side attacks of issue 11 (`ally.attacks=...`, run by /bin/ally-attack).
    pub attacks: Vec<Attack>,
    /// Seeds the served files' contents.
    pub seed: u64,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            big_bytes: 16 << 20,
            small_bytes: 1 << 20,
            upload_bytes: 16 << 20,
            streams: 4,
            pktgen: 2000,
            udp_flood_burst: UDP_FLOOD_BURST,
            resets: Vec::new(),
            attacks: Vec::new(),
            seed: 0xa11e_5eed,
        }
    }
}

/// The inspection test's file (issue 5): `eicar.bin`, this many bytes of the seeded stream
/// with [`EICAR`] planted every [`EICAR_STRIDE`] bytes from [`EICAR_FIRST`].
pub const EICAR_FILE_BYTES: u64 = 4 << 20;

/// The 68-byte EICAR anti-virus test string.
pub const EICAR: &[u8; 68] =
    b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// Offset of the first planted EICAR string: odd, and inside the first TCP segment of the body.
pub const EICAR_FIRST: usize = 1001;

/// Distance between planted EICAR strings (~61 KiB, odd: the offsets alternate in parity and
/// fall at ever different places within the segments). Ally does not reassemble streams, so
/// an instance split across two segments is not seen; with 1460-byte segments most are whole.
pub const EICAR_STRIDE: usize = 62_467;

/// `file_contents(seed, "eicar", bytes)` with the EICAR string planted.
pub fn eicar_contents(seed: u64, bytes: u64) -> Vec<u8> {
    let mut data = file_contents(seed, "eicar", bytes);
    let mut at = EICAR_FIRST;
    while at + EICAR.len() <= data.len() {
        data[at..at + EICAR.len()].copy_from_slice(EICAR);
        at += EICAR_STRIDE;
    }
    data
}

/// Issue 12's decoded-body test: `eicar.gz`, a short text with the EICAR string, gzipped and
/// served chunked ([`GZIP_CHUNK`]-byte chunks, so chunk framing also cuts the compressed bytes):
/// only a rule on the decoded body (`file_data`) can see the string.
pub fn eicar_gzip() -> Vec<u8> {
    use std::io::Write as _;
    let mut text = b"Ally gzip test: the EICAR string follows.\n".to_vec();
    text.extend_from_slice(EICAR);
    text.extend_from_slice(b"\nEnd of the test file.\n");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&text)
        .and_then(|()| gz.finish())
        .expect("gzip into memory cannot fail")
}

/// Chunk size of `eicar.gz`'s chunked response.
pub const GZIP_CHUNK: usize = 16;

/// Largest file or upload the runner accepts (the guest keeps each in its RAM-backed rootfs).
pub const MAX_TRANSFER_BYTES: u64 = 256 << 20;

/// How long a connection may sit idle (no byte moved either way) before the host gives up on
/// it. Generous: under an emulator the guest may pause for a long while.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The longest HTTP request head the server reads.
const MAX_REQUEST_HEAD: usize = 8192;

/// A file the HTTP server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFile {
    /// The guest's name for it (`big`, `small`); the path is `/<name>.bin`.
    pub name: String,
    pub bytes: u64,
    /// Lower-case hex SHA-256, computed on the host.
    pub sha256: String,
}

/// One HTTP request as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRecord {
    pub peer: String,
    /// The request path, or what was wrong with the request.
    pub path: String,
    pub status: u16,
    /// Body bytes written to the socket.
    pub sent: u64,
    /// Whether the whole body was written.
    pub complete: bool,
    pub seconds: f64,
    /// Why the response was cut short, if it was.
    pub error: Option<String>,
}

/// One upload as the listener saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadRecord {
    pub peer: String,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of every byte received.
    pub sha256: String,
    /// Whether the guest closed its sending side (a complete upload); false after an error or
    /// an idle timeout.
    pub complete: bool,
    pub seconds: f64,
    pub error: Option<String>,
    /// Whether the bytes received contain [`crate::inspect::FORBIDDEN_UPLOAD`] anywhere (also
    /// across the listener's reads): content a `drop` rule must have kept off the wire.
    pub forbidden: bool,
}

/// What the endpoints saw during a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetReport {
    /// The sizes the endpoints served and the guest was told to upload.
    pub options: NetOptions,
    pub http_port: u16,
    pub upload_port: u16,
    /// The second HTTP listener (same files), whose port the inspection rules drop EICAR from.
    pub inspect_drop_port: u16,
    pub files: Vec<ServedFile>,
    pub requests: Vec<HttpRecord>,
    pub uploads: Vec<UploadRecord>,
    /// Listener-level errors (accept failures).
    pub errors: Vec<String>,
    /// The UDP sink the attacks send to (`ally.attack_udp=PORT`, `$ALLY_STORM_PORT`).
    pub attack_udp_port: u16,
    /// What the UDP sink received.
    pub udp: UdpCounts,
    /// The port slirp forwards to the guest for the UDP flood (`ally.udp_flood=PORT`).
    pub udp_flood_port: u16,
    /// Datagrams the host sent into the guest on its request (`GET /udp-flood`).
    pub udp_flood_sent: u64,
}

/// Datagrams the UDP sink received, by payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounts {
    /// Carrying [`STORM_MARKER`] (the alert storm).
    pub storm: u64,
    /// Carrying [`TUCSO_MARKER`] (the TUCSO frame, which Ally must drop).
    pub tucso: u64,
    /// Carrying [`FRAG_SECRET_MARKER`] (sent in IP fragments; Ally must drop them).
    pub frag_secret: u64,
    /// Carrying [`FRAG_CONTROL_MARKER`] (sent in IP fragments; they must arrive).
    pub frag_control: u64,
    /// pktgen's frames (their payload starts with [`PKTGEN_MAGIC`]), by size.
    pub pktgen_small: u64,
    pub pktgen_large: u64,
    /// Anything else.
    pub other: u64,
}

/// The first four payload bytes of a pktgen frame (net/core/pktgen.c, `PKTGEN_MAGIC`, in
/// network order).
pub const PKTGEN_MAGIC: [u8; 4] = [0xbe, 0x9b, 0xe9, 0x55];

/// A pktgen payload at least this long came from the large-frame run.
pub const PKTGEN_LARGE_PAYLOAD: usize = 1000;

/// The alert storm's payload marker (`guest/attack` has its own copy; the rule with sid
/// 1000104 alerts on it).
pub const STORM_MARKER: &[u8] = b"ALLY-ALERT-STORM";
/// The TUCSO attack frame's payload marker (`guest/attack` has its own copy).
pub const TUCSO_MARKER: &[u8] = b"ALLY-ATTACK-TUCSO";
/// The fragmented datagrams' markers (`guest/attack` has its own copies; the rule with sid
/// 1000105 drops the secret).
pub const FRAG_SECRET_MARKER: &[u8] = b"ALLY-FRAGMENTED-SECRET";
pub const FRAG_CONTROL_MARKER: &[u8] = b"ALLY-FRAGMENTED-CONTROL";

impl UdpCounts {
    fn count(&mut self, payload: &[u8]) {
        let has = |m: &[u8]| payload.windows(m.len()).any(|w| w == m);
        if payload.starts_with(&PKTGEN_MAGIC) {
            if payload.len() >= PKTGEN_LARGE_PAYLOAD {
                self.pktgen_large += 1;
            } else {
                self.pktgen_small += 1;
            }
        } else if has(TUCSO_MARKER) {
            self.tucso += 1;
        } else if has(FRAG_SECRET_MARKER) {
            self.frag_secret += 1;
        } else if has(FRAG_CONTROL_MARKER) {
            self.frag_control += 1;
        } else if has(STORM_MARKER) {
            self.storm += 1;
        } else {
            self.other += 1;
        }
    }
}

impl NetReport {
    pub fn file(&self, name: &str) -> Option<&ServedFile> {
        self.files.iter().find(|f| f.name == name)
    }
}

impl fmt::Display for NetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "host endpoints: http 127.0.0.1:{} and 127.0.0.1:{} (inspect-drop), upload 127.0.0.1:{}",
            self.http_port, self.inspect_drop_port, self.upload_port
        )?;
        for s in &self.files {
            writeln!(
                f,
                "  file /{}.bin bytes={} sha256={}",
                s.name, s.bytes, s.sha256
            )?;
        }
        for r in &self.requests {
            writeln!(
                f,
                "  http {} {} status={} sent={} complete={} seconds={:.1} rate={}{}",
                r.peer,
                r.path,
                r.status,
                r.sent,
                r.complete,
                r.seconds,
                rate(r.sent, r.seconds),
                r.error
                    .as_ref()
                    .map(|e| format!(" error={e}"))
                    .unwrap_or_default()
            )?;
        }
        for u in &self.uploads {
            writeln!(
                f,
                "  upload {} bytes={} sha256={} complete={} seconds={:.1} rate={}{}",
                u.peer,
                u.bytes,
                u.sha256,
                u.complete,
                u.seconds,
                rate(u.bytes, u.seconds),
                u.error
                    .as_ref()
                    .map(|e| format!(" error={e}"))
                    .unwrap_or_default()
            )?;
        }
        if self.udp != UdpCounts::default() {
            writeln!(
                f,
                "  udp 127.0.0.1:{} storm={} tucso={} frag-secret={} frag-control={} pktgen-small={} pktgen-large={} other={}",
                self.attack_udp_port,
                self.udp.storm,
                self.udp.tucso,
                self.udp.frag_secret,
                self.udp.frag_control,
                self.udp.pktgen_small,
                self.udp.pktgen_large,
                self.udp.other
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  error {e}")?;
        }
        Ok(())
    }
}

/// `N KiB/s` (host wall time).
fn rate(bytes: u64, seconds: f64) -> String {
    if seconds > 0.0 {
        format!("{:.0}KiB/s", bytes as f64 / 1024.0 / seconds)
    } else {
        "-".into()
    }
}

/// The deterministic contents of a served file: a SplitMix64 stream seeded by `seed` and the
/// file's name, so `big` and `small` differ and every run serves the same bytes.
pub fn file_contents(seed: u64, name: &str, bytes: u64) -> Vec<u8> {
    let mut state = name.bytes().fold(seed ^ 0x9e37_79b9_7f4a_7c15, |s, b| {
        s.rotate_left(8) ^ u64::from(b)
    });
    let mut out = Vec::with_capacity(bytes as usize);
    while (out.len() as u64) < bytes {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let take = (bytes - out.len() as u64).min(8) as usize;
        out.extend_from_slice(&z.to_le_bytes()[..take]);
    }
    out
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An error starting the endpoints.
#[derive(Debug)]
pub enum EndpointError {
    BadSize {
        what: &'static str,
        bytes: u64,
    },
    Bind {
        what: &'static str,
        source: std::io::Error,
    },
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointError::BadSize { what, bytes } => write!(
                f,
                "{what} of {bytes} bytes is out of range 1..={MAX_TRANSFER_BYTES}"
            ),
            EndpointError::Bind { what, source } => {
                write!(f, "cannot listen on 127.0.0.1 for the {what}: {source}")
            }
        }
    }
}

impl std::error::Error for EndpointError {}

#[derive(Debug, Default)]
struct Shared {
    requests: Vec<HttpRecord>,
    uploads: Vec<UploadRecord>,
    errors: Vec<String>,
    udp: UdpCounts,
    udp_flood_sent: u64,
    /// Open connections, shut down when the endpoints stop.
    open: BTreeMap<u64, TcpStream>,
    next_id: u64,
}

type State = Arc<Mutex<Shared>>;

/// What a connection thread gets besides its stream.
struct Conn {
    state: State,
    stop: Arc<AtomicBool>,
    id: u64,
}

impl Conn {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn finish(&self, f: impl FnOnce(&mut Shared)) {
        let mut s = lock(&self.state);
        s.open.remove(&self.id);
        f(&mut s);
    }
}

fn lock(state: &State) -> std::sync::MutexGuard<'_, Shared> {
    // A panicking connection thread must not take the report down with it.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running endpoints.
#[derive(Debug)]
pub struct Endpoints {
    pub http_port: u16,
    pub upload_port: u16,
    pub inspect_drop_port: u16,
    pub attack_udp_port: u16,
    /// The UDP port slirp forwards from the host to the guest (the same number on both
    /// sides), where `GET /udp-flood` sends [`UDP_FLOOD_DATAGRAMS`] datagrams.
    pub udp_flood_port: u16,
    pub options: NetOptions,
    files: Vec<ServedFile>,
    state: State,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Endpoints {
    /// Generates the files, hashes them and starts both listeners.
    pub fn start(options: NetOptions) -> Result<Endpoints, EndpointError> {
        for (what, bytes) in [
            ("big.bin", options.big_bytes),
            ("small.bin", options.small_bytes),
            ("upload", options.upload_bytes),
        ] {
            if bytes == 0 || bytes > MAX_TRANSFER_BYTES {
                return Err(EndpointError::BadSize { what, bytes });
            }
        }
        let mut served = BTreeMap::new();
        let mut files = Vec::new();
        for (name, bytes) in [("big", options.big_bytes), ("small", options.small_bytes)] {
            let data = file_contents(options.seed, name, bytes);
            files.push(ServedFile {
                name: name.to_string(),
                bytes,
                sha256: sha256_hex(&data),
            });
            served.insert(format!("/{name}.bin"), Arc::new(data));
        }
        let eicar = eicar_contents(options.seed, EICAR_FILE_BYTES);
        files.push(ServedFile {
            name: "eicar".into(),
            bytes: EICAR_FILE_BYTES,
            sha256: sha256_hex(&eicar),
        });
        served.insert("/eicar.bin".into(), Arc::new(eicar));
        let gz = eicar_gzip();
        files.push(ServedFile {
            name: "eicar-gz".into(),
            bytes: gz.len() as u64,
            sha256: sha256_hex(&gz),
        });
        served.insert("/eicar.gz".into(), Arc::new(gz));
        let bind = |what| {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| EndpointError::Bind { what, source })
        };
        let http = bind("HTTP server")?;
        let upload = bind("upload listener")?;
        let http_drop = bind("inspect-drop HTTP server")?;
        let port = |l: &TcpListener, what| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|source| EndpointError::Bind { what, source })
        };
        let http_port = port(&http, "HTTP server")?;
        let upload_port = port(&upload, "upload listener")?;
        let inspect_drop_port = port(&http_drop, "inspect-drop HTTP server")?;
        let udp = UdpSocket::bind("127.0.0.1:0")
            .and_then(|u| {
                u.set_read_timeout(Some(Duration::from_millis(100)))
                    .map(|()| u)
            })
            .map_err(|source| EndpointError::Bind {
                what: "attack UDP sink",
                source,
            })?;
        let attack_udp_port =
            udp.local_addr()
                .map(|a| a.port())
                .map_err(|source| EndpointError::Bind {
                    what: "attack UDP sink",
                    source,
                })?;
        // A free port for slirp's forward to the guest: taken from the OS and released (slirp
        // binds it when the emulator starts).
        let udp_flood_port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|u| u.local_addr())
            .map(|a| a.port())
            .map_err(|source| EndpointError::Bind {
                what: "UDP flood port",
                source,
            })?;
        let state = State::default();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(served);
        let served2 = served.clone();
        let flood_burst = options.udp_flood_burst;
        let acceptors = vec![
            spawn_acceptor(http, state.clone(), stop.clone(), move |s, c| {
                serve_http(s, &served, c, Some((udp_flood_port, flood_burst)))
            }),
            spawn_acceptor(http_drop, state.clone(), stop.clone(), move |s, c| {
                serve_http(s, &served2, c, None)
            }),
            spawn_acceptor(upload, state.clone(), stop.clone(), receive_upload),
            spawn_udp_sink(udp, state.clone(), stop.clone()),
        ];
        Ok(Endpoints {
            http_port,
            upload_port,
            inspect_drop_port,
            attack_udp_port,
            udp_flood_port,
            options,
            files,
            state,
            stop,
            acceptors,
        })
    }

    /// What the guest needs to know, as kernel command-line words (read by `guest/init` from
    /// /proc/cmdline; the dotted names are ignored by the kernel and not passed to init).
    pub fn guest_cmdline(&self) -> String {
        let attacks = attack::guest_cmdline(&self.options.attacks, &self.options.resets);
        format!(
            "ally.http={} ally.upload={} ally.upload_bytes={} ally.small_bytes={} ally.streams={} ally.pktgen={} ally.inspect_drop={} ally.attack_udp={} ally.udp_flood={}{}{attacks}",
            self.http_port,
            self.upload_port,
            self.options.upload_bytes,
            self.options.small_bytes,
            self.options.streams,
            self.options.pktgen,
            self.inspect_drop_port,
            self.attack_udp_port,
            self.udp_flood_port,
            if attacks.is_empty() { "" } else { " " },
        )
    }

    /// A snapshot of what was seen so far.
    pub fn report(&self) -> NetReport {
        let s = lock(&self.state);
        NetReport {
            options: self.options.clone(),
            http_port: self.http_port,
            upload_port: self.upload_port,
            inspect_drop_port: self.inspect_drop_port,
            files: self.files.clone(),
            requests: s.requests.clone(),
            uploads: s.uploads.clone(),
            errors: s.errors.clone(),
            attack_udp_port: self.attack_udp_port,
            udp: s.udp,
            udp_flood_port: self.udp_flood_port,
            udp_flood_sent: s.udp_flood_sent,
        }
    }

    /// Stops accepting, cuts open connections (their threads then record what they had) and
    /// returns the report.
    pub fn stop(mut self) -> NetReport {
        self.shutdown();
        self.report()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
        let open: Vec<TcpStream> = std::mem::take(&mut lock(&self.state).open)
            .into_values()
            .collect();
        for s in &open {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Let the connection threads record their (cut) transfers.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && self.unfinished() > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connections accepted whose threads have not recorded them yet.
    fn unfinished(&self) -> u64 {
        let s = lock(&self.state);
        s.next_id - (s.requests.len() + s.uploads.len()) as u64
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        if !self.acceptors.is_empty() {
            self.shutdown();
        }
    }
}

/// Counts the datagrams the attacks send (slirp forwards the guest's 10.0.2.2:PORT to the
/// host's 127.0.0.1:PORT) until `stop`.
fn spawn_udp_sink(sock: UdpSocket, state: State, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            match sock.recv(&mut buf) {
                Ok(n) => lock(&state).udp.count(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    lock(&state).errors.push(format!("udp sink: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })
}

/// Accepts until `stop`; each connection gets a thread running `handle`.
fn spawn_acceptor<F>(
    listener: TcpListener,
    state: State,
    stop: Arc<AtomicBool>,
    handle: F,
) -> JoinHandle<()>
where
    F: Fn(TcpStream, &Conn) + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
                    let id = {
                        let mut s = lock(&state);
                        let id = s.next_id;
                        s.next_id += 1;
                        if let Ok(c) = stream.try_clone() {
                            s.open.insert(id, c);
                        }
                        id
                    };
                    let conn = Conn {
                        state: state.clone(),
                        stop: stop.clone(),
                        id,
                    };
                    let handle = handle.clone();
                    std::thread::spawn(move || handle(stream, &conn));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    lock(&state).errors.push(format!("accept: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })
}

fn peer(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a: SocketAddr| a.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The path of a `GET` request line, or why it is refused.
pub fn parse_request_line(line: &str) -> Result<&str, String> {
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next(), w.next()) {
        (Some("GET"), Some(path), Some(v), None) if v.starts_with("HTTP/1.") => Ok(path),
        _ => Err(format!("bad request line `{}`", line.trim_end())),
    }
}

/// Reads the request head (up to the empty line).
fn read_head(stream: &TcpStream) -> Result<String, String> {
    let mut r = BufReader::new(stream.take(MAX_REQUEST_HEAD as u64));
    let mut first = String::new();
    r.read_line(&mut first)
        .map_err(|e| format!("reading the request: {e}"))?;
    loop {
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(0) => return Err("the request head ended without an empty line".into()),
            Ok(_) if l.trim_end().is_empty() => return Ok(first),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
}

/// Datagrams `GET /udp-flood` sends into the guest (1472-byte payloads: full frames).
pub const UDP_FLOOD_DATAGRAMS: u64 = 2000;
const UDP_FLOOD_PAYLOAD: usize = 1472;
/// Pacing: Bochs' slirp reads its host socket once per emulator poll (about 200 frames a
/// second reach the guest), so an unpaced burst would overflow the socket buffer on the
/// host, not exercise the guest.
pub const UDP_FLOOD_BURST: u64 = 16;
/// QEMU's slirp reads the socket whenever it is readable: bursts as large as the host's
/// default UDP receive buffer (212,992 B) holds, 64 datagrams of 1500 B, keep the guest busy.
pub const UDP_FLOOD_BURST_QEMU: u64 = 64;
const UDP_FLOOD_PAUSE: Duration = Duration::from_millis(5);

/// Sends the UDP flood to `port` (slirp forwards it to the guest) in a thread of its own;
/// the count sent goes into the report.
fn spawn_udp_flood(port: u16, burst: u64, conn_state: State, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
            lock(&conn_state).errors.push("udp flood: no socket".into());
            return;
        };
        let payload = vec![0x5a_u8; UDP_FLOOD_PAYLOAD];
        for n in 0..UDP_FLOOD_DATAGRAMS {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if sock.send_to(&payload, ("127.0.0.1", port)).is_ok() {
                lock(&conn_state).udp_flood_sent += 1;
            }
            if (n + 1) % burst.max(1) == 0 {
                std::thread::sleep(UDP_FLOOD_PAUSE);
            }
        }
    });
}

fn serve_http(
    mut stream: TcpStream,
    files: &BTreeMap<String, Arc<Vec<u8>>>,
    conn: &Conn,
    udp_flood: Option<(u16, u64)>,
) {
    let start = Instant::now();
    let mut rec = HttpRecord {
        peer: peer(&stream),
        path: String::new(),
        status: 400,
        sent: 0,
        complete: false,
        seconds: 0.0,
        error: None,
    };
    let head = read_head(&stream);
    let path = head
        .as_deref()
        .map_err(Clone::clone)
        .and_then(|h| parse_request_line(h).map(str::to_string));
    let body = match &path {
        Ok(p) => {
            rec.path = p.clone();
            files.get(p)
        }
        Err(e) => {
            rec.path = "-".into();
            rec.error = Some(e.clone());
            None
        }
    };
    let result = match body {
        None if udp_flood.is_some() && rec.path == "/udp-flood" => {
            rec.status = 200;
            let r = stream.write_all(
                b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nOK\n",
            );
            if let Some((port, burst)) = udp_flood {
                spawn_udp_flood(port, burst, conn.state.clone(), conn.stop.clone());
            }
            r
        }
        // HTTP/1.1, gzip content coding, chunked: the whole response in one write, so that it
        // usually travels in one segment.
        Some(data) if rec.path.ends_with(".gz") => {
            rec.status = 200;
            let mut r = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
            for chunk in data.chunks(GZIP_CHUNK) {
                r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                r.extend_from_slice(chunk);
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"0\r\n\r\n");
            stream.write_all(&r).and_then(|()| {
                rec.sent = data.len() as u64;
                stream.flush()
            })
        }
        Some(data) => {
            rec.status = 200;
            let header = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                data.len()
            );
            stream.write_all(header.as_bytes()).and_then(|()| {
                for chunk in data.chunks(64 << 10) {
                    stream.write_all(chunk)?;
                    rec.sent += chunk.len() as u64;
                }
                stream.flush()
            })
        }
        None => {
            if path.is_ok() {
                rec.status = 404;
            }
            let msg = if rec.status == 404 {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else {
                "HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            stream.write_all(msg.as_bytes())
        }
    };
    match result {
        Ok(()) => rec.complete = rec.status == 200,
        Err(e) => {
            rec.error = Some(format!("after {} body bytes: {e}", rec.sent));
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Let the guest read the end before the socket goes (a reset could discard the tail).
    let mut sink = [0u8; 512];
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    rec.seconds = start.elapsed().as_secs_f64();
    conn.finish(|s| s.requests.push(rec));
}

fn receive_upload(mut stream: TcpStream, conn: &Conn) {
    let start = Instant::now();
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    let mut forbidden = ContentSearch::new(crate::inspect::FORBIDDEN_UPLOAD.as_bytes());
    let error = loop {
        match stream.read(&mut buf) {
            // The endpoints cut every open connection when they stop (after the emulator):
            // that end of input is not the guest's.
            Ok(0) if conn.stopping() => {
                break Some(format!("cut after {bytes} bytes: the run ended"))
            }
            Ok(0) => break None,
            Ok(n) => {
                h.update(&buf[..n]);
                forbidden.feed(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break Some(format!(
                    "no data for {} s after {bytes} bytes",
                    IDLE_TIMEOUT.as_secs()
                ))
            }
            Err(e) => break Some(format!("after {bytes} bytes: {e}")),
        }
    };
    let sha256 = hex(&h.finalize());
    if error.is_none() {
        let _ = stream
            .write_all(format!("ALLYUPLOAD bytes={bytes} sha256={sha256}\n").as_bytes())
            .and_then(|()| stream.flush());
    }
    let peer = peer(&stream);
    let _ = stream.shutdown(Shutdown::Both);
    conn.finish(|s| {
        s.uploads.push(UploadRecord {
            peer,
            bytes,
            sha256,
            complete: error.is_none(),
            seconds: start.elapsed().as_secs_f64(),
            error,
            forbidden: forbidden.found(),
        })
    });
}

/// Searches a byte stream, fed in pieces, for one needle (a match may span pieces).
struct ContentSearch<'a> {
    needle: &'a [u8],
    /// The last `needle.len() - 1` bytes fed, then the new piece.
    window: Vec<u8>,
    found: bool,
}

impl<'a> ContentSearch<'a> {
    fn new(needle: &'a [u8]) -> Self {
        Self {
            needle,
            window: Vec::new(),
            found: needle.is_empty(),
        }
    }

    fn feed(&mut self, piece: &[u8]) {
        if self.found {
            return;
        }
        self.window.extend_from_slice(piece);
        self.found = self
            .window
            .windows(self.needle.len())
            .any(|w| w == self.needle);
        let keep = self.needle.len().saturating_sub(1).min(self.window.len());
        self.window.drain(..self.window.len() - keep);
    }

    fn found(&self) -> bool {
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_search_spans_pieces() {
        let find = |pieces: &[&[u8]]| {
            let mut s = ContentSearch::new(b"FORBIDDEN");
            pieces.iter().for_each(|p| s.feed(p));
            s.found()
        };
        assert!(find(&[b"xxFORBIDDENyy"]));
        assert!(find(&[b"xxFOR", b"BID", b"DEN"]));
        let bytes: Vec<&[u8]> = b"..FORBIDDEN..".chunks(1).collect();
        assert!(find(&bytes));
        assert!(!find(&[b"FORBIDDE", b"xN"]));
        assert!(!find(&[b"FORBIDDE"]));
        assert!(!find(&[]));
    }

    fn small_options() -> NetOptions {
        NetOptions {
            big_bytes: 300_001,
            small_bytes: 4097,
            upload_bytes: 1000,
            streams: 2,
            pktgen: 2000,
            udp_flood_burst: UDP_FLOOD_BURST,
            resets: Vec::new(),
            attacks: Vec::new(),
            seed: 7,
        }
    }

    fn get(port: u16, path: &str) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 10.0.2.2\r\nUser-Agent: Wget\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    }

    fn split_response(r: &[u8]) -> (String, &[u8]) {
        let at = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (String::from_utf8_lossy(&r[..at]).into_owned(), &r[at + 4..])
    }

    #[test]
    fn contents_are_deterministic_and_distinct() {
        let a = file_contents(1, "big", 1001);
        assert_eq!(a.len(), 1001);
        assert_eq!(a, file_contents(1, "big", 1001));
        assert_ne!(a[..64], file_contents(1, "small", 64)[..]);
        assert_ne!(a[..64], file_contents(2, "big", 64)[..]);
        // A prefix of a longer file is the shorter file.
        assert_eq!(a[..100], file_contents(1, "big", 100)[..]);
        // Not a constant stream.
        assert!(a.iter().filter(|&&b| b == a[0]).count() < 100);
    }

    #[test]
    fn eicar_file_has_the_string_planted() {
        assert_eq!(EICAR.len(), 68);
        assert_eq!(&EICAR[..12], b"X5O!P%@AP[4\\");
        let d = eicar_contents(3, 1 << 20);
        assert_eq!(d.len(), 1 << 20);
        let hits: Vec<usize> = d
            .windows(EICAR.len())
            .enumerate()
            .filter(|(_, w)| w == EICAR)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            hits.len(),
            (((1 << 20) - 68 - EICAR_FIRST) / EICAR_STRIDE) + 1
        );
        assert_eq!(hits[0], EICAR_FIRST);
        assert_eq!(hits[1], EICAR_FIRST + EICAR_STRIDE);
        // Outside the planted strings it is the seeded stream.
        let plain = file_contents(3, "eicar", 1 << 20);
        assert_eq!(d[..EICAR_FIRST], plain[..EICAR_FIRST]);
        assert_ne!(d, plain);
    }

    #[test]
    fn drop_listener_serves_the_same_files() {
        let e = Endpoints::start(small_options()).unwrap();
        let r = get(e.inspect_drop_port, "/eicar.bin");
        let (head, body) = split_response(&r);
        assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
        assert_eq!(body, eicar_contents(7, EICAR_FILE_BYTES));
        assert_ne!(e.inspect_drop_port, e.http_port);
        drop(e);
    }

    #[test]
    fn sha256_matches_the_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /big.bin HTTP/1.1\r\n"),
            Ok("/big.bin")
        );
        assert_eq!(parse_request_line("GET /x HTTP/1.0"), Ok("/x"));
        assert_eq!(
            parse_request_line("POST /x HTTP/1.1\r\n"),
            Err("bad request line `POST /x HTTP/1.1`".to_string())
        );
        assert!(parse_request_line("GET /x").is_err());
    }

    #[test]
    fn eicar_gz_is_served_gzipped_in_small_chunks() {
        let e = Endpoints::start(small_options()).unwrap();
        let r = get(e.inspect_drop_port, "/eicar.gz");
        let (head, mut body) = split_response(&r);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.contains("Content-Encoding: gzip"), "{head}");
        assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
        // De-chunk: every chunk but the last is GZIP_CHUNK bytes.
        let mut gz = Vec::new();
        loop {
            let line_end = body.windows(2).position(|w| w == b"\r\n").unwrap();
            let len =
                usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap(), 16).unwrap();
            assert!(len <= GZIP_CHUNK);
            body = &body[line_end + 2..];
            if len == 0 {
                break;
            }
            gz.extend_from_slice(&body[..len]);
            body = &body[len + 2..];
        }
        assert_eq!(gz, eicar_gzip());
        // The raw bytes hide the string; gunzipped it is there.
        assert!(!gz.windows(EICAR.len()).any(|w| w == EICAR));
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
        assert!(text.windows(EICAR.len()).any(|w| w == EICAR));
        let rep = e.stop();
        assert_eq!(rep.file("eicar-gz").unwrap().bytes, gz.len() as u64);
    }

    #[test]
    fn serves_files_and_records_requests() {
        let o = small_options();
        let e = Endpoints::start(o).unwrap();
        let (head, body) = {
            let r = get(e.http_port, "/big.bin");
            let (h, b) = split_response(&r);
            (h, b.to_vec())
        };
        assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
        assert!(head.contains("Content-Length: 300001"), "{head}");
        assert_eq!(body, file_contents(7, "big", 300_001));
        let r = get(e.http_port, "/nope.bin");
        assert!(split_response(&r).0.starts_with("HTTP/1.0 404 "));
        let mut s = TcpStream::connect(("127.0.0.1", e.http_port)).unwrap();
        s.write_all(b"BREW /pot HTCPCP/1.0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(split_response(&out).0.starts_with("HTTP/1.0 400 "));
        let cmdline = e.guest_cmdline();
        let rep = e.stop();
        assert_eq!(
            cmdline,
            format!(
                "ally.http={} ally.upload={} ally.upload_bytes=1000 ally.small_bytes=4097 ally.streams=2 ally.pktgen=2000 ally.inspect_drop={} ally.attack_udp={} ally.udp_flood={}",
                rep.http_port,
                rep.upload_port,
                rep.inspect_drop_port,
                rep.attack_udp_port,
                rep.udp_flood_port
            )
        );
        let big = rep.file("big").unwrap();
        assert_eq!(big.bytes, 300_001);
        assert_eq!(big.sha256, sha256_hex(&file_contents(7, "big", 300_001)));
        assert_eq!(rep.file("small").unwrap().bytes, 4097);
        assert_eq!(
            rep.file("eicar").unwrap().sha256,
            sha256_hex(&eicar_contents(7, EICAR_FILE_BYTES))
        );
        assert_eq!(rep.requests.len(), 3, "{rep}");
        let ok = rep.requests.iter().find(|r| r.path == "/big.bin").unwrap();
        assert_eq!((ok.status, ok.sent, ok.complete), (200, 300_001, true));
        assert!(rep.requests.iter().any(|r| r.status == 404 && !r.complete));
        assert!(rep
            .requests
            .iter()
            .any(|r| r.status == 400 && r.error.as_deref().is_some_and(|e| e.contains("BREW"))));
    }

    #[test]
    fn upload_is_hashed_and_echoed() {
        let e = Endpoints::start(small_options()).unwrap();
        let data = file_contents(9, "up", 200_000);
        let mut s = TcpStream::connect(("127.0.0.1", e.upload_port)).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert_eq!(
            reply,
            format!("ALLYUPLOAD bytes=200000 sha256={}\n", sha256_hex(&data))
        );
        // An upload still open when the endpoints stop is recorded as incomplete.
        let mut open = TcpStream::connect(("127.0.0.1", e.upload_port)).unwrap();
        open.write_all(b"partial").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&e.state).next_id < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        let rep = e.stop();
        assert_eq!(rep.uploads.len(), 2, "{rep}");
        let done = rep.uploads.iter().find(|u| u.complete).unwrap();
        assert_eq!(done.bytes, 200_000);
        assert_eq!(done.sha256, sha256_hex(&data));
        let cut = rep.uploads.iter().find(|u| !u.complete).unwrap();
        assert_eq!(cut.bytes, 7);
        assert_eq!(
            cut.error.as_deref(),
            Some("cut after 7 bytes: the run ended")
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut o = small_options();
        o.upload_bytes = 0;
        assert_eq!(
            Endpoints::start(o).unwrap_err().to_string(),
            "upload of 0 bytes is out of range 1..=268435456"
        );
    }

    #[test]
    fn udp_sink_counts_by_payload() {
        let mut o = small_options();
        o.attacks = vec![Attack::AlertStorm];
        o.resets = vec![ResetMethod::Reboot];
        let e = Endpoints::start(o).unwrap();
        assert!(e
            .guest_cmdline()
            .ends_with(" ally.attacks=alert-storm ally.resets=reboot"));
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        for p in [
            &b"ALLY-ALERT-STORM seq=000001"[..],
            b"ALLY-ALERT-STORM seq=000002",
            b"xxALLY-ATTACK-TUCSO\0\0",
            b"FRAG seq=001 aaALLY-FRAGMENTED-CONTROL",
            b"FRAG seq=002 aaALLY-FRAGMENTED-SECRET",
        ] {
            s.send_to(p, ("127.0.0.1", e.attack_udp_port)).unwrap();
        }
        // pktgen's frames: the magic first, then its sequence and time stamp, zeros after.
        let mut pktgen = PKTGEN_MAGIC.to_vec();
        pktgen.resize(18, 0);
        s.send_to(&pktgen, ("127.0.0.1", e.attack_udp_port))
            .unwrap();
        pktgen.resize(1458, 0);
        s.send_to(&pktgen, ("127.0.0.1", e.attack_udp_port))
            .unwrap();
        s.send_to(&pktgen, ("127.0.0.1", e.attack_udp_port))
            .unwrap();
        s.send_to(b"hello", ("127.0.0.1", e.attack_udp_port))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while e.report().udp.other == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let rep = e.stop();
        assert_eq!(
            rep.udp,
            UdpCounts {
                storm: 2,
                tucso: 1,
                frag_secret: 1,
                frag_control: 1,
                pktgen_small: 1,
                pktgen_large: 2,
                other: 1
            }
        );
    }

    #[test]
    fn udp_flood_is_sent_to_the_forwarded_port_on_request() {
        let e = Endpoints::start(small_options()).unwrap();
        // Stand in for slirp's forward: the flood goes to the host's side of the port.
        let guest = UdpSocket::bind(("127.0.0.1", e.udp_flood_port)).unwrap();
        guest
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let r = get(e.http_port, "/udp-flood");
        assert!(split_response(&r).0.starts_with("HTTP/1.0 200 "));
        let mut buf = [0u8; 2048];
        assert_eq!(guest.recv(&mut buf).unwrap(), 1472);
        // Not on the inspect-drop listener.
        let r = get(e.inspect_drop_port, "/udp-flood");
        assert!(split_response(&r).0.starts_with("HTTP/1.0 404 "));
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.report().udp_flood_sent < UDP_FLOOD_DATAGRAMS && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(e.stop().udp_flood_sent, UDP_FLOOD_DATAGRAMS);
    }
}
