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

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::convert::{self, ConvertError, KvmIrqchipState, KvmVcpuState};
use super::hvm_context::{self, SaveHeader};
use super::stream::image::ImageWriter;
use super::stream::libxc::{
    LibxcHeader, LibxcRecord, PageData, PageType, TscInfo, MAX_BATCH, PAGE_SIZE,
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
/// `nr_vcpus` counts all.
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
        w,
        Some(Some(&cfg)),
        LibxcHeader::hvm_v3(XEN_VERSION.0, XEN_VERSION.1),
    )?;
    img.libxc(&LibxcRecord::StaticDataEnd)?;
    let mut stats = SaveStats::default();
    let mut batch = PageData {
        pfns: Vec::with_capacity(MAX_BATCH),
        data: Vec::with_capacity(MAX_BATCH * PAGE_SIZE),
    };
    let flush = |img: &mut ImageWriter<W>, b: &mut PageData| -> Result<(), SaveError> {
        if !b.pfns.is_empty() {
            img.page_data(b)?;
            b.pfns.clear();
            b.data.clear();
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
    let zero = [0u8; PAGE_SIZE];
    let mut next_pfn = 0u64;
    for (start, len, data) in regions {
        let first = start / PAGE_SIZE as u64;
        for pfn in next_pfn..first {
            batch.pfns.push((pfn, PageType::XTab));
            stats.holes += 1;
            if batch.pfns.len() == MAX_BATCH {
                flush(&mut img, &mut batch)?;
            }
        }
        for pfn in first..first + len / PAGE_SIZE as u64 {
            let at = batch.data.len();
            let off = (pfn - first) * PAGE_SIZE as u64;
            // The ranges are sorted and disjoint: the one that could hold
            // `off` is the last starting at or before it.
            let hole = data.as_ref().is_some_and(|d| {
                let i = d.partition_point(|(s, _)| *s <= off);
                i == 0 || d[i - 1].1 <= off
            });
            if hole {
                batch.data.extend_from_slice(&zero);
            } else {
                batch.data.resize(at + PAGE_SIZE, 0);
                mem.read_slice(&mut batch.data[at..], GuestAddress(pfn * PAGE_SIZE as u64))
                    .map_err(|e| SaveError::Memory {
                        gpa: pfn * PAGE_SIZE as u64,
                        why: e.to_string(),
                    })?;
            }
            batch.pfns.push((pfn, PageType::Normal));
            stats.pages += 1;
            if batch.pfns.len() == MAX_BATCH {
                flush(&mut img, &mut batch)?;
            }
        }
        next_pfn = next_pfn.max(first + len / PAGE_SIZE as u64);
    }
    flush(&mut img, &mut batch)?;
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
}
