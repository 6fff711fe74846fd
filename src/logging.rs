//! Log set-up: `XENKVM_LOG` or `--log-level` (validated), `--log-file`.
//!
//! A plain level (`off`, `error`, `warn`, `info`, `debug`, `trace`) applies to
//! xenkvm's own crates; other crates (the ELF parser, ...) stay at `warn`.
//! At `trace` every hypercall and every vCPU exit is logged with its vCPU id.
//! Directives (`xenkvm=debug,goblin=trace`) are taken as written, but each
//! must name a known level.

use std::path::Path;

/// The crates whose logs a plain level selects.
const OWN_CRATES: &[&str] = &["xenkvm", "hypercalls", "gpc", "runstate", "xen_abi"];

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()))
}

/// Turns a `XENKVM_LOG`/`--log-level` value into `EnvFilter` directives, or
/// says what is wrong with it.
pub fn filter_directives(spec: &str) -> Result<String, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok("warn".into());
    }
    let help = "use one of off, error, warn, info, debug, trace, or directives such as xenkvm=debug,hypercalls=trace";
    if !spec.contains('=') && !spec.contains(',') {
        if !is_level(spec) {
            return Err(format!("unknown log level \"{spec}\" ({help})"));
        }
        let l = spec.to_ascii_lowercase();
        return Ok(match l.as_str() {
            "off" | "error" | "warn" => l,
            _ => std::iter::once("warn".to_string())
                .chain(OWN_CRATES.iter().map(|c| format!("{c}={l}")))
                .collect::<Vec<_>>()
                .join(","),
        });
    }
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match d.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            _ => d,
        };
        if !is_level(level) {
            return Err(format!("unknown log level \"{level}\" in \"{d}\" ({help})"));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(spec)
        .map_err(|e| format!("bad log directives \"{spec}\": {e} ({help})"))?;
    Ok(spec.to_string())
}

/// Installs the global subscriber: `level` (the `--log-level` value, else
/// `XENKVM_LOG`, else `warn`) to stderr, or appended to `file`.
pub fn init(level: Option<&str>, file: Option<&Path>) -> Result<(), String> {
    let (source, spec) = match level {
        Some(l) => ("--log-level", l.to_string()),
        None => (
            "XENKVM_LOG",
            std::env::var("XENKVM_LOG").unwrap_or_default(),
        ),
    };
    let directives = filter_directives(&spec).map_err(|e| format!("{source}={spec}: {e}"))?;
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| format!("{source}={spec}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true);
    let r = match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open --log-file {}: {e}", path.display()))?;
            builder
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .try_init()
        }
        None => builder
            .with_writer(std::io::stderr)
            // Colour only on a terminal: logs kept in files stay plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    r.map_err(|e| format!("cannot set up logging: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_directives_unknown_level_is_refused() {
        let e = filter_directives("verbose").unwrap_err();
        assert!(e.starts_with("unknown log level \"verbose\""), "{e}");
        let e = filter_directives("xenkvm=loud").unwrap_err();
        assert!(e.contains("\"loud\""), "{e}");
    }

    #[test]
    fn filter_directives_plain_level_keeps_other_crates_at_warn() {
        let d = filter_directives("debug").unwrap();
        assert!(d.starts_with("warn,"), "{d}");
        assert!(
            d.contains("xenkvm=debug") && d.contains("hypercalls=debug"),
            "{d}"
        );
        assert!(!d.contains("goblin"), "{d}");
        assert_eq!(filter_directives("WARN").unwrap(), "warn");
        assert_eq!(filter_directives("").unwrap(), "warn");
    }

    #[test]
    fn filter_directives_explicit_directives_pass_through() {
        assert_eq!(
            filter_directives("xenkvm=trace,goblin=debug").unwrap(),
            "xenkvm=trace,goblin=debug"
        );
    }
}
