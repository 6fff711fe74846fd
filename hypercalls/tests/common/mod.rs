//! Shared fixtures: a domain over a [`FakePlatform`] and a [`FakeVcpu`] with a small mapped
//! window, plus helpers to issue hypercalls in either width.

#![allow(dead_code)]

use std::sync::Arc;

use hypercalls::testing::{FakePlatform, FakeVcpu};
use hypercalls::{Domain, DomainConfig, GuestWidth, Hypercall, Outcome};

/// Mapped guest-virtual window: 4 pages at 1 MiB.
pub const BUF: u64 = 0x10_0000;
pub const BUF_LEN: u64 = 0x4000;
/// A page that is never mapped.
pub const HOLE: u64 = 0x9000_0000;
/// 8 bytes before a page boundary inside the window: structures here straddle two pages.
pub const STRADDLE: u64 = BUF + 0x1000 - 8;
/// The last bytes of the window; the page after it is unmapped.
pub const WINDOW_END: u64 = BUF + BUF_LEN;

pub mod nr {
    pub const MEMORY_OP: u64 = 12;
    pub const SET_TIMER_OP: u64 = 15;
    pub const XEN_VERSION: u64 = 17;
    pub const CONSOLE_IO: u64 = 18;
    pub const GRANT_TABLE_OP: u64 = 20;
    pub const VM_ASSIST: u64 = 21;
    pub const VCPU_OP: u64 = 24;
    pub const SCHED_OP: u64 = 29;
    pub const EVENT_CHANNEL_OP: u64 = 32;
    pub const HVM_OP: u64 = 34;
}

pub const EPERM: i64 = -1;
pub const ENOENT: i64 = -2;
pub const ESRCH: i64 = -3;
pub const ENXIO: i64 = -6;
pub const E2BIG: i64 = -7;
pub const EACCES: i64 = -13;
pub const EFAULT: i64 = -14;
pub const EEXIST: i64 = -17;
pub const EINVAL: i64 = -22;
pub const ENOSPC: i64 = -28;
pub const EDOM: i64 = -33;
pub const ENOSYS: i64 = -38;
pub const EOPNOTSUPP: i64 = -95;

pub struct Env {
    pub p: Arc<FakePlatform>,
    pub d: Domain,
    pub v: FakeVcpu,
}

pub fn env(width: GuestWidth) -> Env {
    env_cfg(
        width,
        DomainConfig {
            vcpus: 2,
            handle: *b"0123456789abcdef",
            ..DomainConfig::default()
        },
    )
}

pub fn env_cfg(width: GuestWidth, cfg: DomainConfig) -> Env {
    let p = Arc::new(FakePlatform::default());
    let d = Domain::new(cfg, p.clone()).expect("domain");
    let v = FakeVcpu::new(0, width);
    v.map(BUF, BUF_LEN);
    Env { p, d, v }
}

impl Env {
    pub fn call(&self, nr: u64, args: &[u64]) -> Outcome {
        self.call_on(&self.v, nr, args)
    }

    pub fn call_on(&self, v: &FakeVcpu, nr: u64, args: &[u64]) -> Outcome {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        let hc = match v.width {
            GuestWidth::Bits64 => Hypercall::from_regs64(nr, a[0], a[1], a[2], a[3], a[4], a[5]),
            GuestWidth::Bits32 => {
                let t = |x: u64| x as u32;
                Hypercall::from_regs32(t(nr), t(a[0]), t(a[1]), t(a[2]), t(a[3]), t(a[4]), t(a[5]))
            }
        };
        self.d.dispatch(v, &hc)
    }

    /// The RAX value of a hypercall that must not block.
    pub fn ret(&self, nr: u64, args: &[u64]) -> i64 {
        match self.call(nr, args) {
            Outcome::Return(r) => r,
            o => panic!("hypercall {nr} {args:x?} did not return: {o:?}"),
        }
    }

    /// The domain still answers a trivial hypercall.
    pub fn alive(&self) {
        assert_eq!(self.ret(nr::XEN_VERSION, &[0, 0]), 0x40011);
    }

    pub fn is_64(&self) -> bool {
        self.v.width == GuestWidth::Bits64
    }
}

pub fn both() -> [GuestWidth; 2] {
    [GuestWidth::Bits64, GuestWidth::Bits32]
}

pub fn le16(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}

/// Build a little-endian structure from (offset, bytes) pieces.
pub fn st(len: usize, fields: &[(usize, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; len];
    for (off, f) in fields {
        b[*off..*off + f.len()].copy_from_slice(f);
    }
    b
}
