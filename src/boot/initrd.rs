//! The initrd as the guest receives it: a gzip-compressed initramfs is
//! inflated here, on the host, so the guest kernel finds a plain `newc` cpio
//! archive and skips its own gunzip.
//!
//! Why: on a host whose KVM runs guest kernel code in its instruction
//! emulator (this project's, see the README's host notes), `inflate_fast`
//! was 16 % of the Debian kernel's instructions while it unpacked its 1.1 MB
//! initramfs; inflating on the host takes milliseconds. On an ordinary
//! VMX/SVM host it saves the guest the same work at native speed. (The
//! unpack phase as a whole, which also creates the files and runs beside
//! other initcalls, took 452 s of guest time with this against 502 s
//! without in two loaded boots: not a clean comparison.) Linux's initramfs unpacker
//! takes an uncompressed cpio archive as it takes a compressed one
//! (`init/initramfs.c`: a buffer that starts with `070701` is cpio,
//! anything else goes to the decompressors), so the guest ends up with the
//! same root filesystem.
//!
//! What is inflated: one or more gzip members back to back (optionally
//! followed by zero padding) whose output is a `newc` cpio archive. Anything
//! else (an uncompressed initrd, an early-microcode cpio followed by a
//! compressed one, other compressions, a gzip-compressed disk image for
//! `/dev/ram0`) is passed on unchanged, with the reason, so nothing a guest
//! could unpack itself is lost. The gzip decoding is flate2's (pure-Rust
//! miniz_oxide backend).

use std::io::Read;

/// What [`inflate`] did with an initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Gzip members inflated to a cpio archive of `to` bytes.
    Inflated {
        from: usize,
        to: usize,
        members: usize,
    },
    /// Passed on as it was, and why.
    Unchanged(&'static str),
}

/// The gzip magic and the deflate method byte.
const GZIP: [u8; 3] = [0x1f, 0x8b, 0x08];

/// `initrd` as the guest should get it: inflated when it is gzip-compressed
/// cpio and the result stays within `limit` bytes, else unchanged.
pub fn inflate(initrd: Vec<u8>, limit: usize) -> (Vec<u8>, Outcome) {
    if !initrd.starts_with(&GZIP) {
        return (initrd, Outcome::Unchanged("not gzip-compressed"));
    }
    match inflate_members(&initrd, limit) {
        Ok((out, members)) if out.starts_with(b"07070") => {
            let outcome = Outcome::Inflated {
                from: initrd.len(),
                to: out.len(),
                members,
            };
            (out, outcome)
        }
        Ok(_) => (
            initrd,
            Outcome::Unchanged("its gzip content is not a cpio archive"),
        ),
        Err(why) => (initrd, Outcome::Unchanged(why)),
    }
}

/// The concatenated output of the gzip members of `data` and their count.
fn inflate_members(data: &[u8], limit: usize) -> Result<(Vec<u8>, usize), &'static str> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut members = 0;
    loop {
        let mut dec = flate2::bufread::GzDecoder::new(rest);
        let room = (limit - out.len()) as u64;
        let n = (&mut dec)
            .take(room.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|_| "its gzip data is corrupt")?;
        if n as u64 > room {
            return Err("it inflates to more than fits in the guest's RAM");
        }
        members += 1;
        rest = dec.into_inner();
        if rest.iter().all(|&b| b == 0) {
            return Ok((out, members));
        }
        if !rest.starts_with(&GZIP) {
            return Err("its gzip data is followed by data that is not gzip");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A newc cpio archive with one file `init` and the trailer.
    fn cpio(body: &[u8]) -> Vec<u8> {
        fn entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
            let hdr = format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                1, mode, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
            );
            out.extend_from_slice(hdr.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        }
        let mut out = Vec::new();
        entry(&mut out, "init", 0o100755, body);
        entry(&mut out, "TRAILER!!!", 0, &[]);
        out
    }

    #[test]
    fn gzip_cpio_is_inflated_to_the_same_bytes() {
        let archive = cpio(&b"#!/bin/sh\necho hello\n".repeat(1000));
        let (out, how) = inflate(gz(&archive), 1 << 20);
        assert_eq!(out, archive);
        assert!(matches!(how, Outcome::Inflated { to, members: 1, .. } if to == archive.len()));
    }

    #[test]
    fn concatenated_members_and_zero_padding_are_inflated() {
        let (a, b) = (cpio(b"first"), cpio(b"second"));
        let mut img = gz(&a);
        img.extend(gz(&b));
        img.extend([0u8; 512]);
        let (out, how) = inflate(img, 1 << 20);
        assert_eq!(out, [a, b].concat());
        assert!(matches!(how, Outcome::Inflated { members: 2, .. }));
    }

    #[test]
    fn everything_else_is_passed_on_unchanged() {
        let archive = cpio(b"x");
        // Uncompressed cpio.
        let (out, how) = inflate(archive.clone(), 1 << 20);
        assert_eq!(
            (out, how),
            (archive.clone(), Outcome::Unchanged("not gzip-compressed"))
        );
        // Gzip, then an uncompressed cpio (what the guest could still unpack).
        let mut mixed = gz(&archive);
        mixed.extend(&archive);
        let (out, how) = inflate(mixed.clone(), 1 << 20);
        assert_eq!(out, mixed);
        assert!(matches!(how, Outcome::Unchanged(_)));
        // A gzip-compressed disk image, not cpio.
        let image = gz(&[0x53u8; 4096]);
        let (out, how) = inflate(image.clone(), 1 << 20);
        assert_eq!(out, image);
        assert!(matches!(how, Outcome::Unchanged(_)));
        // Corrupt deflate data.
        let mut bad = gz(&archive);
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        bad[mid + 1] ^= 0x55;
        let (out, how) = inflate(bad.clone(), 1 << 20);
        assert_eq!(out, bad);
        assert!(matches!(how, Outcome::Unchanged(_)));
        // Inflates to more than the limit.
        let big = gz(&cpio(&vec![7u8; 64 << 10]));
        let (out, how) = inflate(big.clone(), 16 << 10);
        assert_eq!(out, big);
        assert_eq!(
            how,
            Outcome::Unchanged("it inflates to more than fits in the guest's RAM")
        );
    }

    #[test]
    fn truncated_gzip_never_panics() {
        let img = gz(&cpio(&[1u8; 9000]));
        for cut in 0..img.len() {
            let (out, _) = inflate(img[..cut].to_vec(), 1 << 20);
            assert!(out.len() <= 1 << 20);
        }
    }
}
