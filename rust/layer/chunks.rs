//! Recycled 1 MiB buffers for the pipelines between threads (pack: tar -> hash/zstd; unpack:
//! zstd -> tar/hash). A chunk goes back to its pool when the last consumer drops it, so the
//! steady state allocates nothing and takes no page faults. Buffers stay at their full length
//! (zeroed once, when first allocated) and a chunk records how much of one it holds, so producers
//! read straight into them without clearing memory on every round.

use std::ops::Deref;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};

pub struct Chunk {
    data: Vec<u8>,
    len: usize,
    home: Sender<Vec<u8>>,
}

impl Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let _ = self.home.try_send(data); // pool full or gone: just free it
    }
}

/// A shared, immutable chunk handed to several consumers.
pub type Shared = Arc<Chunk>;

#[derive(Clone)]
pub struct Pool {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    size: usize,
}

impl Pool {
    pub fn new(size: usize, keep: usize) -> Self {
        let (tx, rx) = bounded(keep);
        Pool { tx, rx, size }
    }

    /// A buffer of length `size` (recycled when possible; its contents are not cleared).
    pub fn take(&self) -> Vec<u8> {
        self.rx
            .try_recv()
            .ok()
            .filter(|b| b.len() == self.size)
            .unwrap_or_else(|| vec![0u8; self.size])
    }

    /// Share the first `len` bytes of `data` (a buffer from `take`).
    pub fn share(&self, data: Vec<u8>, len: usize) -> Shared {
        let len = len.min(data.len());
        Arc::new(Chunk {
            data,
            len,
            home: self.tx.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_back() {
        let pool = Pool::new(16, 4);
        let mut v = pool.take();
        assert_eq!(v.len(), 16);
        v[..3].copy_from_slice(b"abc");
        let ptr = v.as_ptr();
        let shared = pool.share(v, 3);
        let other = shared.clone();
        assert_eq!(&**other, b"abc");
        drop(shared);
        drop(other);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr, "the same buffer, recycled");
        assert_eq!(again.len(), 16);
    }

    #[test]
    fn share_never_exceeds_the_buffer() {
        let pool = Pool::new(4, 1);
        let chunk = pool.share(pool.take(), 99);
        assert_eq!(chunk.len(), 4);
    }
}
