//! The xenkvm command line.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// One line on stderr that never panics (`eprintln!` does when stderr is
/// closed): see `xenkvm::vmm::runner`.
macro_rules! stderr_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

use clap::{Parser, Subcommand, ValueEnum};
use xenkvm::config::{DiskSpec, NicSpec};
use xenkvm::devices::XenConsoleTo;
use xenkvm::vmm::console_dest::ConsoleDest;
use xenkvm::vmm::console_input::InputMode;
use xenkvm::vmm::runner::{exit_status, Action, RunOptions, StatusMode};
use xenkvm::vmm::{BootProtocol, VmConfig};

#[derive(Parser, Debug)]
#[command(
    name = "xenkvm",
    version,
    about = "Run unmodified Xen HVM and PV-on-HVM guests on Linux KVM, without Xen.",
    after_help = exit_status::HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log level: off, error, warn (default), info, debug, trace (every
    /// hypercall and vCPU exit), or directives such as xenkvm=debug.
    /// Overrides XENKVM_LOG.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Append logs to this file instead of stderr.
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<PathBuf>,
}

/// `save --suspend-timeout`'s default: the VM's own
/// ([`xenkvm::vmm::control::SUSPEND_WAIT`]).
const SUSPEND_TIMEOUT_DEFAULT: u64 = xenkvm::vmm::control::SUSPEND_WAIT.as_secs();

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a guest kernel: a PVH ELF (an XTF test, vmlinux) or a Linux
    /// bzImage (see --boot).
    #[command(after_help = exit_status::HELP)]
    Run(RunArgs),
    /// Boot the guest an xl.cfg file describes, as `xl create` would (keys
    /// name, type, builder, memory, maxmem, vcpus, maxvcpus, kernel,
    /// ramdisk, cmdline, extra, root, disk, vif, on_poweroff, on_reboot,
    /// on_crash; others are named in one warning, and those xenkvm cannot
    /// honour, such as viridian or pci, refused). Relative paths in the file
    /// are relative to the current directory, as with xl.
    #[command(after_help = CREATE_HELP)]
    Create(CreateArgs),
    /// Boot the project's own test guest (built by cargo) and print what it
    /// checked from inside: Xen CPUID, hypercalls, shared_info, xenstore,
    /// event channels, grant tables, traps, SCHEDOP_poll.
    #[command(after_help = exit_status::HELP)]
    Demo {
        /// Stop and fail after this many seconds (more than 0, at most one
        /// year).
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_timeout, allow_negative_numbers = true)]
        timeout: Duration,
        #[command(flatten)]
        ui: UiArgs,
    },
    /// Probe this host's KVM for what it cannot run (legacy paging, int n
    /// from user mode, ...), print what xenkvm fixes up and the guest
    /// command-line options this host needs. Exits 1 without a usable
    /// /dev/kvm.
    Probe {
        /// Instead: decode the kernels' executable sections, run each
        /// distinct instruction form at CPL 0 in a throwaway VM, and print
        /// how many this host's KVM fails to emulate and xenkvm handles.
        #[arg(long)]
        coverage: bool,
        /// With --coverage: write the forms KVM fails on here, one a line.
        #[arg(long, value_name = "PATH", requires = "coverage")]
        write_list: Option<PathBuf>,
        /// With --coverage: kernels (ELF, bzImage, or directories of them);
        /// default ../shared/guests/linux/vmlinuz and ../shared/guests/xtf.
        #[arg(value_name = "KERNEL", requires = "coverage")]
        kernels: Vec<PathBuf>,
    },
    /// Benchmarks on the built-in test guest.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// List the running VMs that have a control socket (started with
    /// --name): name, pid, memory, vCPUs, state, seconds running.
    List,
    /// Pause a running VM (as `xl pause`): no vCPU runs guest code until
    /// `xenkvm unpause`. NAME is a --name or a socket path.
    Pause {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Let a paused VM run again (as `xl unpause`).
    Unpause {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Attach this terminal to a running VM's console (as `xl console`):
    /// what the guest writes appears here, what you type goes to its PV
    /// console (hvc0). Ctrl-] detaches and leaves the guest running.
    #[command(after_help = CONSOLE_HELP)]
    Console {
        /// A --name, or a control socket path.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Write a running VM's memory and CPU/irqchip state to FILE as an xl
    /// save image (Xen's format: xl header, libxl v2 and libxc v3 streams),
    /// then end the VM (as `xl save`; its xenkvm exits 0). `xenkvm restore
    /// FILE` starts it again. A guest with Xen drivers (Linux) is asked
    /// to suspend itself first, as `xl save` does, and sets its Xen side up
    /// again when restored; any other guest's Xen-side state (event
    /// channels, grants, xenstore, timers, runstate) travels only with
    /// `--xen-state`.
    Save {
        /// Leave the guest running after the save (as `xl save -c`).
        #[arg(short = 'c', long)]
        checkpoint: bool,
        /// Also write xenkvm's own optional record XENKVM_XEN_STATE (the
        /// Xen-side state: shared_info and grant frames with their contents,
        /// event channels, vcpu_info/time/runstate areas, runstate times,
        /// Xen timers, upcall vectors, HVM params, xenstore), which `restore`
        /// applies so the guest simply continues. Off by default: Xen 4.17's
        /// verify-stream-v2 refuses an image with it.
        #[arg(long)]
        xen_state: bool,
        /// How long to wait for a guest with Xen drivers (one that sets
        /// `control/feature-suspend`, as Linux does) to suspend itself,
        /// as libxl asks it: `control/shutdown = suspend`, then the guest's
        /// SCHEDOP_shutdown(SHUTDOWN_suspend). Restored, it finds itself in
        /// a new domain and sets its Xen side up again; after a checkpoint
        /// it carries on (suspend cancelled). A guest that does not suspend
        /// in time keeps running and the save fails. Not with --xen-state,
        /// which saves any guest as it is.
        #[arg(long, value_name = "SECS", default_value_t = SUSPEND_TIMEOUT_DEFAULT)]
        suspend_timeout: u64,
        /// No progress bar, only the final report (there is none unless
        /// stderr is a terminal).
        #[arg(long, short)]
        quiet: bool,
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Start a guest from an image written by `xenkvm save` (or an xl save
    /// image, a bare libxl or libxc stream of an x86 HVM guest). The whole
    /// image is checked before the guest is built. The Xen-side state (event
    /// channels, grants, xenstore, timers, runstate) comes back when the
    /// image has xenkvm's record (`save --xen-state`); without it a guest
    /// that had set them up finds them reset, as under Xen: a guest that
    /// suspended itself for the save (Linux, see `save`) sets them up again
    /// and its PV frontends reconnect to the --disk/--net given here. A
    /// reboot ends it (there is no kernel to boot again).
    #[command(after_help = exit_status::HELP)]
    Restore {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The domain's name (default: the one in the image).
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        name: Option<String>,
        /// Serve the control socket here (default from the name, as `run`).
        #[arg(long, value_name = "PATH")]
        api_socket: Option<PathBuf>,
        /// Stop the guest and fail (status 4) after this many seconds.
        #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
        timeout: Option<Duration>,
        /// A PV disk for the restored guest, as `run --disk` (the same vdev
        /// the guest had: its frontend reconnects to it). Not with an image
        /// that has xenkvm's Xen-state record (`save --xen-state`): its
        /// frontends stay connected to rings no backend serves any more.
        #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
        disks: Vec<DiskSpec>,
        /// A PV network interface for the restored guest, as `run --net`
        /// (give the MAC it had: without mac= one is generated from --name).
        #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
        nets: Vec<NicSpec>,
        #[command(flatten)]
        ui: UiArgs,
    },
    /// Move a running VM to another xenkvm process while it keeps running
    /// (as `xl migrate`): a live stream in Xen's format (xl header, libxl
    /// v2, libxc v3 with pages sent again as the guest writes them) to a
    /// `xenkvm migrate-receive`, over TCP (DEST = HOST:PORT of one started
    /// with --listen) or a command's stdin/stdout (--pipe, e.g. "ssh host
    /// xenkvm migrate-receive"). The guest pauses only for the last pages
    /// and its CPU/device/Xen state; if anything fails before the
    /// destination has the whole guest, it keeps running here. On success
    /// the VM's xenkvm here exits 0.
    Migrate {
        #[arg(value_name = "NAME")]
        name: String,
        /// HOST:PORT of `xenkvm migrate-receive --listen`.
        #[arg(
            value_name = "DEST",
            required_unless_present = "pipe",
            conflicts_with = "pipe"
        )]
        dest: Option<String>,
        /// Run COMMAND with `sh -c` and use its stdin/stdout as the
        /// transport (it must run `xenkvm migrate-receive` without --listen).
        #[arg(long, value_name = "COMMAND")]
        pipe: Option<String>,
        /// Send at most this many MiB/s (0: no limit).
        #[arg(long, value_name = "MIB_S", default_value_t = 0.0)]
        bandwidth: f64,
        /// Pause the guest once the rest is estimated to take at most this
        /// long to send.
        #[arg(long, value_name = "MS", default_value_t = 300)]
        downtime: u64,
        /// Pause after this many live rounds whatever remains.
        #[arg(long, value_name = "N", default_value_t = 30)]
        max_rounds: u32,
        /// No progress display, only the final report.
        #[arg(long, short)]
        quiet: bool,
        /// Test only: do not merge the VMM's own dirty bitmap (shows what
        /// is lost without it).
        #[arg(long, hide = true)]
        no_vmm_dirty: bool,
    },
    /// Receive a guest from `xenkvm migrate` and run it (as `xl
    /// migrate-receive`): from one TCP connection (--listen), else over
    /// stdin/stdout (the guest's console then goes to stderr unless
    /// --console says otherwise). The guest is built from the whole stream
    /// before the source lets go; if the stream breaks, nothing runs here.
    #[command(after_help = exit_status::HELP)]
    MigrateReceive {
        /// Accept one connection at ADDR:PORT (port 0: any; the address is
        /// printed on stderr).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// The domain's name (default: the one in the stream).
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        name: Option<String>,
        /// Serve the control socket here (default from the name).
        #[arg(long, value_name = "PATH")]
        api_socket: Option<PathBuf>,
        /// Stop the guest and fail (status 4) after this many seconds.
        #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
        timeout: Option<Duration>,
        /// A PV disk for the arriving guest, as `run --disk` (the same vdev
        /// and the same data, e.g. shared storage): a guest with PV devices
        /// suspends itself for the last round and its frontend reconnects.
        #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
        disks: Vec<DiskSpec>,
        /// A PV network interface for the arriving guest, as `run --net`
        /// (give the MAC it had).
        #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
        nets: Vec<NicSpec>,
        #[command(flatten)]
        ui: UiArgs,
    },
    /// Stop a VM as if it powered off (its --on-poweroff action applies).
    /// The guest is not asked first: this is a power-off, not a
    /// cooperative shutdown.
    Shutdown {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Dump a running VM's Xen and vCPU state for debugging, as `xl
    /// debug-keys` does on Xen (which prints to `xl dmesg`; this prints
    /// here). KEYS: e event channels (vcpu_info event fields, ports, stuck
    /// ports), q vCPU state (registers, pending events, local APIC vectors;
    /// pauses the VM for a moment), r runstate (accounting, the guest's area,
    /// host schedule tracking), h the list. For a guest that hangs
    #[command(name = "debug-keys")]
    DebugKeys {
        #[arg(value_name = "NAME")]
        name: String,
        /// One or more keys, run in order (e.g. `eqr`)
        #[arg(value_name = "KEYS")]
        keys: String,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Schedule-out visibility: vCPU 1 watches vCPU 0's runstate area while a
    /// host thread pinned beside vCPU 0's thread preempts it in bursts.
    Sched {
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        secs: u32,
        /// The hog spins this long...
        #[arg(long, value_name = "MS", default_value_t = 20)]
        hog_on: u32,
        /// ...then sleeps this long.
        #[arg(long, value_name = "MS", default_value_t = 30)]
        hog_off: u32,
        /// Mechanisms to compare (bpf, bpf-direct, perf, perf-batched, sampling); default:
        /// every one this host permits, sampling included.
        #[arg(long, value_delimiter = ',')]
        mechanism: Vec<String>,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Run vCPU 1 (the watcher) SCHED_FIFO 1, so that a loaded host's
        /// other work does not keep it off its CPU (it sees nothing then).
        #[arg(long)]
        watcher_fifo: bool,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Draw the visibility-latency CDFs into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
}

const CREATE_HELP: &str = "Example:\n  name = \"web\"\n  type = \"pvh\"\n  memory = 512\n  vcpus = 2\n  kernel = \"/boot/vmlinuz\"\n  ramdisk = \"/boot/initrd.img\"\n  extra = \"console=hvc0\"\n  disk = [ 'format=raw,vdev=xvda,access=rw,target=/srv/web.img' ]\n  vif = [ 'bridge=xenbr0' ]\n  on_reboot = \"restart\"\n\nExit status: as `xenkvm run` (see xenkvm run --help).";

#[derive(clap::Args, Debug)]
struct CreateArgs {
    /// The xl.cfg file.
    #[arg(value_name = "FILE.cfg")]
    config: PathBuf,
    /// xl's overrides: lines of xl.cfg syntax applied after the file
    /// (e.g. memory=1024 'extra="console=hvc0"').
    #[arg(value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Show the guest's console on this terminal (as `xl create -c`; it is
    /// xenkvm's default: the guest's console is on stdout unless --console
    /// says otherwise).
    #[arg(short = 'c')]
    attach: bool,
    /// Stop the guest and fail (status 4) after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    #[command(flatten)]
    ui: UiArgs,
}

/// Where Xen's own console goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum XenConsoleArg {
    /// The log: level info, target xen_console (--log-level
    /// warn,xen_console=info shows it on stderr).
    Log,
    /// The guest's console output, interleaved with it.
    Console,
}

/// How `run` enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BootArg {
    /// An ELF by PVH; a bzImage by PVH of the kernel ELF extracted from it
    /// (skips the in-guest decompressor).
    Auto,
    /// PVH entry (32-bit, hvm_start_info); a bzImage's ELF is extracted.
    Pvh,
    /// The Linux x86 boot protocol's 64-bit entry of a bzImage (zero page,
    /// E820, initrd; the kernel decompresses itself and runs as a Xen
    /// PV-on-HVM guest).
    Linux,
    /// xl.cfg's `type = "hvm"`: a bzImage by the Linux boot protocol, an
    /// ELF by its PVH entry.
    #[value(skip)]
    Hvm,
}

/// What to do when the guest stops (xl.cfg's on_poweroff/on_reboot/on_crash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ActionArg {
    /// End xenkvm with the guest.
    Destroy,
    /// Boot the guest again in a fresh VM with the same options.
    Restart,
}

impl From<ActionArg> for Action {
    fn from(a: ActionArg) -> Action {
        match a {
            ActionArg::Destroy => Action::Destroy,
            ActionArg::Restart => Action::Restart,
        }
    }
}

/// Where the guest's console input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum InputArg {
    /// Stdin when it is a terminal (read only while xenkvm is in the
    /// foreground), a pipe or a file; not /dev/null.
    Auto,
    /// Stdin, whatever it is.
    Stdin,
    /// No console input; stdin is not read.
    None,
}

/// Options of the terminal interface shared by `run`, `create` and `demo`.
#[derive(clap::Args, Debug, Clone)]
struct UiArgs {
    /// Where the guest's console (hvc0) input comes from.
    #[arg(long, value_enum, default_value_t = InputArg::Auto, value_name = "FROM")]
    console_input: InputArg,
    /// Where the guest's console (hvc0, the serial port) goes: stdout, pty
    /// (a pseudo-terminal whose path is printed on stderr; attach with
    /// e.g. `screen PATH`; what is typed there is the guest's input; the
    /// guest runs on while nobody is attached, and up to 1 MiB of output
    /// waits for a reader), or file:PATH (appended).
    #[arg(long, value_name = "DEST", default_value = "stdout", value_parser = ConsoleDest::parse)]
    console: ConsoleDest,
    /// Where Xen's own console goes (what the guest writes with the
    /// console_io hypercall and to the debug ports 0xE9 and 0x12): the log
    /// (default for run and create), or the guest's console (default for
    /// demo, whose test guest reports there).
    #[arg(long, value_enum, value_name = "TO")]
    xen_console: Option<XenConsoleArg>,
    /// Show the status line while the guest is silent even when stderr is
    /// not a terminal (as a full line every --status-after seconds).
    #[arg(long, conflicts_with = "quiet")]
    status: bool,
    /// Seconds of console silence before the status line appears.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_timeout, allow_negative_numbers = true)]
    status_after: Duration,
    /// No status line and no notes on stderr; failures and restarts still
    /// print one line each.
    #[arg(long, short)]
    quiet: bool,
    /// Host schedule tracking (the vCPUs' Xen runstate from the host's
    /// context switches): best (the first of bpf-direct, perf,
    /// perf-batched, sampling this process may use; the default where guest
    /// kernel code runs natively), sampling (run_delay read every 10 ms, no
    /// prompt runnable, halts count as running; the default on a host that
    /// emulates guest kernel code, as `xenkvm probe` shows),
    /// bpf-direct (a BPF program also writes running into the area at the
    /// switch-in), bpf, perf, perf-batched. Overrides XENKVM_SCHED;
    /// `xenkvm probe` shows what best gives on this host.
    #[arg(long, value_name = "MECH", value_parser = clap::builder::PossibleValuesParser::new(xenkvm::xen::sched::MECHANISMS))]
    sched: Option<String>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guest kernel: an ELF image with a Xen PVH entry note, or a Linux
    /// bzImage (booted as --boot says).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// How to boot the kernel.
    #[arg(long, value_enum, default_value_t = BootArg::Auto)]
    boot: BootArg,
    /// Initial ramdisk (PVH: module 0 of hvm_start_info; Linux boot
    /// protocol: ramdisk_image in the zero page). It must fit in guest RAM
    /// below 3 GiB. A gzip-compressed initramfs is inflated here first, so
    /// the guest kernel skips its own gunzip; any other initrd goes to the
    /// guest as it is.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (at most 4095 bytes). Linux on a host whose
    /// `xenkvm probe` says so needs `noxsave clearcpuid=137`.
    #[arg(long, value_name = "STR", default_value = "", value_parser = parse_cmdline)]
    cmdline: String,
    /// Guest memory in MiB, 16 to 65536.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(16..=65536))]
    memory: u64,
    /// Number of vCPUs, 1 to 32.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(xenkvm::MAX_VCPUS)))]
    vcpus: u32,
    /// Stop the guest and fail (status 4) after this many seconds in all,
    /// restarts included (more than 0, at most one year). Default: no limit.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    /// When the guest powers off.
    #[arg(long, value_enum, default_value_t = ActionArg::Destroy, value_name = "ACTION")]
    on_poweroff: ActionArg,
    /// When the guest reboots (or triple-faults). Xen's default: restart,
    /// up to 5 times within 60 s.
    #[arg(long, value_enum, default_value_t = ActionArg::Restart, value_name = "ACTION")]
    on_reboot: ActionArg,
    /// When the guest crashes.
    #[arg(long, value_enum, default_value_t = ActionArg::Destroy, value_name = "ACTION")]
    on_crash: ActionArg,
    /// The domain's name (xenstore's `name`; seeds generated MACs).
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    name: Option<String>,
    /// Serve the VM's control socket (xenkvm pause/unpause/shutdown/list)
    /// at this path. Default with --name: $XDG_RUNTIME_DIR/xenkvm/NAME.sock
    /// (or /run/xenkvm/NAME.sock); without --name, none.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    // --- PV disks and NICs (xl syntax; repeatable).
    /// A PV disk in xl's syntax (xl-disk-configuration(5)), e.g.
    /// target=/srv/g.img,format=raw,vdev=xvda,access=rw or the positional
    /// /srv/g.img,raw,xvda,rw or phy:/dev/vg/lv,xvda,w. Repeatable.
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
    disks: Vec<DiskSpec>,
    /// A PV network interface in xl's syntax (xl-network-configuration(5)),
    /// e.g. mac=00:16:3e:01:02:03,bridge=br0,vifname=vm0; without mac= a
    /// stable one in 00:16:3e is generated from --name and the index.
    /// Repeatable.
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    nets: Vec<NicSpec>,
    #[command(flatten)]
    ui: UiArgs,
}

/// NICs without a MAC get a stable one from the VM's name and their index.
fn with_macs(nets: &[NicSpec], name: &str) -> Vec<NicSpec> {
    nets.iter()
        .enumerate()
        .map(|(i, n)| NicSpec {
            mac: Some(n.mac_for(name, i as u32)),
            ..n.clone()
        })
        .collect()
}

fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    DiskSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_net(s: &str) -> Result<NicSpec, String> {
    NicSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || s.chars().any(char::is_control) {
        return Err("a name of 1 to 64 printable characters".into());
    }
    Ok(s.to_string())
}

/// The longest `--timeout`: one year.
const MAX_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// `--timeout`/`--status-after`: a finite number of seconds, more than 0
/// (at least 1 ms) and at most a year.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("\"{s}\" is not a number of seconds"))?;
    if !v.is_finite() {
        return Err(format!("\"{s}\" is not a finite number of seconds"));
    }
    if v <= 0.0 {
        return Err(format!(
            "{s} is not more than 0 (leave --timeout out to run without a limit)"
        ));
    }
    if v < 0.001 {
        return Err(format!("{s} is below the resolution of 0.001 s"));
    }
    if v > MAX_TIMEOUT_SECS {
        return Err(format!("{s} is more than a year ({MAX_TIMEOUT_SECS} s)"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The command line as the guest gets it: NUL-terminated in one 4 KiB page.
fn parse_cmdline(s: &str) -> Result<String, String> {
    let max = xenkvm::boot::layout::CMDLINE_MAX - 1;
    if s.len() > max {
        return Err(format!(
            "the command line is {} bytes; at most {max} fit",
            s.len()
        ));
    }
    if s.contains('\0') {
        return Err("the command line contains a NUL byte".into());
    }
    Ok(s.to_string())
}

impl UiArgs {
    /// Where Xen's console goes, `default` unless --xen-console says.
    fn xen_console(&self, default: XenConsoleTo) -> XenConsoleTo {
        match self.xen_console {
            None => default,
            Some(XenConsoleArg::Log) => XenConsoleTo::Log,
            Some(XenConsoleArg::Console) => XenConsoleTo::Console,
        }
    }

    fn options(&self) -> RunOptions {
        RunOptions {
            console_input: match self.console_input {
                InputArg::Auto => InputMode::Auto,
                InputArg::Stdin => InputMode::Stdin,
                InputArg::None => InputMode::None,
            },
            status: if self.quiet {
                StatusMode::Never
            } else if self.status {
                StatusMode::Always
            } else {
                StatusMode::Auto
            },
            status_after: self.status_after,
            ..Default::default()
        }
    }
}

/// Reads `path` (for `flag`): a regular file up to `max` bytes (the loader
/// then says how much `--memory` it needs), anything else (a pipe, a
/// device) up to the guest's RAM, so that `/dev/zero` cannot eat the
/// host's memory.
fn read_limited(flag: &str, path: &Path, max: u64, mem_mib: u64) -> Result<Vec<u8>, String> {
    let err = |e: std::io::Error| format!("cannot read {flag} {}: {e}", path.display());
    let f = std::fs::File::open(path).map_err(err)?;
    let regular = f.metadata().map(|m| m.is_file()).unwrap_or(false);
    let limit = if regular { max } else { max.min(mem_mib << 20) };
    let mut v = Vec::new();
    f.take(limit + 1).read_to_end(&mut v).map_err(err)?;
    if v.len() as u64 > limit {
        return Err(if regular {
            format!(
                "{flag} {} is larger than {} MiB, more than xenkvm can load",
                path.display(),
                limit >> 20
            )
        } else {
            format!(
                "{flag} {} gave more than {} MiB, more than fits in the guest's RAM (--memory {mem_mib})",
                path.display(),
                limit >> 20
            )
        });
    }
    Ok(v)
}

/// The config and run options of `run`, or the line saying why not.
fn run_config(a: &RunArgs) -> Result<(VmConfig, RunOptions), String> {
    let kernel = read_limited("--kernel", &a.kernel, 1 << 30, a.memory)?;
    let is_bz = xenkvm::boot::bzimage::is_bzimage(&kernel);
    let (kernel, boot) = match a.boot {
        BootArg::Linux if !is_bz => {
            return Err(format!(
                "--boot linux needs a Linux bzImage, and {} is not one (no \"HdrS\" setup header); use --boot pvh for an ELF",
                a.kernel.display()
            ))
        }
        BootArg::Linux => (kernel, BootProtocol::Linux),
        BootArg::Hvm if is_bz => (kernel, BootProtocol::Linux),
        BootArg::Hvm => (kernel, BootProtocol::Pvh),
        // PVH entry of the ELF inside a bzImage.
        BootArg::Auto | BootArg::Pvh if is_bz => {
            if !a.ui.quiet {
                stderr_line!(
                    "xenkvm: {} is a bzImage: extracting its kernel ELF to boot it by PVH (--boot linux runs its own decompressor instead)",
                    a.kernel.display()
                );
            }
            match xenkvm::boot::bzimage::extract_elf(&kernel) {
                Ok(elf) => (elf, BootProtocol::Pvh),
                Err(e) => return Err(format!("{}: {e}", a.kernel.display())),
            }
        }
        BootArg::Auto | BootArg::Pvh => (kernel, BootProtocol::Pvh),
    };
    let initrd = match &a.initrd {
        Some(p) => {
            let limit = xenkvm::boot::layout::LOW_RAM_MAX.min(a.memory << 20);
            let raw = read_limited("--initrd", p, xenkvm::boot::layout::LOW_RAM_MAX, a.memory)?;
            let (rd, how) = xenkvm::boot::initrd::inflate(raw, limit as usize);
            match how {
                xenkvm::boot::initrd::Outcome::Inflated { from, to, members } => tracing::info!(
                    initrd = %p.display(),
                    from,
                    to,
                    members,
                    "initrd inflated on the host (gzip to cpio): the guest skips its own gunzip"
                ),
                xenkvm::boot::initrd::Outcome::Unchanged(why) => tracing::info!(
                    initrd = %p.display(),
                    why,
                    "initrd passed to the guest as it is"
                ),
            }
            Some(rd)
        }
        None => None,
    };
    let name = a.name.clone().unwrap_or_else(|| VmConfig::default().name);
    let nics = with_macs(&a.nets, &name);
    let cfg = VmConfig {
        kernel,
        boot,
        initrd,
        cmdline: a.cmdline.clone(),
        mem_mib: a.memory,
        vcpus: a.vcpus,
        timeout: a.timeout,
        name,
        xen_console: a.ui.xen_console(XenConsoleTo::Log),
        disks: a.disks.clone(),
        nics,
        ..Default::default()
    };
    let opts = RunOptions {
        timeout: a.timeout,
        on_poweroff: a.on_poweroff.into(),
        on_reboot: a.on_reboot.into(),
        on_crash: a.on_crash.into(),
        initrd_name: a.initrd.as_ref().map(|p| p.display().to_string()),
        control_socket: control_socket(a),
        ..a.ui.options()
    };
    Ok((cfg, opts))
}

/// Where the control socket goes: --api-socket, else one named after --name.
fn control_socket(a: &RunArgs) -> Option<PathBuf> {
    use xenkvm::vmm::control::{name_fits_socket, socket_path};
    if let Some(p) = &a.api_socket {
        return Some(p.clone());
    }
    let name = a.name.as_deref()?;
    if name_fits_socket(name) {
        Some(socket_path(name))
    } else {
        tracing::warn!(
            name,
            "no control socket: the name has characters a socket file name cannot carry (use --api-socket)"
        );
        None
    }
}

/// The `run` arguments an xl.cfg (and its overrides) amounts to.
fn create_run_args(c: &CreateArgs) -> Result<RunArgs, String> {
    use xenkvm::config::{GuestType, OnEvent, XlConfig};
    let origin = c.config.display().to_string();
    let x = XlConfig::load(&c.config, &c.overrides).map_err(|e| e.to_string())?;
    if let Some(w) = x.unused_warning(&origin) {
        tracing::warn!("{w}");
    }
    for w in &x.warnings {
        tracing::warn!("{w}");
    }
    let kernel = x.kernel.clone().ok_or_else(|| {
        format!("{origin}: kernel: missing (xenkvm boots a kernel directly: kernel = \"PATH\")")
    })?;
    for (key, p) in [("kernel", Some(&kernel)), ("ramdisk", x.ramdisk.as_ref())] {
        if let Some(p) = p {
            std::fs::File::open(p)
                .map_err(|e| format!("{origin}: {key}: cannot read {}: {e}", p.display()))?;
        }
    }
    let cmdline = parse_cmdline(x.cmdline.as_deref().unwrap_or(""))
        .map_err(|e| format!("{origin}: cmdline: {e}"))?;
    let key = x.domain_key();
    let nets = x
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| NicSpec {
            mac: Some(n.mac_for(&key, i as u32)),
            ..n.clone()
        })
        .collect();
    let action = |a: Option<OnEvent>, default: ActionArg| match a {
        None => default,
        Some(OnEvent::Destroy) => ActionArg::Destroy,
        Some(OnEvent::Restart) => ActionArg::Restart,
    };
    Ok(RunArgs {
        kernel,
        boot: match x.guest_type {
            GuestType::Unspecified => BootArg::Auto,
            GuestType::Pvh => BootArg::Pvh,
            GuestType::Hvm => BootArg::Hvm,
        },
        initrd: x.ramdisk.clone(),
        cmdline,
        memory: x.memory_mib.unwrap_or(256),
        vcpus: x.vcpus.unwrap_or(1),
        timeout: c.timeout,
        on_poweroff: action(x.on_poweroff, ActionArg::Destroy),
        on_reboot: action(x.on_reboot, ActionArg::Restart),
        on_crash: action(x.on_crash, ActionArg::Destroy),
        name: x.name.clone(),
        api_socket: None,
        disks: x.disks.clone(),
        nets,
        ui: c.ui.clone(),
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help and --version succeed; a usage error is one line and a
        // failure (1: 2 means the guest crashed).
        Err(e) if e.use_stderr() => return fail(exit_status::ERROR, &usage_error_line(&e)),
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = xenkvm::logging::init(cli.log_level.as_deref(), cli.log_file.as_deref()) {
        return fail(exit_status::ERROR, &e);
    }
    match cli.cmd {
        Cmd::Run(a) => match run_config(&a) {
            Ok((cfg, opts)) => run(cfg, &opts, &a.ui),
            Err(e) => fail(exit_status::ERROR, &e),
        },
        Cmd::Create(c) => match create_run_args(&c).and_then(|a| run_config(&a).map(|r| (r, a))) {
            Ok(((cfg, opts), a)) => run(cfg, &opts, &a.ui),
            Err(e) => fail(exit_status::ERROR, &e),
        },
        Cmd::Demo { timeout, ui } => {
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin())
                && ui.console_input != InputArg::None;
            println!(
                "xenkvm demo: booting the built-in test guest ({} bytes)",
                xenkvm::testing::TEST_GUEST_ELF.len()
            );
            // On a terminal the console_input check waits longer for a typed
            // line, and the guest says so when it starts waiting.
            let cmdline = if interactive {
                "demo console_wait=15"
            } else {
                "demo"
            };
            let cfg = VmConfig {
                kernel: xenkvm::testing::TEST_GUEST_ELF.to_vec(),
                cmdline: cmdline.into(),
                mem_mib: 64,
                // vCPU 1 starts by INIT/SIPI, vCPU 2 by VCPUOP_initialise (check vcpu_init).
                vcpus: 3,
                timeout: Some(timeout),
                name: "demo".into(),
                // The test guest reports on Xen's console.
                xen_console: ui.xen_console(XenConsoleTo::Console),
                ..Default::default()
            };
            let opts = RunOptions {
                timeout: Some(timeout),
                ..ui.options()
            };
            run(cfg, &opts, &ui)
        }
        Cmd::List => {
            println!(
                "{:<24} {:>8} {:>7} {:>5} {:<10} {:>9}",
                "Name", "PID", "Mem", "VCPUs", "State", "Time(s)"
            );
            for (name, kv) in xenkvm::vmm::control::list() {
                let get = |k: &str| {
                    kv.iter()
                        .find(|(x, _)| x == k)
                        .map_or("-", |(_, v)| v.as_str())
                        .to_string()
                };
                println!(
                    "{:<24} {:>8} {:>7} {:>5} {:<10} {:>9}",
                    name,
                    get("pid"),
                    get("memory"),
                    get("vcpus"),
                    get("state"),
                    get("time")
                );
            }
            ExitCode::SUCCESS
        }
        Cmd::Pause { name } => control_verb(&name, "pause"),
        Cmd::Unpause { name } => control_verb(&name, "unpause"),
        Cmd::Console { name } => console(&name),
        Cmd::Shutdown { name } => control_verb(&name, "shutdown"),
        Cmd::DebugKeys { name, keys } => match xenkvm::vmm::control::debug_keys(&name, &keys) {
            Ok(lines) => {
                // `| head` closes the pipe early: the rest is not wanted.
                let mut out = std::io::stdout().lock();
                for l in lines {
                    if writeln!(out, "{l}").is_err() {
                        return ExitCode::from(xenkvm::vmm::runner::exit_status::STDOUT_CLOSED);
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(exit_status::ERROR, &e.to_string()),
        },
        Cmd::Restore {
            file,
            name,
            api_socket,
            timeout,
            disks,
            nets,
            ui,
        } => {
            let img = match xenkvm::migration::restore::load(&file) {
                Ok(i) => i,
                Err(e) => return fail(exit_status::ERROR, &e.to_string()),
            };
            if img.xen_state.is_some() && !(disks.is_empty() && nets.is_empty()) {
                return fail(
                    exit_status::ERROR,
                    &format!(
                        "{}: --disk/--net with an image that has xenkvm's Xen-state record (save --xen-state): the guest's frontends would stay connected to rings no backend serves; save it without --xen-state (a guest with Xen drivers suspends itself and reconnects)",
                        file.display()
                    ),
                );
            }
            let name = name
                .or_else(|| (!img.name.is_empty()).then(|| img.name.clone()))
                .unwrap_or_else(|| "restored".into());
            let control_socket = api_socket.or_else(|| {
                xenkvm::vmm::control::name_fits_socket(&name)
                    .then(|| xenkvm::vmm::control::socket_path(&name))
            });
            let nics = with_macs(&nets, &name);
            let cfg = VmConfig {
                mem_mib: img.mem_mib,
                vcpus: img.vcpus.len() as u32,
                timeout,
                name,
                xen_console: ui.xen_console(XenConsoleTo::Log),
                restore: Some((file.clone(), std::sync::Arc::new(img))),
                nics,
                disks,
                ..Default::default()
            };
            let opts = RunOptions {
                timeout,
                on_reboot: Action::Destroy,
                control_socket,
                ..ui.options()
            };
            run(cfg, &opts, &ui)
        }
        Cmd::Migrate {
            name,
            dest,
            pipe,
            bandwidth,
            downtime,
            max_rounds,
            quiet,
            no_vmm_dirty,
        } => {
            let opts = xenkvm::vmm::migrate::MigrateOpts {
                dest: dest.clone().or_else(|| pipe.clone()).unwrap_or_default(),
                bandwidth: (bandwidth.max(0.0) * 1048576.0) as u64,
                downtime: Duration::from_millis(downtime),
                max_rounds,
                vmm_dirty: !no_vmm_dirty,
            };
            migrate_client(&name, dest.as_deref(), pipe.as_deref(), &opts, quiet)
        }
        Cmd::MigrateReceive {
            listen,
            name,
            api_socket,
            timeout,
            disks,
            nets,
            ui,
        } => migrate_receive(
            listen.as_deref(),
            name,
            api_socket,
            timeout,
            (disks, nets),
            ui,
        ),
        Cmd::Save {
            checkpoint,
            xen_state,
            suspend_timeout,
            quiet,
            name,
            file,
        } => match std::path::absolute(&file) {
            Ok(p) => match save_client(
                &name,
                &format!(
                    "{}{}{} {}",
                    if checkpoint { "checkpoint" } else { "save" },
                    if xen_state { "+xen" } else { "" },
                    // Only when not the VM's default: a VM of an older
                    // xenkvm knows no `+wait`.
                    if suspend_timeout == SUSPEND_TIMEOUT_DEFAULT {
                        String::new()
                    } else {
                        format!("+wait={suspend_timeout}")
                    },
                    p.display()
                ),
                quiet,
            ) {
                Ok(r) => {
                    println!("{r}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(exit_status::ERROR, &e.to_string()),
            },
            Err(e) => fail(exit_status::ERROR, &format!("{}: {e}", file.display())),
        },
        Cmd::Probe {
            coverage: false, ..
        } => probe(),
        Cmd::Probe {
            coverage: true,
            write_list,
            kernels,
        } => {
            let inputs = if kernels.is_empty() {
                xenkvm::kvm::coverage::default_inputs()
            } else {
                kernels
            };
            let r = match xenkvm::kvm::coverage::report(&inputs) {
                Ok(r) => r,
                Err(e) => return fail(exit_status::ERROR, &e),
            };
            print!("{r}");
            if let Some(path) = write_list {
                let list: String = r
                    .results
                    .iter()
                    .filter(|x| x.outcome.host_failed())
                    .map(|x| xenkvm::kvm::coverage::list_line(x) + "\n")
                    .collect();
                if let Err(e) = std::fs::write(&path, list) {
                    return fail(exit_status::ERROR, &format!("{}: {e}", path.display()));
                }
            }
            if r.tally.xenkvm_handled == r.tally.host_failures {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Cmd::Bench(BenchCmd::Sched {
            secs,
            hog_on,
            hog_off,
            mechanism,
            rounds,
            watcher_fifo,
            json,
            plot,
        }) => {
            use xenkvm::vmm::bench_sched as b;
            let mechs = if mechanism.is_empty() {
                b::available()
            } else {
                mechanism
            };
            let base = b::SchedBench {
                secs,
                hog_on_ms: hog_on,
                hog_off_ms: hog_off,
                watcher_fifo,
                mechanism: None,
            };
            let s = match b::suite(&base, &mechs, rounds) {
                Ok(s) => s,
                Err(e) => return fail(1, &e),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                print!("{}", b::table(&s));
            }
            if let Some(p) = plot {
                if let Err(e) = std::fs::write(&p, b::svg(&s)) {
                    return fail(1, &format!("{}: {e}", p.display()));
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// A clap usage error as one line: its message without the usage and tips.
fn usage_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if l.starts_with("Usage:") || l.starts_with("For more information") {
            break;
        }
        if l.starts_with("tip:") {
            continue;
        }
        parts.push(l.strip_prefix("error: ").unwrap_or(l));
    }
    format!("{} (see --help)", parts.join(" "))
}

fn probe() -> ExitCode {
    if let Err(e) = xenkvm::kvm::open_kvm() {
        return fail(exit_status::ERROR, &e.to_string());
    }
    let p = xenkvm::kvm::probe::HostProbe::run();
    print!("{p}");
    print!("{}", xenkvm::kvm::probe::HostMeasures::run());
    println!(
        "{:<30} {} (--sched best: {})",
        "host schedule tracking",
        xenkvm::xen::sched::Mechanism::choose(None),
        xenkvm::xen::sched::Mechanism::choose(Some("best"))
    );
    ExitCode::SUCCESS
}

fn run(mut cfg: VmConfig, opts: &RunOptions, ui: &UiArgs) -> ExitCode {
    if ui.sched.is_some() {
        cfg.sched = ui.sched.clone();
    }
    let console = match xenkvm::vmm::console_dest::open(&ui.console) {
        Ok(c) => c,
        Err(e) => return fail(exit_status::ERROR, &e),
    };
    if let Some(p) = &console.pty_path {
        // The one line a person (or a script) needs to attach.
        stderr_line!("xenkvm: guest console on {}", p.display());
    }
    cfg.console_in = console.input.clone();
    let ended = xenkvm::vmm::runner::run(cfg, console.out, opts);
    if let Some(m) = &ended.message {
        stderr_line!("xenkvm: {m}");
    }
    ExitCode::from(ended.code)
}

/// Sends one verb to a VM's control socket; one line on failure.
fn control_verb(name: &str, verb: &str) -> ExitCode {
    match xenkvm::vmm::control::request(name, verb) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(exit_status::ERROR, &e.to_string()),
    }
}

const CONSOLE_HELP: &str = "\
The output is a copy: the VM's --console destination (stdout, pty, file) \
keeps getting it too. It is what that destination gets (hvc0 and COM1; \
Xen's console too with --xen-console console), from the moment of \
attaching. Input goes to hvc0 as --console-input input does.

On a terminal, the keyboard is in raw mode while attached (Ctrl-C goes to \
the guest) and is restored on the way out. Not on a terminal, stdin is \
read (a Ctrl-] byte in it detaches too; its end does not) and the output \
goes to stdout.

One client at a time: a second `xenkvm console NAME` is refused, naming the \
attached one's pid. A client that stops reading never holds up the guest: \
output beyond 256 KiB waiting for it is dropped (the VM logs it and the \
client sees a note where).

Exit status: 0 detached (Ctrl-]) or the VM ended; 1 no such VM, or it \
refused; 128+N a signal N (the terminal restored first).";

/// `xenkvm console NAME`.
fn console(name: &str) -> ExitCode {
    use xenkvm::vmm::console_client::{run, Ended};
    match run(name) {
        Ok(Ended::Detached) => {
            stderr_line!("xenkvm: detached from the console of {name}; the guest runs on");
            ExitCode::SUCCESS
        }
        Ok(Ended::VmClosed) => {
            stderr_line!("xenkvm: the console of {name} closed: the VM ended");
            ExitCode::SUCCESS
        }
        Ok(Ended::StdoutClosed) => ExitCode::SUCCESS,
        Ok(Ended::Signal(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
        Err(e) => fail(exit_status::ERROR, &e.to_string()),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    stderr_line!("xenkvm: {msg}");
    ExitCode::from(code)
}

/// `xenkvm save`: sends `request` (a save or checkpoint); on a terminal
/// (stderr) and unless `quiet`, with the VM's progress shown as a bar with
/// bytes and rate, cleared at the end. The reply's text.
fn save_client(
    name: &str,
    request: &str,
    quiet: bool,
) -> Result<String, xenkvm::vmm::control::ControlError> {
    use indicatif::{ProgressBar, ProgressStyle};
    use xenkvm::vmm::control::{request as plain, request_with_progress, Progress};
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return plain(name, request);
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "saving [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let r = request_with_progress(name, request, &mut |p: &Progress| {
        bar.set_length(p.total);
        bar.set_position(p.bytes);
    });
    bar.finish_and_clear();
    r
}

/// `xenkvm migrate`: the progress (a bar on a terminal, a line per round
/// otherwise, on stderr) and the final report (stdout).
fn migrate_client(
    name: &str,
    dest: Option<&str>,
    pipe: Option<&str>,
    opts: &xenkvm::vmm::migrate::MigrateOpts,
    quiet: bool,
) -> ExitCode {
    use indicatif::{ProgressBar, ProgressStyle};
    use xenkvm::vmm::migrate::{client, field, Progress};
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = (tty && !quiet).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} pages {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    });
    let mut last_round = 0;
    let mut on_progress = |p: &Progress| {
        let msg = format!(
            "{:.1} MiB sent, dirty {:.0} pages/s, est. downtime {:.0} ms{}",
            p.bytes as f64 / 1048576.0,
            p.dirty_rate,
            p.est_ms,
            if p.paused { " (paused)" } else { "" }
        );
        match &bar {
            Some(b) => {
                b.set_prefix(format!("round {}", p.round));
                b.set_length(p.of);
                b.set_position(p.done);
                b.set_message(msg);
            }
            None if !quiet && p.done == p.of && p.round != last_round => {
                last_round = p.round;
                stderr_line!("xenkvm: migrate: round {}: {} pages, {msg}", p.round, p.of);
            }
            None => {}
        }
    };
    let r = client(name, dest, pipe, opts, &mut on_progress);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match r {
        Ok(res) => {
            let f = |k| field(&res.line, k).unwrap_or("?").to_string();
            let mib = f("bytes").parse::<f64>().unwrap_or(0.0) / 1048576.0;
            println!(
                "migrated {name} to {}: {:.2} s, {} rounds, {mib:.1} MiB ({} pages), downtime {} ms ({} pages, {:.2} MiB sent paused; {})",
                opts.dest,
                f("total_ms").parse::<f64>().unwrap_or(0.0) / 1000.0,
                f("rounds"),
                f("pages"),
                f("downtime_ms"),
                f("final_pages"),
                f("final_bytes").parse::<f64>().unwrap_or(0.0) / 1048576.0,
                f("stop").replace('_', " ")
            );
            println!("{}", res.line);
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit_status::ERROR, &e),
    }
}

/// `xenkvm migrate-receive`.
fn migrate_receive(
    listen: Option<&str>,
    name: Option<String>,
    api_socket: Option<PathBuf>,
    timeout: Option<Duration>,
    (disks, nets): (Vec<DiskSpec>, Vec<NicSpec>),
    mut ui: UiArgs,
) -> ExitCode {
    use std::io::Write as _;
    use std::os::fd::OwnedFd;
    use xenkvm::migration::live;
    let transport = || -> Result<(std::fs::File, std::fs::File), String> {
        match listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                if let Ok(a) = l.local_addr() {
                    stderr_line!("xenkvm: migrate-receive: listening on {a}");
                }
                let (s, peer) = l.accept().map_err(|e| format!("accept on {addr}: {e}"))?;
                tracing::info!(%peer, "migration source connected");
                let _ = s.set_nodelay(true);
                let r = s.try_clone().map_err(|e| e.to_string())?;
                Ok((
                    std::fs::File::from(OwnedFd::from(r)),
                    std::fs::File::from(OwnedFd::from(s)),
                ))
            }
            None => {
                // stdin/stdout carry the stream; the console must not.
                let r = rustix::io::dup(std::io::stdin()).map_err(|e| e.to_string())?;
                let w = rustix::io::dup(std::io::stdout()).map_err(|e| e.to_string())?;
                let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
                rustix::stdio::dup2_stdin(&null).map_err(|e| e.to_string())?;
                rustix::stdio::dup2_stdout(std::io::stderr()).map_err(|e| e.to_string())?;
                Ok((std::fs::File::from(r), std::fs::File::from(w)))
            }
        }
    };
    let (rd, mut wr) = match transport() {
        Ok(t) => t,
        Err(e) => return fail(exit_status::ERROR, &e),
    };
    if listen.is_none() {
        ui.console_input = InputArg::None;
    }
    if let Err(e) = wr.write_all(live::BANNER).and_then(|_| wr.flush()) {
        return fail(exit_status::ERROR, &format!("migration transport: {e}"));
    }
    // Test knob: SIGKILL this receiver after that many stream bytes, or
    // (`end`) once the whole stream is in, before it answers.
    let knob = std::env::var("XENKVM_TEST_RECEIVE_KILL_AT").ok();
    let kill_at = knob.as_deref().and_then(|v| v.parse().ok());
    let rx = {
        // Page data goes straight from the transport into the new guest's RAM.
        match live::receive(live::StreamIn::new(&rd, kill_at)) {
            Ok(rx) => rx,
            Err(e) => return fail(exit_status::ERROR, &format!("{e}; nothing runs here")),
        }
    };
    if knob.as_deref() == Some("end") {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
    let img = match xenkvm::migration::restore::load(&rx.tail_path()) {
        Ok(i) => i,
        Err(e) => return fail(exit_status::ERROR, &format!("migration stream: {e}")),
    };
    tracing::info!(
        bytes = rx.bytes,
        page_records = rx.page_records,
        pages = rx.staging.pages(),
        "migration stream received"
    );
    let name = name
        .or_else(|| (!img.name.is_empty()).then(|| img.name.clone()))
        .unwrap_or_else(|| "migrated".into());
    let control_socket = api_socket.or_else(|| {
        xenkvm::vmm::control::name_fits_socket(&name)
            .then(|| xenkvm::vmm::control::socket_path(&name))
    });
    if img.xen_state.is_some() && !(disks.is_empty() && nets.is_empty()) {
        // Before the handshake: the source keeps the guest.
        return fail(
            exit_status::ERROR,
            "--disk/--net: the guest did not suspend itself for the migration (the stream has xenkvm's Xen-state record): its frontends would stay connected to rings no backend serves; nothing runs here",
        );
    }
    let nics = with_macs(&nets, &name);
    let cfg = VmConfig {
        disks,
        nics,
        mem_mib: img.mem_mib,
        vcpus: img.vcpus.len() as u32,
        timeout,
        name,
        xen_console: ui.xen_console(XenConsoleTo::Log),
        restore: Some((rx.tail_path(), std::sync::Arc::new(img))),
        incoming_pages: Some(std::sync::Arc::new(rx)),
        ..Default::default()
    };
    let opts = RunOptions {
        timeout,
        on_reboot: Action::Destroy,
        control_socket,
        incoming: Some(xenkvm::vmm::migrate::Incoming::new(rd, wr)),
        ..ui.options()
    };
    run(cfg, &opts, &ui)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xenkvm").chain(args.iter().copied()))
    }

    fn run_err(args: &[&str]) -> String {
        let mut v = vec!["run", "--kernel", "/k"];
        v.extend_from_slice(args);
        parse(&v).expect_err("must be refused").to_string()
    }

    #[test]
    fn cli_timeout_nan_inf_negative_huge_are_refused_not_panics() {
        for bad in ["nan", "inf", "-1", "1e20", "0", "0.0001", "x"] {
            let e = run_err(&["--timeout", bad]);
            assert!(e.contains("--timeout"), "{bad}: {e}");
            let e = parse(&["demo", "--timeout", bad]).unwrap_err().to_string();
            assert!(e.contains("--timeout"), "{bad}: {e}");
        }
    }

    #[test]
    fn cli_usage_errors_are_one_line() {
        let e = parse(&["run", "--kernel", "/k", "--timeout", "nan"]).unwrap_err();
        assert_eq!(
            usage_error_line(&e),
            "invalid value 'nan' for '--timeout <SECS>': \"nan\" is not a finite number of seconds (see --help)"
        );
        let e = parse(&["run"]).unwrap_err();
        assert_eq!(
            usage_error_line(&e),
            "the following required arguments were not provided: --kernel <PATH> (see --help)"
        );
    }

    #[test]
    fn cli_timeout_small_value_is_kept_exactly() {
        let Cmd::Run(a) = parse(&["run", "--kernel", "/k", "--timeout", "0.001"])
            .unwrap()
            .cmd
        else {
            panic!("not run")
        };
        assert_eq!(a.timeout, Some(Duration::from_millis(1)));
    }

    #[test]
    fn cli_memory_vcpus_cmdline_limits_are_enforced() {
        assert!(run_err(&["--memory", "15"]).contains("16..=65536"));
        assert!(run_err(&["--memory", "65537"]).contains("16..=65536"));
        assert!(run_err(&["--vcpus", "0"]).contains("1..=32"));
        assert!(run_err(&["--vcpus", "33"]).contains("1..=32"));
        let long = "x".repeat(4096);
        assert!(run_err(&["--cmdline", &long]).contains("at most 4095 fit"));
        assert!(parse(&["run", "--kernel", "/k", "--cmdline", &"x".repeat(4095)]).is_ok());
    }

    #[test]
    fn cli_help_names_limits_and_exit_statuses() {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let run = cmd.find_subcommand_mut("run").unwrap();
        let help = run.render_long_help().to_string();
        for s in [
            "16 to 65536",
            "1 to 32",
            "4095 bytes",
            "130 SIGINT",
            "143 SIGTERM",
            "141 stdout was closed",
            "--on-reboot",
            "--disk <SPEC>",
            "xl-disk-configuration(5)",
            "--net <SPEC>",
            "00:16:3e",
            "--console <DEST>",
            "file:PATH",
            "--xen-console <TO>",
        ] {
            assert!(help.contains(s), "help lacks {s:?}:\n{help}");
        }
        let create = cmd.find_subcommand_mut("create").unwrap();
        let help = create.render_long_help().to_string();
        for s in [
            "FILE.cfg",
            "KEY=VALUE",
            "viridian",
            "vif = [ 'bridge=xenbr0' ]",
            "-c",
        ] {
            assert!(help.contains(s), "create help lacks {s:?}:\n{help}");
        }
    }

    #[test]
    fn cli_disk_and_net_specs_parse_with_xl_syntax() {
        let Cmd::Run(a) = parse(&[
            "run",
            "--kernel",
            "/k",
            "--disk",
            "phy:/dev/vg/lv,xvda,w",
            "--disk",
            "format=qcow2,vdev=xvdb,access=ro,target=/a,b.qcow2",
            "--net",
            "bridge=br0",
            "--name",
            "web",
        ])
        .unwrap()
        .cmd
        else {
            panic!("not run")
        };
        assert_eq!(a.disks.len(), 2);
        assert_eq!(a.disks[1].target, "/a,b.qcow2");
        assert_eq!(a.nets[0].bridge.as_deref(), Some("br0"));
        let e = run_err(&["--disk", "/x,raw,xvda,rx"]);
        assert!(e.contains("disk \"/x,raw,xvda,rx\": access=rx:"), "{e}");
        let e = run_err(&["--console", "tty"]);
        assert!(e.contains("\"tty\" is not stdout, pty or file:PATH"), "{e}");
    }

    #[test]
    fn cli_on_reboot_defaults_to_restart() {
        let Cmd::Run(a) = parse(&["run", "--kernel", "/k"]).unwrap().cmd else {
            panic!("not run")
        };
        assert_eq!(a.on_reboot, ActionArg::Restart);
        assert_eq!(a.on_crash, ActionArg::Destroy);
        assert!(parse(&["run", "--kernel", "/k", "--on-reboot", "destroy"]).is_ok());
        assert!(parse(&["run", "--kernel", "/k", "--on-reboot", "preserve"]).is_err());
    }

    fn args_for(kernel: &Path, extra: &[&str]) -> RunArgs {
        let mut v = vec!["run", "--kernel", kernel.to_str().unwrap()];
        v.extend_from_slice(extra);
        match parse(&v).unwrap().cmd {
            Cmd::Run(a) => a,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn run_config_kernel_dev_zero_stops_at_memory_size() {
        let Err(e) = run_config(&args_for(Path::new("/dev/zero"), &["--memory", "16"])) else {
            panic!("refused")
        };
        assert_eq!(
            e,
            "--kernel /dev/zero gave more than 16 MiB, more than fits in the guest's RAM (--memory 16)"
        );
    }

    #[test]
    fn run_config_missing_initrd_is_named() {
        let k = std::env::temp_dir().join(format!("xenkvm-cli-k-{}", std::process::id()));
        std::fs::write(&k, xenkvm::testing::TEST_GUEST_ELF).unwrap();
        let r = run_config(&args_for(&k, &["--initrd", "/nonexistent/initrd.gz"]));
        let _ = std::fs::remove_file(&k);
        let Err(e) = r else { panic!("refused") };
        assert!(
            e.starts_with("cannot read --initrd /nonexistent/initrd.gz: "),
            "{e}"
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                any::<f64>().prop_map(|f| f.to_string()),
                any::<i64>().prop_map(|i| i.to_string()),
                any::<u64>().prop_map(|i| i.to_string()),
                Just("nan".to_string()),
                Just("-inf".to_string()),
                Just("1e309".to_string()),
                "[a-z]{0,8}",
            ]
        }

        fn flag() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "--kernel",
                "--initrd",
                "--cmdline",
                "--memory",
                "--vcpus",
                "--timeout",
                "--boot",
                "--on-reboot",
                "--on-poweroff",
                "--on-crash",
                "--console-input",
                "--status-after",
                "--log-level",
                "--status",
                "--quiet",
                "--disk",
                "--net",
                "--name",
                "--console",
                "--xen-console",
                "--bogus",
            ])
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 100_000, ..ProptestConfig::default() })]
            /// Random flag values never panic the parser or the options
            /// built from what it accepts.
            #[test]
            fn cli_random_flag_values_never_panic(
                sub in prop::sample::select(vec!["run", "demo"]),
                pairs in prop::collection::vec((flag(), value()), 0..6),
            ) {
                let mut argv = vec!["xenkvm".to_string(), sub.to_string()];
                for (f, v) in pairs {
                    argv.push(f.to_string());
                    argv.push(v);
                }
                // One Command for all cases (building it is most of the
                // cost); the same definition `Cli::try_parse` uses.
                thread_local! {
                    static CMD: std::cell::RefCell<clap::Command> =
                        std::cell::RefCell::new(<Cli as clap::CommandFactory>::command());
                }
                let parsed = CMD.with(|c| {
                    c.borrow_mut()
                        .try_get_matches_from_mut(&argv)
                        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m))
                });
                if let Ok(cli) = parsed {
                    match cli.cmd {
                        Cmd::Run(a) => {
                            let o = a.ui.options();
                            prop_assert!(o.status_after > Duration::ZERO);
                            if let Some(t) = a.timeout {
                                prop_assert!(t > Duration::ZERO);
                            }
                        }
                        Cmd::Demo { timeout, ui } => {
                            prop_assert!(timeout > Duration::ZERO);
                            let _ = ui.options();
                        }
                        Cmd::Probe { .. }
                        | Cmd::Bench(_)
                        | Cmd::Create(_)
                        | Cmd::List
                        | Cmd::Pause { .. }
                        | Cmd::Unpause { .. }
                        | Cmd::Console { .. }
                        | Cmd::Shutdown { .. }
                        | Cmd::DebugKeys { .. }
                        | Cmd::Save { .. }
                        | Cmd::Migrate { .. }
                        | Cmd::MigrateReceive { .. }
                        | Cmd::Restore { .. } => {}
                    }
                    if let Some(l) = cli.log_level.as_deref() {
                        let _ = xenkvm::logging::filter_directives(l);
                    }
                }
            }
        }
    }
}
