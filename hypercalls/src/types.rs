//! Boundary types: the decoded hypercall, the validated values handlers work with, and what a
//! hypercall asks the VMM to do next.

use crate::abi;

/// The guest's execution width, which selects the hypercall register convention and the
/// layout of shared structures (64-bit native or 32-bit compat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestWidth {
    /// Protected mode (or 16-bit protected mode): `EBX, ECX, EDX, ESI, EDI, EBP`, compat layouts.
    Bits32,
    /// Long mode: `RDI, RSI, RDX, R10, R8, R9`, native layouts.
    Bits64,
}

/// A hypercall as decoded from the vCPU's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hypercall {
    /// `RAX`/`EAX`: the hypercall number.
    pub nr: u64,
    /// The argument registers in ABI order.
    pub args: [u64; 6],
}

impl Hypercall {
    /// The 64-bit convention: number in RAX, arguments in RDI, RSI, RDX, R10, R8, R9.
    pub fn from_regs64(rax: u64, rdi: u64, rsi: u64, rdx: u64, r10: u64, r8: u64, r9: u64) -> Self {
        Hypercall {
            nr: rax,
            args: [rdi, rsi, rdx, r10, r8, r9],
        }
    }

    /// The 32-bit convention: number in EAX, arguments in EBX, ECX, EDX, ESI, EDI, EBP.
    pub fn from_regs32(
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
        esi: u32,
        edi: u32,
        ebp: u32,
    ) -> Self {
        Hypercall {
            nr: u64::from(eax),
            args: [ebx, ecx, edx, esi, edi, ebp].map(u64::from),
        }
    }

    /// The hypercall with its number and arguments truncated as the guest's width implies
    /// (a 32-bit guest's registers carry 32 bits).
    pub(crate) fn for_width(&self, w: GuestWidth) -> Hypercall {
        match w {
            GuestWidth::Bits64 => *self,
            GuestWidth::Bits32 => Hypercall {
                nr: self.nr & 0xffff_ffff,
                args: self.args.map(|a| a & 0xffff_ffff),
            },
        }
    }
}

/// A hypercall number inside Xen's table (`NR_hypercalls` = 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HypercallNr(u8);

impl HypercallNr {
    /// `None` for numbers outside Xen's hypercall table.
    pub fn new(nr: u64) -> Option<Self> {
        (nr < abi::nr::NR_HYPERCALLS).then_some(HypercallNr(nr as u8))
    }

    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

/// A guest frame number that can be placed in the p2m (below 2^40: a 52-bit physical address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gfn(u64);

impl Gfn {
    /// Largest frame number of a 52-bit guest-physical address space.
    pub const MAX: u64 = (1 << 40) - 1;

    /// `None` for `INVALID_GFN` and frames outside a 52-bit physical address space.
    pub fn new(raw: u64) -> Option<Self> {
        (raw <= Self::MAX).then_some(Gfn(raw))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The guest-physical address of the frame's first byte.
    pub fn gpa(self) -> u64 {
        self.0 << abi::PAGE_SHIFT
    }
}

/// An event channel port number inside the domain's current port space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvtchnPort(u32);

impl EvtchnPort {
    /// `None` unless `raw < limit` (the domain's number of ports for its ABI).
    pub fn new(raw: u32, limit: u32) -> Option<Self> {
        (raw < limit).then_some(EvtchnPort(raw))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// A vCPU id below the domain's number of vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuId(u32);

impl VcpuId {
    /// `None` unless `raw < nr_vcpus`.
    pub fn new(raw: u32, nr_vcpus: u32) -> Option<Self> {
        (raw < nr_vcpus).then_some(VcpuId(raw))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub(crate) fn idx(self) -> usize {
        self.0 as usize
    }
}

/// What the VMM does after a hypercall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Put the value in RAX and resume the guest (negative Xen errno on failure).
    Return(i64),
    /// `SCHEDOP_block`: block the vCPU until an interrupt or event is deliverable (as `HLT`),
    /// then return 0. `deadline_ns` (Xen system time) is a wake-up time, if any.
    Block { deadline_ns: Option<u64> },
    /// `SCHEDOP_poll`: block until one of `ports` is pending (masked or not, see
    /// [`crate::Domain::poll_should_wake`]), an event or interrupt is deliverable, or the
    /// deadline (absolute Xen system time) passes; then call [`crate::Domain::end_poll`] and
    /// return 0. At most 128 ports. A deadline in the past means "return at once".
    Poll {
        ports: Vec<u32>,
        deadline_ns: Option<u64>,
    },
    /// `SCHEDOP_yield`: give up the host CPU, then return 0.
    Yield,
    /// `SCHEDOP_shutdown` (or the last vCPU going down): stop the domain. `reason` is the
    /// effective `SHUTDOWN_*` code (an earlier `SCHEDOP_shutdown_code` wins, as in Xen).
    /// For `SHUTDOWN_suspend` a VMM that resumes the domain returns 0 in RAX.
    Shutdown { reason: u8 },
}
