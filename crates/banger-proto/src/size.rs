//! Human sizes (`512M`, `20G`, `1.5G`) as used by `--memory`, `--disk` and the config file.
//! Units are binary (K = KiB, M = MiB, G = GiB, T = TiB), like Docker and QEMU.

use std::fmt;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number followed by an optional unit.
    #[error("size {0:?} is not a number with a unit such as 512M or 20G")]
    Malformed(String),
    /// A unit that is not K, M, G or T (optionally followed by `iB` or `B`).
    #[error("size {0:?} has an unknown unit; use K, M, G or T")]
    UnknownUnit(String),
    /// Too large to represent.
    #[error("size {0:?} is too large")]
    Overflow(String),
    /// A bare number where a unit is required.
    #[error("size {0:?} needs a unit, e.g. {0}G or {0}M")]
    MissingUnit(String),
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const KIB: u64 = 1024;
const MIB: u64 = KIB * 1024;
const GIB: u64 = MIB * 1024;
const TIB: u64 = GIB * 1024;

impl ByteSize {
    /// Parses `text`; a bare number is taken in `bare_unit` bytes, or refused when it is `None`.
    pub fn parse_with_default_unit(text: &str, bare_unit: Option<u64>) -> Result<Self, SizeError> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        if number.is_empty() || number.starts_with('.') || number.matches('.').count() > 1 {
            return Err(SizeError::Malformed(text.to_owned()));
        }
        let multiplier = match unit.trim().to_ascii_uppercase().as_str() {
            "" => bare_unit.ok_or_else(|| SizeError::MissingUnit(text.to_owned()))?,
            "B" => 1,
            "K" | "KB" | "KIB" => KIB,
            "M" | "MB" | "MIB" => MIB,
            "G" | "GB" | "GIB" => GIB,
            "T" | "TB" | "TIB" => TIB,
            _ => return Err(SizeError::UnknownUnit(text.to_owned())),
        };
        let bytes = match number.split_once('.') {
            None => number
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(multiplier)),
            Some((whole, frac)) => {
                let whole: u64 = whole
                    .parse()
                    .map_err(|_| SizeError::Malformed(text.to_owned()))?;
                let frac_value: f64 = format!("0.{frac}")
                    .parse()
                    .map_err(|_| SizeError::Malformed(text.to_owned()))?;
                whole.checked_mul(multiplier).and_then(|w| {
                    // Fractions are rounded down to whole bytes.
                    w.checked_add((frac_value * multiplier as f64) as u64)
                })
            }
        };
        bytes
            .map(ByteSize)
            .ok_or_else(|| SizeError::Overflow(text.to_owned()))
    }

    /// Parses a size that must carry a unit.
    pub fn parse(text: &str) -> Result<Self, SizeError> {
        Self::parse_with_default_unit(text, None)
    }

    /// Parses a memory size: a bare number is MiB.
    pub fn parse_mib(text: &str) -> Result<Self, SizeError> {
        Self::parse_with_default_unit(text, Some(MIB))
    }

    /// Whole MiB, rounded down.
    pub fn mib(self) -> u64 {
        self.0 / MIB
    }
}

impl fmt::Display for ByteSize {
    /// The shortest exact rendering: `8G`, `1536M`, `4096K`, or bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, suffix) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
            if n >= unit && n.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", n / unit);
            }
        }
        write!(f, "{n}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(ByteSize::parse("512M").unwrap().0, 512 * MIB);
        assert_eq!(ByteSize::parse("20G").unwrap().0, 20 * GIB);
        assert_eq!(ByteSize::parse("20GiB").unwrap().0, 20 * GIB);
        assert_eq!(ByteSize::parse("1.5G").unwrap().0, 1536 * MIB);
        assert_eq!(ByteSize::parse("4k").unwrap().0, 4096);
        assert_eq!(ByteSize::parse_mib("1024").unwrap().0, GIB);
    }

    #[test]
    fn refuses_bad_forms() {
        assert!(matches!(
            ByteSize::parse("8"),
            Err(SizeError::MissingUnit(_))
        ));
        assert!(matches!(ByteSize::parse("G"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            ByteSize::parse("-1G"),
            Err(SizeError::Malformed(_))
        ));
        assert!(matches!(
            ByteSize::parse("1X"),
            Err(SizeError::UnknownUnit(_))
        ));
        assert!(matches!(
            ByteSize::parse("1.2.3G"),
            Err(SizeError::Malformed(_))
        ));
        assert!(matches!(
            ByteSize::parse("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_shortest_exact_form() {
        assert_eq!(ByteSize(8 * GIB).to_string(), "8G");
        assert_eq!(ByteSize(1536 * MIB).to_string(), "1536M");
        assert_eq!(ByteSize(7).to_string(), "7B");
    }
}
