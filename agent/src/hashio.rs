//! sha256 while reading: the one adapter every place that hashes bytes as it reads
//! them goes through (kernels copied to the ESP and read back, operations copied slot
//! to slot or read back from the target).

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Hashes (sha256) every byte read through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
        }
    }

    /// The sha256 of every byte read so far.
    pub fn finalize(self) -> [u8; 32] {
        self.hash.finalize().into()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// sha256 of everything `r` yields, read through `buf`.
pub fn sha256_with(r: impl Read, buf: &mut [u8]) -> io::Result<[u8; 32]> {
    let mut h = HashingReader::new(r);
    while h.read(buf)? > 0 {}
    Ok(h.finalize())
}

/// sha256 of everything `r` yields, read 1 MiB at a time.
pub fn sha256_of(r: impl Read) -> io::Result<[u8; 32]> {
    sha256_with(r, &mut vec![0u8; 1 << 20])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockio::RangesReader;

    #[test]
    fn hashes_what_passes_through_ranges_and_all() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let want: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(sha256_with(&data[..], &mut [0u8; 7]).expect("read"), want);
        // Ranges in order, an empty one among them, read in small steps.
        let ranges = [(0, 4000), (4000, 0), (4000, 6000)];
        let read_at = |b: &mut [u8], off: u64| {
            b.copy_from_slice(&data[off as usize..off as usize + b.len()]);
            Ok(())
        };
        let r = RangesReader::new(read_at, ranges);
        assert_eq!(sha256_with(r, &mut [0u8; 333]).expect("read"), want);
    }
}
