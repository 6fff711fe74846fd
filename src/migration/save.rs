//! Writing a paused guest as an xl save image: xl header with the domain
//! config as JSON, the libxl v2 stream, and a libxc v3 stream for an x86
//! HVM domain in the order Xen 4.14+ writes one (X86_CPUID_POLICY and
//! X86_MSR_POLICY, STATIC_DATA_END,
//! PAGE_DATA batches with XTAB for the holes below the top of RAM but the
//! MMIO hole ([`gap_entries`]),
//! X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS unless all are 0, END).
//!
//! Before STATIC_DATA_END: X86_CPUID_POLICY and X86_MSR_POLICY
//! ([`policy_records`]) when the caller gives the guest's CPUID. xenkvm's own optional record XENKVM_XEN_STATE
//! ([`super::xenkvm_records`]) is written before END when the caller gives
//! one (`save --xen-state`); otherwise an image holds the guest's memory and
//! CPU/irqchip state only.

use std::io::Write;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::convert::{self, ConvertError, KvmIrqchipState, KvmVcpuState};
use super::hvm_context::{self, SaveHeader};
use super::pageio::{Copying, PageOut, PageSrc};
use super::stream::image::ImageWriter;
use super::stream::libxc::{
    CpuidLeaf, LibxcHeader, LibxcRecord, MsrEntry, PageType, TscInfo, MAX_BATCH, PAGE_SIZE,
};
use super::xenkvm_records::{self, XenState};
use crate::GuestMem;

/// The Xen version a saved stream claims (the ABI xenkvm implements).
pub const XEN_VERSION: (u32, u32) = (4, 17);

/// HVM params Xen's `write_hvm_params` puts in a stream.
pub const STREAM_PARAMS: &[u32] = &[1, 5, 6, 9, 12, 17, 19, 27, 28, 29, 32, 33, 34, 36, 37, 38];

/// Why a save failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// State that Xen's format cannot hold.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// Reading guest memory failed.
    #[error("guest memory at {gpa:#x}: {why}")]
    Memory {
        /// Address.
        gpa: u64,
        /// Error.
        why: String,
    },
    /// Writing the image failed.
    #[error("writing the image: {0}")]
    Io(#[from] std::io::Error),
}

/// What the domain looks like, for the headers.
#[derive(Debug, Clone)]
pub struct SaveMeta {
    /// Domain name.
    pub name: String,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// Guest TSC frequency.
    pub tsc_khz: u32,
    /// Xen system time now (ns), for X86_TSC_INFO.
    pub system_time_ns: u64,
    /// xenkvm's Xen-state record to write before END (`None`: none, the
    /// image then passes Xen's verify-stream-v2, which refuses any record
    /// type it does not list even with the optional bit set).
    pub xen_state: Option<XenState>,
    /// The guest's CPUID policy (`arch::x86::cpuid::to_policy`), written
    /// as X86_CPUID_POLICY; empty: no policy records.
    pub cpuid: Vec<CpuidLeaf>,
}

/// The static-data records Xen 4.14+ writes before STATIC_DATA_END: the
/// CPUID policy and the MSR policy, which here holds only
/// `MSR_INTEL_PLATFORM_INFO` = 0 (no CPUID faulting; Xen also lists
/// `MSR_ARCH_CAPABILITIES`, which xenkvm does not read back from KVM).
/// Nothing without a CPUID policy.
pub fn policy_records(cpuid: &[CpuidLeaf]) -> Vec<LibxcRecord> {
    if cpuid.is_empty() {
        return Vec::new();
    }
    vec![
        LibxcRecord::CpuidPolicy(cpuid.to_vec()),
        LibxcRecord::MsrPolicy(vec![MsrEntry {
            idx: MSR_INTEL_PLATFORM_INFO,
            flags: 0,
            val: 0,
        }]),
    ]
}

/// `MSR_INTEL_PLATFORM_INFO`.
const MSR_INTEL_PLATFORM_INFO: u32 = 0xce;

/// What a save wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveStats {
    /// Pages with data.
    pub pages: u64,
    /// XTAB entries (holes).
    pub holes: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// The libxl domain config (JSON) xl puts in its header, with what xenkvm knows.
pub fn config_json(meta: &SaveMeta, vcpus: usize) -> String {
    let name: String = meta
        .name
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if c.is_control() => vec![],
            c => vec![c],
        })
        .collect();
    format!(
        "{{\"c_info\":{{\"type\":\"hvm\",\"name\":\"{name}\"}},\"b_info\":{{\"max_vcpus\":{vcpus},\"max_memkb\":{kb},\"target_memkb\":{kb},\"type.hvm\":{{}}}}}}",
        kb = meta.mem_mib * 1024
    )
}

/// Sorted, disjoint (start, end) byte ranges of a region that hold data.
pub(crate) type DataRanges = Vec<(u64, u64)>;

/// The ranges (offsets relative to `start`, within `len`) of `file` that
/// hold data (`SEEK_DATA`/`SEEK_HOLE`); `None` if the file cannot say.
pub(crate) fn data_ranges(file: &std::fs::File, start: u64, len: u64) -> Option<DataRanges> {
    use rustix::fs::{seek, SeekFrom};
    let end = start.checked_add(len)?;
    let mut v = Vec::new();
    let mut at = start;
    while at < end {
        let d = match seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // no data after `at`
            Err(_) => return None,
        };
        if d >= end {
            break;
        }
        let h = seek(file, SeekFrom::Hole(d)).ok()?.min(end);
        v.push((d - start, h - start));
        at = h;
    }
    Some(v)
}

/// How many XTAB entries the gap of frames `next..first` before a RAM
/// region gets: all of it, unless the region is one of those past the MMIO
/// hole (the special pages, high RAM), whose gap is left out. Xen lists
/// that hole too (its p2m reaches the special pages at 0xfeff8), but at 8
/// bytes a frame that is 8 MiB of entries for any guest, and a reader
/// treats a frame it is not told about as it treats XTAB: not populated.
fn gap_entries(next: u64, first: u64) -> u64 {
    if first >= crate::boot::layout::SPECIAL_BASE / PAGE_SIZE as u64 {
        0
    } else {
        first.saturating_sub(next)
    }
}

/// Writes the image of a paused guest to `w`. `vcpus` are the vCPUs that
/// are up, by id (as Xen, a vCPU that is down has no CPU record);
/// `nr_vcpus` counts all. Pages are copied out of `mem` into a batch
/// ([`write_image_to`] with a [`Direct`](super::pageio::Direct) output
/// writes them straight from guest RAM instead).
#[allow(clippy::too_many_arguments)]
pub fn write_image<W: Write>(
    w: W,
    meta: &SaveMeta,
    nr_vcpus: usize,
    vcpus: &[(u16, KvmVcpuState)],
    irqchip: &KvmIrqchipState,
    mem: &GuestMem,
    params: &[(u64, u64)],
) -> Result<SaveStats, SaveError> {
    write_image_to(
        Copying::new(w, mem),
        meta,
        nr_vcpus,
        vcpus,
        irqchip,
        mem,
        params,
    )
}

/// [`write_image`] to any [`PageOut`], which fetches the pages itself.
#[allow(clippy::too_many_arguments)]
pub fn write_image_to<O: PageOut>(
    out: O,
    meta: &SaveMeta,
    nr_vcpus: usize,
    vcpus: &[(u16, KvmVcpuState)],
    irqchip: &KvmIrqchipState,
    mem: &GuestMem,
    params: &[(u64, u64)],
) -> Result<SaveStats, SaveError> {
    write_image_with_progress(
        out,
        meta,
        nr_vcpus,
        vcpus,
        irqchip,
        mem,
        params,
        &mut |_| {},
    )
}

/// How far a save is: image bytes written (holes of a sparse file
/// included) and the size the whole image will have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveProgress {
    /// Bytes of the image written so far.
    pub bytes: u64,
    /// The image's size once complete.
    pub total: u64,
}

/// Bytes of the PAGE_DATA records for `entries` pfns (holes included), of
/// which `data` carry a page, in batches of [`MAX_BATCH`]: per record its
/// header and count words, 8 bytes per pfn and 4096 per data page.
fn page_records_bytes(entries: u64, data: u64) -> u64 {
    entries.div_ceil(MAX_BATCH as u64) * 16 + entries * 8 + data * PAGE_SIZE as u64
}

/// Bytes `records`, libxc END and libxl END take in the stream.
fn tail_bytes(records: &[LibxcRecord]) -> std::io::Result<u64> {
    use super::stream::libxl::LibxlRecord;
    let mut sink = super::stream::Sink::new(std::io::sink());
    for r in records.iter().chain([&LibxcRecord::End]) {
        r.write(&mut sink)?;
    }
    LibxlRecord::End.write(&mut sink)?;
    Ok(sink.offset())
}

/// [`write_image_to`], calling `progress` after the headers, after each
/// PAGE_DATA batch (every 4 MiB of pages; no system call of its own) and
/// once the image is complete (`bytes == total`).
#[allow(clippy::too_many_arguments)]
pub fn write_image_with_progress<O: PageOut>(
    out: O,
    meta: &SaveMeta,
    nr_vcpus: usize,
    vcpus: &[(u16, KvmVcpuState)],
    irqchip: &KvmIrqchipState,
    mem: &GuestMem,
    params: &[(u64, u64)],
    progress: &mut dyn FnMut(SaveProgress),
) -> Result<SaveStats, SaveError> {
    // Convert first: nothing is written for state that cannot be represented.
    let mut recs = Vec::new();
    for (i, v) in vcpus {
        let (r, extra) = convert::vcpu_to_records(*i, v)?;
        if extra != convert::EventsExtra::default() {
            tracing::warn!(
                vcpu = i,
                ?extra,
                "vCPU event state Xen's CPU record cannot hold is not saved"
            );
        }
        recs.extend(r);
    }
    recs.extend(convert::irqchip_to_records(irqchip));
    let blob = hvm_context::build(
        SaveHeader {
            changeset: 0,
            cpuid: 0,
            gtsc_khz: meta.tsc_khz,
        },
        recs,
    );

    // The records after the pages, known before any page is written (so
    // the image's size is too).
    let mut tail = vec![
        LibxcRecord::TscInfo(TscInfo {
            mode: 0,
            khz: meta.tsc_khz,
            nsec: meta.system_time_ns,
            incarnation: 0,
        }),
        LibxcRecord::HvmContext(blob),
    ];
    let params: Vec<(u64, u64)> = params.iter().copied().filter(|(_, v)| *v != 0).collect();
    if !params.is_empty() {
        tail.push(LibxcRecord::HvmParams(params));
    }
    if let Some(st) = &meta.xen_state {
        tail.push(LibxcRecord::Optional {
            rtype: xenkvm_records::REC_XENKVM_XEN_STATE,
            body: xenkvm_records::encode(st),
        });
    }

    let cfg = config_json(meta, nr_vcpus);
    let mut img = ImageWriter::begin(
        out,
        Some(Some(&cfg)),
        LibxcHeader::hvm_v3(XEN_VERSION.0, XEN_VERSION.1),
    )?;
    for r in policy_records(&meta.cpuid) {
        img.libxc(&r)?;
    }
    img.libxc(&LibxcRecord::StaticDataEnd)?;
    let mut stats = SaveStats::default();
    let mut pfns: Vec<(u64, PageType)> = Vec::with_capacity(MAX_BATCH);
    let mut pages: Vec<PageSrc> = Vec::with_capacity(MAX_BATCH);
    // Per region: its guest range and, for a memfd-backed one, the page
    // ranges the file holds data for (pages never touched are holes: sent
    // as zeroes without faulting them in, which would allocate them).
    let mut regions: Vec<(u64, u64, Option<DataRanges>)> = mem
        .iter()
        .map(|r| {
            let data = r
                .file_offset()
                .and_then(|fo| data_ranges(fo.file(), fo.start(), r.len()));
            (r.start_addr().0, r.len(), data)
        })
        .collect();
    regions.sort_by_key(|r| r.0);
    // The pfn entries (holes below the top of RAM included) and data pages
    // the loop below writes, for the image's size.
    let (mut entries, mut data_pages, mut next) = (0u64, 0u64, 0u64);
    for (start, len, _) in &regions {
        let first = start / PAGE_SIZE as u64;
        let n = len / PAGE_SIZE as u64;
        entries += gap_entries(next, first) + n;
        data_pages += n;
        next = next.max(first + n);
    }
    let total = img.offset() + page_records_bytes(entries, data_pages) + tail_bytes(&tail)?;
    progress(SaveProgress {
        bytes: img.offset(),
        total,
    });
    let mut flush = |img: &mut ImageWriter<O>,
                     pfns: &mut Vec<(u64, PageType)>,
                     pages: &mut Vec<PageSrc>|
     -> Result<(), SaveError> {
        if !pfns.is_empty() {
            img.page_batch(pfns, pages)?;
            pfns.clear();
            pages.clear();
            progress(SaveProgress {
                bytes: img.offset(),
                total,
            });
        }
        Ok(())
    };
    let mut next_pfn = 0u64;
    for (start, len, data) in regions {
        let first = start / PAGE_SIZE as u64;
        for pfn in first - gap_entries(next_pfn, first)..first {
            pfns.push((pfn, PageType::XTab));
            stats.holes += 1;
            if pfns.len() == MAX_BATCH {
                flush(&mut img, &mut pfns, &mut pages)?;
            }
        }
        // The data ranges are sorted and disjoint: walk them with the pages.
        let mut ranges = data.as_deref().map(|d| d.iter().peekable());
        for pfn in first..first + len / PAGE_SIZE as u64 {
            let off = (pfn - first) * PAGE_SIZE as u64;
            let zero = match ranges.as_mut() {
                None => false,
                Some(it) => {
                    while it.next_if(|(_, e)| *e <= off).is_some() {}
                    it.peek().is_none_or(|(s, _)| *s > off)
                }
            };
            pfns.push((pfn, PageType::Normal));
            pages.push(PageSrc { pfn, zero });
            stats.pages += 1;
            if pfns.len() == MAX_BATCH {
                flush(&mut img, &mut pfns, &mut pages)?;
            }
        }
        next_pfn = next_pfn.max(first + len / PAGE_SIZE as u64);
    }
    flush(&mut img, &mut pfns, &mut pages)?;
    for r in &tail {
        img.libxc(r)?;
    }
    stats.bytes = img.offset();
    // What finish writes: libxc END and libxl END.
    let end = img.offset() + tail_bytes(&[])?;
    let w = img.finish(&[])?;
    drop(w);
    progress(SaveProgress { bytes: end, total });
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn save_data_ranges_finds_touched_pages_of_a_memfd() {
        let fd =
            rustix::fs::memfd_create("xenkvm-save-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = std::fs::File::from(fd);
        f.set_len(16 * PAGE_SIZE as u64).unwrap();
        for page in [3u64, 7, 8] {
            f.seek(SeekFrom::Start(page * PAGE_SIZE as u64)).unwrap();
            f.write_all(&[1]).unwrap();
        }
        let p = PAGE_SIZE as u64;
        // The whole file, and a region starting at page 2.
        assert_eq!(
            data_ranges(&f, 0, 16 * p).unwrap(),
            vec![(3 * p, 4 * p), (7 * p, 9 * p)]
        );
        assert_eq!(
            data_ranges(&f, 2 * p, 6 * p).unwrap(),
            vec![(p, 2 * p), (5 * p, 6 * p)]
        );
        assert_eq!(data_ranges(&f, 9 * p, 7 * p).unwrap(), vec![]);
    }

    #[test]
    fn save_direct_to_a_file_writes_the_same_image_as_copying() {
        use std::io::Read;

        use crate::migration::convert::tests::{irqchip, long_mode_vcpu};
        let ranges: Vec<(vm_memory::GuestAddress, u64)> = crate::boot::layout::ram_ranges(16 << 20)
            .into_iter()
            .map(|(a, l)| (a, l as u64))
            .collect();
        let map = gpc::MemoryMap::new(&ranges).unwrap();
        let mem = map.guest_memory();
        // Touched pages here and there (the rest are holes of the memfds).
        for (i, gpa) in [0x5000u64, 0x6000, 0x7000, 0x10_0000, 0x3ff000, 0x9f000]
            .iter()
            .enumerate()
        {
            let v: Vec<u8> = (0..PAGE_SIZE).map(|j| (j * 5 + i) as u8).collect();
            vm_memory::Bytes::write_slice(mem, &v, vm_memory::GuestAddress(*gpa)).unwrap();
        }
        let meta = SaveMeta {
            name: "t".into(),
            mem_mib: 16,
            tsc_khz: 1_000_000,
            system_time_ns: 1_000,
            xen_state: None,
            cpuid: Vec::new(),
        };
        let vcpus = [(0, long_mode_vcpu(0))];
        let mut want = Vec::new();
        let a = write_image(&mut want, &meta, 1, &vcpus, &irqchip(), mem, &[(1, 2)]).unwrap();
        let fd = rustix::fs::memfd_create("save-direct", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = std::fs::File::from(fd);
        let mut d = crate::migration::pageio::Direct::new(&f, &map);
        let b = write_image_to(&mut d, &meta, 1, &vcpus, &irqchip(), mem, &[(1, 2)]).unwrap();
        d.finish().unwrap();
        assert_eq!(a, b);
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(got == want, "the images differ");
        // Most of it was never written: holes.
        let data = data_ranges(&f, 0, got.len() as u64).unwrap();
        let written: u64 = data.iter().map(|(s, e)| e - s).sum();
        assert!(written < got.len() as u64 / 4, "{written} of {}", got.len());
    }

    #[test]
    fn save_progress_rises_to_the_image_size_known_from_the_start() {
        use crate::migration::convert::tests::{irqchip, long_mode_vcpu};
        // RAM in two regions with a gap (XTAB entries) and more pages than
        // a batch, with and without the Xen-state record.
        let map = gpc::MemoryMap::new(&[
            (vm_memory::GuestAddress(0), 5 << 20),
            (
                vm_memory::GuestAddress(8 << 20),
                (1 << 20) + 3 * PAGE_SIZE as u64,
            ),
        ])
        .unwrap();
        let vcpus = [(0, long_mode_vcpu(0))];
        for xen_state in [None, Some(XenState::default())] {
            let meta = SaveMeta {
                name: "p".into(),
                mem_mib: 9,
                tsc_khz: 1_000_000,
                system_time_ns: 1_000,
                xen_state,
                cpuid: Vec::new(),
            };
            let mut img = Vec::new();
            let mut seen: Vec<SaveProgress> = Vec::new();
            write_image_with_progress(
                Copying::new(&mut img, map.guest_memory()),
                &meta,
                1,
                &vcpus,
                &irqchip(),
                map.guest_memory(),
                &[(1, 2), (3, 0)],
                &mut |p| seen.push(p),
            )
            .unwrap();
            let total = img.len() as u64;
            assert!(seen.len() >= 3, "{seen:?}");
            assert!(seen.iter().all(|p| p.total == total), "{seen:?} of {total}");
            assert!(seen.windows(2).all(|w| w[0].bytes < w[1].bytes), "{seen:?}");
            assert_eq!(seen.last().unwrap().bytes, total);
        }
    }
}
