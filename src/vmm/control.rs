//! The control socket of a running VM and the client side of xl's verbs
//! (`xenkvm list`, `pause`, `unpause`, `shutdown`; `console` is
//! [`crate::vmm::console_attach`] and [`crate::vmm::console_client`]).
//!
//! One Unix stream socket per VM: `--api-socket PATH`, or for `--name NAME`
//! `$XDG_RUNTIME_DIR/xenkvm/NAME.sock` (else `/run/xenkvm/NAME.sock`). The
//! directory is created mode 0700 and the socket made 0600; a connecting
//! process whose uid (`SO_PEERCRED`) is not xenkvm's is refused. The
//! protocol is one request line and one reply line: `info`, `pause`,
//! `unpause`, `shutdown`; the reply is `ok ...` or `error ...`. After `ok
//! attached` to `console`, the connection is the guest's console. A save
//! or checkpoint asked for as `progress save PATH` gets `progress ...`
//! lines ([`Progress`]) before its reply (`xenkvm save` on a terminal).
//!
//! The server runs on a thread of its own (kind `Control`); it acts on the
//! current [`Machine`] (the runner attaches each VM it builds, across
//! restarts).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::vmm::machine::{GuestExit, Machine};
use crate::vmm::threads::{self, ThreadKind};

/// A control-socket failure, as one line.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be set up.
    #[error("control socket {path}: {why}")]
    Setup {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// No VM answers there.
    #[error("no running VM {name} (no control socket at {path}: {why})")]
    NotRunning {
        /// Name given.
        name: String,
        /// Where we looked.
        path: PathBuf,
        /// The connect error.
        why: String,
    },
    /// The VM answered with an error.
    #[error("{name}: {why}")]
    Refused {
        /// Name given.
        name: String,
        /// The VM's reply.
        why: String,
    },
}

/// The directory of named sockets.
pub fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("xenkvm"),
        _ => PathBuf::from("/run/xenkvm"),
    }
}

/// The socket of VM `name` (a name with a `/` is a socket path itself).
pub fn socket_path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        socket_dir().join(format!("{name}.sock"))
    }
}

/// Whether `name` can name a socket file.
pub fn name_fits_socket(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+@:".contains(c))
}

/// What `info` reports.
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// Domain name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub mem_mib: u64,
}

struct Shared {
    info: VmInfo,
    machine: Mutex<Option<Weak<Machine>>>,
    paused: AtomicBool,
    done: AtomicBool,
    started: Instant,
    /// A live migration runs (`migrate`): other verbs but `info` wait.
    migrating: AtomicBool,
    /// The attached `xenkvm console` client, if any.
    console: Arc<crate::vmm::console_attach::Slot>,
    /// The connection of the `progress save ...` request being executed
    /// (requests are served one at a time on the control thread): `save`
    /// writes its `progress ...` lines there.
    save_progress: Mutex<Option<UnixStream>>,
}

/// A running control socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    shared: Arc<Shared>,
    /// The listening socket again, to wake the accept when dropped (even
    /// if someone removed the socket file).
    waker: UnixListener,
    /// The socket file's (device, inode): removed at the end only if the
    /// path still names it (not another VM's socket bound there since).
    file_id: Option<(u64, u64)>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds the socket at `path` (refusing one a live VM still answers on)
    /// and starts serving it.
    pub fn start(path: &Path, info: VmInfo) -> Result<ControlServer, ControlError> {
        let setup = |why: String| ControlError::Setup {
            path: path.to_path_buf(),
            why,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| setup(format!("cannot create {}: {e}", dir.display())))?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(setup(
                    "a running VM already answers on it (choose another --name)".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| setup(format!("cannot remove the stale socket: {e}")))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| setup(format!("cannot bind: {e}")))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| setup(format!("cannot make it 0600: {e}")))?;
        let shared = Arc::new(Shared {
            info,
            machine: Mutex::new(None),
            paused: AtomicBool::new(false),
            done: AtomicBool::new(false),
            started: Instant::now(),
            migrating: AtomicBool::new(false),
            console: Arc::default(),
            save_progress: Mutex::new(None),
        });
        let s2 = shared.clone();
        let waker = listener
            .try_clone()
            .map_err(|e| setup(format!("cannot clone the socket: {e}")))?;
        let thread = threads::spawn(
            ThreadKind::Control,
            "control".into(),
            Arc::new(|m| tracing::error!("{m}")),
            move || serve(listener, s2),
        )
        .map_err(|e| setup(format!("cannot start its thread: {e}")))?;
        tracing::info!(path = %path.display(), "control socket ready");
        let file_id = file_id(path);
        Ok(ControlServer {
            path: path.to_path_buf(),
            shared,
            waker,
            file_id,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the verbs act on `m` (a new VM runs unpaused).
    pub fn attach(&self, m: &Arc<Machine>) {
        *self.shared.machine.lock() = Some(Arc::downgrade(m));
        self.shared.paused.store(false, Ordering::Release);
    }

    /// Between VMs (a restart): verbs answer that no guest runs.
    pub fn detach(&self) {
        *self.shared.machine.lock() = None;
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::Release);
        // An attached console client gets the guest's last output.
        crate::vmm::console_attach::end(&self.shared.console);
        // Wake the accept: shutdown makes a blocked accept(2) fail.
        let _ = rustix::net::shutdown(&self.waker, rustix::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.file_id.is_some() && file_id(&self.path) == self.file_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn serve(listener: UnixListener, s: Arc<Shared>) {
    for conn in listener.incoming() {
        if s.done.load(Ordering::Acquire) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if let Err(e) = handle(conn, &s) {
            tracing::debug!(%e, "control connection");
        }
    }
}

fn handle(mut conn: UnixStream, s: &Arc<Shared>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let me = rustix::process::geteuid();
    match rustix::net::sockopt::socket_peercred(&conn) {
        Ok(c) if c.uid == me => {}
        Ok(c) => {
            tracing::warn!(
                uid = c.uid.as_raw(),
                "control socket: refused a connection from another user"
            );
            return conn.write_all(b"error permission denied: not the VM's owner\n");
        }
        Err(e) => {
            return conn.write_all(format!("error cannot identify the peer: {e}\n").as_bytes())
        }
    }
    let (line, fds) = read_request(&conn)?;
    if let Some(args) = line.trim().strip_prefix("migrate ") {
        return migrate_request(conn, args, fds, s);
    }
    if line.trim() == "console" {
        let w = Arc::downgrade(s);
        let current =
            Arc::new(move || w.upgrade()?.machine.lock().as_ref().and_then(Weak::upgrade));
        return crate::vmm::console_attach::attach(conn, &s.console, current);
    }
    if let Some(keys) = line.trim().strip_prefix("debug-keys ") {
        return conn.write_all(debug_keys_reply(keys.trim(), s).as_bytes());
    }
    let Some(verb) = progress_request(line.trim(), &conn, s) else {
        return conn.write_all(b"error progress lines come only with save and checkpoint\n");
    };
    let reply = match execute(verb, s) {
        Ok(r) => format!("ok {r}\n"),
        Err(e) => format!("error {e}\n"),
    };
    s.save_progress.lock().take();
    conn.write_all(reply.as_bytes())
}

/// A request `progress VERB ...` (VERB a save or checkpoint) asks for
/// `progress ...` lines before the reply: `conn` is kept for `save` to
/// write them to. The request without that word; `None` for `progress`
/// before another verb.
fn progress_request<'a>(line: &'a str, conn: &UnixStream, s: &Shared) -> Option<&'a str> {
    let Some(verb) = line.strip_prefix("progress ") else {
        return Some(line);
    };
    let verb = verb.trim_start();
    if !is_save_request(verb) {
        return None;
    }
    *s.save_progress.lock() = conn.try_clone().ok();
    Some(verb)
}

/// One request line (up to 8 KiB) and the descriptors sent with it.
fn read_request(conn: &UnixStream) -> std::io::Result<(String, Vec<std::os::fd::OwnedFd>)> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    while !line.contains(&b'\n') && line.len() < 8192 {
        let mut buf = [0u8; 1024];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let r = recvmsg(
            conn,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for msg in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = msg {
                fds.extend(rights);
            }
        }
        if r.bytes == 0 {
            break;
        }
        line.extend_from_slice(&buf[..r.bytes]);
    }
    let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
    Ok((String::from_utf8_lossy(&line[..end]).into_owned(), fds))
}

/// `migrate OPTIONS` with the transport's (read, write) descriptors: runs
/// the live migration on a thread of its own (other verbs keep being
/// served), writing `progress ...` lines and then `ok migrated ...` or
/// `error ...` on `conn`.
fn migrate_request(
    mut conn: UnixStream,
    args: &str,
    fds: Vec<std::os::fd::OwnedFd>,
    s: &Arc<Shared>,
) -> std::io::Result<()> {
    let opts = match crate::vmm::migrate::MigrateOpts::from_words(args) {
        Ok(o) => o,
        Err(e) => return conn.write_all(format!("error {e}\n").as_bytes()),
    };
    let mut fds = fds.into_iter();
    let (Some(rd), Some(wr)) = (fds.next(), fds.next()) else {
        return conn.write_all(b"error migrate needs the transport's two descriptors\n");
    };
    let Some(m) = s.machine.lock().as_ref().and_then(Weak::upgrade) else {
        return conn.write_all(b"error no guest is running (it is being restarted)\n");
    };
    if s.migrating.swap(true, Ordering::AcqRel) {
        return conn.write_all(b"error a migration is already in progress\n");
    }
    let s = s.clone();
    let s2 = s.clone();
    let spawned = threads::spawn(
        ThreadKind::Control,
        "migrate".into(),
        Arc::new(move |msg| {
            s2.migrating.store(false, Ordering::Release);
            tracing::error!("{msg}")
        }),
        move || {
            let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
            let was_paused = s.paused.load(Ordering::Acquire);
            // The client never writes after its request: readable = gone.
            let peer = conn.try_clone().ok();
            let alive = || {
                use rustix::event::{poll, PollFd, PollFlags, Timespec};
                let Some(p) = peer.as_ref() else { return true };
                let mut f = [PollFd::new(p, PollFlags::IN)];
                let zero = Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                !matches!(poll(&mut f, Some(&zero)), Ok(n) if n > 0)
            };
            let mut w = conn.try_clone().ok();
            let mut progress = |p: &crate::vmm::migrate::Progress| {
                if let Some(c) = w.as_mut() {
                    let _ = c.write_all(format!("{}\n", p.line()).as_bytes());
                }
            };
            let out = crate::vmm::migrate::send(
                &m,
                &s.info.name,
                s.info.mem_mib,
                was_paused,
                &opts,
                rd,
                wr,
                &alive,
                &mut progress,
            );
            use crate::vmm::migrate::Outcome;
            let migrated = matches!(out, Outcome::Migrated(_));
            let reply = match out {
                Outcome::Migrated(r) => {
                    tracing::info!(report = %r.line(), "migrated");
                    format!("ok {}\n", r.line())
                }
                Outcome::Failed(e) => {
                    if !was_paused {
                        m.resume();
                    }
                    tracing::warn!(%e, "migration failed; the guest runs on here");
                    format!("error migration failed, the guest runs on here: {e}\n")
                }
                Outcome::Ambiguous(e) => {
                    s.paused.store(true, Ordering::Release);
                    tracing::error!(%e, "migration failed after the go-ahead; the guest stays paused here");
                    format!("error migration failed after the source let go: {e}; the guest may run at the destination and stays paused here (xenkvm unpause to run it here)\n")
                }
            };
            let _ = conn.write_all(reply.as_bytes());
            // Only now: the process ends soon after, and a client that got
            // no reply reports a failure although the guest migrated.
            if migrated {
                m.request_exit(GuestExit::Migrated(opts.dest.clone()));
            }
            s.migrating.store(false, Ordering::Release);
        },
    );
    spawned.map(|_| ())
}

fn execute(verb: &str, s: &Shared) -> Result<String, String> {
    if verb != "info" && s.migrating.load(Ordering::Acquire) {
        return Err("a live migration is in progress".into());
    }
    if verb == "info" {
        let i = &s.info;
        let state = if s.machine.lock().as_ref().and_then(Weak::upgrade).is_none() {
            "restarting"
        } else if s.paused.load(Ordering::Acquire) {
            "paused"
        } else {
            "running"
        };
        return Ok(format!(
            "name={} vcpus={} memory={} state={state} pid={} time={:.1}",
            i.name,
            i.vcpus,
            i.mem_mib,
            std::process::id(),
            s.started.elapsed().as_secs_f64()
        ));
    }
    let m = s
        .machine
        .lock()
        .as_ref()
        .and_then(Weak::upgrade)
        .ok_or("no guest is running (it is being restarted)")?;
    match verb {
        "pause" => {
            if s.paused.load(Ordering::Acquire) {
                return Err("already paused".into());
            }
            m.pause(Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            s.paused.store(true, Ordering::Release);
            Ok("paused".into())
        }
        "unpause" => {
            if !s.paused.swap(false, Ordering::AcqRel) {
                return Err("not paused".into());
            }
            m.resume();
            Ok("running".into())
        }
        v if is_save_request(v) => {
            let (verb, arg) = v.split_once(' ').unwrap_or((v, ""));
            let path = Path::new(arg.trim());
            if !path.is_absolute() {
                return Err(format!("{verb} needs an absolute path"));
            }
            let (verb, flags) = verb.split_once('+').unwrap_or((verb, ""));
            let mut xen_state = false;
            let mut suspend_wait = SUSPEND_WAIT;
            for f in flags.split('+').filter(|f| !f.is_empty()) {
                match f.split_once('=') {
                    // `+xen`: also write xenkvm's XENKVM_XEN_STATE record.
                    None if f == "xen" => xen_state = true,
                    Some(("wait", secs)) => {
                        suspend_wait = secs
                            .parse::<u64>()
                            .map(Duration::from_secs)
                            .map_err(|_| format!("{verb}: wait={secs:?} is not a number of seconds"))?
                    }
                    _ => return Err(format!("{verb}: unknown option {f:?}")),
                }
            }
            let checkpoint = verb == "checkpoint";
            // With `+xen` the guest is saved as it is, whatever drivers it
            // has: the record brings its Xen side back.
            let held = if xen_state {
                None
            } else {
                suspend_for_save(&m, s, suspend_wait)?
            };
            let r = save(&m, s, path, checkpoint, xen_state);
            if held.is_some() {
                crate::vmm::suspend::finish(&m, checkpoint || r.is_err());
            }
            let r = match (r, held) {
                (Ok(r), Some(v)) => format!("{r} (suspended by the guest on vCPU {v})"),
                (r, _) => r?,
            };
            if verb == "save" {
                // As `xl save`: the guest ends once its image is complete.
                m.request_exit(GuestExit::Saved(path.display().to_string()));
            }
            Ok(r)
        }
        "shutdown" => {
            tracing::info!("control socket: shutdown");
            m.request_exit(GuestExit::Poweroff);
            Ok("shutting down".into())
        }
        v => Err(format!(
            "unknown request {v:?} (info, pause, unpause, save[+xen][+wait=SECS] PATH, checkpoint[+xen][+wait=SECS] PATH, shutdown, console)"
        )),
    }
}

/// The reply to `debug-keys KEYS`: `dump ...` lines (one per line of the
/// dump), then `ok`; or one `error ...` line.
fn debug_keys_reply(keys: &str, s: &Shared) -> String {
    if s.migrating.load(Ordering::Acquire) {
        return "error a live migration is in progress\n".into();
    }
    let Some(m) = s.machine.lock().as_ref().and_then(Weak::upgrade) else {
        return "error no guest is running (it is being restarted)\n".into();
    };
    let paused = s.paused.load(Ordering::Acquire);
    match crate::vmm::debug_keys::run(&m, keys, paused) {
        Ok(lines) => {
            let mut r = String::new();
            for l in lines {
                r.push_str("dump ");
                r.push_str(&l.replace('\n', " "));
                r.push('\n');
            }
            r.push_str("ok\n");
            r
        }
        Err(e) => format!("error {e}\n"),
    }
}

/// `debug-keys KEYS` to VM `name`: the lines of the dump.
pub fn debug_keys(name: &str, keys: &str) -> Result<Vec<String>, ControlError> {
    let mut lines = Vec::new();
    exchange_lines(name, &format!("debug-keys {keys}"), &mut lines)?;
    Ok(lines)
}

/// A `save`/`checkpoint` request, with or without `+` options (`+xen`,
/// `+wait=SECS`).
fn is_save_request(v: &str) -> bool {
    ["save ", "checkpoint ", "save+", "checkpoint+"]
        .iter()
        .any(|p| v.starts_with(p))
}

pub use crate::vmm::suspend::SUSPEND_WAIT;

/// A save's cooperative suspend ([`crate::vmm::suspend::ask_guest`]); a
/// paused guest cannot answer.
fn suspend_for_save(m: &Machine, s: &Shared, wait: Duration) -> Result<Option<u32>, String> {
    if !crate::vmm::suspend::has_suspend_support(m) {
        return Ok(None);
    }
    if s.paused.load(Ordering::Acquire) {
        return Err("the guest is paused, and its Xen drivers suspend it themselves for a save: unpause it first (or save --xen-state to save it as it is)".into());
    }
    crate::vmm::suspend::ask_guest(m, wait)
}

/// `save PATH` / `checkpoint PATH`: pauses the guest (unless paused),
/// writes the xl save image to PATH (through a temporary file renamed at
/// the end, so a failed save leaves no partial image). A checkpoint, or a
/// save that failed, lets the guest run again if it ran; a successful save
/// keeps it paused (the caller then ends it).
/// With `xen_state`, the image also carries xenkvm's XENKVM_XEN_STATE record
/// ([`crate::xen::Xen::xen_state`]; `xenkvm restore` applies it; Xen 4.17's
/// verify-stream-v2 refuses such an image).
fn save(
    m: &Machine,
    s: &Shared,
    path: &Path,
    checkpoint: bool,
    xen_state: bool,
) -> Result<String, String> {
    use crate::migration::save::{write_image_with_progress, SaveMeta, STREAM_PARAMS};
    let was_paused = s.paused.load(Ordering::Acquire);
    let t0 = Instant::now();
    if !was_paused {
        if let Err(e) = m.pause(Duration::from_secs(10)) {
            // Those that paused run again (and a vCPU held in a suspend
            // returns "cancelled").
            m.resume();
            return Err(e.to_string());
        }
    }
    let result = (|| {
        // `bpf-direct`'s pages over guest RAM go back into it: the image is
        // written from guest RAM itself.
        m.xen.sched_direct_release()?;
        let mut states = Vec::with_capacity(m.vcpus.len());
        for h in m.vcpus.iter().filter(|h| h.started()) {
            match h.saved_state() {
                Some(Ok(st)) => states.push((h.id as u16, st)),
                Some(Err(e)) => return Err(format!("vCPU {}: {e}", h.id)),
                None => return Err(format!("vCPU {} has no saved state (it stopped)", h.id)),
            }
        }
        let irq = m.irq.save_irqchip().map_err(|e| e.to_string())?;
        let params: Vec<(u64, u64)> = STREAM_PARAMS
            .iter()
            .map(|i| (u64::from(*i), m.xen.domain.param(*i).unwrap_or(0)))
            .collect();
        // The guest TSC and the Xen system time it gives, read together.
        let (guest_tsc, system_time_ns) = m.clock.now();
        let meta = SaveMeta {
            name: s.info.name.clone(),
            mem_mib: s.info.mem_mib,
            tsc_khz: m.clock.tsc_khz,
            system_time_ns,
            xen_state: xen_state.then(|| {
                m.xen
                    .xen_state(crate::migration::xenkvm_records::ClockState {
                        tsc_khz: m.clock.tsc_khz,
                        system_time_ns,
                        guest_tsc,
                    })
            }),
            cpuid: m.cpuid_policy.clone(),
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let mut progress = progress_lines(s, t0);
        let mut write = || -> Result<crate::migration::save::SaveStats, String> {
            let f = std::fs::File::create(&tmp)
                .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
            // Pages go to the file straight from guest RAM (`writev`);
            // pages never touched become holes of the file.
            let mut w = crate::migration::pageio::Direct::new(&f, &m.map);
            let st = write_image_with_progress(
                &mut w,
                &meta,
                m.vcpus.len(),
                &states,
                &irq,
                &m.mem,
                &params,
                &mut progress,
            )
            .map_err(|e| format!("{}: {e}", path.display()))?;
            w.finish().map_err(|e| format!("{}: {e}", path.display()))?;
            f.sync_all()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::rename(&tmp, path)
                .map_err(|e| format!("cannot rename to {}: {e}", path.display()))?;
            Ok(st)
        };
        let st = write();
        if st.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        st
    })();
    let paused_for = t0.elapsed();
    if !was_paused && (checkpoint || result.is_err()) {
        m.resume();
    }
    let st = result?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(st.bytes);
    tracing::info!(path = %path.display(), pages = st.pages, bytes, "saved");
    Ok(format!(
        "saved {} pages ({} holes), {bytes} bytes, to {} in {:.3} s",
        st.pages,
        st.holes,
        path.display(),
        paused_for.as_secs_f64()
    ))
}

/// A `progress ...` line of a save or checkpoint asked for with
/// `progress save PATH` (a plain request gets none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Image bytes written so far.
    pub bytes: u64,
    /// The image's size once complete.
    pub total: u64,
    /// Since the request, including the pause.
    pub elapsed: Duration,
}

impl Progress {
    /// As a `progress ...` line.
    pub fn line(&self) -> String {
        format!(
            "progress bytes={} total={} elapsed_ms={}",
            self.bytes,
            self.total,
            self.elapsed.as_millis()
        )
    }

    /// From a `progress ...` line (unknown words are skipped).
    pub fn parse(l: &str) -> Option<Progress> {
        let mut p = Progress::default();
        for w in l.strip_prefix("progress ")?.split_whitespace() {
            let (k, v) = w.split_once('=')?;
            match k {
                "bytes" => p.bytes = v.parse().ok()?,
                "total" => p.total = v.parse().ok()?,
                "elapsed_ms" => p.elapsed = Duration::from_millis(v.parse().ok()?),
                _ => {}
            }
        }
        Some(p)
    }
}

/// How often a save reports its progress (the first and last report are
/// always sent).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// The page writer's progress callback for a save: writes `progress ...`
/// lines to the requester if it asked for them (see [`Shared::save_progress`]),
/// at most every [`PROGRESS_EVERY`]; stops at the first failed write.
fn progress_lines(
    s: &Shared,
    t0: Instant,
) -> impl FnMut(crate::migration::save::SaveProgress) + use<> {
    let mut conn = s.save_progress.lock().take();
    let mut last: Option<Instant> = None;
    move |p| {
        let Some(c) = conn.as_mut() else { return };
        let now = Instant::now();
        if p.bytes < p.total && last.is_some_and(|l| now - l < PROGRESS_EVERY) {
            return;
        }
        last = Some(now);
        let line = Progress {
            bytes: p.bytes,
            total: p.total,
            elapsed: t0.elapsed(),
        }
        .line();
        if c.write_all(format!("{line}\n").as_bytes()).is_err() {
            conn = None;
        }
    }
}

/// Sends `verb` to VM `name` (a name or a socket path); the reply's text.
pub fn request(name: &str, verb: &str) -> Result<String, ControlError> {
    exchange(name, verb, None)
}

/// [`request`] for a `save`/`checkpoint` (with or without `+xen`), with
/// the VM's progress reports passed to `on_progress` as they come.
pub fn request_with_progress(
    name: &str,
    verb: &str,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<String, ControlError> {
    exchange(name, verb, Some(on_progress))
}

fn exchange(
    name: &str,
    verb: &str,
    on_progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<String, ControlError> {
    exchange_inner(name, verb, on_progress, None)
}

/// [`exchange`] for a request answered by `dump ...` lines before its
/// reply (`debug-keys`): they go to `dump`.
fn exchange_lines(name: &str, verb: &str, dump: &mut Vec<String>) -> Result<String, ControlError> {
    exchange_inner(name, verb, None, Some(dump))
}

fn exchange_inner(
    name: &str,
    verb: &str,
    mut on_progress: Option<&mut dyn FnMut(&Progress)>,
    mut dump: Option<&mut Vec<String>>,
) -> Result<String, ControlError> {
    let path = socket_path(name);
    let not_running = |why: String| ControlError::NotRunning {
        name: name.to_string(),
        path: path.clone(),
        why,
    };
    let mut c = UnixStream::connect(&path).map_err(|e| not_running(e.to_string()))?;
    let io = |e: std::io::Error| not_running(e.to_string());
    // A save takes as long as writing the guest's memory does.
    let timeout = (!is_save_request(verb)).then(|| Duration::from_secs(30));
    c.set_read_timeout(timeout).map_err(io)?;
    // The VM may answer (a refusal) before it reads the request: read the
    // reply even if the write failed.
    let request = match on_progress {
        Some(_) => format!("progress {verb}\n"),
        None => format!("{verb}\n"),
    };
    let wrote = c.write_all(request.as_bytes());
    let mut rd = BufReader::new(c);
    let mut line = String::new();
    loop {
        line.clear();
        (&mut rd).take(4096).read_line(&mut line).map_err(io)?;
        if let (Some(d), Some(l)) = (dump.as_mut(), line.strip_prefix("dump ")) {
            d.push(l.trim_end().to_string());
            continue;
        }
        match (on_progress.as_mut(), Progress::parse(line.trim_end())) {
            (Some(f), Some(p)) => f(&p),
            _ => break,
        }
    }
    if line.is_empty() {
        return Err(not_running(match wrote {
            Err(e) => e.to_string(),
            Ok(()) => "it closed the connection without a reply".into(),
        }));
    }
    let line = line.trim_end();
    if let Some(r) = line.strip_prefix("ok") {
        Ok(r.trim_start().to_string())
    } else {
        Err(ControlError::Refused {
            name: name.to_string(),
            why: line.strip_prefix("error ").unwrap_or(line).to_string(),
        })
    }
}

/// `info` of every VM with a socket in [`socket_dir`], by name (stale
/// sockets skipped): (name, the `key=value` fields).
pub fn list() -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(socket_dir()) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    paths.sort();
    for p in paths {
        let Some(name) = p.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        if let Ok(r) = request(&p.to_string_lossy(), "info") {
            let kv = r
                .split_whitespace()
                .filter_map(|f| f.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            out.push((name, kv));
        }
    }
    out
}
