//! Gzip with random access: a decoder that records zran-style checkpoints while it inflates, and
//! that can restart from any checkpoint.
//!
//! A checkpoint is taken at a deflate block boundary once at least the chosen spacing of output
//! has passed since the previous one. It holds the compressed offset, the 0–7 bits of the last
//! consumed byte that belong to the next block, and the 32 KiB of output before it (deflate's
//! back-reference window). Restarting primes those bits into a raw inflater and sets the window
//! as its dictionary. `flate2` cannot do this (no `inflatePrime`), so this drives zlib-rs through
//! its C API. Several concatenated gzip members are one stream; a member start is a checkpoint that
//! needs no window.

use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::sync::Arc;

use libz_rs_sys as z;
use serde::{Deserialize, Serialize};

/// Deflate's maximum back-reference distance: the window a checkpoint must carry.
pub const WINDOW: usize = 32 * 1024;
const IN_BUF: usize = 64 * 1024;

/// A place in a gzip stream where inflation can restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the uncompressed stream.
    pub uoff: u64,
    /// Offset in the compressed stream of the first byte not yet consumed.
    pub coff: u64,
    /// Bits (0–7) of the byte at `coff - 1` that belong to the next block.
    pub bits: u8,
    /// `coff` is the first byte of a gzip member header; no window is needed.
    pub member_start: bool,
    /// The 32 KiB of output before `uoff`, zstd-compressed (empty for a member start).
    pub window: Window,
}

/// Whether two tables of checkpoints say the same: the same places, windows compared by
/// content (two zstd builds may compress one differently; identical bytes are equal without
/// decoding). `b_apart`: `b`'s windows may be left out (an index that keeps them in a blob of
/// their own, each checked as it is fetched).
pub fn same_checkpoints(a: &[Checkpoint], b: &[Checkpoint], b_apart: bool) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(p, q)| {
            (p.uoff, p.coff, p.bits, p.member_start) == (q.uoff, q.coff, q.bits, q.member_start)
                && ((b_apart && q.window.is_empty())
                    || p.window == q.window
                    || p.window
                        .decode()
                        .is_ok_and(|w| q.window.decode().is_ok_and(|v| v == w)))
        })
}

/// Moves the checkpoints' windows out, laid end to end in checkpoint order: returns them and
/// each one's (offset, length) there (how access tables and published indexes store them).
pub fn take_windows(cps: &mut [Checkpoint]) -> (Vec<u8>, Vec<(u64, u32)>) {
    let mut blob = Vec::new();
    let mut spans = Vec::with_capacity(cps.len());
    for cp in cps {
        spans.push((blob.len() as u64, cp.window.len() as u32));
        blob.extend_from_slice(&cp.window);
        cp.window = Window::default();
    }
    (blob, spans)
}

/// A checkpoint's compressed window: held in memory (just made, or decoded), or a slice of the
/// mapped access table it was loaded from, so that a mount's checkpoints cost it no memory of
/// their own however large the layer. Serialized exactly as a `Vec<u8>`.
#[derive(Clone, Default)]
pub struct Window(WindowBytes);

#[derive(Clone)]
enum WindowBytes {
    Owned(Vec<u8>),
    /// `range` of a mapped file.
    Mapped(Arc<crate::mapped::Mapped>, std::ops::Range<usize>),
}

impl Default for WindowBytes {
    fn default() -> Self {
        WindowBytes::Owned(Vec::new())
    }
}

impl Window {
    /// The window at `range` of `map` (checked in range by the caller).
    pub(crate) fn mapped(map: Arc<crate::mapped::Mapped>, range: std::ops::Range<usize>) -> Window {
        Window(WindowBytes::Mapped(map, range))
    }

    /// The window itself (up to [`WINDOW`] bytes).
    pub fn decode(&self) -> io::Result<Vec<u8>> {
        thread_local! {
            // One zstd context per thread (~100 KiB, initialised), not one per window: every
            // cold random read decodes one or two.
            static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let decoded = ZSTD.with(|z| {
            let mut z = z.borrow_mut();
            if z.is_none() {
                *z = Some(zstd::bulk::Decompressor::new()?);
            }
            z.as_mut().expect("made above").decompress(self, WINDOW)
        });
        decoded.map_err(|e| corrupt(format!("checkpoint window: {e}")))
    }
}

impl std::ops::Deref for Window {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            WindowBytes::Owned(v) => v,
            WindowBytes::Mapped(m, r) => &m.as_slice()[r.clone()],
        }
    }
}

impl From<Vec<u8>> for Window {
    fn from(v: Vec<u8>) -> Window {
        Window(WindowBytes::Owned(v))
    }
}

impl PartialEq for Window {
    fn eq(&self, o: &Window) -> bool {
        **self == **o
    }
}
impl Eq for Window {}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Window({} bytes)", self.len())
    }
}

impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Window, D::Error> {
        Vec::<u8>::deserialize(d).map(Window::from)
    }
}

/// Owns a raw (header-less) zlib-rs inflate stream.
struct RawInflate {
    // Boxed: zlib keeps a pointer back to the stream, so it must not move.
    strm: Box<z::z_stream>,
}

// SAFETY: the stream is owned exclusively by this value and has no thread affinity.
unsafe impl Send for RawInflate {}

impl RawInflate {
    fn new() -> io::Result<RawInflate> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid, default-initialised stream; version/size come from the library.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                -15,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if ret != z::Z_OK {
            return Err(io::Error::other(format!("inflateInit2 failed ({ret})")));
        }
        Ok(RawInflate { strm })
    }

    fn reset(&mut self) {
        // SAFETY: the stream was initialised by inflateInit2_.
        unsafe { z::inflateReset(&mut *self.strm) };
    }

    fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: initialised stream.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, bits as i32, value as i32) };
        check(ret, "inflatePrime")
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        if dict.is_empty() {
            return Ok(());
        }
        // SAFETY: initialised stream; dict is a valid slice for the call.
        let ret =
            unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) };
        check(ret, "inflateSetDictionary")
    }

    /// One inflate call into `output` (written, never read: it may be uninitialised). Returns
    /// (consumed, produced, return code, data_type).
    fn run(
        &mut self,
        input: &[u8],
        output: &mut [MaybeUninit<u8>],
        flush: i32,
    ) -> (usize, usize, i32, i32) {
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = output.as_mut_ptr().cast();
        s.avail_out = output.len().min(u32::MAX as usize) as u32;
        let (ain, aout) = (s.avail_in, s.avail_out);
        // SAFETY: next_in/next_out point into live slices of the stated lengths.
        let ret = unsafe { z::inflate(s, flush) };
        let s = &mut *self.strm;
        let consumed = (ain - s.avail_in) as usize;
        let produced = (aout - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        (consumed, produced, ret, s.data_type)
    }
}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: initialised stream, ended exactly once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

fn check(ret: i32, what: &str) -> io::Result<()> {
    if ret == z::Z_OK {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what} failed ({ret})")))
    }
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The last [`WINDOW`] bytes of output, for checkpoint windows.
struct Ring {
    buf: Vec<u8>,
    pos: usize,
    full: bool,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            buf: vec![0; WINDOW],
            pos: 0,
            full: false,
        }
    }
    fn clear(&mut self) {
        self.pos = 0;
        self.full = false;
    }
    fn push(&mut self, mut data: &[u8]) {
        if data.len() >= WINDOW {
            data = &data[data.len() - WINDOW..];
        }
        let first = data.len().min(WINDOW - self.pos);
        self.buf[self.pos..self.pos + first].copy_from_slice(&data[..first]);
        let rest = &data[first..];
        self.buf[..rest.len()].copy_from_slice(rest);
        let new_pos = self.pos + data.len();
        if new_pos >= WINDOW {
            self.full = true;
        }
        self.pos = new_pos % WINDOW;
    }
    fn contents(&self) -> Vec<u8> {
        if self.full {
            let mut v = Vec::with_capacity(WINDOW);
            v.extend_from_slice(&self.buf[self.pos..]);
            v.extend_from_slice(&self.buf[..self.pos]);
            v
        } else {
            self.buf[..self.pos].to_vec()
        }
    }
}

struct Recorder {
    spacing: u64,
    last: u64,
    /// The sparser spacing whose checkpoints must all be among the recorded ones (see
    /// [`GzipReader::with_sparser`]), and the last of those.
    sparser: u64,
    last_sparser: u64,
    ring: Ring,
    checkpoints: Vec<Checkpoint>,
    /// Compresses the windows (one context for all: not one made and freed per checkpoint).
    windows: zstd::bulk::Compressor<'static>,
}

impl Recorder {
    /// Whether a checkpoint is due at `uoff` (a place one may be taken); if so, it is taken
    /// as far as the spacing goes.
    fn due(&mut self, uoff: u64) -> bool {
        let sparser = uoff - self.last_sparser >= self.sparser;
        if !sparser && uoff - self.last < self.spacing {
            return false;
        }
        if sparser {
            self.last_sparser = uoff;
        }
        self.last = uoff;
        true
    }
}

/// The checkpoints among `cps` (recorded in order, at any spacing up to `spacing`, with those
/// of `spacing` among them: see [`GzipReader::with_sparser`]) that a reader recording every
/// `spacing` bytes would have taken: the same rule run over the places recorded, which hold
/// every place it would have picked and none it would have picked instead.
pub fn sparser(cps: &[Checkpoint], spacing: u64) -> Vec<Checkpoint> {
    let mut last = 0;
    cps.iter()
        .enumerate()
        .filter(|(k, cp)| {
            let keep = *k == 0 || cp.uoff - last >= spacing;
            if keep {
                last = cp.uoff;
            }
            keep
        })
        .map(|(_, cp)| cp.clone())
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Header,
    Deflate,
    Trailer,
    Done,
}

/// Decompresses a (multi-member) gzip stream as a `Read`, optionally recording checkpoints.
pub struct GzipReader<R> {
    inner: R,
    inbuf: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    /// Absolute compressed offset of `inbuf[in_pos]`.
    coff: u64,
    /// Absolute uncompressed offset of the next output byte.
    uoff: u64,
    z: RawInflate,
    state: State,
    members: u64,
    recorder: Option<Recorder>,
}

impl<R: Read> GzipReader<R> {
    /// Reads a gzip stream from its start, recording a checkpoint every `spacing` bytes of output
    /// (or none when `spacing` is `None`).
    pub fn new(inner: R, spacing: Option<u64>) -> io::Result<GzipReader<R>> {
        let windows = match spacing {
            Some(_) => Some(zstd::bulk::Compressor::new(1)?),
            None => None,
        };
        let recorder = spacing.zip(windows).map(|(spacing, windows)| Recorder {
            windows,
            spacing,
            last: 0,
            sparser: spacing,
            last_sparser: 0,
            ring: Ring::new(),
            checkpoints: vec![Checkpoint {
                uoff: 0,
                coff: 0,
                bits: 0,
                member_start: true,
                window: Window::default(),
            }],
        });
        Ok(GzipReader {
            inner,
            inbuf: vec![0; IN_BUF].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            coff: 0,
            uoff: 0,
            z: RawInflate::new()?,
            state: State::Header,
            members: 0,
            recorder,
        })
    }

    /// Also records every checkpoint that a reader of spacing `sparser` (larger) would have,
    /// so that [`sparser`] finds exactly those among the ones recorded: an index with dense
    /// checkpoints still says what one of `sparser` spacing says.
    pub fn with_sparser(mut self, sparser: u64) -> GzipReader<R> {
        if let Some(rec) = &mut self.recorder {
            rec.sparser = sparser.max(rec.spacing);
        }
        self
    }

    /// Restarts at `cp`. `inner` must be positioned at `cp.coff`, or at `cp.coff - 1` when
    /// `cp.bits > 0` (that byte's high bits are primed into the inflater).
    pub fn resume(mut inner: R, cp: &Checkpoint) -> io::Result<GzipReader<R>> {
        let mut z = RawInflate::new()?;
        let mut state = State::Header;
        if !cp.member_start {
            if cp.bits > 0 {
                let mut b = [0u8];
                inner.read_exact(&mut b)?;
                z.prime(cp.bits, b[0] >> (8 - cp.bits))?;
            }
            let window = cp.window.decode()?;
            z.set_dictionary(&window)?;
            state = State::Deflate;
        }
        Ok(GzipReader {
            inner,
            inbuf: vec![0; IN_BUF].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            coff: cp.coff,
            uoff: cp.uoff,
            z,
            state,
            // A resumed stream is past its first member: EOF at a member boundary is the end.
            members: 1,
            recorder: None,
        })
    }

    /// The checkpoints recorded so far (the first is always offset 0).
    pub fn take_checkpoints(&mut self) -> Vec<Checkpoint> {
        self.recorder
            .as_mut()
            .map(|r| std::mem::take(&mut r.checkpoints))
            .unwrap_or_default()
    }

    /// Uncompressed bytes produced so far (plus the resume offset).
    pub fn uncompressed_offset(&self) -> u64 {
        self.uoff
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Refills the input buffer when empty; returns false at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        if self.in_pos < self.in_len {
            return Ok(true);
        }
        self.in_pos = 0;
        self.in_len = 0;
        loop {
            match self.inner.read(&mut self.inbuf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.in_len = n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn next_byte(&mut self) -> io::Result<Option<u8>> {
        if !self.fill()? {
            return Ok(None);
        }
        let b = self.inbuf[self.in_pos];
        self.in_pos += 1;
        self.coff += 1;
        Ok(Some(b))
    }

    fn need_byte(&mut self, what: &str) -> io::Result<u8> {
        self.next_byte()?
            .ok_or_else(|| corrupt(format!("truncated gzip stream (in {what})")))
    }

    /// Parses a member header; returns false at a clean end of stream.
    fn read_header(&mut self) -> io::Result<bool> {
        let start = self.coff;
        let Some(b0) = self.next_byte()? else {
            if self.members == 0 {
                return Err(corrupt("empty stream: not gzip"));
            }
            return Ok(false);
        };
        if b0 == 0 && self.members > 0 {
            // Trailing zero padding after the last member (some writers add it): allowed,
            // anything else after it is not.
            while let Some(b) = self.next_byte()? {
                if b != 0 {
                    return Err(corrupt(format!(
                        "garbage after the last gzip member at byte {}",
                        self.coff - 1
                    )));
                }
            }
            return Ok(false);
        }
        let b1 = self.need_byte("header")?;
        if b0 != 0x1f || b1 != 0x8b {
            return Err(corrupt(format!(
                "not a gzip stream: bad magic {b0:02x}{b1:02x} at byte {start}"
            )));
        }
        let method = self.need_byte("header")?;
        if method != 8 {
            return Err(corrupt(format!("unknown gzip compression method {method}")));
        }
        let flags = self.need_byte("header")?;
        for _ in 0..6 {
            self.need_byte("header")?; // mtime, xfl, os
        }
        if flags & 0x04 != 0 {
            let lo = self.need_byte("header")? as usize;
            let hi = self.need_byte("header")? as usize;
            for _ in 0..(lo | hi << 8) {
                self.need_byte("header extra field")?;
            }
        }
        for flag in [0x08u8, 0x10] {
            if flags & flag != 0 {
                while self.need_byte("header name/comment")? != 0 {}
            }
        }
        if flags & 0x02 != 0 {
            self.need_byte("header crc")?;
            self.need_byte("header crc")?;
        }
        self.members += 1;
        self.z.reset();
        if let Some(rec) = &mut self.recorder {
            rec.ring.clear();
        }
        Ok(true)
    }

    /// Inflates into `out`; returns how many of its first bytes it wrote.
    fn inflate_some(&mut self, out: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        let flush = if self.recorder.is_some() {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        loop {
            if !self.fill()? {
                return Err(corrupt(format!(
                    "truncated gzip stream at compressed byte {}",
                    self.coff
                )));
            }
            let (c, p, ret, data_type) =
                self.z
                    .run(&self.inbuf[self.in_pos..self.in_len], out, flush);
            self.in_pos += c;
            self.coff += c as u64;
            self.uoff += p as u64;
            match ret {
                z::Z_OK | z::Z_BUF_ERROR => {}
                z::Z_STREAM_END => self.state = State::Trailer,
                z::Z_NEED_DICT => return Err(corrupt("deflate stream wants a dictionary")),
                _ => {
                    return Err(corrupt(format!(
                        "corrupt deflate data near compressed byte {} ({ret})",
                        self.coff
                    )))
                }
            }
            if let Some(rec) = &mut self.recorder {
                // SAFETY: inflate wrote out's first `p` bytes.
                rec.ring
                    .push(unsafe { std::slice::from_raw_parts(out.as_ptr().cast::<u8>(), p) });
                let at_boundary = data_type & 128 != 0 && data_type & 64 == 0;
                if ret != z::Z_STREAM_END && at_boundary && rec.due(self.uoff) {
                    rec.checkpoints.push(Checkpoint {
                        uoff: self.uoff,
                        coff: self.coff,
                        bits: (data_type & 7) as u8,
                        member_start: false,
                        window: rec.windows.compress(&rec.ring.contents())?.into(),
                    });
                }
            }
            if p > 0 || self.state != State::Deflate {
                return Ok(p);
            }
        }
    }
}

impl<R: Read> GzipReader<R> {
    /// Appends exactly `n` bytes of output to `out`, inflated straight into its spare capacity:
    /// a span read in pieces costs no zeroing of each piece before it is overwritten.
    pub fn read_append(&mut self, out: &mut Vec<u8>, n: usize) -> io::Result<()> {
        out.reserve(n);
        let target = out.len() + n;
        while out.len() < target {
            let len = out.len();
            let k = self.read_uninit(&mut out.spare_capacity_mut()[..target - len])?;
            if k == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "gzip stream ends early",
                ));
            }
            // SAFETY: read_uninit wrote the first `k` bytes of the spare capacity.
            unsafe { out.set_len(len + k) };
        }
        Ok(())
    }

    /// [`Read::read`] into memory that need not be initialised: returns how many of `out`'s
    /// first bytes it wrote.
    fn read_uninit(&mut self, out: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Header => {
                    if let Some(rec) = &mut self.recorder {
                        if self.members > 0 && rec.due(self.uoff) {
                            rec.checkpoints.push(Checkpoint {
                                uoff: self.uoff,
                                coff: self.coff,
                                bits: 0,
                                member_start: true,
                                window: Window::default(),
                            });
                        }
                    }
                    self.state = if self.read_header()? {
                        State::Deflate
                    } else {
                        State::Done
                    };
                }
                State::Deflate => {
                    let n = self.inflate_some(out)?;
                    if n > 0 {
                        return Ok(n);
                    }
                }
                State::Trailer => {
                    // CRC32 and ISIZE: integrity is checked by the layer's diff_id instead.
                    for _ in 0..8 {
                        self.need_byte("trailer")?;
                    }
                    self.state = State::Header;
                }
            }
        }
    }
}

impl<R: Read> Read for GzipReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // SAFETY: initialised bytes are valid `MaybeUninit`s, and read_uninit only writes
        // bytes (never uninitialised ones) into them.
        let out = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<u8>>(), out.len())
        };
        self.read_uninit(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that compress as a layer's do: runs of text between runs of noise.
    fn window_like(n: usize, seed: u64) -> Vec<u8> {
        crate::index::xorshift_bytes(n, &mut { seed | 1 }, |i, x| match (i / 512) % 2 {
            0 => b"/usr/lib/x86_64-linux-gnu/"[(x % 26) as usize],
            _ => x as u8,
        })
    }

    fn zstd_window(plain: &[u8], level: i32) -> Window {
        zstd::bulk::compress(plain, level).unwrap().into()
    }

    /// Windows decode with each thread's one context, short ones too (a checkpoint within a
    /// stream's first 32 KiB), one after the other; a damaged one is an error, never a window:
    /// cut short, decoding to more than 32 KiB, or not zstd at all.
    #[test]
    fn windows_decode_and_damaged_ones_are_refused() {
        for (n, seed) in [(WINDOW, 1), (1000, 3), (WINDOW, 2), (1, 4)] {
            let plain = window_like(n, seed);
            assert_eq!(zstd_window(&plain, 1).decode().unwrap(), plain);
        }
        let good = zstd_window(&window_like(WINDOW, 5), 1);
        let cut = Window::from(good[..good.len() / 2].to_vec());
        let big = zstd_window(&vec![7u8; WINDOW + 1], 1);
        for bad in [cut, big, Window::from(b"not zstd".to_vec())] {
            let err = bad.decode().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("checkpoint window"), "{err}");
        }
        // The context is still good after the errors.
        assert_eq!(good.decode().unwrap(), window_like(WINDOW, 5));
    }

    /// Checkpoints of the same stream whose windows another zstd compressed differently are
    /// the same; other bytes, another place, a damaged window, or a window left out (unless
    /// allowed) are not.
    #[test]
    fn checkpoints_compare_by_their_windows_content() {
        let cp = |uoff: u64, window: Window| Checkpoint {
            uoff,
            coff: uoff / 3,
            bits: 5,
            member_start: false,
            window,
        };
        let (w1, w2) = (window_like(WINDOW, 7), window_like(WINDOW, 8));
        let stored = vec![cp(1 << 18, zstd_window(&w1, 1))];
        let published = vec![cp(1 << 18, zstd_window(&w1, 19))];
        assert_ne!(stored[0].window, published[0].window);
        assert!(same_checkpoints(&stored, &published, false));
        let other = vec![cp(1 << 18, zstd_window(&w2, 1))];
        assert!(!same_checkpoints(&stored, &other, false));
        let moved = vec![cp(1 << 19, published[0].window.clone())];
        assert!(!same_checkpoints(&stored, &moved, false));
        let apart = vec![cp(1 << 18, Window::default())];
        assert!(same_checkpoints(&stored, &apart, true));
        assert!(!same_checkpoints(&stored, &apart, false));
        let broken = vec![cp(1 << 18, Window::from(b"broken".to_vec()))];
        assert!(!same_checkpoints(&broken, &published, false));
        // Two different damaged windows are not the same window.
        let damaged = vec![cp(1 << 18, Window::from(b"damaged".to_vec()))];
        assert!(!same_checkpoints(&broken, &damaged, false));
    }
}
