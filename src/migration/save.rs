//! Writing a paused guest as an xl save image: xl header with the domain
//! config as JSON, the libxl v2 stream, and a libxc v3 stream for an x86
//! HVM domain in the order Xen 4.14+ writes one (STATIC_DATA_END,
//! PAGE_DATA batches with XTAB for the holes below the top of RAM,
//! X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS unless all are 0, END).
//!
//! Not written yet: X86_CPUID_POLICY / X86_MSR_POLICY (Xen then applies its
//! default policy). xenkvm's own optional record XENKVM_XEN_STATE
//! ([`super::xenkvm_records`]) is written before END when the caller gives
//! one (`save --xen-state`); otherwise an image holds the guest's memory and
//! CPU/irqchip state only.

use std::io::Write;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::convert::{self, ConvertError, KvmIrqchipState, KvmVcpuState};
use super::hvm_context::{self, SaveHeader};
use super::pageio::{Copying, PageOut, PageSrc};
use super::stream::image::ImageWriter;
use super::stream::libxc::{LibxcHeader, LibxcRecord, PageType, TscInfo, MAX_BATCH, PAGE_SIZE};
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
}

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

    let cfg = config_json(meta, nr_vcpus);
    let mut img = ImageWriter::begin(
        out,
        Some(Some(&cfg)),
        LibxcHeader::hvm_v3(XEN_VERSION.0, XEN_VERSION.1),
    )?;
    img.libxc(&LibxcRecord::StaticDataEnd)?;
    let mut stats = SaveStats::default();
    let mut pfns: Vec<(u64, PageType)> = Vec::with_capacity(MAX_BATCH);
    let mut pages: Vec<PageSrc> = Vec::with_capacity(MAX_BATCH);
    let flush = |img: &mut ImageWriter<O>,
                 pfns: &mut Vec<(u64, PageType)>,
                 pages: &mut Vec<PageSrc>|
     -> Result<(), SaveError> {
        if !pfns.is_empty() {
            img.page_batch(pfns, pages)?;
            pfns.clear();
            pages.clear();
        }
        Ok(())
    };
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
    let mut next_pfn = 0u64;
    for (start, len, data) in regions {
        let first = start / PAGE_SIZE as u64;
        for pfn in next_pfn..first {
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
    img.libxc(&LibxcRecord::TscInfo(TscInfo {
        mode: 0,
        khz: meta.tsc_khz,
        nsec: meta.system_time_ns,
        incarnation: 0,
    }))?;
    img.libxc(&LibxcRecord::HvmContext(blob))?;
    let params: Vec<(u64, u64)> = params.iter().copied().filter(|(_, v)| *v != 0).collect();
    if !params.is_empty() {
        img.libxc(&LibxcRecord::HvmParams(params))?;
    }
    if let Some(st) = &meta.xen_state {
        img.libxc(&LibxcRecord::Optional {
            rtype: xenkvm_records::REC_XENKVM_XEN_STATE,
            body: xenkvm_records::encode(st),
        })?;
    }
    stats.bytes = img.offset();
    let w = img.finish(&[])?;
    drop(w);
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
}
