//! A TAP device for the network backend: `/dev/net/tun` opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (each frame read or written starts
//! with a 12-byte `virtio_net_hdr_mrg_rxbuf`, `TUNSETVNETHDRSZ`), the
//! offloads the reader accepts (`TUNSETOFFLOAD`: checksum, TSO4, TSO6),
//! its MAC, MTU, link up, and optionally a port of a host bridge
//! (`SIOCBRADDIF`). Non-blocking: reads return `WouldBlock` when empty.
//!
//! The ioctls are this file's `unsafe`, each with its `// SAFETY:`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `TUN_F_*` for [`Tap::set_offload`].
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Bytes of the vnet header every frame carries.
pub const VNET_HDR_LEN: usize = 12;

const IFF_UP: u16 = 0x1;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_TUN_EXCL: u16 = 0x8000;
const IFF_ATTACH_QUEUE: u16 = 0x0200;
const IFF_DETACH_QUEUE: u16 = 0x0400;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFMTU: libc::c_ulong = 0x8922;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const ARPHRD_ETHER: u16 = 1;
const IFNAMSIZ: usize = 16;

/// `struct ifreq`: the name, then a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?} is not 1 to 15 bytes"),
            ));
        }
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }
    fn name(&self) -> String {
        let n = self.name.iter().position(|&c| c == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..n]).into_owned()
    }
}

/// `ioctl(fd, req, &mut ifr)` or `ioctl(fd, req, arg)`.
fn ioctl_ifreq(fd: BorrowedFd<'_>, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a live, writable `struct ifreq` (40 bytes, the
    // layout every ifreq ioctl used here reads and writes) for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ifr as *mut IfReq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong, v: &mut libc::c_int) -> io::Result<()> {
    // SAFETY: `v` is a live int, what TUNSETVNETHDRSZ reads.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, v as *mut libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: BorrowedFd<'_>, req: libc::c_ulong, v: libc::c_ulong) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
    // passed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, v) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A datagram socket for the interface ioctls.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned by the OwnedFd at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the TAP called `name`, with vnet headers
    /// and checksum offload only (add TSO with [`Tap::set_offload`] once the
    /// reader accepts it).
    pub fn open(name: &str) -> io::Result<Tap> {
        Self::open_queue(name, false, false)
    }

    /// Creates the TAP called `name` with `n` queues (`IFF_MULTI_QUEUE`
    /// when `n > 1`): the kernel spreads received frames over the attached
    /// queues by flow. The device must not exist yet (`IFF_TUN_EXCL`: no
    /// attaching to another VM's TAP of the same name).
    pub fn open_queues(name: &str, n: usize) -> io::Result<Vec<Tap>> {
        let mut v: Vec<Tap> = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let t = match v.first() {
                None => Self::open_queue(name, n > 1, true).map_err(|e| {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        io::Error::new(
                            e.kind(),
                            format!("{e}: an interface of that name exists already"),
                        )
                    } else {
                        e
                    }
                })?,
                Some(first) => Self::open_queue(first.name(), n > 1, false)?,
            };
            v.push(t);
        }
        Ok(v)
    }

    fn open_queue(name: &str, multi: bool, excl: bool) -> io::Result<Tap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut ifr = IfReq::new(name)?;
        let mut flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        if multi {
            flags |= IFF_MULTI_QUEUE;
        }
        if excl {
            flags |= IFF_TUN_EXCL;
        }
        ifr.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl_ifreq(file.as_fd(), libc::TUNSETIFF as _, &mut ifr)?;
        let mut sz = VNET_HDR_LEN as libc::c_int;
        ioctl_int(file.as_fd(), libc::TUNSETVNETHDRSZ as _, &mut sz)?;
        let tap = Tap {
            name: ifr.name(),
            file,
        };
        tap.set_offload(TUN_F_CSUM)?;
        Ok(tap)
    }

    /// The interface's name (the kernel's, if it filled in a pattern).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads the reader accepts (`TUN_F_*`): frames read may then
    /// carry a partial checksum or be TSO segments.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        ioctl_val(
            self.file.as_fd(),
            libc::TUNSETOFFLOAD as _,
            libc::c_ulong::from(flags),
        )
    }

    /// Attaches this queue to the device (it receives frames) or detaches
    /// it (`TUNSETQUEUE`; only for queues of a multi-queue TAP).
    pub fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        let mut ifr = IfReq::new(&self.name)?;
        let f = if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        ifr.data[..2].copy_from_slice(&f.to_ne_bytes());
        match ioctl_ifreq(self.file.as_fd(), TUNSETQUEUE, &mut ifr) {
            // Already in that state.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r,
        }
    }

    /// Sets the interface's MAC address.
    pub fn set_mac(&self, mac: [u8; 6]) -> io::Result<()> {
        let s = ctl_socket()?;
        let mut ifr = IfReq::new(&self.name)?;
        ifr.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        ifr.data[2..8].copy_from_slice(&mac);
        ioctl_ifreq(s.as_fd(), SIOCSIFHWADDR, &mut ifr)
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let s = ctl_socket()?;
        let mut ifr = IfReq::new(&self.name)?;
        ifr.data[..4].copy_from_slice(&(mtu as i32).to_ne_bytes());
        ioctl_ifreq(s.as_fd(), SIOCSIFMTU, &mut ifr)
    }

    /// Brings the link up.
    pub fn up(&self) -> io::Result<()> {
        let s = ctl_socket()?;
        let mut ifr = IfReq::new(&self.name)?;
        ioctl_ifreq(s.as_fd(), SIOCGIFFLAGS, &mut ifr)?;
        let f = u16::from_ne_bytes([ifr.data[0], ifr.data[1]]) | IFF_UP;
        ifr.data[..2].copy_from_slice(&f.to_ne_bytes());
        ioctl_ifreq(s.as_fd(), SIOCSIFFLAGS, &mut ifr)
    }

    /// Makes the interface a port of host bridge `bridge`.
    pub fn attach_bridge(&self, bridge: &str) -> io::Result<()> {
        let s = ctl_socket()?;
        let mut ifr = IfReq::new(&self.name)?;
        ioctl_ifreq(s.as_fd(), SIOCGIFINDEX, &mut ifr)?;
        let index = i32::from_ne_bytes([ifr.data[0], ifr.data[1], ifr.data[2], ifr.data[3]]);
        let mut br = IfReq::new(bridge)?;
        br.data[..4].copy_from_slice(&index.to_ne_bytes());
        ioctl_ifreq(s.as_fd(), SIOCBRADDIF, &mut br)
    }

    /// Reads one frame (vnet header first) into `buf`; `WouldBlock` if
    /// none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Sleeps until `kick` (an eventfd) or `other` is readable, or
/// `timeout_ms` passed.
pub fn wait_readable(
    kick: &vmm_sys_util::eventfd::EventFd,
    other: Option<BorrowedFd<'_>>,
    timeout_ms: i32,
) -> io::Result<usize> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    // SAFETY: `kick` is borrowed for the whole call, so its descriptor
    // stays open while the BorrowedFd (which does not outlive this
    // function) refers to it.
    let kfd = unsafe { BorrowedFd::borrow_raw(kick.as_raw_fd()) };
    let mut fds = vec![PollFd::new(&kfd, PollFlags::IN)];
    if let Some(o) = &other {
        fds.push(PollFd::new(o, PollFlags::IN));
    }
    let t = Timespec {
        tv_sec: i64::from(timeout_ms / 1000),
        tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
    };
    poll(&mut fds, Some(&t)).map_err(io::Error::from)
}
