//! The layer's zstd stream writer: libzstd's context API (through `zstd-sys`) with the parameters
//! a layer is packed with.
//!
//! Why not `zstd::stream::write::Encoder`: zstd 1.5.7 splits 128 KiB blocks before compressing
//! them ("pre-splitting", `ZSTD_c_blockSplitterLevel`, on by default from the `dfast` strategy up),
//! and the safe wrapper cannot turn that off. On the benchmark volume at level 3 it cost 27 % more
//! CPU single-threaded (2.10 s vs 1.53 s per GiB) and 14 % with workers, for 0.01 % smaller output.
//! A layer is compressed once per snapshot on the hub's critical path, so it is packed without it.
//! Everything else is libzstd's: the output is a standard single zstd frame that `zstd -d` and
//! Python `zstandard` read, and multithreaded compression gives the same bytes for any number of
//! workers (>= 1), so a layer's digest does not depend on the machine's core count.

use std::ffi::CStr;
use std::io::{self, Write};
use std::ptr::NonNull;

use zstd_sys::{
    ZSTD_CCtx, ZSTD_CCtx_setParameter, ZSTD_CStreamOutSize, ZSTD_EndDirective, ZSTD_cParameter,
    ZSTD_compressStream2, ZSTD_createCCtx, ZSTD_freeCCtx, ZSTD_getErrorName, ZSTD_inBuffer,
    ZSTD_isError, ZSTD_outBuffer,
};

/// `ZSTD_c_blockSplitterLevel` (an experimental parameter: zstd.h names it `experimentalParam20`).
const BLOCK_SPLITTER_LEVEL: ZSTD_cParameter = ZSTD_cParameter::ZSTD_c_experimentalParam20;
/// Its value for "no pre-splitting".
const NO_PRE_SPLIT: i32 = 1;

fn check(code: usize, what: &str) -> io::Result<usize> {
    // SAFETY: ZSTD_isError and ZSTD_getErrorName accept any value and return a static string.
    if unsafe { ZSTD_isError(code) } != 0 {
        let name = unsafe { CStr::from_ptr(ZSTD_getErrorName(code)) };
        return Err(io::Error::other(format!(
            "zstd {what}: {}",
            name.to_string_lossy()
        )));
    }
    Ok(code)
}

/// A zstd compression stream into `W`. Call `finish` to end the frame and get `W` back; dropping
/// it unfinished leaves a truncated frame (which every decoder refuses).
pub struct LayerEncoder<W: Write> {
    cctx: NonNull<ZSTD_CCtx>,
    out: Vec<u8>,
    /// Taken by `finish`.
    inner: Option<W>,
}

// SAFETY: the context is owned by this value alone and used from one thread at a time (&mut self);
// libzstd contexts may move between threads (its worker pool is internal and joined on free).
unsafe impl<W: Write + Send> Send for LayerEncoder<W> {}

impl<W: Write> LayerEncoder<W> {
    /// `workers` >= 1: multithreaded (same output for any count); 0: single-threaded (another
    /// frame layout, so another digest).
    pub fn new(inner: W, level: i32, workers: u32) -> io::Result<Self> {
        // SAFETY: plain constructor; null means out of memory.
        let cctx = NonNull::new(unsafe { ZSTD_createCCtx() })
            .ok_or_else(|| io::Error::other("zstd: cannot create a compression context"))?;
        // SAFETY: ZSTD_CStreamOutSize has no preconditions.
        let out_size = unsafe { ZSTD_CStreamOutSize() };
        let enc = LayerEncoder {
            cctx,
            out: vec![0u8; out_size],
            inner: Some(inner),
        };
        enc.set(ZSTD_cParameter::ZSTD_c_compressionLevel, level, "level")?;
        enc.set(ZSTD_cParameter::ZSTD_c_checksumFlag, 0, "checksum flag")?;
        // A libzstd older than 1.5.7 (a system one linked through pkg-config) has no
        // pre-splitter and refuses the parameter: it already compresses the way we ask.
        let _ = enc.set(BLOCK_SPLITTER_LEVEL, NO_PRE_SPLIT, "block splitter level");
        if workers > 0 {
            let n = i32::try_from(workers).unwrap_or(i32::MAX);
            enc.set(ZSTD_cParameter::ZSTD_c_nbWorkers, n, "workers")?;
        }
        Ok(enc)
    }

    fn set(&self, param: ZSTD_cParameter, value: i32, what: &str) -> io::Result<()> {
        // SAFETY: a live context we own; libzstd validates the parameter and value.
        check(
            unsafe { ZSTD_CCtx_setParameter(self.cctx.as_ptr(), param, value) },
            what,
        )
        .map(|_| ())
    }

    /// One compressStream2 call on `input` from `*pos`; writes what it produced. Returns libzstd's
    /// hint (for `ZSTD_e_end`: 0 once the frame is complete).
    fn step(&mut self, input: &[u8], pos: &mut usize, op: ZSTD_EndDirective) -> io::Result<usize> {
        let mut inb = ZSTD_inBuffer {
            src: input.as_ptr().cast(),
            size: input.len(),
            pos: *pos,
        };
        let mut outb = ZSTD_outBuffer {
            dst: self.out.as_mut_ptr().cast(),
            size: self.out.len(),
            pos: 0,
        };
        // SAFETY: both buffers point at live memory of the sizes given; the context is ours.
        let code = check(
            unsafe { ZSTD_compressStream2(self.cctx.as_ptr(), &mut outb, &mut inb, op) },
            "compress",
        )?;
        *pos = inb.pos;
        if outb.pos > 0 {
            let inner = self
                .inner
                .as_mut()
                .ok_or_else(|| io::Error::other("zstd: stream already finished"))?;
            inner.write_all(&self.out[..outb.pos])?;
        }
        Ok(code)
    }

    /// End the frame, flush everything to the inner writer and return it.
    pub fn finish(mut self) -> io::Result<W> {
        let mut pos = 0;
        while self.step(&[], &mut pos, ZSTD_EndDirective::ZSTD_e_end)? != 0 {}
        let mut inner = self
            .inner
            .take()
            .ok_or_else(|| io::Error::other("zstd: stream already finished"))?;
        inner.flush()?;
        Ok(inner)
    }
}

impl<W: Write> Write for LayerEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pos = 0;
        while pos < buf.len() {
            self.step(buf, &mut pos, ZSTD_EndDirective::ZSTD_e_continue)?;
        }
        Ok(buf.len())
    }

    /// Does not end a block (that would change the output): data is flushed by `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for LayerEncoder<W> {
    fn drop(&mut self) {
        // SAFETY: our context, freed exactly once, here.
        unsafe {
            ZSTD_freeCCtx(self.cctx.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        // compressible text with incompressible stretches, several MiB (several MT jobs)
        let mut v = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..40_000u32 {
            v.extend_from_slice(format!("line {i} of a layer, value {}\n", i % 97).as_bytes());
            if i % 1000 == 0 {
                for _ in 0..16_384 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    v.push(x as u8);
                }
            }
        }
        v.repeat(16) // ~32 MB: four multithreaded jobs at level 3 (8 MiB each)
    }

    fn encode(data: &[u8], workers: u32, step: usize) -> Vec<u8> {
        let mut enc = LayerEncoder::new(Vec::new(), 3, workers).expect("encoder");
        for piece in data.chunks(step) {
            enc.write_all(piece).expect("write");
        }
        enc.finish().expect("finish")
    }

    #[test]
    fn round_trips_and_output_does_not_depend_on_workers_or_writes() {
        let data = sample();
        let one = encode(&data, 1, 1 << 20);
        assert_eq!(
            zstd::stream::decode_all(one.as_slice()).expect("decode"),
            data
        );
        assert_eq!(
            encode(&data, 3, 1 << 20),
            one,
            "worker count changed the bytes"
        );
        assert_eq!(encode(&data, 1, 4093), one, "write sizes changed the bytes");
        assert_eq!(
            encode(&data, 2, 17 << 20),
            one,
            "write sizes changed the bytes"
        );
        let single = encode(&data, 0, 1 << 20);
        assert_eq!(
            zstd::stream::decode_all(single.as_slice()).expect("decode"),
            data
        );
        assert!(one.len() < data.len() / 2);
    }

    #[test]
    fn pre_splitting_is_off() {
        // The same level, workers and checksum setting through the zstd crate, which leaves
        // 1.5.7's pre-splitter on: the frames must differ (if a zstd-sys upgrade moved the
        // experimental parameter, ours would silently match the default again).
        let data = sample();
        let mut default = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
        default.multithread(1).expect("workers");
        default.include_checksum(false).expect("checksum");
        default.write_all(&data).expect("write");
        let default = default.finish().expect("finish");
        let ours = encode(&data, 1, 1 << 20);
        assert_ne!(ours, default, "pre-splitting still on");
        assert_eq!(
            zstd::stream::decode_all(default.as_slice()).expect("decode"),
            data
        );
    }

    #[test]
    fn empty_input_is_a_valid_frame() {
        let out = encode(&[], 2, 1);
        assert!(zstd::stream::decode_all(out.as_slice())
            .expect("decode")
            .is_empty());
    }

    #[test]
    fn write_errors_come_back() {
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut enc = LayerEncoder::new(Failing, 3, 1).expect("encoder");
        let data = sample();
        let err = enc
            .write_all(&data)
            .and_then(|()| enc.finish().map(|_| ()))
            .expect_err("must fail");
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
