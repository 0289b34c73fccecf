//! What one image layer may cost the host: its compressed size, what it expands to (in total and
//! relative to its compressed size, so a decompression bomb is stopped early) and its number of
//! entries. The defaults are far above what real images use; they are the only place these
//! numbers live. Layers are checked when they enter the store (pull, load) and again while they
//! are unpacked, so a blob stored by an older mvm is held to the same limits.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// Most bytes one compressed layer blob may have (8 GiB).
pub const MAX_LAYER_COMPRESSED: u64 = 8 << 30;
/// Most bytes one layer may expand to: its tar stream, and the file data written from it (16 GiB).
pub const MAX_LAYER_UNPACKED: u64 = 16 << 30;
/// Largest expansion ratio (uncompressed : compressed) of a layer beyond [`RATIO_FREE_BYTES`].
pub const MAX_LAYER_RATIO: u64 = 100;
/// What any layer may expand to whatever its ratio (small layers of zeros are normal) (16 MiB).
pub const RATIO_FREE_BYTES: u64 = 16 << 20;
/// Most entries (files, directories, links, whiteouts...) in one layer.
pub const MAX_LAYER_ENTRIES: u64 = 1_000_000;

/// A layer over one of the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The blob itself is too large.
    #[error("it is {size} bytes, over the limit of {limit} bytes per compressed layer")]
    Compressed {
        /// The blob's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// It expands to more than the absolute limit.
    #[error("it expands to more than {limit} bytes, the limit per layer")]
    Unpacked {
        /// The limit.
        limit: u64,
    },
    /// It expands far more than real layers do.
    #[error(
        "it expands more than {ratio} times its size of {compressed} bytes: refusing a likely \
         decompression bomb"
    )]
    Ratio {
        /// The largest ratio allowed.
        ratio: u64,
        /// The blob's size.
        compressed: u64,
    },
    /// It has too many entries.
    #[error("it has more than {limit} entries, the limit per layer")]
    Entries {
        /// The limit.
        limit: u64,
    },
}

/// The limits one layer is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Most bytes of the compressed blob.
    pub compressed: u64,
    /// Most bytes it may expand to.
    pub unpacked: u64,
    /// Largest ratio of expanded to compressed bytes, past `ratio_free` bytes.
    pub ratio: u64,
    /// What a layer may expand to regardless of the ratio.
    pub ratio_free: u64,
    /// Most entries.
    pub entries: u64,
}

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            compressed: MAX_LAYER_COMPRESSED,
            unpacked: MAX_LAYER_UNPACKED,
            ratio: MAX_LAYER_RATIO,
            ratio_free: RATIO_FREE_BYTES,
            entries: MAX_LAYER_ENTRIES,
        }
    }
}

impl LayerLimits {
    /// Refuses a blob of `size` bytes before it is read (or downloaded).
    pub fn check_compressed(&self, size: u64) -> Result<(), LimitError> {
        if size > self.compressed {
            return Err(LimitError::Compressed {
                size,
                limit: self.compressed,
            });
        }
        Ok(())
    }

    /// How many bytes a blob of `compressed` bytes may expand to, and the error past that.
    pub fn budget(&self, compressed: u64) -> (u64, LimitError) {
        let by_ratio = compressed.saturating_mul(self.ratio).max(self.ratio_free);
        if by_ratio < self.unpacked {
            let err = LimitError::Ratio {
                ratio: self.ratio,
                compressed,
            };
            (by_ratio, err)
        } else {
            let err = LimitError::Unpacked {
                limit: self.unpacked,
            };
            (self.unpacked, err)
        }
    }

    /// Refuses the entry after the `entries`-th.
    pub fn check_entries(&self, entries: u64) -> Result<(), LimitError> {
        if entries > self.entries {
            return Err(LimitError::Entries {
                limit: self.entries,
            });
        }
        Ok(())
    }
}

/// Where a [`Budget`] records that it ran out, for the caller to find after the reader that
/// tripped it failed (the archive reader wraps I/O errors on the way up).
pub(crate) type Tripped = Rc<Cell<Option<LimitError>>>;

/// A byte budget shared by everything one layer expands to: its decompressed tar stream and
/// the file data written from it (a sparse entry writes more than the stream carries).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    left: Rc<Cell<u64>>,
    over: LimitError,
    tripped: Tripped,
}

impl Budget {
    pub(crate) fn new(bytes: u64, over: LimitError) -> Self {
        Budget {
            left: Rc::new(Cell::new(bytes)),
            over,
            tripped: Rc::new(Cell::new(None)),
        }
    }

    /// The error, once the budget ran out.
    pub(crate) fn tripped(&self) -> Option<LimitError> {
        self.tripped.get()
    }

    /// Takes `n` bytes; fails (and remembers it) when they are not there.
    pub(crate) fn spend(&self, n: u64) -> io::Result<()> {
        match self.left.get().checked_sub(n) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.tripped.set(Some(self.over));
                Err(io::Error::other(self.over))
            }
        }
    }

    /// `reader`, counted against this budget.
    pub(crate) fn reader<R: Read>(&self, reader: R) -> Counted<R> {
        Counted {
            inner: reader,
            budget: self.clone(),
        }
    }
}

/// A reader whose bytes are spent from a [`Budget`].
#[derive(Debug)]
pub(crate) struct Counted<R> {
    inner: R,
    budget: Budget,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.spend(n as u64)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_the_ratio_until_the_absolute_limit() {
        let l = LayerLimits::default();
        let (small, err) = l.budget(1000);
        assert_eq!(
            small, RATIO_FREE_BYTES,
            "small layers get the free allowance"
        );
        assert!(matches!(err, LimitError::Ratio { .. }));
        assert_eq!(l.budget(1 << 20).0, 100 << 20);
        let (big, err) = l.budget(1 << 30);
        assert_eq!(big, MAX_LAYER_UNPACKED);
        assert!(matches!(err, LimitError::Unpacked { .. }));
        assert!(l.check_compressed(MAX_LAYER_COMPRESSED).is_ok());
        assert!(l.check_compressed(MAX_LAYER_COMPRESSED + 1).is_err());
        assert!(l.check_entries(MAX_LAYER_ENTRIES).is_ok());
        assert!(l.check_entries(MAX_LAYER_ENTRIES + 1).is_err());
    }

    #[test]
    fn a_counted_reader_stops_at_the_budget_and_says_why() {
        let b = Budget::new(10, LimitError::Unpacked { limit: 10 });
        let mut r = b.reader(&[7u8; 64][..]);
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(b.tripped(), Some(LimitError::Unpacked { limit: 10 }));
        assert!(err.to_string().contains("more than 10 bytes"), "{err}");
        let msg = LimitError::Ratio {
            ratio: 100,
            compressed: 5,
        }
        .to_string();
        assert!(!msg.contains('\n'), "{msg}");
    }
}
