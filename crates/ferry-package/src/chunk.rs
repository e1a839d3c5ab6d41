//! Per-chunk work shared by the writer and the reader: the zero test,
//! hashing, compression, and running such work on several threads.

use sha2::{Digest, Sha256};

/// zstd level for new chunks: level 1 is fast enough to keep up with a disk
/// and still shrinks guest memory well.
pub(crate) const ZSTD_LEVEL: i32 = 1;

/// Whether every byte of `data` is zero.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed-size blocks lets the compiler vectorise the loop; the
    // early exit per block keeps non-zero data cheap.
    let mut blocks = data.chunks_exact(256);
    for block in blocks.by_ref() {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// sha256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// sha256 of `len` zero bytes, without allocating them.
pub(crate) fn zero_sha256(len: u64) -> [u8; 32] {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        h.update(&ZEROS[..n as usize]);
        left -= n;
    }
    h.finalize().into()
}

/// Compresses `data` with zstd if that saves at least an eighth of it.
/// `None` means: store it raw (also if zstd cannot be set up).
pub(crate) fn compress(data: &[u8]) -> Option<Vec<u8>> {
    let budget = data.len() - data.len() / 8;
    if budget == 0 {
        return None;
    }
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?;
    let mut out = Vec::with_capacity(budget);
    // zstd fails with "destination too small" as soon as the output would
    // exceed the budget, so incompressible data costs little.
    match compressor.compress_to_buffer(data, &mut out) {
        Ok(n) if n <= budget && n > 0 => Some(out),
        _ => None,
    }
}

/// Decompresses `stored`, which must yield exactly `len` bytes.
pub(crate) fn decompress(stored: &[u8], len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    let mut d = zstd::bulk::Decompressor::new().ok()?;
    match d.decompress_to_buffer(stored, &mut out) {
        Ok(n) if n == len && out.len() == len => Some(out),
        _ => None,
    }
}

/// How many threads to hash and (de)compress chunks on.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Maps `items` through `f` on up to `threads` threads; the results are in
/// the order of the items.
pub(crate) fn par_map<T, R, F>(items: &[T], threads: usize, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let f = &f;
    let work = move |first: usize| -> Vec<(usize, R)> {
        items
            .iter()
            .enumerate()
            .skip(first)
            .step_by(threads)
            .map(|(i, item)| (i, f(item)))
            .collect()
    };
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads).map(|t| scope.spawn(move || work(t))).collect();
        let mut all = work(0);
        for h in handles {
            match h.join() {
                Ok(part) => all.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        for (i, r) in all {
            slots[i] = Some(r);
        }
    });
    slots
        .into_iter()
        .map(|r| r.expect("every item was mapped"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_test() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        for i in [0, 255, 256, 511, 999] {
            let mut v = vec![0u8; 1000];
            v[i] = 1;
            assert!(!is_zero(&v), "{i}");
        }
    }

    #[test]
    fn zero_hash_matches() {
        for len in [0u64, 1, 65535, 65536, 65537, 200_000] {
            assert_eq!(zero_sha256(len), sha256(&vec![0; len as usize]));
        }
    }

    #[test]
    fn compression_rules() {
        let text = b"ferry ".repeat(1000);
        let packed = compress(&text).expect("compressible");
        assert_eq!(decompress(&packed, text.len()).unwrap(), text);
        assert!(decompress(&packed, text.len() - 1).is_none());
        assert!(decompress(&packed, text.len() + 1).is_none());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&noise).is_none());
        assert!(compress(&[]).is_none());
    }

    #[test]
    fn par_map_keeps_order() {
        let items: Vec<u32> = (0..37).collect();
        for t in [1, 2, 3, 8, 100] {
            assert_eq!(
                par_map(&items, t, |x| x * 2),
                (0..37).map(|x| x * 2).collect::<Vec<_>>()
            );
        }
        assert!(par_map(&[] as &[u32], 4, |x| *x).is_empty());
    }
}
