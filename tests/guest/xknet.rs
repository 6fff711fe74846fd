//! `xknet`: the Linux guest's side of the 100 MiB TCP test in `tests/linux.rs`
//! (issue 11). The shared initramfs has only busybox, whose `nc` moves 1 KiB
//! per system call and whose `sha256sum` reads a file again: on this host,
//! where the guest's kernel code is emulated and pays per byte it copies, a
//! checksum of 100 MiB received into a file costs as much again as the
//! transfer. This program copies each byte across the kernel once and hashes
//! it in user space (native speed here):
//!
//! - `xknet recv HOST:PORT`: connects, reads to EOF (1 MiB reads), prints
//!   `XKNET-RX <bytes> <sha256> <seconds>`;
//! - `xknet send HOST:PORT MIB`: connects, writes MIB MiB of a pseudo-random
//!   stream (xorshift64*), waits for the peer to close, prints
//!   `XKNET-TX <bytes> <sha256> <seconds>`.
//!
//! Built by the test with `rustc -C target-feature=+crt-static` (std only,
//! one file, no cargo) and put in the guest's initramfs. SHA-256 is written
//! here from FIPS 180-4 because the program has no dependencies.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Instant;

const CHUNK: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match (args.get(1).map(String::as_str), args.get(2), args.get(3)) {
        (Some("recv"), Some(peer), None) => recv(peer),
        (Some("send"), Some(peer), Some(mib)) => match mib.parse::<u64>() {
            Ok(m) => send(peer, m),
            Err(e) => Err(format!("MIB {mib:?}: {e}")),
        },
        _ => Err("usage: xknet recv HOST:PORT | xknet send HOST:PORT MIB".into()),
    };
    if let Err(e) = r {
        println!("XKNET-ERROR {e}");
        std::process::exit(1);
    }
}

fn connect(peer: &str) -> Result<TcpStream, String> {
    TcpStream::connect(peer).map_err(|e| format!("connect {peer}: {e}"))
}

fn recv(peer: &str) -> Result<(), String> {
    let mut s = connect(peer)?;
    let t = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read after {total} bytes: {e}")),
        };
        h.update(&buf[..n]);
        total += n as u64;
    }
    println!(
        "XKNET-RX {total} {} {:.1}",
        hex(&h.finish()),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn send(peer: &str, mib: u64) -> Result<(), String> {
    let mut s = connect(peer)?;
    let t = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..mib {
        for word in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        h.update(&buf);
        s.write_all(&buf).map_err(|e| format!("write: {e}"))?;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    // The peer closes once it has everything: until then bytes may still be
    // in flight.
    let mut rest = [0u8; 64];
    while s.read(&mut rest).map_err(|e| format!("read: {e}"))? > 0 {}
    println!(
        "XKNET-TX {} {} {:.1}",
        mib << 20,
        hex(&h.finish()),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 (FIPS 180-4, section 6.2).
struct Sha256 {
    h: [u32; 8],
    block: [u8; 64],
    used: usize,
    len: u64,
}

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

impl Sha256 {
    fn new() -> Sha256 {
        Sha256 {
            h: [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ],
            block: [0; 64],
            used: 0,
            len: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            let n = (64 - self.used).min(data.len());
            self.block[self.used..self.used + n].copy_from_slice(&data[..n]);
            self.used += n;
            data = &data[n..];
            if self.used == 64 {
                let b = self.block;
                self.compress(&b);
                self.used = 0;
            }
        }
    }

    fn finish(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        self.update(&[0x80]);
        while self.used != 56 {
            self.update(&[0]);
        }
        self.update(&bits.to_be_bytes());
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.h) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    fn compress(&mut self, block: &[u8; 64]) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            h = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (s, v) in self.h.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = s.wrapping_add(v);
        }
    }
}
