//! The run loop behind `xenkvm run` and `xenkvm demo`: it builds a VM from a
//! [`VmConfig`], runs it, and decides what happens when the guest stops
//! (Xen's `on_poweroff`/`on_reboot`/`on_crash`: destroy, or restart with a
//! fresh VM from the same config), and what the process exits with.
//!
//! While a guest runs, a supervisor thread
//! - turns SIGINT/SIGTERM into one line on stderr and a clean stop (exit
//!   status 130/143; a second signal exits at once);
//! - stops the guest when stdout is a closed pipe (EPIPE; exit status 141);
//! - shows a one-line status on stderr while the guest's console is silent
//!   (on a terminal by default, `--status` anywhere, `--quiet` never).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// One line on stderr that never panics: `eprintln!` panics when stderr is
/// closed (the parent died, `2>&-`), and a supervisor that panicked there
/// before asking the guest to stop left xenkvm running with nobody to stop
/// it. A lost line is all that goes wrong now.
macro_rules! stderr_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

use parking_lot::Mutex;

use crate::devices::ConsoleOut;
use crate::vmm::console_input::{self, InputMode, StdinKind};
use crate::vmm::machine::{GuestExit, Machine};
use crate::vmm::{BootProtocol, Vm, VmConfig, VmError};

/// The process exit statuses of `xenkvm run` and `xenkvm demo`.
pub mod exit_status {
    /// The guest powered off.
    pub const POWEROFF: u8 = 0;
    /// xenkvm failed: bad arguments, a file it cannot read, no usable KVM,
    /// a VMM error.
    pub const ERROR: u8 = 1;
    /// The guest crashed (and `--on-crash` is `destroy`).
    pub const CRASH: u8 = 2;
    /// The guest rebooted (with `--on-reboot destroy`, or too many restarts
    /// in a row), or it suspended itself.
    pub const REBOOT: u8 = 3;
    /// `--timeout` expired.
    pub const TIMEOUT: u8 = 4;
    /// SIGINT (Ctrl-C): 128 + 2.
    pub const SIGINT: u8 = 130;
    /// Stdout was a pipe whose reader closed it (EPIPE): 128 + SIGPIPE.
    pub const STDOUT_CLOSED: u8 = 141;
    /// SIGTERM: 128 + 15.
    pub const SIGTERM: u8 = 143;

    /// The exit statuses as the help text and README give them.
    pub const HELP: &str = "Exit status: 0 the guest powered off; 1 xenkvm failed (bad arguments, \
an unreadable file, no usable KVM, a VMM error); 2 the guest crashed; 3 the guest rebooted \
(--on-reboot destroy, or more than 5 restarts within 60 s) or suspended itself; 4 --timeout \
expired; 130 SIGINT (Ctrl-C); 141 stdout was closed (EPIPE); 143 SIGTERM. Each failure prints \
one line on stderr saying why.";
}

/// What to do when the guest powers off, reboots or crashes (xl.cfg's
/// `on_poweroff`, `on_reboot`, `on_crash`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Action {
    /// End xenkvm with the guest.
    #[default]
    Destroy,
    /// Build a fresh VM from the same config and boot it again.
    Restart,
}

/// When the status line is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StatusMode {
    /// When stderr is a terminal.
    #[default]
    Auto,
    /// Always (on a non-terminal, as a full line every `status_after`).
    Always,
    /// Never (`--quiet`).
    Never,
}

/// More than this many restarts within [`RESTART_WINDOW`] is a restart
/// loop: xenkvm stops.
pub const RESTART_LIMIT: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How the run loop behaves (the CLI's options).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Wall-clock limit for the whole run, restarts included.
    pub timeout: Option<Duration>,
    pub on_poweroff: Action,
    /// Xen's default is restart.
    pub on_reboot: Action,
    pub on_crash: Action,
    pub console_input: InputMode,
    pub status: StatusMode,
    /// Console silence before the status line appears.
    pub status_after: Duration,
    /// The --initrd path, for messages.
    pub initrd_name: Option<String>,
    /// Serve the VM's control socket here (`--api-socket`, or from `--name`).
    pub control_socket: Option<std::path::PathBuf>,
    /// A migrated-in guest: xl's handshake with the source between building
    /// the guest and running it (`xenkvm migrate-receive`).
    pub incoming: Option<super::migrate::Incoming>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: None,
            on_poweroff: Action::Destroy,
            on_reboot: Action::Restart,
            on_crash: Action::Destroy,
            console_input: InputMode::Auto,
            status: StatusMode::Auto,
            status_after: Duration::from_secs(5),
            initrd_name: None,
            control_socket: None,
            incoming: None,
        }
    }
}

/// How a run ended: the exit status and the line to print (none when
/// already printed or on success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub code: u8,
    pub message: Option<String>,
}

impl Ended {
    fn new(code: u8, message: impl Into<String>) -> Ended {
        Ended {
            code,
            message: Some(message.into()),
        }
    }
}

/// Seconds as a person reads them: "0.001 s", "1.5 s", "90 s".
pub fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 {
        format!("{s:.0} s")
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        let t = format!("{s:.3}");
        format!("{} s", t.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Runs the guest of `cfg` as `opts` says, restarting it as the actions
/// say, until it ends for good.
pub fn run(mut cfg: VmConfig, console: Arc<ConsoleOut>, opts: &RunOptions) -> Ended {
    // A pty console brings its own input.
    cfg.stdin_console = cfg.console_in.is_none()
        && console_input::reads_stdin(opts.console_input, StdinKind::of_stdin());
    let ctl = match &opts.control_socket {
        None => None,
        Some(path) => {
            let info = super::control::VmInfo {
                name: cfg.name.clone(),
                vcpus: cfg.vcpus,
                mem_mib: cfg.mem_mib,
            };
            match super::control::ControlServer::start(path, info) {
                Ok(c) => Some(c),
                Err(e) => return Ended::new(exit_status::ERROR, e.to_string()),
            }
        }
    };
    let sup = Supervisor::start(console.clone(), opts);
    let ended = run_loop(&cfg, &console, opts, &sup, ctl.as_ref());
    drop(ctl);
    sup.finish();
    console.flush();
    ended
}

fn run_loop(
    cfg: &VmConfig,
    console: &Arc<ConsoleOut>,
    opts: &RunOptions,
    sup: &Supervisor,
    ctl: Option<&super::control::ControlServer>,
) -> Ended {
    let start = Instant::now();
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    let mut nr_restarts = 0u64;
    loop {
        let remaining = opts.timeout.map(|t| t.saturating_sub(start.elapsed()));
        if let (Some(t), Some(Duration::ZERO)) = (opts.timeout, remaining) {
            return timeout_ended(t);
        }
        let vm = match Vm::create(cfg, console.clone()) {
            Ok(vm) => vm,
            Err(e) => return Ended::new(exit_status::ERROR, create_error(cfg, opts, &e)),
        };
        if let Some(inc) = &opts.incoming {
            if let Err(e) = inc.ready() {
                return Ended::new(
                    exit_status::ERROR,
                    format!("migration: {e}; the received guest is discarded"),
                );
            }
        }
        sup.attach(&vm.machine);
        if let Some(c) = ctl {
            c.attach(&vm.machine);
        }
        let exit = match &opts.incoming {
            Some(inc) => vm.run_with(remaining, |_| inc.started()),
            None => vm.run(remaining),
        };
        if let Some(c) = ctl {
            c.detach();
        }
        sup.detach();
        if let Some(code) = sup.stopped() {
            // The supervisor printed why.
            return Ended {
                code,
                message: None,
            };
        }
        let (action, code, what, flag) = match exit {
            GuestExit::Poweroff => (
                opts.on_poweroff,
                exit_status::POWEROFF,
                "powered off".to_string(),
                "--on-poweroff",
            ),
            GuestExit::Reboot(why) => (
                opts.on_reboot,
                exit_status::REBOOT,
                format!("rebooted: {why}"),
                "--on-reboot",
            ),
            GuestExit::Crash(why) => (
                opts.on_crash,
                exit_status::CRASH,
                format!("crashed: {why}"),
                "--on-crash",
            ),
            GuestExit::Suspend => {
                return Ended::new(
                    exit_status::REBOOT,
                    "guest suspended itself and nothing can resume it",
                )
            }
            GuestExit::Timeout(_) => return timeout_ended(opts.timeout.unwrap_or_default()),
            GuestExit::Error(e) => return Ended::new(exit_status::ERROR, e),
            GuestExit::Stopped(why) => return Ended::new(exit_status::ERROR, why),
            GuestExit::Saved(path) => {
                return Ended::new(exit_status::POWEROFF, format!("guest saved to {path}"))
            }
            GuestExit::Migrated(to) => {
                return Ended::new(exit_status::POWEROFF, format!("guest migrated to {to}"))
            }
        };
        if action == Action::Destroy {
            return Ended {
                code,
                message: (code != exit_status::POWEROFF).then(|| format!("guest {what}")),
            };
        }
        let now = Instant::now();
        restarts.push_back(now);
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            restarts.pop_front();
        }
        if restarts.len() > RESTART_LIMIT {
            return Ended::new(
                code,
                format!(
                    "guest {what}; it was restarted {RESTART_LIMIT} times within {}: a restart loop, stopping ({flag} destroy stops at the first)",
                    fmt_secs(RESTART_WINDOW)
                ),
            );
        }
        nr_restarts += 1;
        console.clear_status();
        stderr_line!("xenkvm: guest {what}: restarting it (restart {nr_restarts}; {flag} destroy stops instead)");
        tracing::info!(restart = nr_restarts, %what, "restarting the guest");
    }
}

fn timeout_ended(t: Duration) -> Ended {
    Ended::new(
        exit_status::TIMEOUT,
        format!(
            "timeout: the guest was still running after --timeout {}",
            fmt_secs(t)
        ),
    )
}

/// The line for a VM that could not be created, with what to do about it.
fn create_error(cfg: &VmConfig, opts: &RunOptions, e: &VmError) -> String {
    let too_big = matches!(
        e,
        VmError::Boot(crate::boot::BootError::InitrdTooLarge(_))
            | VmError::LinuxBoot(crate::boot::linux::LinuxBootError::InitrdTooLarge(_))
    );
    if !too_big {
        return e.to_string();
    }
    let name = opts.initrd_name.as_deref().unwrap_or("the initrd");
    let len = cfg.initrd.as_ref().map_or(0, |i| i.len());
    match min_memory_for_initrd(cfg) {
        Some(mib) => format!(
            "--initrd {name} ({len} bytes) does not fit in --memory {} MiB; it fits with --memory {mib} (the guest needs more to unpack it)",
            cfg.mem_mib
        ),
        None => format!(
            "--initrd {name} ({len} bytes) does not fit in the guest's RAM below 4 GiB with any --memory"
        ),
    }
}

/// The smallest `--memory` (MiB) with which the kernel and initrd of `cfg`
/// load, found by loading them into scratch memory (only RAM below the
/// 3 GiB hole holds an initrd, so the search stops there).
pub fn min_memory_for_initrd(cfg: &VmConfig) -> Option<u64> {
    let fits = |mib: u64| -> bool {
        let Ok(mem) = crate::GuestMem::from_ranges(&crate::boot::layout::ram_ranges(mib << 20))
        else {
            return false;
        };
        let e820 = crate::boot::layout::e820(&mem);
        let Ok(rsdp) = crate::boot::acpi::write_tables(&mem, cfg.vcpus.max(1)) else {
            return false;
        };
        match cfg.boot {
            BootProtocol::Pvh => {
                crate::boot::load_pvh_elf(&mem, &cfg.kernel).is_ok()
                    && crate::boot::write_start_info(
                        &mem,
                        &e820,
                        &cfg.cmdline,
                        cfg.initrd.as_deref(),
                        rsdp,
                    )
                    .is_ok()
            }
            BootProtocol::Linux => crate::boot::linux::load_bzimage(
                &mem,
                &cfg.kernel,
                &cfg.cmdline,
                cfg.initrd.as_deref(),
                &e820,
                rsdp,
            )
            .is_ok(),
        }
    };
    let max = crate::boot::layout::LOW_RAM_MAX >> 20;
    let (mut lo, mut hi) = (cfg.mem_mib.clamp(16, max), max);
    if !fits(hi) {
        return None;
    }
    // fits(hi); find the least such value above lo.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(hi)
}

// ---------------------------------------------------------------- signals

/// Number of SIGINT/SIGTERM received, and the last one.
static SIGNALS: AtomicU32 = AtomicU32::new(0);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The supervisor's wake-up eventfd (-1 before it exists), for the handler.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only atomics and write(2): async-signal-safe.
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) of 8 bytes from a live local to an eventfd the
        // supervisor keeps open for the process's life (it is never closed
        // while WAKE_FD names it); async-signal-safe.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

fn signal_code(sig: i32) -> u8 {
    match sig {
        libc::SIGTERM => exit_status::SIGTERM,
        _ => exit_status::SIGINT,
    }
}

/// The signals this process ignores (bit `n - 1` for signal `n`), from
/// `/proc/self/status`; 0 if unknown.
fn ignored_signals() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

// ------------------------------------------------------------- supervisor

struct Shared {
    console: Arc<ConsoleOut>,
    machine: Mutex<Option<Weak<Machine>>>,
    /// The exit status the supervisor stopped the guest with.
    stopped: Mutex<Option<u8>>,
    done: AtomicBool,
    status: StatusMode,
    terminal: bool,
    status_after: Duration,
    /// Written by the signal handler, a console that found its reader
    /// gone, and `finish`: the supervisor sleeps on it.
    wake: Option<std::os::fd::OwnedFd>,
}

struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    /// Blocks SIGINT/SIGTERM in this thread (so in every thread it starts
    /// later: vCPUs, console input) and starts the supervisor thread, the
    /// one thread that takes them.
    fn start(console: Arc<ConsoleOut>, opts: &RunOptions) -> Supervisor {
        for s in [libc::SIGINT, libc::SIGTERM] {
            if let Err(e) = vmm_sys_util::signal::block_signal(s) {
                tracing::warn!(%e, "cannot block {}", signal_name(s));
            }
        }
        let shared = Arc::new(Shared {
            console,
            machine: Mutex::new(None),
            stopped: Mutex::new(None),
            done: AtomicBool::new(false),
            status: opts.status,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            status_after: opts.status_after,
            wake: wake_fd(),
        });
        if let Some(fd) = &shared.wake {
            use std::os::fd::AsRawFd;
            // Kept open for the process's life (see on_signal).
            if WAKE_FD
                .compare_exchange(-1, fd.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                tracing::debug!("a supervisor ran before: signals wake the first one's fd");
            }
            let w = Arc::downgrade(&shared);
            shared.console.on_closed(Box::new(move || {
                if let Some(s) = w.upgrade() {
                    s.poke()
                }
            }));
        }
        let s = shared.clone();
        // A signal ignored when xenkvm started (SIGINT for `cmd &` in a
        // script) stays ignored, as shells expect.
        let ignored = ignored_signals();
        let thread = crate::vmm::threads::spawn(
            crate::vmm::threads::ThreadKind::Supervisor,
            "supervisor".into(),
            Arc::new(
                |msg| tracing::error!(%msg, "the supervisor died: Ctrl-C may not stop the guest"),
            ),
            move || {
                for sig in [libc::SIGINT, libc::SIGTERM] {
                    if ignored & (1u64 << (sig - 1)) != 0 {
                        continue;
                    }
                    if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_signal) {
                        tracing::warn!(%e, "cannot handle {}", signal_name(sig));
                    }
                    let _ = vmm_sys_util::signal::unblock_signal(sig);
                }
                s.watch();
            },
        );
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(%e, "cannot start the supervisor thread: Ctrl-C kills xenkvm at once");
                for s in [libc::SIGINT, libc::SIGTERM] {
                    let _ = vmm_sys_util::signal::unblock_signal(s);
                }
                None
            }
        };
        Supervisor { shared, thread }
    }

    fn attach(&self, m: &Arc<Machine>) {
        *self.shared.machine.lock() = Some(Arc::downgrade(m));
        // A signal or EPIPE before this guest started stops it at once.
        self.shared.check_stop();
        if self.shared.stopped.lock().is_some() {
            m.request_exit(GuestExit::Stopped("stopped before it started".into()));
        }
    }

    fn detach(&self) {
        *self.shared.machine.lock() = None;
    }

    fn stopped(&self) -> Option<u8> {
        self.shared.check_stop();
        *self.shared.stopped.lock()
    }

    fn finish(mut self) {
        self.shared.done.store(true, Ordering::Release);
        self.shared.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.console.clear_status();
    }
}

/// The supervisor's wake-up eventfd.
fn wake_fd() -> Option<std::os::fd::OwnedFd> {
    rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )
    .map_err(|e| tracing::warn!(%e, "no supervisor eventfd: it looks every 50 ms instead"))
    .ok()
}

/// The shortest wait between looks (the status line's redraw bound).
const TICK: Duration = Duration::from_millis(50);

impl Shared {
    fn poke(&self) {
        if let Some(fd) = &self.wake {
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
        }
    }

    /// Sleeps until poked or `timeout` (for ever if `None`).
    fn sleep(&self, timeout: Option<Duration>) {
        let Some(fd) = &self.wake else {
            std::thread::sleep(timeout.unwrap_or(TICK).min(TICK));
            return;
        };
        let ts = timeout.map(|t| rustix::event::Timespec {
            tv_sec: t.as_secs() as _,
            tv_nsec: t.subsec_nanos() as _,
        });
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        if let Ok(n) = rustix::event::poll(&mut fds, ts.as_ref()) {
            if n > 0 {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(fd, &mut b);
            }
        }
    }

    fn watch(&self) {
        let mut last_status = Instant::now();
        let mut last_counts: Option<(Instant, u64, u64)> = None;
        let mut shown_at: Option<Instant> = None;
        let show = match self.status {
            StatusMode::Never => false,
            StatusMode::Auto => self.terminal,
            StatusMode::Always => true,
        };
        let redraw = if self.terminal {
            Duration::from_secs(1)
        } else {
            self.status_after
        };
        while !self.done.load(Ordering::Acquire) {
            // Without a status line nothing is due: sleep until poked (a
            // signal, a closed stdout, the end). With one, until it is due.
            let due = show.then(|| {
                let silent = self.console.silent_for();
                if silent < self.status_after {
                    self.status_after - silent
                } else {
                    redraw.saturating_sub(last_status.elapsed())
                }
                .max(TICK)
            });
            self.sleep(due);
            if self.done.load(Ordering::Acquire) {
                break;
            }
            self.check_stop();
            if !show || self.stopped.lock().is_some() {
                continue;
            }
            let silent = self.console.silent_for();
            if silent < self.status_after {
                shown_at = None;
                continue;
            }
            // On a terminal the line is redrawn every second; elsewhere a
            // full line every `status_after`.
            let every = if self.terminal {
                Duration::from_secs(1)
            } else {
                self.status_after
            };
            if shown_at.is_some() && last_status.elapsed() < every {
                continue;
            }
            let Some(m) = self.machine.lock().as_ref().and_then(Weak::upgrade) else {
                continue;
            };
            let now = Instant::now();
            let exits = m.exits.load(Ordering::Relaxed);
            let hcalls = m.hypercalls.load(Ordering::Relaxed);
            let rates = last_counts.map(|(t, e, h)| {
                let dt = now.duration_since(t).as_secs_f64().max(1e-3);
                (
                    exits.saturating_sub(e) as f64 / dt,
                    hcalls.saturating_sub(h) as f64 / dt,
                )
            });
            last_counts = Some((now, exits, hcalls));
            let in_guest = m
                .vcpus
                .iter()
                .filter(|h| h.reported() == crate::vcpu::Reported::Running)
                .count();
            let line = status_line(silent, m.nr_vcpus, in_guest, exits, hcalls, rates);
            drop(m);
            last_status = now;
            shown_at = Some(now);
            if self.terminal {
                self.console.show_status(fit_terminal(&line));
            } else {
                stderr_line!("{line}");
            }
        }
        self.console.clear_status();
    }

    /// Acts on a signal or a closed stdout: one line, then the guest stops.
    fn check_stop(&self) {
        let sigs = SIGNALS.load(Ordering::SeqCst);
        let sig = LAST_SIGNAL.load(Ordering::SeqCst);
        let mut stopped = self.stopped.lock();
        if sigs >= 2 && stopped.is_some() {
            self.console.clear_status();
            stderr_line!(
                "xenkvm: {} again: exiting without waiting for the guest",
                signal_name(sig)
            );
            std::process::exit(i32::from(signal_code(sig)));
        }
        if stopped.is_some() {
            return;
        }
        let why = if sigs > 0 {
            *stopped = Some(signal_code(sig));
            format!("{}: stopping the guest", signal_name(sig))
        } else if self.console.closed() {
            *stopped = Some(exit_status::STDOUT_CLOSED);
            "stdout was closed (EPIPE: nobody reads the guest's output): stopping the guest"
                .to_string()
        } else {
            return;
        };
        drop(stopped);
        self.console.clear_status();
        stderr_line!("xenkvm: {why}");
        if let Some(m) = self.machine.lock().as_ref().and_then(Weak::upgrade) {
            m.request_exit(GuestExit::Stopped(why));
        }
    }
}

/// The status line: how long the console has been silent and what the
/// vCPUs do (short: it must fit on one terminal line).
pub fn status_line(
    silent: Duration,
    vcpus: u32,
    in_guest: usize,
    exits: u64,
    hypercalls: u64,
    rates: Option<(f64, f64)>,
) -> String {
    let (e, h) = match rates {
        Some((e, h)) => (format!(" ({e:.0}/s)"), format!(" ({h:.0}/s)")),
        None => (String::new(), String::new()),
    };
    format!(
        "xenkvm: guest silent {} s; vCPUs {in_guest}/{vcpus} in guest; {exits} exits{e}, {hypercalls} hypercalls{h}",
        silent.as_secs(),
    )
}

/// `line` cut to the terminal's width (a wrapped status line could not be
/// erased).
fn fit_terminal(line: &str) -> &str {
    let cols = rustix::termios::tcgetwinsize(std::io::stderr())
        .map(|w| usize::from(w.ws_col))
        .unwrap_or(0);
    if cols < 20 || line.len() < cols {
        return line;
    }
    let mut end = cols - 1;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_signals_reads_this_process_mask() {
        // Rust ignores SIGPIPE in every Rust program.
        assert_ne!(ignored_signals() & (1 << (libc::SIGPIPE - 1)), 0);
    }

    #[test]
    fn fmt_secs_small_timeouts_keep_their_digits() {
        assert_eq!(fmt_secs(Duration::from_secs_f64(0.001)), "0.001 s");
        assert_eq!(fmt_secs(Duration::from_secs_f64(0.25)), "0.25 s");
        assert_eq!(fmt_secs(Duration::from_secs_f64(1.5)), "1.5 s");
        assert_eq!(fmt_secs(Duration::from_secs(120)), "120 s");
    }

    #[test]
    fn timeout_message_names_the_requested_timeout() {
        let e = timeout_ended(Duration::from_secs_f64(0.001));
        assert_eq!(e.code, exit_status::TIMEOUT);
        assert_eq!(
            e.message.as_deref(),
            Some("timeout: the guest was still running after --timeout 0.001 s")
        );
    }

    #[test]
    fn status_line_says_guest_is_alive() {
        let l = status_line(Duration::from_secs(12), 2, 1, 5000, 40, Some((100.0, 3.0)));
        assert_eq!(
            l,
            "xenkvm: guest silent 12 s; vCPUs 1/2 in guest; 5000 exits (100/s), 40 hypercalls (3/s)"
        );
        assert!(l.len() < 100);
    }

    #[test]
    fn run_options_default_restarts_on_reboot_only() {
        let o = RunOptions::default();
        assert_eq!(o.on_reboot, Action::Restart);
        assert_eq!(o.on_poweroff, Action::Destroy);
        assert_eq!(o.on_crash, Action::Destroy);
    }

    #[test]
    fn open_kvm_at_dev_null_is_not_kvm() {
        let Err(e) = crate::kvm::open_kvm_at(c"/dev/null") else {
            panic!("/dev/null is not KVM")
        };
        assert_eq!(
            e.to_string(),
            "/dev/null is not a KVM device (KVM_GET_API_VERSION gave -1, not 12)"
        );
    }

    #[test]
    fn open_kvm_at_missing_path_names_it() {
        let Err(e) = crate::kvm::open_kvm_at(c"/nonexistent/kvm") else {
            panic!("no such file")
        };
        assert!(
            e.to_string().starts_with("cannot open /nonexistent/kvm: "),
            "{e}"
        );
    }

    #[test]
    fn min_memory_for_initrd_pvh_fits_just_above_initrd_size() {
        let cfg = VmConfig {
            kernel: crate::testing::TEST_GUEST_ELF.to_vec(),
            initrd: Some(vec![0u8; 40 << 20]),
            mem_mib: 32,
            ..Default::default()
        };
        let mib = min_memory_for_initrd(&cfg).expect("40 MiB fits somewhere");
        assert!((41..=48).contains(&mib), "{mib}");
    }
}
