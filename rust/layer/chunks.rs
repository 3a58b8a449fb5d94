//! Recycled 1 MiB buffers for the pipelines between threads (pack: tar -> hash/zstd; unpack:
//! zstd -> tar/hash). A chunk goes back to its pool when the last consumer drops it, so the
//! steady state allocates nothing and takes no page faults.

use std::ops::Deref;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};

pub struct Chunk {
    data: Vec<u8>,
    home: Sender<Vec<u8>>,
}

impl Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let mut data = std::mem::take(&mut self.data);
        data.clear();
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

    /// An empty buffer with capacity `size` (recycled when possible).
    pub fn take(&self) -> Vec<u8> {
        self.rx
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.size))
    }

    pub fn share(&self, data: Vec<u8>) -> Shared {
        Arc::new(Chunk {
            data,
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
        v.extend_from_slice(b"abc");
        let ptr = v.as_ptr();
        let shared = pool.share(v);
        let other = shared.clone();
        assert_eq!(&**other, b"abc");
        drop(shared);
        drop(other);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
    }
}
