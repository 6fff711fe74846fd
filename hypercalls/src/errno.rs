//! Xen error numbers (`xen/include/public/errno.h`, via `xen_abi::errno`), the values
//! hypercalls return negated.
//!
//! Internal failures are mapped to an [`Errno`] where they happen; [`Errno::ret`] is the single
//! place that turns one into the guest's RAX value.

use std::fmt;

/// A positive Xen errno value; the guest sees its negation in RAX.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(xen_abi::errno::EPERM as i32);
    pub const ENOENT: Errno = Errno(xen_abi::errno::ENOENT as i32);
    pub const ESRCH: Errno = Errno(xen_abi::errno::ESRCH as i32);
    pub const EIO: Errno = Errno(xen_abi::errno::EIO as i32);
    pub const ENXIO: Errno = Errno(xen_abi::errno::ENXIO as i32);
    pub const E2BIG: Errno = Errno(xen_abi::errno::E2BIG as i32);
    pub const EAGAIN: Errno = Errno(xen_abi::errno::EAGAIN as i32);
    pub const ENOMEM: Errno = Errno(xen_abi::errno::ENOMEM as i32);
    pub const EACCES: Errno = Errno(xen_abi::errno::EACCES as i32);
    pub const EFAULT: Errno = Errno(xen_abi::errno::EFAULT as i32);
    pub const EBUSY: Errno = Errno(xen_abi::errno::EBUSY as i32);
    pub const EEXIST: Errno = Errno(xen_abi::errno::EEXIST as i32);
    pub const EXDEV: Errno = Errno(xen_abi::errno::EXDEV as i32);
    pub const ENODEV: Errno = Errno(xen_abi::errno::ENODEV as i32);
    pub const EINVAL: Errno = Errno(xen_abi::errno::EINVAL as i32);
    pub const ENOSPC: Errno = Errno(xen_abi::errno::ENOSPC as i32);
    pub const EDOM: Errno = Errno(xen_abi::errno::EDOM as i32);
    pub const ERANGE: Errno = Errno(xen_abi::errno::ERANGE as i32);
    pub const ENOSYS: Errno = Errno(xen_abi::errno::ENOSYS as i32);
    pub const ETIME: Errno = Errno(xen_abi::errno::ETIME as i32);
    pub const EOVERFLOW: Errno = Errno(xen_abi::errno::EOVERFLOW as i32);
    pub const EILSEQ: Errno = Errno(xen_abi::errno::EILSEQ as i32);
    pub const EOPNOTSUPP: Errno = Errno(xen_abi::errno::EOPNOTSUPP as i32);
    pub const ENOBUFS: Errno = Errno(xen_abi::errno::ENOBUFS as i32);

    /// The value a failing hypercall leaves in RAX.
    pub fn ret(self) -> i64 {
        -i64::from(self.0)
    }

    fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            3 => "ESRCH",
            5 => "EIO",
            6 => "ENXIO",
            7 => "E2BIG",
            11 => "EAGAIN",
            12 => "ENOMEM",
            13 => "EACCES",
            14 => "EFAULT",
            16 => "EBUSY",
            17 => "EEXIST",
            18 => "EXDEV",
            19 => "ENODEV",
            22 => "EINVAL",
            28 => "ENOSPC",
            33 => "EDOM",
            34 => "ERANGE",
            38 => "ENOSYS",
            62 => "ETIME",
            75 => "EOVERFLOW",
            84 => "EILSEQ",
            95 => "EOPNOTSUPP",
            105 => "ENOBUFS",
            _ => return None,
        })
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
