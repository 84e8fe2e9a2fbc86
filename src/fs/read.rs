//! The read path: a file's bytes from the layers' readers (spans decoded on threads of their
//! own, off the FUSE workers), spans decompressed ahead of a walk, and lazily fetched bytes
//! waited for; and the reads a writable layer makes of the image's files.

use super::*;

/// Threads that run the jobs handed to them, off the FUSE workers: reads that first wait for
/// bytes to be fetched or decompressed here, copy-ups in the user's writable layer.
pub(crate) struct JobThreads {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

/// Threads for waiting reads: a read waits at most its deadline, so this many slow reads at
/// once is plenty; more queue.
pub(super) const WAITING_READ_THREADS: usize = 8;
/// Threads for decompressing reads: decompression is CPU work, so one per CPU (at least two,
/// so one long span does not hold up the rest).
pub(super) fn decoding_read_threads() -> usize {
    crate::cpus()
}

/// Jobs decompressing ahead at once: one per CPU (at least two). A reader walking the image in
/// order (`tar`, `cp -a`, a first boot) reads one file at a time, and inflating is most of the
/// work: each job takes the next span not taken, so every core inflates while the reader
/// copies, instead of one core inflating while the other waits for it.
pub(super) fn ahead_jobs() -> usize {
    decoding_read_threads()
}

impl JobThreads {
    /// `threads` threads named `bux-fuse-<name>-<n>`; more jobs than that queue.
    pub(crate) fn new(name: &str, threads: usize) -> JobThreads {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for n in 0..threads {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("bux-fuse-{name}-{n}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // the filesystem is gone
                    }
                });
        }
        JobThreads {
            tx: std::sync::Mutex::new(tx),
        }
    }

    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Box::new(job));
    }
}

/// Files up to this size are fetched whole on their first read (a file read at all is
/// usually read in full); larger ones this far past the read.
pub(super) const FETCH_AHEAD: u64 = 4 << 20;

impl Shared {
    pub(super) fn read_file(&self, i: Inode<'_>, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        self.read_file_with(i, offset, size, true)
    }

    /// With `decode` false, reads only what is decompressed already, else fails with `EAGAIN`
    /// (see [`LayerReader::read_decoded_at`]).
    pub(super) fn read_file_with(
        &self,
        i: Inode<'_>,
        offset: u64,
        size: u32,
        decode: bool,
    ) -> Result<Vec<u8>, Errno> {
        if offset >= i.size || !matches!(i.data, NodeData::File { .. } | NodeData::Sparse { .. }) {
            return Ok(Vec::new());
        }
        let len = (size as u64).min(i.size - offset) as usize;
        let mut buf = vec![0u8; len];
        self.fill_file(i, offset, &mut buf, decode)?;
        Ok(buf)
    }

    /// Fills `buf` (zeroed) with `i`'s bytes at `offset`, holes left as they are; the caller
    /// keeps it within the file.
    pub(super) fn fill_file(
        &self,
        i: Inode<'_>,
        offset: u64,
        buf: &mut [u8],
        decode: bool,
    ) -> Result<(), Errno> {
        match &i.data {
            NodeData::File {
                layer,
                offset: base,
            } => self.read_layer(*layer, base + offset, buf, decode),
            NodeData::Sparse { layer, extents } => {
                // Holes stay zero; copy the parts of extents that overlap [offset, offset+len).
                let end = offset + buf.len() as u64;
                let first = extents.partition_point(|e| e.file_off + e.len <= offset);
                for e in extents.iter_from(first).take_while(|e| e.file_off < end) {
                    let from = e.file_off.max(offset);
                    let to = (e.file_off + e.len).min(end);
                    let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                    let at = e.stream_off + (from - e.file_off);
                    self.read_layer(*layer, at, dst, decode)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// After a read of `ino` up to `end`: whether to start a job decompressing ahead in its
    /// layer's stream (see [`LayerReader::span_ahead`]). Records where the reads are and
    /// claims a job (at most [`ahead_jobs`] at once); the caller runs
    /// [`Shared::inflate_ahead`] on an ahead thread.
    pub(super) fn claim_ahead(&self, ino: INodeNo, end: u64) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let Ok(i) = self.inode(ino) else { return false };
        let NodeData::File { layer, offset } = i.data else {
            return false;
        };
        let pos = offset + end.min(i.size).saturating_sub(1);
        let Some(reader) = self.layers.get(layer as usize) else {
            return false;
        };
        let at = (layer as u64) << 48 | pos.min((1 << 48) - 1);
        // Every read comes here: while every job runs, it only learns where the reads are.
        let max = ahead_jobs();
        if self.ahead_jobs.load(Acquire) >= max {
            self.ahead_at.store(at, Relaxed);
            return false;
        }
        if reader.span_ahead(&self.cache, pos).is_none() {
            return false;
        }
        self.ahead_at.store(at, Relaxed);
        self.ahead_jobs
            .fetch_update(AcqRel, Acquire, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Starts a job decompressing ahead (claimed by [`Shared::claim_ahead`]).
    pub(super) fn start_ahead(self: &Arc<Self>) {
        let shared = self.clone();
        self.ahead.run(move || shared.inflate_ahead());
    }

    /// Decompresses ahead of the reads, following them as they go on, until nothing is left
    /// to do ahead of where they are (each span once: the jobs take the first not taken).
    pub(super) fn inflate_ahead(&self) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        loop {
            let at = self.ahead_at.load(Relaxed);
            let (layer, pos) = ((at >> 48) as usize, at & ((1 << 48) - 1));
            let Some(reader) = self.layers.get(layer) else {
                break;
            };
            let Some(span) = reader.span_ahead(&self.cache, pos) else {
                break;
            };
            if let Err(e) = reader.inflate_span(&self.cache, span) {
                tracing::debug!("decompressing ahead in layer {layer}: {e}");
                break;
            }
        }
        self.ahead_jobs.fetch_sub(1, Release);
    }

    pub(super) fn read_layer(
        &self,
        layer: u32,
        at: u64,
        buf: &mut [u8],
        decode: bool,
    ) -> Result<(), Errno> {
        let reader = self.layers.get(layer as usize).ok_or(Errno::EIO)?;
        let read = match decode {
            true => reader.read_at(&self.cache, at, buf),
            false => reader.read_decoded_at(&self.cache, at, buf),
        };
        let n = read.map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Errno::EAGAIN;
            }
            tracing::error!("read of layer {layer} at {at}: {e}");
            Errno::EIO
        })?;
        if n < buf.len() {
            tracing::error!("layer {layer} ends before offset {}", at + buf.len() as u64);
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// The layer stream ranges a read of `i` at `offset` needs, and those worth fetching with
    /// it (the rest of a small file, a window ahead in a large one).
    pub(super) fn stream_ranges(
        &self,
        i: Inode<'_>,
        offset: u64,
        size: u32,
    ) -> Vec<(u32, std::ops::Range<u64>, std::ops::Range<u64>)> {
        let end = offset.saturating_add(size as u64).min(i.size);
        if offset >= end {
            return Vec::new();
        }
        let ahead = if i.size <= FETCH_AHEAD {
            i.size
        } else {
            end.saturating_add(FETCH_AHEAD).min(i.size)
        };
        match &i.data {
            NodeData::File {
                layer,
                offset: base,
            } => {
                let from = if i.size <= FETCH_AHEAD { 0 } else { offset };
                vec![(*layer, base + offset..base + end, base + from..base + ahead)]
            }
            NodeData::Sparse { layer, extents } => extents
                .iter()
                .filter(|e| e.file_off < end && e.file_off + e.len > offset)
                .map(|e| {
                    let from = e.file_off.max(offset);
                    let to = (e.file_off + e.len).min(end);
                    let r = e.stream_off + (from - e.file_off)..e.stream_off + (to - e.file_off);
                    (*layer, r.clone(), r)
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether a read can be answered without waiting for a fetch.
    pub(super) fn is_local(&self, i: Inode<'_>, offset: u64, size: u32) -> bool {
        !self.may_fetch
            || self
                .stream_ranges(i, offset, size)
                .into_iter()
                .all(|(l, need, _)| self.layers.get(l as usize).is_none_or(|r| r.is_local(need)))
    }

    /// A read that may wait on the network: fetch what it needs (and what is worth fetching
    /// with it) in one go, then read.
    pub(super) fn fetch_and_read(
        &self,
        ino: INodeNo,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
        let i = self.inode(ino)?;
        self.fetch_for(ino, i, offset, size)?;
        self.read_file(i, offset, size)
    }

    /// Fetches what a read of `i` needs, and what is worth fetching with it.
    pub(super) fn fetch_for(
        &self,
        ino: INodeNo,
        i: Inode<'_>,
        offset: u64,
        size: u32,
    ) -> Result<(), Errno> {
        for (l, _, ahead) in self.stream_ranges(i, offset, size) {
            if let Some(r) = self.layers.get(l as usize) {
                // A failed look-ahead is not the read's failure (the read asks for less),
                // except a timeout: the read has waited its deadline already.
                if let Err(e) = r.prefetch(ahead) {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        tracing::warn!("read of inode {} at {offset}: {e}", ino.0);
                        return Err(Errno::EIO);
                    }
                    tracing::debug!("prefetch for inode {}: {e}", ino.0);
                }
            }
        }
        Ok(())
    }
}

/// What a writable layer served over this tree reads of it (see [`crate::upper`]).
impl ImageFs {
    /// Runs `job` on the threads of reads that decompress (`wait` false) or wait for lazily
    /// fetched bytes (`wait` true), off the FUSE workers.
    pub(crate) fn run_read(&self, wait: bool, job: impl FnOnce() + Send + 'static) {
        match wait {
            true => self.waiting_reads.run(job),
            false => self.decoding_reads.run(job),
        }
    }

    /// Whether a read of tree inode `ino` can be answered without waiting for a fetch.
    pub(crate) fn lower_is_local(&self, ino: u64, offset: u64, size: u32) -> bool {
        self.inode(INodeNo(ino))
            .is_ok_and(|i| self.is_local(i, offset, size))
    }

    /// Fills `buf` with tree inode `ino`'s bytes at `offset` (all within the file), waiting for
    /// lazily fetched bytes as a read does: [`ImageFs::read_lower`] without a buffer of its own.
    pub(crate) fn read_lower_into(
        &self,
        ino: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Errno> {
        let i = self.inode(INodeNo(ino))?;
        let size = u32::try_from(buf.len()).map_err(|_| Errno::EINVAL)?;
        if offset.saturating_add(size as u64) > i.size {
            tracing::error!("inode {ino} ends before offset {}", offset + size as u64);
            return Err(Errno::EIO);
        }
        if !self.is_local(i, offset, size) {
            self.fetch_for(INodeNo(ino), i, offset, size)?;
        }
        buf.fill(0);
        self.fill_file(i, offset, buf, true)
    }

    /// All of tree inode `ino`'s bytes if they can be had without waiting: every layer it
    /// lies in stored whole, and its bytes kept uncompressed or decoded already (else
    /// `EAGAIN`: no fetch, no inflate).
    pub(crate) fn read_lower_at_once(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let i = self.inode(INodeNo(ino))?;
        let size = u32::try_from(i.size).map_err(|_| Errno::EFBIG)?;
        if !self.is_local(i, 0, size) {
            return Err(Errno::EAGAIN);
        }
        self.read_file_with(i, 0, size, false)
    }

    /// Bytes of tree inode `ino`, waiting for lazily fetched bytes as a read does.
    pub(crate) fn read_lower(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let i = self.inode(INodeNo(ino))?;
        if self.is_local(i, offset, size) {
            self.read_file(i, offset, size)
        } else {
            self.fetch_and_read(INodeNo(ino), offset, size)
        }
    }
}
