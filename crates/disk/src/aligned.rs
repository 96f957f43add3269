//! Page-aligned buffers and a fast all-zero test.
//!
//! Reads from the page cache into a buffer that is not page aligned run up
//! to 5x slower (the kernel falls back from page-sized copies), so every
//! buffer the engine reads disk data into should be an [`AlignedBuf`].
//! [`is_zero`] folds 64-bit words so the zero check costs next to nothing
//! beside hashing.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: one x86-64 page.
pub const PAGE_SIZE: usize = 4096;

/// A zero-initialised heap buffer whose start is aligned to [`PAGE_SIZE`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
#[allow(unsafe_code)]
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like Vec<u8>.
#[allow(unsafe_code)]
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`PAGE_SIZE`].
    ///
    /// Panics if `len` overflows a `Layout` (as `Vec` would) and aborts on
    /// allocation failure through `handle_alloc_error`.
    pub fn new(len: usize) -> AlignedBuf {
        if len == 0 {
            // A dangling pointer aligned to PAGE_SIZE: never dereferenced for reads
            // beyond zero bytes and never deallocated.
            let ptr = NonNull::new(PAGE_SIZE as *mut u8).expect("PAGE_SIZE is non-zero");
            return AlignedBuf { ptr, len };
        }
        let layout = Self::layout(len);
        #[allow(unsafe_code)]
        // SAFETY: layout has a non-zero size (len > 0).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, PAGE_SIZE).expect("buffer size overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            #[allow(unsafe_code)]
            // SAFETY: ptr came from alloc_zeroed with this exact layout.
            unsafe {
                alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len))
            };
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        #[allow(unsafe_code)]
        // SAFETY: ptr is valid for len initialised bytes (zeroed at allocation)
        // for as long as self lives; for len == 0 a dangling aligned pointer is allowed.
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
        }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        #[allow(unsafe_code)]
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len)
        }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        let mut copy = AlignedBuf::new(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// True when every byte of `buf` is zero.
///
/// Folds 64 bytes at a time into one word with OR (the compiler turns this
/// into vector code) and checks the fold only once per 4 KiB, so a non-zero
/// block is found quickly without a branch per word.
pub fn is_zero(buf: &[u8]) -> bool {
    const BLOCK: usize = 4096;
    let mut blocks = buf.chunks_exact(BLOCK);
    for block in &mut blocks {
        if !fold_zero(block) {
            return false;
        }
    }
    fold_zero(blocks.remainder())
}

#[inline]
fn fold_zero(buf: &[u8]) -> bool {
    let mut lanes = buf.chunks_exact(64);
    let mut acc = [0u64; 8];
    for lane in &mut lanes {
        for (i, word) in lane.chunks_exact(8).enumerate() {
            acc[i] |= u64::from_ne_bytes(word.try_into().expect("8-byte word"));
        }
    }
    let tail = lanes.remainder().iter().fold(0u8, |a, &b| a | b);
    acc.iter().fold(0u64, |a, &w| a | w) == 0 && tail == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_page_aligned_and_zeroed() {
        for len in [1, 4095, 4096, 4097, 4 << 20] {
            let buf = AlignedBuf::new(len);
            assert_eq!(buf.as_ptr() as usize % PAGE_SIZE, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&b| b == 0));
        }
        let empty = AlignedBuf::new(0);
        assert!(empty.is_empty());
        assert_eq!(&*empty, &[] as &[u8]);
    }

    #[test]
    fn aligned_buf_writes_and_clones() {
        let mut buf = AlignedBuf::new(10_000);
        buf[9_999] = 7;
        buf[..3].copy_from_slice(b"abc");
        let copy = buf.clone();
        assert_eq!(&copy[..3], b"abc");
        assert_eq!(copy[9_999], 7);
        assert_eq!(copy.as_ptr() as usize % PAGE_SIZE, 0);
    }

    #[test]
    fn is_zero_finds_any_single_non_zero_byte() {
        for len in [0usize, 1, 7, 63, 64, 65, 4095, 4096, 4097, 10_000] {
            let mut buf = vec![0u8; len];
            assert!(is_zero(&buf), "len {len}");
            for pos in 0..len {
                buf[pos] = 0x80;
                assert!(!is_zero(&buf), "len {len} pos {pos}");
                buf[pos] = 0;
            }
        }
    }

    #[test]
    fn is_zero_on_unaligned_slices() {
        let mut buf = AlignedBuf::new(8192);
        buf[8191] = 1;
        assert!(is_zero(&buf[3..8191]));
        assert!(!is_zero(&buf[3..]));
    }
}
