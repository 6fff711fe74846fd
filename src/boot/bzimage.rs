//! Booting a Linux bzImage by PVH: the compressed payload of a bzImage holds
//! the kernel's ELF (`vmlinux`), which carries the Xen PVH entry note. Booting
//! that ELF directly skips the in-guest decompressor, which takes about 90 s
//! on this project's KVM. The payload location comes from the x86 boot
//! protocol's setup header (`payload_offset`, `payload_length`, protocol
//! 2.08+); LZ4 (the Debian kernels' choice, legacy frame format) is
//! decompressed with lz4_flex. Other compressions are refused by name.

use std::io::Read;

/// Largest kernel ELF we are willing to decompress.
const MAX_ELF: usize = 512 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BzImageError {
    #[error("not a bzImage (no \"HdrS\" setup header)")]
    NotBzImage,
    #[error("the bzImage uses boot protocol {0:#x}; payload extraction needs 2.08 or later")]
    OldProtocol(u16),
    #[error("the bzImage's payload ({offset:#x} + {len:#x}) lies outside the file")]
    PayloadOutside { offset: usize, len: usize },
    #[error("the bzImage payload is {0}-compressed; xenkvm can extract only LZ4 so far (boot the decompressed vmlinux instead)")]
    Unsupported(&'static str),
    #[error("the LZ4 payload is corrupt: {0}")]
    Corrupt(String),
    #[error("the decompressed kernel is larger than {} MiB", MAX_ELF >> 20)]
    TooLarge,
}

/// True if `image` starts like a bzImage.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.get(0x202..0x206) == Some(b"HdrS")
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The compressed payload of a bzImage.
pub fn payload(image: &[u8]) -> Result<&[u8], BzImageError> {
    if !is_bzimage(image) {
        return Err(BzImageError::NotBzImage);
    }
    let version = u16_at(image, 0x206).ok_or(BzImageError::NotBzImage)?;
    if version < 0x208 {
        return Err(BzImageError::OldProtocol(version));
    }
    let setup_sects = match image.get(0x1f1).copied().ok_or(BzImageError::NotBzImage)? {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = u32_at(image, 0x248).ok_or(BzImageError::NotBzImage)? as usize;
    let len = u32_at(image, 0x24c).ok_or(BzImageError::NotBzImage)? as usize;
    let start = pm_start.checked_add(offset);
    start
        .and_then(|s| s.checked_add(len).map(|e| (s, e)))
        .and_then(|(s, e)| image.get(s..e))
        .ok_or(BzImageError::PayloadOutside {
            offset: pm_start + offset,
            len,
        })
}

/// Extracts the kernel ELF from a bzImage.
pub fn extract_elf(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let p = payload(image)?;
    match p {
        [0x02, 0x21, 0x4c, 0x18, ..] => decompress_lz4_legacy(p),
        [0x1f, 0x8b, ..] => Err(BzImageError::Unsupported("gzip")),
        [0xfd, b'7', b'z', b'X', b'Z', ..] => Err(BzImageError::Unsupported("xz")),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Err(BzImageError::Unsupported("zstd")),
        [b'B', b'Z', b'h', ..] => Err(BzImageError::Unsupported("bzip2")),
        [0x89, b'L', b'Z', b'O', ..] => Err(BzImageError::Unsupported("lzo")),
        _ => Err(BzImageError::Unsupported("an unknown format")),
    }
}

/// The kernel build appends the uncompressed size (LE u32) after the LZ4
/// legacy stream; it is used to check the result.
fn decompress_lz4_legacy(p: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let (stream, size) = match p.len().checked_sub(4) {
        Some(n) => (&p[..n], u32_at(p, n).map(|v| v as usize)),
        None => {
            return Err(BzImageError::Corrupt(
                "payload shorter than its size trailer".into(),
            ))
        }
    };
    let mut out = Vec::new();
    let mut dec = lz4_flex::frame::FrameDecoder::new(stream).take(MAX_ELF as u64 + 1);
    dec.read_to_end(&mut out)
        .map_err(|e| BzImageError::Corrupt(e.to_string()))?;
    if out.len() > MAX_ELF {
        return Err(BzImageError::TooLarge);
    }
    if size.is_some_and(|s| s != out.len()) {
        return Err(BzImageError::Corrupt(format!(
            "decompressed {} bytes, the size trailer says {}",
            out.len(),
            size.unwrap_or(0)
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LZ4 legacy stream as the kernel build writes it: magic, then
    /// size-prefixed blocks of at most 8 MiB, then the uncompressed size.
    fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = 0x184c_2102u32.to_le_bytes().to_vec();
        for chunk in data.chunks(8 << 20) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// A bzImage-shaped file: setup header with 4 setup sectors, payload
    /// right after the protected-mode start.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 5 * 512];
        f[0x1f1] = 4;
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        f[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes());
        f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        f.resize(5 * 512 + 0x40, 0);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn extract_elf_lz4_payload_round_trips() {
        let elf = crate::boot::build_pvh_elf32(0x100000, 0x100000, &[0x90; 3000], 16);
        let img = bzimage(&lz4_legacy(&elf));
        assert!(is_bzimage(&img));
        assert_eq!(extract_elf(&img).unwrap(), elf);
    }

    #[test]
    fn extract_elf_other_compressions_refused_by_name() {
        let img = bzimage(&[0x1f, 0x8b, 8, 0, 0, 0]);
        assert_eq!(extract_elf(&img), Err(BzImageError::Unsupported("gzip")));
        let img = bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 0]);
        assert_eq!(extract_elf(&img), Err(BzImageError::Unsupported("zstd")));
    }

    #[test]
    fn extract_elf_corrupt_or_truncated_input_refused_without_panic() {
        let elf = crate::boot::build_pvh_elf32(0x100000, 0x100000, &[7; 5000], 0);
        // The legacy format has no checksum: a flipped data byte may decode
        // to wrong bytes of the right length, but must never panic.
        let mut z = lz4_legacy(&elf);
        let n = z.len();
        z[n / 2] ^= 0xff;
        let _ = extract_elf(&bzimage(&z));
        // A block size beyond the data, or a size trailer that disagrees, is refused.
        let mut z = lz4_legacy(&elf);
        z[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(extract_elf(&bzimage(&z)).is_err());
        let mut z = lz4_legacy(&elf);
        let n = z.len();
        z[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            extract_elf(&bzimage(&z)),
            Err(BzImageError::Corrupt(_))
        ));
        let mut img = bzimage(&lz4_legacy(&elf));
        img.truncate(img.len() - 10);
        assert!(matches!(
            extract_elf(&img),
            Err(BzImageError::PayloadOutside { .. })
        ));
        assert_eq!(extract_elf(&[0u8; 100]), Err(BzImageError::NotBzImage));
    }
}
