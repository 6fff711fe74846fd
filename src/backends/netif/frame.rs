//! What a backend reads of a frame's headers: where the L4 header starts
//! and which protocol it is (to turn netif's `csum_blank` and GSO into a
//! `virtio_net_hdr` for the TAP, whose `csum_start`/`csum_offset`/`hdr_len`
//! netif does not carry), the Internet checksum to fill in a blank one in
//! software, and the `virtio_net_hdr` itself (the 12-byte form with
//! `num_buffers`, as set with `TUNSETVNETHDRSZ`). Frames are guest- or
//! host-controlled: every read is bounds-checked.

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const VNET_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_*`.
pub const VNET_GSO_NONE: u8 = 0;
pub const VNET_GSO_TCPV4: u8 = 1;
pub const VNET_GSO_UDP: u8 = 3;
pub const VNET_GSO_TCPV6: u8 = 4;
pub const VNET_GSO_ECN: u8 = 0x80;
/// Bytes of the header as the TAP is set up (`virtio_net_hdr_mrg_rxbuf`).
pub const VNET_HDR_LEN: usize = 12;

/// `struct virtio_net_hdr_mrg_rxbuf` (little-endian, as a TAP with
/// `TUNSETVNETLE` or on a little-endian host uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..10)?;
        let u = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }
}

/// IP protocol numbers.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Where a frame's L4 header is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4Info {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the L4 header.
    pub l4: usize,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Bytes of the TCP header (with options); 8 for UDP.
    pub l4_len: usize,
    /// Offset of the checksum field within the L4 header.
    pub csum_offset: usize,
}

/// Finds the TCP or UDP header of an Ethernet frame (one 802.1Q tag at
/// most; IPv6 extension headers hop-by-hop, routing, destination options
/// skipped; IPv4 fragments other than the first refused). `None` for
/// anything else or a truncated header.
pub fn l4_offsets(f: &[u8]) -> Option<L4Info> {
    let be16 = |o: usize| -> Option<u16> { Some(u16::from_be_bytes([*f.get(o)?, *f.get(o + 1)?])) };
    let mut l3 = 14;
    let mut ethertype = be16(12)?;
    if ethertype == 0x8100 {
        ethertype = be16(16)?;
        l3 = 18;
    }
    let (v6, mut proto, mut l4) = match ethertype {
        0x0800 => {
            let vihl = *f.get(l3)?;
            let ihl = usize::from(vihl & 0xf) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            let frag = be16(l3 + 6)?;
            if frag & 0x1fff != 0 {
                return None;
            }
            (false, *f.get(l3 + 9)?, l3 + ihl)
        }
        0x86dd => {
            if *f.get(l3)? >> 4 != 6 {
                return None;
            }
            (true, *f.get(l3 + 6)?, l3 + 40)
        }
        _ => return None,
    };
    if v6 {
        // At most a few extension headers.
        for _ in 0..4 {
            match proto {
                0 | 43 | 60 => {
                    let next = *f.get(l4)?;
                    let len = (usize::from(*f.get(l4 + 1)?) + 1) * 8;
                    proto = next;
                    l4 += len;
                }
                _ => break,
            }
        }
    }
    let (l4_len, csum_offset) = match proto {
        IPPROTO_TCP => {
            let doff = usize::from(*f.get(l4 + 12)? >> 4) * 4;
            if doff < 20 {
                return None;
            }
            (doff, 16)
        }
        IPPROTO_UDP => (8, 6),
        _ => return None,
    };
    if f.len() < l4 + l4_len {
        return None;
    }
    Some(L4Info {
        v6,
        l3,
        l4,
        proto,
        l4_len,
        csum_offset,
    })
}

/// One's-complement sum of `data` added to `sum` (not folded).
pub fn csum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u64::from(*b) << 8;
    }
    sum
}

/// Folds a sum to the 16-bit complement checksum.
pub fn csum_fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Fills in the TCP or UDP checksum of a whole (not segmented) frame, as
/// the sender left it blank: pseudo-header plus L4 header and payload
/// (the L4 length from the IP header, clamped to the frame). False if the
/// frame is not TCP/UDP over IP or is truncated.
pub fn checksum_fill(f: &mut [u8]) -> bool {
    let Some(i) = l4_offsets(f) else {
        return false;
    };
    let be16 = |f: &[u8], o: usize| u16::from_be_bytes([f[o], f[o + 1]]) as usize;
    let end = if i.v6 {
        i.l3 + 40 + be16(f, i.l3 + 4)
    } else {
        i.l3 + be16(f, i.l3 + 2)
    };
    if end > f.len() || end < i.l4 + i.l4_len {
        return false;
    }
    let l4_len = end - i.l4;
    let mut sum = if i.v6 {
        csum_add(0, &f[i.l3 + 8..i.l3 + 40])
    } else {
        csum_add(0, &f[i.l3 + 12..i.l3 + 20])
    };
    sum += u64::from(i.proto) + l4_len as u64;
    let at = i.l4 + i.csum_offset;
    f[at] = 0;
    f[at + 1] = 0;
    sum = csum_add(sum, &f[i.l4..end]);
    let mut c = csum_fold(sum);
    if c == 0 && i.proto == IPPROTO_UDP {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// True if the TCP/UDP checksum of a whole frame verifies (tests).
pub fn checksum_ok(f: &[u8]) -> bool {
    let mut c = f.to_vec();
    let Some(i) = l4_offsets(f) else {
        return false;
    };
    let at = i.l4 + i.csum_offset;
    checksum_fill(&mut c) && c[at..at + 2] == f[at..at + 2]
}
