//! The slot images the generator reads: mapped read-only, checked, read by block.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::GenerateError;
use crate::payload::limits;
use crate::payload::manifest::Extent;

/// A slot image, mapped read-only. Generation runs on publisher machines, where
/// mapping both images is the cheapest way to compare blocks at random.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    map: Mmap,
    sha256: std::sync::OnceLock<[u8; 32]>,
}

impl Image {
    pub fn open(path: &Path) -> Result<Self, GenerateError> {
        let err = |source| GenerateError::ReadImage {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if meta.len() == 0 {
            return Err(GenerateError::EmptyImage {
                path: path.to_owned(),
            });
        }
        if meta.len() > limits::MAX_IMAGE_SIZE {
            return Err(GenerateError::TooLarge {
                path: path.to_owned(),
                size: meta.len(),
                max: limits::MAX_IMAGE_SIZE,
            });
        }
        let map = map_readonly(&file).map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            map,
            sha256: std::sync::OnceLock::new(),
        })
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub(super) fn block(&self, bs: usize, i: u64) -> &[u8] {
        let start = i as usize * bs;
        &self.map[start..start + bs]
    }

    pub(super) fn blocks(&self, bs: usize) -> u64 {
        (self.map.len() / bs) as u64
    }

    /// sha256 of the whole image (computed once).
    pub fn sha256(&self) -> [u8; 32] {
        *self
            .sha256
            .get_or_init(|| Sha256::digest(&self.map[..]).into())
    }
}

#[allow(unsafe_code)]
fn map_readonly(file: &File) -> io::Result<Mmap> {
    // SAFETY: the slice is only sound while nobody truncates or writes the file: a
    // truncation turns reads past the new end into SIGBUS, and a write changes bytes
    // behind a `&[u8]` Rust assumes immutable. The publisher must not change a slot
    // image while generating from it; nothing in this process writes or truncates it.
    unsafe { Mmap::map(file) }
}

pub(super) fn check_image(img: &Image, bs: u32) -> Result<(), GenerateError> {
    if !img.len().is_multiple_of(u64::from(bs)) {
        return Err(GenerateError::NotBlockMultiple {
            path: img.path.clone(),
            size: img.len(),
            block_size: bs,
        });
    }
    Ok(())
}

/// Concatenated bytes of `extents` in `img`.
pub(super) fn gather(img: &Image, bs: usize, extents: &[Extent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(extents.iter().map(|e| e.blocks as usize * bs).sum());
    for e in extents {
        let a = e.start as usize * bs;
        v.extend_from_slice(&img.bytes()[a..a + e.blocks as usize * bs]);
    }
    v
}

pub(super) fn sha_of(img: &Image, bs: usize, extents: &[Extent]) -> [u8; 32] {
    let mut h = Sha256::new();
    for e in extents {
        let a = e.start as usize * bs;
        h.update(&img.bytes()[a..a + e.blocks as usize * bs]);
    }
    h.finalize().into()
}
