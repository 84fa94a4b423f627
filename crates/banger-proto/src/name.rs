//! VM names: DNS labels, validated once at the edge and carried as [`VmName`] afterwards.

use std::fmt;

/// Why a string is not a valid VM name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("VM name is empty")]
    Empty,
    /// Longer than a DNS label may be.
    #[error("VM name {0:?} is longer than 63 characters")]
    TooLong(String),
    /// A character outside a-z, 0-9 and '-'.
    #[error("VM name {name:?} has {ch:?}; use only a-z, 0-9 and '-'")]
    BadChar { name: String, ch: char },
    /// Starts or ends with '-'.
    #[error("VM name {0:?} must not start or end with '-'")]
    EdgeHyphen(String),
}

/// A VM name: a DNS label of 1-63 characters of `a-z`, `0-9` and `-`, not starting or ending
/// with `-`, so `NAME.vm` is always a valid host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmName(String);

impl VmName {
    /// Checks `name` and wraps it.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > 63 {
            return Err(NameError::TooLong(name.to_owned()));
        }
        if let Some(ch) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::BadChar {
                name: name.to_owned(),
                ch,
            });
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(NameError::EdgeHyphen(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for VmName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "dev", "dev-1", "0", &"a".repeat(63)] {
            assert!(VmName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(VmName::parse(""), Err(NameError::Empty));
        assert!(matches!(
            VmName::parse(&"a".repeat(64)),
            Err(NameError::TooLong(_))
        ));
        assert!(matches!(
            VmName::parse("Dev"),
            Err(NameError::BadChar { ch: 'D', .. })
        ));
        assert!(matches!(
            VmName::parse("a_b"),
            Err(NameError::BadChar { ch: '_', .. })
        ));
        assert!(matches!(
            VmName::parse("a.b"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            VmName::parse("../x"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(VmName::parse("-a"), Err(NameError::EdgeHyphen(_))));
        assert!(matches!(VmName::parse("a-"), Err(NameError::EdgeHyphen(_))));
        assert!(matches!(
            VmName::parse("dév"),
            Err(NameError::BadChar { .. })
        ));
    }
}
