//! Reading an image back: [`load`] reads and checks the whole image
//! (structure of every layer, the HVM_CONTEXT records and their conversion
//! to KVM state) before anything is written to a guest, seeking over the
//! page data (its length is checked against the file's); [`apply_pages`]
//! then reads the records again and the pages into the new guest's RAM
//! ([`super::pagefile`]: `pread` and `pwrite`, the image's holes and zero
//! pages left out).
//!
//! Accepted: an xl image (with or without its JSON config), a bare libxl or
//! libxc stream; libxc v2 and v3; HVM_PARAMS before or after HVM_CONTEXT;
//! XTAB, BROKEN and XALLOC pages (no data; BROKEN pages are left zero with
//! a warning). The Xen-side state travels in xenkvm's own XENKVM_XEN_STATE
//! record (`save --xen-state`): it is checked here (a malformed one refuses
//! the image) and returned in [`RestoreImage::xen_state`]; the VM builder
//! continues the saved clock from its CLOCK section
//! (`xen::clock::Clock::continuing`) and `Xen::new` applies the rest
//! (`src/xen/saved.rs`: shared_info and grant frames with their contents,
//! event channels, vcpu_info/time/runstate areas, runstate times, timers,
//! upcall vectors, HVM params, xenstore). An image without the record
//! restores the CPU and memory only: a guest that had registered
//! shared_info, event channels or timers finds them reset.

use std::io::BufReader;
use std::path::Path;

use super::convert::{self, ConvertError, EventsExtra, KvmIrqchipState, KvmVcpuState};
use super::hvm_context::{self, HvmRecord};
use super::stream::image::{ImageReader, Item};
use super::stream::libxc::{CpuidLeaf, LibxcRecord, PageType, PAGE_SIZE};
use super::stream::{Src, StreamError};
use super::xenkvm_records::{self, XenState};
use crate::boot::layout;

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The file cannot be opened.
    #[error("{path}: {why}")]
    File {
        /// Path.
        path: String,
        /// Error.
        why: String,
    },
    /// The stream is malformed.
    #[error("{path}: {source}")]
    Stream {
        /// Path.
        path: String,
        /// What is wrong, naming the record and offset.
        source: StreamError,
    },
    /// The CPU state cannot be represented in KVM.
    #[error("{path}: {source}")]
    Convert {
        /// Path.
        path: String,
        /// What cannot be represented.
        source: ConvertError,
    },
    /// Something else about the image that xenkvm cannot restore.
    #[error("{path}: {why}")]
    Unsupported {
        /// Path.
        path: String,
        /// What.
        why: String,
    },
}

/// What a restore needs besides the pages.
#[derive(Debug, Clone)]
pub struct RestoreImage {
    /// Domain name from the xl config (empty if none).
    pub name: String,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Per vCPU: its state, `None` for a vCPU that was down.
    pub vcpus: Vec<Option<KvmVcpuState>>,
    /// PIC, IOAPIC, PIT.
    pub irqchip: KvmIrqchipState,
    /// HVM params from the stream.
    pub params: Vec<(u64, u64)>,
    /// Pages with data.
    pub pages: u64,
    /// TSC kHz the guest had (0 if the stream does not say).
    pub tsc_khz: u32,
    /// xenkvm's own Xen-state record, checked, if the image has one
    /// (applied by the VM builder, see the module doc).
    pub xen_state: Option<XenState>,
    /// The guest's CPUID policy (X86_CPUID_POLICY), if the stream has one:
    /// the restored vCPUs get no feature it lacks (`vmm`, via
    /// `arch::x86::cpuid::restrict_to_policy`).
    pub cpuid: Option<Vec<CpuidLeaf>>,
}

/// The image's records are read through a buffer this large; page data
/// is seeked over or read with `pread` (a larger buffer would read ahead
/// into page data only to drop it).
const RECORD_BUF: usize = 64 << 10;

type Reader = BufReader<std::fs::File>;

fn open(path: &Path) -> Result<(std::fs::File, ImageReader<Reader>), RestoreError> {
    // Two opens, not a dup: `SEEK_DATA` on one must not move the other.
    let f = std::fs::File::open(path)
        .and_then(|f| Ok((f, std::fs::File::open(path)?)))
        .map_err(|e| RestoreError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    Ok((
        f.0,
        ImageReader::new(BufReader::with_capacity(RECORD_BUF, f.1)),
    ))
}

/// Moves `src` over a PAGE_DATA record's page data (`pages` pages at the
/// current offset; the record has `nr_pfns` entries), which must end
/// within `file_len` bytes.
fn skip_page_data(
    src: &mut Src<Reader>,
    nr_pfns: usize,
    pages: u64,
    file_len: u64,
) -> Result<(), StreamError> {
    let at = src.offset();
    let len = pages * PAGE_SIZE as u64;
    // The record's header (8 bytes), count and reserved (8), pfns.
    let start = at.saturating_sub(16 + 8 * nr_pfns as u64);
    let what = "record PAGE_DATA";
    if at.saturating_add(len) > file_len {
        return Err(StreamError::Truncated {
            layer: "libxc",
            what: what.into(),
            offset: start,
            have: file_len.saturating_sub(start),
            need: at + len - start,
        });
    }
    let n =
        i64::try_from(len).map_err(|_| StreamError::invalid("libxc", what, start, "too long"))?;
    src.get_mut()
        .seek_relative(n)
        .map_err(|source| StreamError::Io {
            layer: "libxc",
            what: what.into(),
            offset: start,
            source,
        })?;
    src.count(len);
    Ok(())
}

/// Where an image's pages lie, to size the guest and check that every page
/// has a home in xenkvm's layout (`boot::layout`) before anything is
/// written: Xen's special pages have theirs; a page in the MMIO hole (a
/// Xen guest with more than 3 GiB below 4 GiB) has none.
#[derive(Debug, Default)]
struct Extent {
    /// Highest frame below 4 GiB outside the special pages, plus one.
    low_end: u64,
    /// Highest frame from 4 GiB, plus one.
    high_end: u64,
}

impl Extent {
    const HIGH_PFN: u64 = layout::HIGH_RAM_BASE / PAGE_SIZE as u64;

    fn add(&mut self, pfn: u64) {
        if pfn >= Self::HIGH_PFN {
            self.high_end = self.high_end.max(pfn + 1);
        } else if !layout::is_special_pfn(pfn) {
            self.low_end = self.low_end.max(pfn + 1);
        }
    }

    /// MiB of memory that holds every page.
    fn mib(&self) -> u64 {
        let bytes = if self.high_end > 0 {
            layout::LOW_RAM_MAX + (self.high_end - Self::HIGH_PFN) * PAGE_SIZE as u64
        } else {
            self.low_end * PAGE_SIZE as u64
        };
        bytes.div_ceil(1 << 20)
    }

    /// Every page lies in the RAM of a `mib` MiB guest.
    fn check(&self, mib: u64) -> Result<(), String> {
        let ram = layout::ram_ranges(mib << 20);
        let low = ram[0].1 as u64 / PAGE_SIZE as u64;
        let high = ram
            .iter()
            .find(|(a, _)| a.0 == layout::HIGH_RAM_BASE)
            .map_or(Self::HIGH_PFN, |(_, l)| {
                Self::HIGH_PFN + *l as u64 / PAGE_SIZE as u64
            });
        let hole = layout::LOW_RAM_MAX / PAGE_SIZE as u64;
        if self.low_end > hole {
            return Err(format!(
                "PAGE_DATA: pfn {:#x} lies in xenkvm's MMIO hole ({:#x}-{:#x}): RAM below 4 GiB \
                 ends at {} MiB here (a Xen guest with more RAM below 4 GiB cannot be restored yet)",
                self.low_end - 1,
                layout::LOW_RAM_MAX,
                layout::HIGH_RAM_BASE - 1,
                layout::LOW_RAM_MAX >> 20
            ));
        }
        let beyond = if self.low_end > low {
            Some(self.low_end - 1)
        } else if self.high_end > high {
            Some(self.high_end - 1)
        } else {
            None
        };
        match beyond {
            Some(pfn) => Err(format!(
                "PAGE_DATA: pfn {pfn:#x} is beyond the guest's {mib} MiB of memory"
            )),
            None => Ok(()),
        }
    }
}

/// Reads and checks the whole image at `path`.
pub fn load(path: &Path) -> Result<RestoreImage, RestoreError> {
    let p = path.display().to_string();
    let stream = |source| RestoreError::Stream {
        path: p.clone(),
        source,
    };
    let unsupported = |why: String| RestoreError::Unsupported {
        path: p.clone(),
        why,
    };
    let (file, mut r) = open(path)?;
    let file_len = file
        .metadata()
        .map_err(|e| RestoreError::File {
            path: p.clone(),
            why: e.to_string(),
        })?
        .len();
    let mut skip = |pfns: &[(u64, PageType)], src: &mut Src<Reader>| {
        let n = pfns.iter().filter(|(_, t)| t.has_data()).count() as u64;
        skip_page_data(src, pfns.len(), n, file_len)
    };
    let mut config: Option<Vec<u8>> = None;
    let mut blob = None;
    let mut params = Vec::new();
    let mut pages = 0u64;
    let mut extent = Extent::default();
    let mut tsc_khz = 0;
    let mut ended = false;
    let mut xen_state = None;
    let mut cpuid = None;
    while let Some((at, item)) = r.next_item_with(&mut skip).map_err(stream)? {
        match item {
            Item::Xl(x) => config = x.config,
            Item::Libxc(LibxcRecord::PageData(pd)) => {
                for (pfn, t) in &pd.pfns {
                    if t.has_data() {
                        pages += 1;
                        extent.add(*pfn);
                    }
                }
            }
            Item::Libxc(LibxcRecord::HvmContext(b)) => blob = Some(b),
            Item::Libxc(LibxcRecord::HvmParams(ps)) => params = ps,
            Item::Libxc(LibxcRecord::TscInfo(t)) => tsc_khz = t.khz,
            Item::Libxc(LibxcRecord::CpuidPolicy(ls)) => cpuid = Some(ls),
            Item::Libxc(LibxcRecord::MsrPolicy(ms)) => {
                tracing::info!(
                    msrs = ms.len(),
                    "X86_MSR_POLICY not applied (KVM's MSRs stay the host's)"
                )
            }
            Item::Libxc(LibxcRecord::Checkpoint) => {
                return Err(unsupported("a checkpointed (Remus/COLO) stream".into()))
            }
            Item::Libxc(LibxcRecord::Optional { rtype, body })
                if rtype == xenkvm_records::REC_XENKVM_XEN_STATE =>
            {
                let st = xenkvm_records::decode(&body).map_err(|e| {
                    stream(StreamError::invalid(
                        "libxc",
                        "XENKVM_XEN_STATE (optional)",
                        at,
                        e.to_string(),
                    ))
                })?;
                if xen_state.replace(st).is_some() {
                    return Err(unsupported(format!(
                        "libxc record XENKVM_XEN_STATE at offset {at:#x}: a second one"
                    )));
                }
            }
            Item::Libxc(LibxcRecord::Optional { rtype, .. }) => {
                tracing::info!(
                    rtype = format_args!("{rtype:#x}"),
                    "optional libxc record skipped"
                );
            }
            Item::Libxl(l) => tracing::info!(?l, "libxl record not used by xenkvm"),
            Item::End => {
                ended = true;
                break;
            }
            _ => {}
        }
    }
    if !ended {
        return Err(unsupported("the image has no END record".into()));
    }
    let blob = blob.ok_or_else(|| unsupported("the stream has no HVM_CONTEXT record".into()))?;
    let recs = hvm_context::parse(&blob).map_err(stream)?;
    let conv = |source| RestoreError::Convert {
        path: p.clone(),
        source,
    };
    convert::check_unconverted(&recs).map_err(conv)?;
    let nr_vcpus = recs
        .iter()
        .filter_map(|r| match r {
            HvmRecord::Cpu(i, _) => Some(usize::from(*i) + 1),
            _ => None,
        })
        .max()
        .ok_or_else(|| unsupported("HVM_CONTEXT has no CPU record".into()))?;
    let (cfg_name, cfg_vcpus, cfg_kb) = config
        .as_deref()
        .and_then(|c| serde_json::from_slice::<serde_json::Value>(c).ok())
        .map(|v| {
            (
                v["c_info"]["name"].as_str().map(str::to_string),
                v["b_info"]["max_vcpus"].as_u64(),
                v["b_info"]["max_memkb"].as_u64(),
            )
        })
        .unwrap_or_default();
    let nr = cfg_vcpus.map_or(nr_vcpus, |n| (n as usize).max(nr_vcpus));
    if nr > crate::MAX_VCPUS as usize {
        return Err(unsupported(format!(
            "{nr} vCPUs (xenkvm runs at most {})",
            crate::MAX_VCPUS
        )));
    }
    let mut vcpus = Vec::with_capacity(nr);
    for id in 0..nr as u16 {
        if recs
            .iter()
            .any(|r| matches!(r, HvmRecord::Cpu(i, _) if *i == id))
        {
            vcpus.push(Some(
                convert::vcpu_from_records(id, &recs, &EventsExtra::default()).map_err(conv)?,
            ));
        } else {
            vcpus.push(None);
        }
    }
    let irqchip = convert::irqchip_from_records(&recs).map_err(conv)?;
    // Memory: the config's, else enough for the highest page.
    let mem_mib = cfg_kb.map_or(extent.mib(), |kb| kb.div_ceil(1024)).max(16);
    if !(16..=65536).contains(&mem_mib) {
        return Err(unsupported(format!(
            "{mem_mib} MiB of memory (xenkvm runs 16 to 65536)"
        )));
    }
    extent.check(mem_mib).map_err(unsupported)?;
    Ok(RestoreImage {
        name: cfg_name.unwrap_or_default(),
        mem_mib,
        vcpus,
        irqchip,
        params,
        pages,
        tsc_khz,
        xen_state,
        cpuid,
    })
}

/// Reads the image's pages into `map`'s RAM (the image was checked by
/// [`load`]); returns how many pages the image holds. `fresh`: nothing was
/// written to the RAM before (then pages that are zero are left out, see
/// [`super::pagefile`]).
pub fn apply_pages(path: &Path, map: &gpc::MemoryMap, fresh: bool) -> Result<u64, RestoreError> {
    let p = path.display().to_string();
    let (file, mut r) = open(path)?;
    let mut loader = super::pagefile::PageLoader::new(&file, map, fresh);
    let mut n = 0u64;
    let mut frames = Vec::with_capacity(super::stream::libxc::MAX_BATCH);
    let mut pages = |pfns: &[(u64, PageType)], src: &mut Src<Reader>| {
        for (pfn, t) in pfns {
            if *t == PageType::Broken {
                tracing::warn!(pfn, "PAGE_DATA: a BROKEN page is restored as zeroes");
            }
        }
        frames.clear();
        frames.extend(pfns.iter().filter(|(_, t)| t.has_data()).map(|(p, _)| *p));
        let at = src.offset();
        loader.load(at, &frames).map_err(|e| {
            let start = at.saturating_sub(16 + 8 * pfns.len() as u64);
            StreamError::invalid("libxc", "record PAGE_DATA", start, e.to_string())
        })?;
        n += frames.len() as u64;
        skip_page_data(src, pfns.len(), frames.len() as u64, u64::MAX)
    };
    while let Some((_, item)) =
        r.next_item_with(&mut pages)
            .map_err(|source| RestoreError::Stream {
                path: p.clone(),
                source,
            })?
    {
        if item == Item::End {
            break;
        }
    }
    tracing::debug!(
        written = loader.stored,
        left_out = loader.skipped,
        "restore: pages loaded"
    );
    Ok(n)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::migration::convert::tests::{irqchip, long_mode_vcpu};
    use crate::migration::save::{write_image, SaveMeta};
    use crate::migration::xenkvm_records::{ClockState, Runstate, VcpuXenState};
    use crate::GuestMem;

    /// A file removed when dropped.
    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn image(xen_state: Option<XenState>, tag: &str) -> (Tmp, std::path::PathBuf) {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let meta = SaveMeta {
            name: "t".into(),
            mem_mib: 16,
            tsc_khz: 1_000_000,
            system_time_ns: 1_000,
            xen_state,
            cpuid: Vec::new(),
        };
        let path = std::env::temp_dir().join(format!(
            "xenkvm-restore-test-{}-{tag}.img",
            std::process::id()
        ));
        let dir = Tmp(path.clone());
        let f = std::fs::File::create(&path).unwrap();
        write_image(
            f,
            &meta,
            1,
            &[(0, long_mode_vcpu(0))],
            &irqchip(),
            &mem,
            &[],
        )
        .unwrap();
        (dir, path)
    }

    fn state() -> XenState {
        XenState {
            clock: Some(ClockState {
                tsc_khz: 1_000_000,
                system_time_ns: 1_000,
                guest_tsc: 1_000,
            }),
            shared_info_gfn: Some(Some(0xfeff0)),
            vcpus: vec![VcpuXenState {
                id: 0,
                runstate: Runstate {
                    state: 0,
                    state_entry_time: 900,
                    time: [800, 0, 100, 0],
                },
                oneshot_remaining_ns: Some(5_000),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn restore_load_xen_state_record_round_trips_through_an_image() {
        let (_d, path) = image(Some(state()), "rt");
        let img = load(&path).unwrap();
        assert_eq!(img.xen_state, Some(state()));
        let (_d, path) = image(None, "none");
        assert_eq!(load(&path).unwrap().xen_state, None);
    }

    #[test]
    fn restore_extent_special_pages_have_a_home_the_mmio_hole_does_not() {
        let mut e = Extent::default();
        for pfn in [0, 0x3fff, 0xfeffc, 0xfefff] {
            e.add(pfn);
        }
        // The special pages do not make the guest 4 GiB large.
        assert_eq!(e.mib(), 64);
        assert_eq!(e.check(64), Ok(()));
        let err = e.check(32).unwrap_err();
        assert!(
            err.contains("pfn 0x3fff is beyond the guest's 32 MiB"),
            "{err}"
        );
        // A Xen guest whose low RAM reaches into xenkvm's hole (Xen's ends at 0xf0000000).
        e.add(0xeffff);
        let err = e.check(4096).unwrap_err();
        assert!(
            err.contains("pfn 0xeffff lies in xenkvm's MMIO hole"),
            "{err}"
        );
        let mut e = Extent::default();
        e.add(0x10_0000 + 255);
        assert_eq!(e.mib(), (layout::LOW_RAM_MAX >> 20) + 1);
        assert_eq!(e.check(e.mib()), Ok(()));
        assert!(e.check(e.mib() - 1).unwrap_err().contains("pfn 0x1000ff"));
    }

    #[test]
    fn restore_load_image_with_xen_special_pages_sizes_the_guest_by_its_ram() {
        let mem = GuestMem::from_ranges(&layout::ram_ranges(16 << 20)).unwrap();
        mem.write_obj(
            0xabu8,
            GuestAddress(layout::special_page(layout::special::XENSTORE)),
        )
        .unwrap();
        mem.write_obj(0xcdu8, GuestAddress((16 << 20) - 4096))
            .unwrap();
        let meta = SaveMeta {
            name: String::new(),
            mem_mib: 16,
            tsc_khz: 1_000_000,
            system_time_ns: 1_000,
            xen_state: None,
            cpuid: vec![CpuidLeaf {
                leaf: 1,
                subleaf: u32::MAX,
                regs: [0x806f8, 0x800, 0xfeda3203, 0x178bfbff],
            }],
        };
        let path = std::env::temp_dir().join(format!(
            "xenkvm-restore-test-{}-special.img",
            std::process::id()
        ));
        let _d = Tmp(path.clone());
        let f = std::fs::File::create(&path).unwrap();
        let store = layout::special_page(layout::special::XENSTORE) >> 12;
        write_image(
            f,
            &meta,
            1,
            &[(0, long_mode_vcpu(0))],
            &irqchip(),
            &mem,
            &[(1, store)],
        )
        .unwrap();
        let img = load(&path).unwrap();
        assert_eq!(img.mem_mib, 16);
        assert_eq!(img.params, vec![(1, 0xfeffc)]);
        assert_eq!(img.cpuid.as_deref(), Some(&meta.cpuid[..]));
        let map = gpc::MemoryMap::new(
            &layout::ram_ranges(16 << 20)
                .into_iter()
                .map(|(a, l)| (a, l as u64))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        apply_pages(&path, &map, true).unwrap();
        let got: u8 = map
            .guest_memory()
            .read_obj(GuestAddress(store << 12))
            .unwrap();
        assert_eq!(got, 0xab);
    }

    #[test]
    fn restore_load_corrupt_xen_state_refused_naming_the_record() {
        let (_d, path) = image(Some(state()), "bad");
        let mut b = std::fs::read(&path).unwrap();
        let at = b
            .windows(8)
            .position(|w| w == crate::migration::xenkvm_records::MAGIC)
            .unwrap();
        b[at + 8] = 2; // version 2
        std::fs::write(&path, &b).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("XENKVM_XEN_STATE"), "{e}");
        assert!(e.contains("version 2"), "{e}");
    }
}
