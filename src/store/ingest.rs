//! Writing blobs into the store: [`BlobWriter`] hashes what it writes and lands the blob only
//! if the digest matches; [`Store::ingest`] opens one that resumes a layer's partial download
//! (kept in `tmp/` when a pull fails or dies), and the rest of what a layer's fetch leaves there.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;

use super::{sync_dir, temp_owner, Store};
use crate::digest::Hasher;
use crate::error::IoContext;
use crate::{Digest, Error, Result};

impl Store {
    /// The name of the lock held by whoever fetches layer `d` (and so writes its partial
    /// download, [`Store::ingest_path`]).
    pub(crate) fn layer_lock_name(d: &Digest) -> String {
        format!("layer-{}", d.hex())
    }

    /// Where the download of blob `d` in progress, or left by a pull that failed or died, is
    /// kept: a prefix of the blob, resumed by the next pull (see [`Store::ingest`]).
    pub(crate) fn ingest_path(&self, d: &Digest) -> PathBuf {
        self.root.join("tmp").join(format!("{}.ingest", d.hex()))
    }

    /// Removes the partial download of blob `d` (the caller holds its layer lock).
    pub(crate) fn discard_ingest(&self, d: &Digest) {
        let _ = fs::remove_file(self.ingest_path(d));
    }

    /// Removes the temp files an earlier fetch of layer `d` left (a process killed mid-pull:
    /// its blob and seekable copy in progress, `<hex>.PID.SEQ` and `<hex>.zst.PID.SEQ`). The
    /// caller holds the layer's lock ([`Store::layer_lock_name`]), which whoever writes them
    /// holds too, so none of them is being written. Returns the bytes freed.
    pub(crate) fn clear_layer_temps(&self, d: &Digest) -> u64 {
        let prefix = format!("{}.", d.hex());
        let dir = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&dir) else {
            return 0;
        };
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && temp_owner(&name).is_some() {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    freed += len;
                }
            }
        }
        freed
    }

    /// Opens the resumable download of blob `expected` ([`Store::ingest_path`]); the caller
    /// holds its layer lock. A partial download already there is kept if it has at least
    /// `min_resume` bytes and no more than `max_len` (the descriptor's size), else emptied.
    ///
    /// Returns the writer and a reader of the bytes already on disk (empty when starting
    /// afresh): those must be written to the writer first, as read — it hashes them again
    /// (sha256 state cannot be saved) without writing them — then the rest of the blob. The
    /// caller feeds the same bytes to whatever else consumes the blob (the indexer), so the
    /// resumed blob is still read in one pass. Dropped uncommitted, the writer leaves the file
    /// (for the next pull to resume); [`Store::discard_ingest`] removes it.
    pub(crate) fn ingest(
        &self,
        expected: Digest,
        max_len: u64,
        min_resume: u64,
    ) -> Result<(BlobWriter, Box<dyn Read + Send>)> {
        let path = self.ingest_path(&expected);
        let ctx = || format!("opening {}", path.display());
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(ctx)?;
        let mut len = file.metadata().ctx(ctx)?.len();
        if len > max_len || len < min_resume {
            file.set_len(0).ctx(ctx)?;
            len = 0;
        }
        file.seek(std::io::SeekFrom::Start(len)).ctx(ctx)?;
        let kept: Box<dyn Read + Send> = if len > 0 {
            Box::new(File::open(&path).ctx(ctx)?.take(len))
        } else {
            Box::new(std::io::empty())
        };
        let writer = BlobWriter {
            file: Some(file),
            tmp: path,
            dest: self.blob_path(&expected),
            expected,
            hasher: Hasher::default(),
            bytes: 0,
            max_len,
            on_disk: len,
            keep: true,
        };
        Ok((writer, kept))
    }

    /// Starts writing a blob that will be verified against `expected` when committed. Writing
    /// more than `max_len` bytes (the descriptor's size) fails at once.
    #[cfg(test)]
    fn blob_writer(&self, expected: Digest, max_len: u64) -> Result<BlobWriter> {
        let tmp = self.temp_path(&expected.hex());
        let file = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest: self.blob_path(&expected),
            expected,
            hasher: Hasher::default(),
            bytes: 0,
            max_len,
            on_disk: 0,
            keep: false,
        })
    }
}

/// A blob being written: bytes go to a temp file and are hashed; [`BlobWriter::commit`] renames
/// the file into place only if the digest matches. Dropped uncommitted, the temp file is removed.
pub(crate) struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: Digest,
    hasher: Hasher,
    bytes: u64,
    max_len: u64,
    /// Bytes already in the file (a resumed download): hashed as they are written again,
    /// not written.
    on_disk: u64,
    /// Left in place when dropped uncommitted (a resumable download).
    keep: bool,
}

impl BlobWriter {
    /// Bytes that were on disk already when the writer was opened (a resumed download).
    pub fn on_disk(&self) -> u64 {
        self.on_disk
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Checks the digest and renames the blob into place.
    pub fn commit(mut self, what: &str) -> Result<PathBuf> {
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.expected {
            return Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: self.expected,
                actual,
            });
        }
        let file = self.file.take().expect("committed once");
        file.sync_all()
            .ctx(|| format!("syncing {}", self.tmp.display()))?;
        fs::rename(&self.tmp, &self.dest).ctx(|| format!("storing {}", self.dest.display()))?;
        sync_dir(&self.dest);
        Ok(self.dest.clone())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("committed"))?;
        if self.bytes + buf.len() as u64 > self.max_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "blob {} is larger than the {} bytes its descriptor declares",
                    self.expected, self.max_len
                ),
            ));
        }
        if self.bytes < self.on_disk {
            // The bytes a resumed download had on disk, read back: hash, do not rewrite.
            let n = buf.len().min((self.on_disk - self.bytes) as usize);
            self.hasher.update(&buf[..n]);
            self.bytes += n as u64;
            return Ok(n);
        }
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() && !self.keep {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_before_they_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = Digest::of(b"layer bytes");
        let mut w = store.blob_writer(good, 11).unwrap();
        w.write_all(b"layer bytes").unwrap();
        assert_eq!(w.commit("test").unwrap(), store.blob_path(&good));
        assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"layer bytes");

        let other = Digest::of(b"something else");
        let mut w = store.blob_writer(other, 100).unwrap();
        w.write_all(b"tampered").unwrap();
        let err = w.commit("layer x").unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        assert!(!store.blob_path(&other).exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        // A blob longer than its descriptor fails on the write that crosses the size.
        let mut w = store.blob_writer(good, 4).unwrap();
        let err = w.write_all(b"layer bytes").unwrap_err().to_string();
        assert!(err.contains("larger than the 4 bytes"), "{err}");
    }

    #[test]
    fn an_ingest_is_kept_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = Digest::of(&blob);
        let len = blob.len() as u64;
        // A first download gets 40 000 bytes and fails: the writer is dropped, the bytes stay.
        let (mut w, mut kept) = store.ingest(d, len, 1).unwrap();
        assert_eq!(w.on_disk(), 0);
        assert_eq!(std::io::copy(&mut kept, &mut std::io::sink()).unwrap(), 0);
        w.write_all(&blob[..40_000]).unwrap();
        drop(w);
        assert_eq!(fs::metadata(store.ingest_path(&d)).unwrap().len(), 40_000);
        // Too few bytes to be worth resuming: emptied.
        let (w, _) = store.ingest(d, len, 50_000).unwrap();
        assert_eq!(w.on_disk(), 0);
        drop(w);
        assert_eq!(fs::metadata(store.ingest_path(&d)).unwrap().len(), 0);
        // Resumed: the bytes on disk are read back and hashed, the rest written after them.
        let (mut w, _) = store.ingest(d, len, 1).unwrap();
        w.write_all(&blob[..40_000]).unwrap();
        drop(w);
        let (mut w, mut kept) = store.ingest(d, len, 1).unwrap();
        assert_eq!(w.on_disk(), 40_000);
        let mut back = Vec::new();
        kept.read_to_end(&mut back).unwrap();
        assert_eq!(back, &blob[..40_000]);
        w.write_all(&back).unwrap();
        w.write_all(&blob[40_000..]).unwrap();
        assert_eq!(w.commit("test").unwrap(), store.blob_path(&d));
        assert_eq!(fs::read(store.blob_path(&d)).unwrap(), blob);
        assert!(!store.ingest_path(&d).exists());
        // A partial longer than the blob is not resumed.
        fs::write(store.ingest_path(&d), vec![0u8; 100_001]).unwrap();
        let (w, _) = store.ingest(d, len, 1).unwrap();
        assert_eq!(w.on_disk(), 0);
        drop(w);
        // Damaged bytes on disk fail the digest: nothing lands.
        fs::write(store.ingest_path(&d), vec![0u8; 40_000]).unwrap();
        let (mut w, mut kept) = store.ingest(d, len, 1).unwrap();
        std::io::copy(&mut kept, &mut w).unwrap();
        w.write_all(&blob[40_000..]).unwrap();
        fs::remove_file(store.blob_path(&d)).unwrap();
        assert!(w.commit("test").is_err());
        assert!(!store.blob_path(&d).exists());
    }

    #[test]
    fn a_layers_stale_temp_files_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (d, other) = (Digest::of(b"layer"), Digest::of(b"other"));
        let tmp = dir.path().join("tmp");
        for name in [
            format!("{}.999999999.0", d.hex()),
            format!("{}.zst.999999999.1", d.hex()),
            format!("{}.999999999.2", other.hex()),
        ] {
            fs::write(tmp.join(name), b"12345").unwrap();
        }
        let (mut w, _) = store.ingest(d, 100, 1).unwrap();
        w.write_all(b"kept").unwrap();
        assert_eq!(store.clear_layer_temps(&d), 10);
        let mut left: Vec<_> = fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            format!("{}.999999999.2", other.hex()),
            format!("{}.ingest", d.hex()),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
