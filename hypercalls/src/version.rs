//! `xen_version`: every sub-op of Xen 4.17 as an HVM domU under the default (dummy) XSM
//! policy sees it.
//!
//! Strings are built in zeroed buffers of the ABI size and copied out whole, so no byte beyond
//! the NUL terminator carries anything but zero (XSA-122). `commandline` is privileged: a domU
//! gets Xen's `"<denied>"` (9 bytes copied, as Xen does), and `build_id` is `-EPERM`.

use crate::abi::{self, xenfeat, xenver};
use crate::domain::{Ctx, Domain};
use crate::errno::Errno;
use crate::types::GuestWidth;

/// Xen 4.17, the version the CPUID leaves report.
const MAJOR: i64 = 4;
const MINOR: i64 = 17;
const EXTRAVERSION: &str = ".0-xenkvm";
const COMPILER: &str = "rustc";
const COMPILE_BY: &str = "xenkvm";
const COMPILE_DOMAIN: &str = "xenkvm";
const COMPILE_DATE: &str = concat!("xenkvm ", env!("CARGO_PKG_VERSION"));
/// `arch_get_xen_caps` on a Xen without PV guests, trailing space included.
const CAPABILITIES: &str = "hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64 ";
const CHANGESET: &str = concat!("xenkvm ", env!("CARGO_PKG_VERSION"));

/// A zeroed `N`-byte buffer holding `s` (truncated to leave a NUL, as `safe_strcpy`).
fn cstr<const N: usize>(s: &str) -> [u8; N] {
    let mut b = [0u8; N];
    let n = s.len().min(N - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

/// `XENVER_get_features` submap 0 for an HVM domU: what Xen 4.17's `do_xen_version` reports
/// for a translated, non-PV, non-hardware domain without PIRQs.
pub(crate) fn features_submap0() -> u32 {
    (1 << xenfeat::MEMORY_OP_VNODE_SUPPORTED)
        | (1 << xenfeat::WRITABLE_PAGE_TABLES)
        | (1 << xenfeat::AUTO_TRANSLATED_PHYSMAP)
        | (1 << xenfeat::HVM_SAFE_PVCLOCK)
        | (1 << xenfeat::HVM_CALLBACK_VECTOR)
        | (1 << xenfeat::NOT_DIRECT_MAPPED)
}

impl Domain {
    /// `do_xen_version` / `compat_xen_version`.
    pub(crate) fn xen_version(&self, ctx: &Ctx, cmd: i32, arg: u64) -> Result<i64, Errno> {
        let g = &ctx.g;
        match cmd {
            xenver::VERSION => Ok((MAJOR << 16) | MINOR),
            xenver::EXTRAVERSION => {
                g.write(arg, &cstr::<{ xenver::EXTRAVERSION_LEN }>(EXTRAVERSION))?;
                Ok(0)
            }
            xenver::COMPILE_INFO => {
                let mut b = [0u8; xenver::COMPILE_INFO_LEN];
                b[..64].copy_from_slice(&cstr::<64>(COMPILER));
                b[64..80].copy_from_slice(&cstr::<16>(COMPILE_BY));
                b[80..112].copy_from_slice(&cstr::<32>(COMPILE_DOMAIN));
                b[112..144].copy_from_slice(&cstr::<32>(COMPILE_DATE));
                g.write(arg, &b)?;
                Ok(0)
            }
            xenver::CAPABILITIES => {
                g.write(arg, &cstr::<{ xenver::CAPABILITIES_LEN }>(CAPABILITIES))?;
                Ok(0)
            }
            xenver::CHANGESET => {
                g.write(arg, &cstr::<{ xenver::CHANGESET_LEN }>(CHANGESET))?;
                Ok(0)
            }
            xenver::PLATFORM_PARAMETERS => {
                match g.width() {
                    GuestWidth::Bits64 => {
                        g.write(arg, &xenver::HYPERVISOR_VIRT_START_64.to_le_bytes())?
                    }
                    GuestWidth::Bits32 => {
                        g.write(arg, &xenver::HYPERVISOR_VIRT_START_COMPAT.to_le_bytes())?
                    }
                }
                Ok(0)
            }
            xenver::GET_FEATURES => {
                let mut b: [u8; xenver::FEATURE_INFO_LEN] = g.read_arr(arg)?;
                if abi::get_u32(&b, 0) != 0 {
                    return Err(Errno::EINVAL);
                }
                abi::put_u32(&mut b, 4, features_submap0());
                g.write(arg, &b)?;
                Ok(0)
            }
            xenver::PAGESIZE => {
                if arg != 0 {
                    Err(Errno::EINVAL)
                } else {
                    Ok(abi::PAGE_SIZE as i64)
                }
            }
            xenver::GUEST_HANDLE => {
                g.write(arg, &self.cfg.handle)?;
                Ok(0)
            }
            xenver::COMMANDLINE => {
                g.write(arg, xenver::DENIED)?;
                Ok(0)
            }
            xenver::BUILD_ID => Err(Errno::EPERM),
            _ => Err(Errno::ENOSYS),
        }
    }
}
