//! Whole gzip spans inflated with libdeflate, which inflates 1.3–1.6 times faster than zlib-rs
//! but only whole streams: no restart at a bit offset, no preset window (see [`super::gzip`]).
//!
//! A span between two checkpoints is made a stream of its own: a stored block holding the
//! checkpoint's window (so that back-references into it resolve), then the span's deflate bits
//! shifted to follow it, then an empty final block. The span's output is what comes after the
//! window. Whatever does not come out at exactly the span's length (a gzip member ending
//! inside it, say) is left to the caller, who inflates it the zlib-rs way.

use libdeflate_sys as ld;

/// One libdeflate decompressor per thread (a few KiB; made once, used for every span).
struct Decompressor(*mut ld::libdeflate_decompressor);

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: allocated by libdeflate_alloc_decompressor, freed once.
        unsafe { ld::libdeflate_free_decompressor(self.0) }
    }
}

thread_local! {
    // SAFETY: allocation has no preconditions; a null result is checked where used.
    static DECOMPRESSOR: Decompressor = Decompressor(unsafe { ld::libdeflate_alloc_decompressor() });
}

/// The deflate bits `start_bit..end_bit` of `compressed` (bit 0: the lowest of its first
/// byte), which begin a block and end one (or the stream), inflated after `window`: exactly
/// `len` bytes, or `None` when they do not inflate to that. Returns libdeflate's output and
/// where the span's bytes start in it (after the window: left in place, not moved out).
pub(crate) fn inflate_span(
    compressed: &[u8],
    start_bit: u64,
    end_bit: u64,
    window: &[u8],
    len: usize,
) -> Option<(Vec<u8>, usize)> {
    if window.len() > super::gzip::WINDOW || end_bit < start_bit {
        return None;
    }
    if end_bit.div_ceil(8) > compressed.len() as u64 {
        return None;
    }
    let input = span_stream(compressed, start_bit, end_bit, window);
    let out_len = window.len() + len;
    let mut out: Vec<u8> = Vec::with_capacity(out_len);
    let mut got = 0usize;
    let ret = DECOMPRESSOR.with(|d| {
        if d.0.is_null() {
            return None;
        }
        // SAFETY: `input` is a live slice; `out` has `out_len` bytes of capacity, which
        // libdeflate only writes (at most `out_len`), and `got` is a valid place for the count.
        Some(unsafe {
            ld::libdeflate_deflate_decompress(
                d.0,
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out_len,
                &mut got,
            )
        })
    })?;
    if ret != ld::libdeflate_result_LIBDEFLATE_SUCCESS || got != out_len {
        return None;
    }
    // SAFETY: libdeflate wrote all `out_len` bytes.
    unsafe { out.set_len(out_len) };
    Some((out, window.len()))
}

/// The stream libdeflate is given: `window` as a stored block, the span's bits from a byte
/// boundary on, and an empty final block.
fn span_stream(compressed: &[u8], start_bit: u64, end_bit: u64, window: &[u8]) -> Vec<u8> {
    let nbits = end_bit - start_bit;
    let mut out = Vec::with_capacity(5 + window.len() + (nbits / 8) as usize + 16);
    // BFINAL 0, BTYPE 00 (stored), the rest of the byte padding; LEN, NLEN; the bytes.
    out.push(0);
    out.extend_from_slice(&(window.len() as u16).to_le_bytes());
    out.extend_from_slice(&(!(window.len() as u16)).to_le_bytes());
    out.extend_from_slice(window);
    let base = out.len();
    let (first, shift) = ((start_bit / 8) as usize, (start_bit % 8) as u32);
    let nbytes = nbits.div_ceil(8) as usize;
    let src = &compressed[first..];
    if shift == 0 {
        out.extend_from_slice(&src[..nbytes]);
    } else {
        // Eight bytes at a time: each output word is the input shifted down by `shift`, its
        // top bits from the byte after.
        let at = |k: usize| src.get(k).copied().unwrap_or(0);
        let mut k = 0;
        while k + 9 <= src.len() && k + 8 <= nbytes {
            let w = u64::from_le_bytes(src[k..k + 8].try_into().unwrap_or_default());
            let v = (w >> shift) | (u64::from(src[k + 8]) << (64 - shift));
            out.extend_from_slice(&v.to_le_bytes());
            k += 8;
        }
        while k < nbytes {
            out.push((at(k) >> shift) | (at(k + 1) << (8 - shift)));
            k += 1;
        }
    }
    // Past the span's last bit: BFINAL 1, BTYPE 01 (fixed Huffman), end of block (seven 0
    // bits): ten bits, 0b11 read lowest first.
    let used = (nbits % 8) as u32;
    if used != 0 {
        let last = base + nbytes - 1;
        out[last] &= (1u8 << used) - 1;
        out[last] |= 0b11 << used;
        if used > 6 {
            out.push(0b11u8 >> (8 - used));
        }
        // The rest of the ten bits are zeros: one more byte always covers them.
        out.push(0);
    } else {
        out.push(0b11);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::gzip::{Checkpoint, GzipReader};
    use std::io::{Read, Write};

    fn text(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 3000) % 3 == 0 {
                    x as u8
                } else {
                    b"the quick brown fox "[(x % 20) as usize]
                }
            })
            .collect()
    }

    fn gzip(parts: &[(&[u8], u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (p, level) in parts {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(*level));
            e.write_all(p).unwrap();
            out.extend(e.finish().unwrap());
        }
        out
    }

    /// Every span of a stream of several members, at every bit alignment its checkpoints
    /// fall on, inflates to its bytes (or, where a member ends inside it, says so and gives
    /// nothing wrong).
    #[test]
    fn every_span_inflates_whole_or_declines() {
        let parts = [text(700_000, 1), text(90_000, 2), text(400_000, 3)];
        let gz = gzip(&[(&parts[0], 6), (&parts[1], 1), (&parts[2], 9)]);
        let data = parts.concat();
        // At every block boundary.
        let mut r = GzipReader::new(&gz[..], Some(1)).unwrap();
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        let cps: Vec<Checkpoint> = r.take_checkpoints();
        let shifts: std::collections::HashSet<u8> = cps.iter().map(|c| c.bits).collect();
        assert!(
            cps.len() >= 20 && shifts.len() >= 4,
            "{} checkpoints, bit offsets {shifts:?}",
            cps.len()
        );
        let (mut whole, mut declined) = (0, 0);
        for (i, cp) in cps.iter().enumerate().filter(|(_, c)| !c.member_start) {
            let start_bit = cp.coff * 8 - u64::from(cp.bits);
            let (end_bit, end) = match cps.get(i + 1) {
                Some(n) => (n.coff * 8 - u64::from(n.bits), n.uoff as usize),
                None => (gz.len() as u64 * 8, data.len()),
            };
            let window = zstd::bulk::decompress(&cp.window, crate::index::gzip::WINDOW).unwrap();
            let len = end - cp.uoff as usize;
            match inflate_span(&gz, start_bit, end_bit, &window, len) {
                Some((out, from)) => {
                    assert!(out[from..] == data[cp.uoff as usize..end], "span {i}");
                    assert!(out[..from] == window[..], "span {i}: the window before it");
                    whole += 1;
                }
                None => declined += 1,
            }
        }
        assert!(
            whole >= 15 && declined <= 3,
            "{whole} whole, {declined} declined"
        );
    }

    /// A span that does not make the length asked (here one byte more) is declined.
    #[test]
    fn a_wrong_length_is_declined() {
        let data = text(300_000, 7);
        let gz = gzip(&[(&data, 6)]);
        let mut r = GzipReader::new(&gz[..], Some(64 << 10)).unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        let cps = r.take_checkpoints();
        let (cp, next) = (&cps[1], &cps[2]);
        let window = zstd::bulk::decompress(&cp.window, crate::index::gzip::WINDOW).unwrap();
        let (s, e) = (
            cp.coff * 8 - u64::from(cp.bits),
            next.coff * 8 - u64::from(next.bits),
        );
        let len = (next.uoff - cp.uoff) as usize;
        assert!(inflate_span(&gz, s, e, &window, len).is_some());
        assert!(inflate_span(&gz, s, e, &window, len + 1).is_none());
        assert!(inflate_span(&gz, s, e, &window, len - 1).is_none());
    }
}
