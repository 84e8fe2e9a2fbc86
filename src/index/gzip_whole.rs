//! Whole gzip spans inflated with libdeflate, which inflates 1.3–1.6 times faster than zlib-rs
//! but only whole streams: no restart at a bit offset, no preset window (see [`super::gzip`]).
//!
//! A span between two checkpoints is made a stream of its own: blocks whose output is the
//! checkpoint's window (so that back-references into it resolve) and whose bits end where the
//! span's first bit lies in its byte, then the span's bytes as they are, then an empty final
//! block. The span's output is what comes after the window. Whatever does not come out at
//! exactly the span's length (a gzip member ending inside it, say) is left to the caller, who
//! inflates it the zlib-rs way.

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
    let input = span_stream(compressed, start_bit, end_bit, window)
        .unwrap_or_else(|| shifted_span_stream(compressed, start_bit, end_bit, window));
    let out_len = window.len() + len;
    let mut out: Vec<u8> = super::span_buffers::take(out_len);
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

/// LSB-first bit packing, as deflate lays out bits (also what tests write deflate streams by
/// hand with).
#[derive(Default)]
pub(crate) struct Bits {
    pub(crate) out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    pub(crate) fn put(&mut self, v: u64, n: u32) {
        self.acc |= v << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code: sent from its most significant bit.
    pub(crate) fn code(&mut self, code: u64, n: u32) {
        let rev = (0..n).fold(0, |r, i| r | ((code >> i) & 1) << (n - 1 - i));
        self.put(rev, n);
    }

    /// A block's header: not final; `kind` 0 stored, 1 fixed Huffman.
    fn header(&mut self, kind: u64) {
        self.put(0, 1);
        self.put(kind, 2);
    }

    /// A literal of the fixed Huffman code: 8 bits for 0–143, 9 for 144–255.
    fn literal(&mut self, b: u8) {
        match b {
            0..=143 => self.code(0x30 + u64::from(b), 8),
            _ => self.code(0x190 + u64::from(b - 144), 9),
        }
    }

    /// End of block in the fixed Huffman code (seven 0 bits).
    fn end_of_block(&mut self) {
        self.code(0, 7);
    }
}

/// The stream libdeflate is given: blocks whose output is `window` and whose bits end where
/// the span's first bit lies in its byte, then the span's bytes as they are, then an empty
/// final block. The span's bits keep their place in their bytes: a stored block among them
/// pads to the byte boundary it had (shifting them would move it). `None` where no such
/// blocks can be made (an odd offset needs a 9-bit literal: a window byte of 144 or more).
fn span_stream(compressed: &[u8], start_bit: u64, end_bit: u64, window: &[u8]) -> Option<Vec<u8>> {
    if end_bit <= start_bit {
        return None;
    }
    let shift = (start_bit % 8) as u32;
    // The window as a stored block, but for its last `k` bytes, sent as fixed-Huffman
    // literals, then `empty` empty fixed blocks: after the stored block (which ends on a byte
    // boundary) that is 10 + 8k + (9-bit literals) + 10 * empty bits, which must leave
    // `shift` bits in the last byte.
    let (k, empty) = if shift % 2 == 0 {
        (0, (shift / 2) as usize)
    } else {
        let k = window.iter().rev().position(|&b| b >= 144)? + 1;
        (k, (shift + 8 - 3) as usize % 8 / 2)
    };
    let (stored, literals) = window.split_at(window.len() - k);
    let mut bits = Bits {
        out: Vec::with_capacity(8 + window.len() + (end_bit - start_bit) as usize / 8 + 8),
        acc: 0,
        n: 0,
    };
    bits.header(0);
    bits.put(0, 8 - bits.n); // to the byte boundary
    bits.out
        .extend_from_slice(&(stored.len() as u16).to_le_bytes());
    bits.out
        .extend_from_slice(&(!(stored.len() as u16)).to_le_bytes());
    bits.out.extend_from_slice(stored);
    if k > 0 {
        bits.header(1);
        literals.iter().for_each(|&b| bits.literal(b));
        bits.end_of_block();
    }
    for _ in 0..empty {
        bits.header(1);
        bits.end_of_block();
    }
    if bits.n != shift {
        return None; // (cannot happen: the arithmetic above)
    }
    // The span's bytes, the first one's low bits replaced by the blocks' last ones.
    let (first, last) = ((start_bit / 8) as usize, ((end_bit - 1) / 8) as usize);
    let span = compressed.get(first..=last)?;
    let mut out = bits.out;
    out.push(
        (bits.acc as u8 & ((1u16 << shift) - 1) as u8) | (span[0] & !(((1u16 << shift) - 1) as u8)),
    );
    out.extend_from_slice(&span[1..]);
    let last = out.len() - 1;
    end_after(&mut out, last, (end_bit % 8) as u32);
    Some(out)
}

/// Ends a stream whose last bits are the low `used` bits of `out[last]` (all of it when 0):
/// past them, BFINAL 1, BTYPE 01 (fixed Huffman), end of block (seven 0 bits): ten bits, 0b11
/// read lowest first.
fn end_after(out: &mut Vec<u8>, last: usize, used: u32) {
    if used != 0 {
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
}

/// The stream libdeflate is given where [`span_stream`] cannot make one: `window` as a stored
/// block, the span's bits shifted to start on a byte boundary, and an empty final block. A
/// stored block among the span's bits then pads to another boundary than it had: libdeflate
/// finds its length and its complement disagree, and the span is declined.
fn shifted_span_stream(compressed: &[u8], start_bit: u64, end_bit: u64, window: &[u8]) -> Vec<u8> {
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
    // `nbytes` > 0 whenever bits are left over (`nbits % 8 != 0`).
    end_after(
        &mut out,
        (base + nbytes).saturating_sub(1),
        (nbits % 8) as u32,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::gzip::{Checkpoint, GzipReader};
    use std::io::Read;

    fn text(n: usize, seed: u64) -> Vec<u8> {
        crate::index::xorshift_bytes(n, &mut { seed }, |i, x| {
            if (i / 3000) % 3 == 0 {
                x as u8
            } else {
                b"the quick brown fox "[(x % 20) as usize]
            }
        })
    }

    /// Every span of a stream of several members, at every bit alignment its checkpoints
    /// fall on, inflates to its bytes (or, where a member ends inside it, says so and gives
    /// nothing wrong).
    #[test]
    fn every_span_inflates_whole_or_declines() {
        // Incompressible stretches make zlib write stored blocks, which pad to a byte
        // boundary: the spans' bits must keep their place in their bytes.
        let noise: Vec<u8> = (0..300_000u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        // Text and noise in turns: Huffman blocks ending anywhere in a byte, stored ones after.
        let mixed: Vec<u8> = (0..24usize)
            .flat_map(|k| {
                [
                    text(9_000, 10 + k as u64),
                    noise[k * 10_000..][..25_000].to_vec(),
                ]
            })
            .flatten()
            .collect();
        let parts = [
            text(700_000, 1),
            mixed,
            noise.clone(),
            text(400_000, 3),
            noise,
        ];
        let gz = crate::index::gzip_members_at(&[
            (&parts[0], 6),
            (&parts[1], 1),
            (&parts[2], 6),
            (&parts[3], 9),
            (&parts[4], 0),
        ]);
        let data = parts.concat();
        // At every block boundary (a span is a block), and further apart (a span is blocks).
        for spacing in [1, 40 << 10, 100 << 10] {
            spans_inflate_whole_or_decline(&gz, &data, spacing);
        }
    }

    fn spans_inflate_whole_or_decline(gz: &[u8], data: &[u8], spacing: u64) {
        let mut r = GzipReader::new(gz, Some(spacing)).unwrap();
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        let cps: Vec<Checkpoint> = r.take_checkpoints();
        let shifts: std::collections::HashSet<u8> = cps.iter().map(|c| c.bits).collect();
        assert!(
            cps.len() >= 12 && shifts.len() >= 4,
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
            let window = cp.window.decode().unwrap();
            let len = end - cp.uoff as usize;
            match inflate_span(gz, start_bit, end_bit, &window, len) {
                Some((out, from)) => {
                    assert!(out[from..] == data[cp.uoff as usize..end], "span {i}");
                    assert!(out[..from] == window[..], "span {i}: the window before it");
                    whole += 1;
                }
                None => declined += 1,
            }
        }
        eprintln!("spacing {spacing}: {whole} whole, {declined} declined");
        // (Declined: spans where a member ends, and odd offsets after a window of bytes
        // under 144 only.)
        assert!(
            whole >= 5 && declined * 5 <= whole,
            "spacing {spacing}: {whole} whole, {declined} declined"
        );
    }

    /// A span that starts anywhere in a byte and holds a stored block (which pads to the byte
    /// boundary it had in the stream) inflates whole: its bits are not moved in their bytes.
    #[test]
    fn spans_holding_stored_blocks_inflate_at_every_bit_offset() {
        for k in 1..=8usize {
            // k 9-bit literals (the window), then the span: a stored block, a fixed block of
            // literals, then (past the span) an empty final block.
            let window: Vec<u8> = (0..k).map(|i| 200 + i as u8).collect();
            let stored = b"stored bytes, copied as they are";
            let tail = b"and literals after";
            let mut b = Bits {
                out: Vec::new(),
                acc: 0,
                n: 0,
            };
            b.header(1);
            window.iter().for_each(|&x| b.literal(x));
            b.end_of_block();
            let start_bit = b.out.len() as u64 * 8 + u64::from(b.n);
            b.header(0);
            b.put(0, (8 - b.n) % 8);
            b.put(stored.len() as u64, 16);
            b.put(!(stored.len() as u16) as u64, 16);
            stored.iter().for_each(|&x| b.put(u64::from(x), 8));
            b.header(1);
            tail.iter().for_each(|&x| b.literal(x));
            b.end_of_block();
            let end_bit = b.out.len() as u64 * 8 + u64::from(b.n);
            b.put(1, 1); // the final block: empty
            b.put(1, 2);
            b.end_of_block();
            b.put(0, 7);
            let span = [&stored[..], &tail[..]].concat();
            assert!(start_bit % 8 != 0 || k == 6, "k {k}: at bit {start_bit}");
            let (out, from) = inflate_span(&b.out, start_bit, end_bit, &window, span.len())
                .unwrap_or_else(|| panic!("k {k}: declined (the span starts at bit {start_bit})"));
            assert_eq!(&out[from..], &span[..], "k {k}");
        }
    }

    /// A span that does not make the length asked (here one byte more) is declined.
    #[test]
    fn a_wrong_length_is_declined() {
        let data = text(300_000, 7);
        let gz = crate::index::gzip_members_at(&[(&data, 6)]);
        let mut r = GzipReader::new(&gz[..], Some(64 << 10)).unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        let cps = r.take_checkpoints();
        let (cp, next) = (&cps[1], &cps[2]);
        let window = cp.window.decode().unwrap();
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
