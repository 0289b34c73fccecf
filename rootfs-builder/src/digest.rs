//! Content digests (`sha256:<64 lowercase hex>`) and a writer that hashes what passes through it
//! and checks the result against the digest and size it was promised.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Errors about digests: malformed text, or content that does not match.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// The text is not `<algorithm>:<hex>`.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    Malformed(String),
    /// Only sha256 is supported.
    #[error("unsupported digest algorithm {0:?}: only sha256 is supported")]
    UnsupportedAlgorithm(String),
    /// The content hashed to another digest.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Mismatch {
        /// The digest that was promised.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// The content has another length than promised.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The digest that was promised.
        digest: Digest,
        /// The size that was promised.
        expected: u64,
        /// The size that arrived.
        actual: u64,
    },
    /// Writing to the underlying writer failed.
    #[error("write failed")]
    Io(#[source] io::Error),
}

/// A validated sha256 digest, kept in its text form `sha256:<64 lowercase hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses and validates `sha256:<64 lowercase hex>`.
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let Some((algorithm, hex)) = text.split_once(':') else {
            return Err(DigestError::Malformed(text.to_string()));
        };
        if algorithm != "sha256" {
            let known = !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
            return Err(if known {
                DigestError::UnsupportedAlgorithm(algorithm.to_string())
            } else {
                DigestError::Malformed(text.to_string())
            });
        }
        let hex_ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex_ok {
            return Err(DigestError::Malformed(text.to_string()));
        }
        Ok(Digest(text.to_string()))
    }

    /// The digest of `data`.
    pub fn of_bytes(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    fn from_hasher(hasher: Sha256) -> Self {
        Digest(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// The full text, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The algorithm, always `sha256`.
    pub fn algorithm(&self) -> &str {
        "sha256"
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first 12 hex digits, as `docker images` shows IDs.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A writer that hashes and counts everything written through it. [`DigestWriter::finish`]
/// checks the result against the expected digest and size; a writer given a size limit refuses
/// to write more than that, so a hostile source cannot fill the disk.
#[derive(Debug)]
pub struct DigestWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
    limit: Option<u64>,
}

impl<W: Write> DigestWriter<W> {
    /// Wraps `inner` with no size limit.
    pub fn new(inner: W) -> Self {
        DigestWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
            limit: None,
        }
    }

    /// Wraps `inner`; writes past `limit` bytes fail with `InvalidData`.
    pub fn with_limit(inner: W, limit: u64) -> Self {
        DigestWriter {
            limit: Some(limit),
            ..Self::new(inner)
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest of what was written, and the inner writer (flushed).
    pub fn into_digest(mut self) -> Result<(Digest, u64, W), DigestError> {
        self.inner.flush().map_err(DigestError::Io)?;
        Ok((Digest::from_hasher(self.hasher), self.written, self.inner))
    }

    /// Flushes, then checks size (when given) and digest; returns the inner writer if both match.
    pub fn finish(self, expected: &Digest, expected_size: Option<u64>) -> Result<W, DigestError> {
        let (actual, written, inner) = self.into_digest()?;
        if let Some(size) = expected_size {
            if size != written {
                return Err(DigestError::SizeMismatch {
                    digest: expected.clone(),
                    expected: size,
                    actual: written,
                });
            }
        }
        if &actual != expected {
            return Err(DigestError::Mismatch {
                expected: expected.clone(),
                actual,
            });
        }
        Ok(inner)
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit {
            let room = limit.saturating_sub(self.written);
            if buf.len() as u64 > room {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("content is larger than the expected {limit} bytes"),
                ));
            }
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_valid_sha256() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.as_str(), EMPTY);
        assert_eq!(d.hex().len(), 64);
        assert_eq!(d.short(), "e3b0c44298fc");
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(EMPTY.parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &EMPTY.to_uppercase().replace("SHA256", "sha256"),
            &format!("{EMPTY}0"),
            &EMPTY.replace('e', "g"),
            ":e3b0",
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(DigestError::Malformed(_))),
                "{bad:?}"
            );
        }
        let sha512 = format!("sha512:{}", "a".repeat(128));
        assert!(matches!(
            Digest::parse(&sha512),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn of_bytes_matches_known_values() {
        assert_eq!(Digest::of_bytes(b"").as_str(), EMPTY);
        assert_eq!(
            Digest::of_bytes(b"abc").as_str(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn writer_verifies_digest_and_size() {
        let expected = Digest::of_bytes(b"hello world");
        let mut w = DigestWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        assert_eq!(w.written(), 11);
        let out = w.finish(&expected, Some(11)).unwrap();
        assert_eq!(out, b"hello world");

        let mut w = DigestWriter::new(Vec::new());
        w.write_all(b"hello wOrld").unwrap();
        assert!(matches!(
            w.finish(&expected, Some(11)),
            Err(DigestError::Mismatch { .. })
        ));

        let mut w = DigestWriter::new(Vec::new());
        w.write_all(b"hello").unwrap();
        let err = w.finish(&expected, Some(11)).unwrap_err();
        assert!(matches!(
            err,
            DigestError::SizeMismatch {
                expected: 11,
                actual: 5,
                ..
            }
        ));
    }

    #[test]
    fn writer_refuses_to_exceed_limit() {
        let mut w = DigestWriter::with_limit(Vec::new(), 4);
        w.write_all(b"abcd").unwrap();
        let err = w.write_all(b"e").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(w.written(), 4);
    }

    #[test]
    fn serde_round_trip_validates() {
        let d = Digest::of_bytes(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
    }
}
