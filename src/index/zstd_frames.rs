//! The seekable copy of a zstd layer: the uncompressed stream cut into fixed-size pieces, each
//! compressed as an independent zstd frame, so a read only decompresses the frames it touches.

use std::io::{self, Read, Write};

/// Passes a stream through unchanged while writing its seekable copy.
pub struct Reframer<'w, R> {
    inner: R,
    out: &'w mut dyn Write,
    frame_size: usize,
    level: i32,
    pending: Vec<u8>,
    uoff: u64,
    coff: u64,
    frames: Vec<(u64, u64)>,
}

impl<'w, R: Read> Reframer<'w, R> {
    /// Wraps `inner`; frames of `frame_size` bytes go to `out` at zstd `level`.
    pub fn new(inner: R, out: &'w mut dyn Write, frame_size: usize, level: i32) -> Self {
        Reframer {
            inner,
            out,
            frame_size,
            level,
            pending: Vec::with_capacity(frame_size),
            uoff: 0,
            coff: 0,
            frames: Vec::new(),
        }
    }

    fn emit(&mut self, len: usize) -> io::Result<()> {
        let frame = zstd::bulk::compress(&self.pending[..len], self.level)?;
        self.out.write_all(&frame)?;
        self.frames.push((self.uoff, self.coff));
        self.uoff += len as u64;
        self.coff += frame.len() as u64;
        self.pending.drain(..len);
        Ok(())
    }

    /// Writes the last partial frame; returns every frame's (uncompressed, compressed) offset.
    pub fn finish(mut self) -> io::Result<Vec<(u64, u64)>> {
        if !self.pending.is_empty() {
            self.emit(self.pending.len())?;
        }
        self.out.flush()?;
        Ok(self.frames)
    }
}

impl<R: Read> Read for Reframer<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pending.extend_from_slice(&buf[..n]);
        while self.pending.len() >= self.frame_size {
            self.emit(self.frame_size)?;
        }
        Ok(n)
    }
}

/// Whether the seekable copy at `path` holds every frame of `frames`: its last frame decodes.
/// (A copy cut short by a crash before it was durable fails this, and is rebuilt.)
pub fn last_frame_ok(path: &std::path::Path, frames: &[(u64, u64)]) -> bool {
    use std::os::unix::fs::FileExt;
    let Some(&(_, start)) = frames.last() else {
        return std::fs::metadata(path).is_ok();
    };
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len <= start || len - start > 64 << 20 {
        return false;
    }
    let mut buf = vec![0u8; (len - start) as usize];
    file.read_exact_at(&mut buf, start).is_ok() && zstd::bulk::decompress(&buf, 64 << 20).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_independently() {
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut out = Vec::new();
        let mut r = Reframer::new(&data[..], &mut out, 4096, 3);
        io::copy(&mut r, &mut io::sink()).unwrap();
        let frames = r.finish().unwrap();
        assert_eq!(frames.len(), data.len().div_ceil(4096));
        for (i, &(u, c)) in frames.iter().enumerate() {
            let cend = frames.get(i + 1).map(|f| f.1 as usize).unwrap_or(out.len());
            let got = zstd::bulk::decompress(&out[c as usize..cend], 4096).unwrap();
            let uend = (u as usize + 4096).min(data.len());
            assert_eq!(got, &data[u as usize..uend]);
        }
    }
}
