//! The xenkvm command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use xenkvm::vmm::machine::GuestExit;
use xenkvm::vmm::{BootProtocol, Vm, VmConfig};

#[derive(Parser)]
#[command(
    name = "xenkvm",
    version,
    about = "Run unmodified Xen HVM and PV-on-HVM guests on Linux KVM, without Xen."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest kernel: a PVH ELF (an XTF test, vmlinux) or a Linux
    /// bzImage (see --boot).
    Run(RunArgs),
    /// Boot the project's own test guest (built by cargo) and print what it
    /// checked from inside: Xen CPUID, hypercalls, shared_info, xenstore,
    /// event channels, grant tables, traps, SCHEDOP_poll.
    Demo {
        /// Stop and fail after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Probe this host's KVM for what it cannot run (legacy paging, int n
    /// from user mode, ...) and print what xenkvm fixes up.
    Probe,
    /// Benchmarks on the built-in test guest.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
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
        /// Mechanisms to compare (perf, perf-batched, sampling); default: the
        /// best this host permits, and sampling.
        #[arg(long, value_delimiter = ',')]
        mechanism: Vec<String>,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Draw the visibility-latency CDFs into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
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
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an ELF image with a Xen PVH entry note, or a Linux
    /// bzImage (booted as --boot says).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// How to boot the kernel.
    #[arg(long, value_enum, default_value_t = BootArg::Auto)]
    boot: BootArg,
    /// Initial ramdisk (PVH: module 0 of hvm_start_info; Linux boot
    /// protocol: ramdisk_image in the zero page).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Stop the guest and fail after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XENKVM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_thread_names(true)
        // Colour only on a terminal: logs kept in files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => {
            let kernel = match std::fs::read(&a.kernel) {
                Ok(k) => k,
                Err(e) => {
                    return fail(
                        1,
                        &format!("cannot read --kernel {}: {e}", a.kernel.display()),
                    )
                }
            };
            let is_bz = xenkvm::boot::bzimage::is_bzimage(&kernel);
            let (kernel, boot) = match a.boot {
                BootArg::Linux if !is_bz => {
                    return fail(
                        1,
                        &format!(
                            "--boot linux needs a Linux bzImage, and {} is not one (no \"HdrS\" setup header); use --boot pvh for an ELF",
                            a.kernel.display()
                        ),
                    )
                }
                BootArg::Linux => (kernel, BootProtocol::Linux),
                // PVH entry of the ELF inside a bzImage.
                BootArg::Auto | BootArg::Pvh if is_bz => {
                    eprintln!(
                        "xenkvm: {} is a bzImage: extracting its kernel ELF to boot it by PVH (--boot linux runs its own decompressor instead)",
                        a.kernel.display()
                    );
                    match xenkvm::boot::bzimage::extract_elf(&kernel) {
                        Ok(elf) => (elf, BootProtocol::Pvh),
                        Err(e) => return fail(1, &format!("{}: {e}", a.kernel.display())),
                    }
                }
                BootArg::Auto | BootArg::Pvh => (kernel, BootProtocol::Pvh),
            };
            let initrd = match a.initrd.as_ref().map(std::fs::read).transpose() {
                Ok(i) => i,
                Err(e) => return fail(1, &format!("cannot read --initrd: {e}")),
            };
            let cfg = VmConfig {
                kernel,
                boot,
                initrd,
                cmdline: a.cmdline,
                mem_mib: a.memory,
                vcpus: a.vcpus,
                timeout: a.timeout.map(Duration::from_secs_f64),
                ..Default::default()
            };
            run(cfg)
        }
        Cmd::Demo { timeout } => {
            println!(
                "xenkvm demo: booting the built-in test guest ({} bytes)",
                xenkvm::testing::TEST_GUEST_ELF.len()
            );
            let cfg = VmConfig {
                kernel: xenkvm::testing::TEST_GUEST_ELF.to_vec(),
                cmdline: "demo".into(),
                mem_mib: 64,
                vcpus: 2,
                timeout: Some(Duration::from_secs_f64(timeout)),
                name: "demo".into(),
                ..Default::default()
            };
            run(cfg)
        }
        Cmd::Probe => {
            print!("{}", xenkvm::kvm::probe::HostProbe::run());
            println!(
                "{:<30} {}",
                "host schedule tracking",
                xenkvm::xen::sched::Mechanism::choose(None)
            );
            ExitCode::SUCCESS
        }
        Cmd::Bench(BenchCmd::Sched {
            secs,
            hog_on,
            hog_off,
            mechanism,
            rounds,
            json,
            plot,
        }) => {
            use xenkvm::vmm::bench_sched as b;
            let mechs = if mechanism.is_empty() {
                let best = xenkvm::xen::sched::Mechanism::choose(None)
                    .name()
                    .to_string();
                if best == "sampling" {
                    vec![best]
                } else {
                    vec![best, "sampling".into()]
                }
            } else {
                mechanism
            };
            let base = b::SchedBench {
                secs,
                hog_on_ms: hog_on,
                hog_off_ms: hog_off,
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

fn run(cfg: VmConfig) -> ExitCode {
    let vm = match Vm::create(&cfg, xenkvm::devices::ConsoleOut::stdout()) {
        Ok(vm) => vm,
        Err(e) => return fail(1, &e.to_string()),
    };
    match vm.run(cfg.timeout) {
        GuestExit::Poweroff => ExitCode::SUCCESS,
        GuestExit::Crash(why) => fail(2, &format!("guest crashed: {why}")),
        GuestExit::Reboot(why) => fail(3, &format!("guest rebooted: {why}")),
        GuestExit::Suspend => fail(3, "guest suspended itself and nothing can resume it"),
        GuestExit::Timeout(d) => fail(
            4,
            &format!(
                "timeout: the guest was still running after {:.1} s",
                d.as_secs_f64()
            ),
        ),
        GuestExit::Error(e) => fail(1, &e),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("xenkvm: {msg}");
    ExitCode::from(code)
}
