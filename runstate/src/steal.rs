//! Steal time from the host scheduler: `run_delay`, the second field of
//! `/proc/thread-self/schedstat` (ns the thread spent runnable but waiting
//! for a CPU). Sampled by the vCPU thread at schedule-in; the growth since
//! the previous sample is charged to runnable rather than running
//! ([`crate::Accounting::transition_with_steal`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Parses `run_delay` out of a schedstat line (`"<on_cpu> <run_delay> <slices>"`).
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// An open `/proc/thread-self/schedstat` of the thread that opened it
/// (`thread-self` is resolved at open, so open it on the vCPU thread).
/// Reading it again is one `pread`.
#[derive(Debug)]
pub struct RunDelay {
    file: File,
}

impl RunDelay {
    /// Opens the calling thread's schedstat.
    pub fn open() -> io::Result<RunDelay> {
        Ok(RunDelay {
            file: File::open("/proc/thread-self/schedstat")?,
        })
    }

    /// The thread's current `run_delay` in ns.
    pub fn sample(&self) -> io::Result<u64> {
        let mut buf = [0u8; 128];
        let n = self.file.read_at(&mut buf, 0)?;
        std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(parse_schedstat)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected /proc/thread-self/schedstat format",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_schedstat_second_field() {
        assert_eq!(parse_schedstat("72495 53450 2\n"), Some(53450));
        assert_eq!(parse_schedstat("1"), None);
        assert_eq!(parse_schedstat("a b c"), None);
    }

    #[test]
    fn run_delay_sample_monotonic_for_this_thread() {
        let r = match RunDelay::open() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: no schedstat ({e})");
                return;
            }
        };
        let a = r.sample().unwrap();
        std::thread::yield_now();
        let b = r.sample().unwrap();
        assert!(b >= a);
    }
}
