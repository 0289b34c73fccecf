//! The one grammar for sizes (`--mem` of `run` and `boot`; defined with the container spec in
//! guest-agent, which the agent shares) and the one for durations
//! (`--timeout`, `MVM_BOOT_TIMEOUT`), and how sizes are written back.

use std::time::Duration;

/// A size or a duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a size.
    #[error(
        "invalid memory size {0:?}: use bytes or a number with K, M, G or T (e.g. 256M, 1.5G)"
    )]
    Size(String),
    /// Not a duration.
    #[error("invalid duration '{0}': use e.g. 30s, 5m or 1h")]
    Duration(String),
}

/// Parses a size such as `256M`, `1g`, `1.5G`, `512KiB`, `64KB` or `1048576` into bytes. Units
/// are powers of 1024 (as Docker's `--memory`), any case, optionally followed by `B` or `iB`.
/// The grammar itself lives with the container spec ([`guest_agent::runtime::spec::parse_size`]),
/// which the guest agent and its probe read too.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    guest_agent::runtime::spec::parse_size(text).map_err(|_| UnitError::Size(text.to_string()))
}

/// A size in the grammar [`parse_size`] reads: `2G`, `16M`, `64K`, or plain bytes.
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_string();
    }
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// Parses a duration: seconds, or a number (fractions allowed) with `s`, `m` or `h`. Zero and
/// negative durations are refused.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::Duration(text.to_string());
    let (num, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(bad)?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grammar is guest-agent's (tested there); a size it refuses becomes one error that
    /// shows the text and the grammar.
    #[test]
    fn a_size_that_does_not_parse_says_what_would() {
        let e = parse_size("12X").unwrap_err();
        assert_eq!(e, UnitError::Size("12X".into()));
        assert!(
            e.to_string().contains("\"12X\"") && e.to_string().contains("256M"),
            "{e}"
        );
    }

    /// What `mvm boot --mem` accepted before it shared this grammar still parses the same; a
    /// fraction (`1.5G`, refused by boot before) is now read as `run --mem` always did.
    #[test]
    fn parses_memory_sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("64KB").unwrap(), 64 << 10);
        assert_eq!(parse_size("268435456").unwrap(), 268_435_456);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        for bad in ["", "M", "12X", "-1M", "ten", "99999999999T", "1 G", "1MM"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("lots")
            .unwrap_err()
            .to_string()
            .starts_with("invalid memory size"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(format_size(16 << 20), "16M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1000), "1000 bytes");
        for n in [64 << 10, 3 << 29, 256 << 20] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "0", "-1s", "1d", "abc", "1.5.2s", "1e300h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
