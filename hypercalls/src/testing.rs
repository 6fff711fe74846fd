//! Test doubles: a vCPU with a sparse guest-virtual address space ([`FakeVcpu`]) and a VMM
//! that records what the domain asked of it ([`FakePlatform`]). Used by this crate's tests and
//! usable by the VMM's own unit tests; nothing here touches KVM.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::errno::Errno;
use crate::guest::{MemFault, VcpuAccess};
use crate::platform::{E820Entry, GuestTime, OverlayId, Platform, RunstateAreaSpec, RunstateInfo};
use crate::shared::{SharedPage, VecPage};
use crate::types::{Gfn, GuestWidth, VcpuId};
use crate::vcpu_init::HvmVcpuState;

const PAGE: u64 = 4096;

/// A vCPU whose guest-virtual memory is a set of mapped 4 KiB pages; everything else faults.
pub struct FakeVcpu {
    pub id: u32,
    pub cpl: u8,
    pub width: GuestWidth,
    /// RFLAGS.IF as the hypercall sees it (set by default).
    pub irqs: std::sync::atomic::AtomicBool,
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// Read-only ranges that read as zeros without backing store (one zero page mapped many
    /// times over, as XTF's consoleio-write test builds).
    zero: Mutex<Vec<(u64, u64)>>,
}

impl FakeVcpu {
    pub fn new(id: u32, width: GuestWidth) -> Self {
        FakeVcpu {
            id,
            cpl: 0,
            width,
            irqs: std::sync::atomic::AtomicBool::new(true),
            pages: Mutex::new(BTreeMap::new()),
            zero: Mutex::new(Vec::new()),
        }
    }

    /// Map `[gva, gva + len)` read-only, reading as zeros.
    pub fn map_zero(&self, gva: u64, len: u64) {
        self.zero.lock().push((gva, gva + len));
    }

    fn in_zero(&self, gva: u64, len: usize) -> bool {
        let end = gva.saturating_add(len as u64);
        self.zero.lock().iter().any(|&(s, e)| gva >= s && end <= e)
    }

    /// Map zeroed pages covering `[gva, gva + len)`.
    pub fn map(&self, gva: u64, len: u64) {
        let mut p = self.pages.lock();
        let first = gva / PAGE;
        let last = (gva + len.max(1) - 1) / PAGE;
        for n in first..=last {
            p.entry(n)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
        }
    }

    /// Remove the page containing `gva`.
    pub fn unmap(&self, gva: u64) {
        self.pages.lock().remove(&(gva / PAGE));
    }

    /// Write directly (test setup); panics if unmapped.
    pub fn poke(&self, gva: u64, data: &[u8]) {
        self.write_virt(gva, data)
            .expect("poke of an unmapped address");
    }

    /// Read directly (test checks); panics if unmapped.
    pub fn peek(&self, gva: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.read_virt(gva, &mut b)
            .expect("peek of an unmapped address");
        b
    }

    pub fn peek_u32(&self, gva: u64) -> u32 {
        u32::from_le_bytes(self.peek(gva, 4).try_into().expect("4 bytes"))
    }

    pub fn peek_u64(&self, gva: u64) -> u64 {
        u64::from_le_bytes(self.peek(gva, 8).try_into().expect("8 bytes"))
    }

    fn access(
        &self,
        gva: u64,
        len: usize,
        mut f: impl FnMut(&mut [u8], usize, usize),
    ) -> Result<(), MemFault> {
        let mut p = self.pages.lock();
        // Check every page first so a faulting access changes nothing.
        let mut a = gva;
        let end = gva.checked_add(len as u64).ok_or(MemFault { gva })?;
        while a < end {
            if !p.contains_key(&(a / PAGE)) {
                return Err(MemFault { gva: a });
            }
            a = (a / PAGE + 1) * PAGE;
        }
        let mut done = 0usize;
        let mut a = gva;
        while done < len {
            let off = (a % PAGE) as usize;
            let n = (PAGE as usize - off).min(len - done);
            let page = p.get_mut(&(a / PAGE)).ok_or(MemFault { gva: a })?;
            f(&mut page[off..off + n], done, n);
            done += n;
            a += n as u64;
        }
        Ok(())
    }
}

impl VcpuAccess for FakeVcpu {
    fn vcpu_id(&self) -> u32 {
        self.id
    }

    fn cpl(&self) -> u8 {
        self.cpl
    }

    fn width(&self) -> GuestWidth {
        self.width
    }

    fn interrupts_enabled(&self) -> bool {
        self.irqs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Identity: a mapped fake page's physical address is its virtual address.
    fn translate(&self, gva: u64) -> Result<u64, MemFault> {
        if self.pages.lock().contains_key(&(gva / PAGE)) {
            Ok(gva)
        } else {
            Err(MemFault { gva })
        }
    }

    fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        if self.in_zero(gva, buf.len()) {
            buf.fill(0);
            return Ok(());
        }
        self.access(gva, buf.len(), |page, at, n| {
            buf[at..at + n].copy_from_slice(page)
        })
    }

    fn write_virt(&self, gva: u64, data: &[u8]) -> Result<(), MemFault> {
        self.access(gva, data.len(), |page, at, n| {
            page.copy_from_slice(&data[at..at + n])
        })
    }
}

/// Everything [`FakePlatform`] was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Upcall(u32),
    Kick(u32),
    Backend(u32),
    Timer(u32, Option<u64>),
    Place(OverlayId, u64),
    VcpuDown(u32),
    VcpuUp(u32),
    /// `vcpu_initialise`: the vCPU and the state it is to start with.
    VcpuInit(u32, Box<HvmVcpuState>),
    Nmi(u32),
    Runstate(u32, Option<RunstateAreaSpec>),
    Watchdog(u32, Option<u64>),
    Unplace(OverlayId),
    Release(Vec<u64>),
    Populate(Vec<u64>),
}

/// A VMM stand-in: in-memory pages, a settable clock, an E820 map, and a call log.
pub struct FakePlatform {
    pub calls: Mutex<Vec<Call>>,
    pub console: Mutex<Vec<u8>>,
    pub input: Mutex<VecDeque<u8>>,
    pub time: Mutex<GuestTime>,
    pub tsc_khz: u32,
    pub wallclock_ns: Mutex<u64>,
    pub e820: Vec<E820Entry>,
    /// Guest RAM pages handed out by `map_guest_page`, by GFN.
    pub ram: Mutex<BTreeMap<u64, Arc<VecPage>>>,
    /// Refuse every `new_shared_page` once this many were made.
    pub page_budget: Mutex<usize>,
    /// What `runstate` reports.
    pub runstate: Mutex<RunstateInfo>,
    /// `populate_pages` fails for a list containing this GFN.
    pub populate_fails_at: Mutex<u64>,
    /// What `vcpu_initialise` returns instead of accepting the state, if set.
    pub vcpu_init_error: Mutex<Option<Errno>>,
}

impl Default for FakePlatform {
    fn default() -> Self {
        FakePlatform {
            calls: Mutex::new(Vec::new()),
            console: Mutex::new(Vec::new()),
            input: Mutex::new(VecDeque::new()),
            time: Mutex::new(GuestTime {
                tsc: 1_000_000,
                system_time_ns: 1_000_000_000,
            }),
            tsc_khz: 2_000_000,
            wallclock_ns: Mutex::new(1_700_000_000_123_456_789),
            // 256 MiB of RAM below a hole, as a small PVH guest has.
            e820: vec![
                E820Entry {
                    addr: 0,
                    size: 0x9_f000,
                    kind: 1,
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 0x0ff0_0000,
                    kind: 1,
                },
                E820Entry {
                    addr: 0xfc00_0000,
                    size: 0x400_0000,
                    kind: 2,
                },
            ],
            ram: Mutex::new(BTreeMap::new()),
            page_budget: Mutex::new(usize::MAX),
            runstate: Mutex::new(RunstateInfo::default()),
            populate_fails_at: Mutex::new(u64::MAX),
            vcpu_init_error: Mutex::new(None),
        }
    }
}

impl FakePlatform {
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock())
    }

    pub fn set_now(&self, ns: u64) {
        self.time.lock().system_time_ns = ns;
    }

    fn log(&self, c: Call) {
        self.calls.lock().push(c);
    }
}

impl Platform for FakePlatform {
    fn console_write(&self, data: &[u8]) {
        self.console.lock().extend_from_slice(data);
    }

    fn console_read(&self, buf: &mut [u8]) -> usize {
        let mut q = self.input.lock();
        let n = buf.len().min(q.len());
        for (b, c) in buf.iter_mut().zip(q.drain(..n)) {
            *b = c;
        }
        n
    }

    fn new_shared_page(&self) -> Result<Arc<dyn SharedPage>, Errno> {
        let mut budget = self.page_budget.lock();
        if *budget == 0 {
            return Err(Errno::ENOMEM);
        }
        *budget -= 1;
        Ok(Arc::new(VecPage::new()))
    }

    fn place_overlay(
        &self,
        id: OverlayId,
        _page: &Arc<dyn SharedPage>,
        gfn: Gfn,
    ) -> Result<(), Errno> {
        self.log(Call::Place(id, gfn.get()));
        Ok(())
    }

    fn map_guest_page(&self, gfn: Gfn) -> Result<Arc<dyn SharedPage>, Errno> {
        let a = gfn.gpa();
        if !self
            .e820
            .iter()
            .any(|e| e.kind == 1 && a >= e.addr && a - e.addr < e.size)
        {
            return Err(Errno::EINVAL);
        }
        let page = self
            .ram
            .lock()
            .entry(gfn.get())
            .or_insert_with(|| Arc::new(VecPage::new()))
            .clone();
        Ok(page)
    }

    fn guest_time(&self) -> GuestTime {
        *self.time.lock()
    }

    fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    fn tsc_stable(&self) -> bool {
        true
    }

    fn wallclock_ns(&self) -> u64 {
        *self.wallclock_ns.lock()
    }

    fn memory_map(&self) -> Vec<E820Entry> {
        self.e820.clone()
    }

    fn is_ram(&self, gpa: u64) -> bool {
        self.e820
            .iter()
            .any(|e| e.kind == E820Entry::RAM && gpa >= e.addr && gpa - e.addr < e.size)
    }

    fn notify_backend(&self, remote_port: u32) {
        self.log(Call::Backend(remote_port));
    }

    fn raise_upcall(&self, vcpu: VcpuId) {
        self.log(Call::Upcall(vcpu.get()));
    }

    fn kick_vcpu(&self, vcpu: VcpuId) {
        self.log(Call::Kick(vcpu.get()));
    }

    fn set_timer(&self, vcpu: VcpuId, deadline_ns: Option<u64>) {
        self.log(Call::Timer(vcpu.get(), deadline_ns));
    }

    fn vcpu_down(&self, vcpu: VcpuId) {
        self.log(Call::VcpuDown(vcpu.get()));
    }

    fn vcpu_up(&self, vcpu: VcpuId) {
        self.log(Call::VcpuUp(vcpu.get()));
    }

    fn vcpu_initialise(&self, vcpu: VcpuId, state: &HvmVcpuState) -> Result<(), Errno> {
        if let Some(e) = *self.vcpu_init_error.lock() {
            return Err(e);
        }
        self.log(Call::VcpuInit(vcpu.get(), Box::new(*state)));
        Ok(())
    }

    fn send_nmi(&self, vcpu: VcpuId) {
        self.log(Call::Nmi(vcpu.get()));
    }
    fn set_runstate_area(&self, vcpu: VcpuId, area: Option<RunstateAreaSpec>) -> Result<(), Errno> {
        self.log(Call::Runstate(vcpu.get(), area));
        Ok(())
    }
    fn runstate(&self, _vcpu: VcpuId) -> RunstateInfo {
        *self.runstate.lock()
    }
    fn set_watchdog(&self, id: u32, deadline_ns: Option<u64>) {
        self.log(Call::Watchdog(id, deadline_ns));
    }
    fn unplace_overlay(&self, id: OverlayId) -> Result<(), Errno> {
        self.log(Call::Unplace(id));
        Ok(())
    }
    fn release_pages(&self, gfns: &[Gfn]) {
        for g in gfns {
            if let Some(p) = self.ram.lock().get(&g.get()) {
                p.write(0, &[0u8; PAGE as usize]);
            }
        }
        self.log(Call::Release(gfns.iter().map(|g| g.get()).collect()));
    }
    fn populate_pages(&self, gfns: &[Gfn]) -> Result<(), Errno> {
        if let Some(bad) = gfns
            .iter()
            .find(|g| g.get() == *self.populate_fails_at.lock())
        {
            return Err(Errno::ENOMEM).inspect_err(|_| {
                tracing::debug!(gfn = bad.get(), "fake populate failure");
            });
        }
        self.log(Call::Populate(gfns.iter().map(|g| g.get()).collect()));
        Ok(())
    }
}
