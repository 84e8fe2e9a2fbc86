//! Lazily fetched layers: a layer blob that fills in from the registry as it is read.
//!
//! The blob is a sparse file in the store (`layers/sha256/<hex>.partial`) cut into the chunks
//! of its published index ([`PublishedLayer`]). A read that needs a missing chunk fetches it by
//! HTTP Range (neighbouring missing chunks in one request), checks it against the chunk's
//! sha256, writes it, makes it durable, and only then marks it present — in memory and in the
//! persisted map (`<hex>.present`, one byte per chunk), so a crash never leaves a chunk marked
//! that was not verified and written, and a later mount reuses everything already fetched.
//!
//! Reads wait at most the deadline; a fetch that fails (after bounded retries) or runs late
//! fails that read alone with `EIO` and the cause logged, and the next read tries again.
//! Concurrent reads of one chunk share its fetch.
//!
//! `LazyBlob::prefetch` streams the whole blob in order in the background: it fills the
//! missing chunks, checks the blob's digest, and re-indexes the tar as a pull would; if the
//! layer's real table differs from the published one the image is marked bad and reads stop.
//! A complete blob becomes an ordinary stored blob.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

mod complete;
mod pull;
mod remote;

pub use complete::{same_as_published, whole_layer_agrees};
pub use pull::LazyOutcome;
pub use remote::Remote;

use crate::index::blob::Blob;
use crate::index::published::{Chunk, PublishedLayer};
use crate::registry::RangeBody;
use crate::{Digest, Error, Store};

/// Most bytes asked for in one Range request (neighbouring missing chunks are coalesced).
const MAX_RUN: u64 = 8 << 20;
/// Attempts per fetch before a read gives up (the next read tries again).
const ATTEMPTS: u32 = 3;

#[derive(Default)]
struct State {
    present: Vec<bool>,
    inflight: Vec<bool>,
    /// Why the last fetch of a chunk failed (cleared when it is fetched again).
    error: Vec<Option<String>>,
}

/// A layer blob fetched on demand (see the module docs).
pub struct LazyBlob {
    digest: Digest,
    len: u64,
    chunks: Vec<Chunk>,
    file: File,
    map: File,
    partial_path: PathBuf,
    /// Where the layer's index as the published index gives it lives (none for a windows blob).
    index_path: Option<PathBuf>,
    state: Mutex<State>,
    cond: Condvar,
    remote: Arc<Remote>,
    /// Set when the layer proved different from its published index: nothing more is served.
    poisoned: AtomicBool,
    completing: AtomicBool,
    /// The gzip checkpoints' windows, when published apart from the index: a blob of their
    /// own, fetched like this one, a window per chunk; and each checkpoint's range in it.
    windows: Option<Windows>,
}

/// A layer's windows blob and each checkpoint's (offset, length) in it.
type Windows = (Arc<LazyBlob>, Vec<(u64, u32)>);

/// The chunk map beside a partial blob (`<..>.partial` → `<..>.present`).
fn map_path(partial: &std::path::Path) -> PathBuf {
    partial.with_extension("present")
}

/// Bytes of a lazily fetched layer already local (`None` if the layer is not partial), as
/// fetched by the published index `index`.
pub fn local_bytes(store: &Store, index: &Digest, published: &PublishedLayer) -> Option<u64> {
    let map = std::fs::read(map_path(&store.partial_path(
        &published.digest,
        index,
        false,
    )))
    .ok()?;
    Some(
        published
            .chunks
            .iter()
            .zip(map.iter().chain(std::iter::repeat(&0)))
            .filter(|(_, &b)| b == 1)
            .map(|(c, _)| c.end - c.start)
            .sum(),
    )
}

impl LazyBlob {
    /// Opens (creating if needed) the partial blob of `layer`, as described by the published
    /// index blob `index`, in `store`. What is fetched by one index is never read by another
    /// (see [`Store::partial_path`]): a chunk is marked present only once it matched a digest
    /// of this index.
    pub fn open(
        store: &Store,
        layer: &PublishedLayer,
        index: &Digest,
        remote: Arc<Remote>,
    ) -> crate::Result<Arc<LazyBlob>> {
        let windows = match &layer.windows {
            Some(w) => {
                let blob = Self::open_parts(
                    w.digest,
                    w.size,
                    w.chunks(),
                    store.partial_path(&layer.digest, index, true),
                    remote.clone(),
                    None,
                )?;
                Some((blob, w.spans.clone()))
            }
            None => None,
        };
        let mut blob = Self::open_parts(
            layer.digest,
            layer.compressed_size,
            layer.chunks.clone(),
            store.partial_path(&layer.digest, index, false),
            remote,
            windows,
        )?;
        if let Some(b) = Arc::get_mut(&mut blob) {
            b.index_path = Some(store.lazy_index_path(&layer.digest, index));
        }
        Ok(blob)
    }

    fn open_parts(
        digest: Digest,
        len: u64,
        chunks: Vec<Chunk>,
        ppath: PathBuf,
        remote: Arc<Remote>,
        windows: Option<Windows>,
    ) -> crate::Result<Arc<LazyBlob>> {
        let mpath = map_path(&ppath);
        let open = |p: &PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|e| Error::io(format!("opening {}", p.display()), e))
        };
        let file = open(&ppath)?;
        let map = open(&mpath)?;
        let n = chunks.len();
        let size = |f: &File| f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut present = vec![0u8; n];
        if size(&file) != len || size(&map) != n as u64 {
            // New, or from something else: start empty — unless the file opened was promoted
            // into a blob meanwhile (a completion's rename), which must not be touched.
            use std::os::unix::fs::MetadataExt;
            let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
                (a.dev(), a.ino()) == (b.dev(), b.ino())
            };
            let still = match (file.metadata(), std::fs::metadata(&ppath)) {
                (Ok(a), Ok(b)) => same(&a, &b),
                _ => false,
            };
            if !still {
                return Err(Error::io(
                    format!("opening {}", ppath.display()),
                    io::Error::other("it was completed meanwhile: open the layer again"),
                ));
            }
            file.set_len(0)
                .and_then(|_| file.set_len(len))
                .and_then(|_| map.set_len(0))
                .and_then(|_| map.set_len(n as u64))
                .map_err(|e| Error::io(format!("sizing {}", ppath.display()), e))?;
        } else {
            map.read_exact_at(&mut present, 0)
                .map_err(|e| Error::io(format!("reading {}", mpath.display()), e))?;
        }
        Ok(Arc::new(LazyBlob {
            windows,
            digest,
            len,
            chunks,
            file,
            map,
            partial_path: ppath,
            index_path: None,
            state: Mutex::new(State {
                present: present.iter().map(|&b| b == 1).collect(),
                inflight: vec![false; n],
                error: vec![None; n],
            }),
            cond: Condvar::new(),
            remote,
            poisoned: AtomicBool::new(false),
            completing: AtomicBool::new(false),
        }))
    }

    /// Chunks needed to read `range`: the fewest covering it. Neighbours may share a byte
    /// (gzip) and there may be gaps between chunks that no read needs (zstd:chunked headers).
    fn cover(&self, range: Range<u64>) -> Vec<usize> {
        let mut out = Vec::new();
        let end = range.end.min(self.len);
        let mut p = range.start;
        while p < end {
            // The last chunk starting at or before p, if it reaches past p; else the next one.
            let k = self.chunks.partition_point(|c| c.start <= p);
            let k = match k.checked_sub(1) {
                Some(j) if self.chunks[j].end > p => j,
                _ if k < self.chunks.len() && self.chunks[k].start < end => k,
                _ => break,
            };
            out.push(k);
            p = self.chunks[k].end;
        }
        out
    }

    /// The windows' byte ranges that reading chunks `chunks` of this blob needs (chunk `k` of
    /// a gzip layer starts at checkpoint `k`).
    fn window_ranges(&self, chunks: &[usize]) -> Vec<Range<u64>> {
        let Some((_, spans)) = &self.windows else {
            return Vec::new();
        };
        chunks
            .iter()
            .filter_map(|&k| spans.get(k))
            .filter(|(_, len)| *len > 0)
            .map(|&(off, len)| off..off + len as u64)
            .collect()
    }

    /// The parts of the blob that no chunk covers.
    fn gaps(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut p = 0;
        for c in &self.chunks {
            if c.start > p {
                out.push(p..c.start);
            }
            p = p.max(c.end);
        }
        if p < self.len {
            out.push(p..self.len);
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn poisoned_error(&self) -> io::Error {
        io::Error::other(format!(
            "layer {} differs from its published index: not served",
            self.digest
        ))
    }

    /// Whether every chunk is local.
    pub fn is_complete(&self) -> bool {
        self.lock().present.iter().all(|&p| p)
    }

    /// Starts fetching runs of the given missing chunks (caller marked them in flight).
    fn start_fetches(self: &Arc<Self>, chunks: &[usize]) {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for &k in chunks {
            match runs.last_mut() {
                Some(r)
                    if r.end == k && self.chunks[k].end - self.chunks[r.start].start <= MAX_RUN =>
                {
                    r.end = k + 1
                }
                _ => runs.push(k..k + 1),
            }
        }
        for run in runs {
            let me = self.clone();
            self.remote.spawn(async move { me.fetch_run(run).await });
        }
    }

    async fn fetch_run(self: Arc<Self>, run: Range<usize>) {
        struct Demand<'a>(&'a Remote);
        impl Drop for Demand<'_> {
            fn drop(&mut self) {
                let now = self.0.started.elapsed().as_millis() as u64;
                self.0.last_demand.store(now, Ordering::SeqCst);
                self.0.demand.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.remote.demand.fetch_add(1, Ordering::SeqCst);
        let _demand = Demand(&self.remote);
        let start = self.chunks[run.start].start;
        let end = self.chunks[run.end - 1].end;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << (2 * attempt))).await;
            }
            let res = tokio::time::timeout(
                self.remote.deadline,
                self.fetch_once(run.clone(), start, end),
            )
            .await;
            match res {
                Ok(Ok(())) => return,
                Ok(Err(Fetch::Permanent(e))) => {
                    last = e;
                    break;
                }
                Ok(Err(Fetch::Transient(e))) => last = e,
                Err(_) => last = format!("no answer within {:?}", self.remote.deadline),
            }
        }
        tracing::warn!(
            "fetching bytes {start}..{end} of layer {}: {last}",
            self.digest.short()
        );
        let mut st = self.lock();
        for k in run {
            st.inflight[k] = false;
            if !st.present[k] {
                st.error[k] = Some(last.clone());
            }
        }
        self.cond.notify_all();
    }

    async fn fetch_once(
        self: &Arc<Self>,
        run: Range<usize>,
        start: u64,
        end: u64,
    ) -> Result<(), Fetch> {
        self.remote.requests.fetch_add(1, Ordering::Relaxed);
        let body = self
            .remote
            .registry
            .blob_range(&self.digest, start, end - start)
            .await
            .map_err(Fetch::from)?;
        let mut stream = match body {
            RangeBody::Partial(s) => s,
            RangeBody::Full(s) => {
                // The registry ignores Range: take the whole blob once, in order, verifying
                // chunks as they pass, rather than once per miss.
                return self
                    .clone()
                    .stream_chunks(s, None)
                    .await
                    .map_err(Fetch::Transient);
            }
        };
        let mut buf = Vec::with_capacity((end - start) as usize);
        while let Some(b) = stream.next().await {
            let b = b.map_err(|e| Fetch::Transient(e.to_string()))?;
            self.remote
                .fetched
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            if buf.len() + b.len() > (end - start) as usize {
                return Err(Fetch::Permanent(
                    "the registry sent more than the range".into(),
                ));
            }
            buf.extend_from_slice(&b);
        }
        if buf.len() as u64 != end - start {
            return Err(Fetch::Transient(format!(
                "short range: {} of {} bytes",
                buf.len(),
                end - start
            )));
        }
        let mut good = Vec::new();
        for k in run {
            let c = self.chunks[k];
            let bytes = &buf[(c.start - start) as usize..(c.end - start) as usize];
            if !c.verify(bytes) {
                return Err(Fetch::Permanent(format!(
                    "bytes {}..{} do not match their published digest (not served)",
                    c.start, c.end
                )));
            }
            good.push((k, bytes));
        }
        self.store_chunks(&good)
            .map_err(|e| Fetch::Transient(e.to_string()))
    }

    /// Writes verified chunks and marks them present, then makes them durable and only then
    /// marks them in the persisted map. Reads waiting for them go on once they are written
    /// (they read the page cache), not after two fsyncs: those cost a cold start milliseconds
    /// per read that misses. A crash still never leaves a chunk marked that was not verified
    /// and written; one in between costs a fetch again.
    fn store_chunks(&self, chunks: &[(usize, &[u8])]) -> io::Result<()> {
        for (k, bytes) in chunks {
            self.file.write_all_at(bytes, self.chunks[*k].start)?;
        }
        {
            let mut st = self.lock();
            for (k, _) in chunks {
                st.present[*k] = true;
                st.inflight[*k] = false;
                st.error[*k] = None;
            }
            self.cond.notify_all();
        }
        let persisted = self.file.sync_data().and_then(|_| {
            for (k, _) in chunks {
                self.map.write_all_at(&[1], *k as u64)?;
            }
            self.map.sync_data()
        });
        if let Err(e) = persisted {
            // Served all the same; a later mount fetches them again.
            tracing::warn!(
                "layer {}: recording fetched chunks: {e}",
                self.digest.short()
            );
        }
        Ok(())
    }

    /// Reads a whole-blob stream in order: verifies each chunk as it completes and stores
    /// those missing; also passes every byte to `tee` (the completion's indexer).
    async fn stream_chunks(
        self: Arc<Self>,
        mut stream: crate::registry::BlobStream,
        tee: Option<std::sync::mpsc::SyncSender<io::Result<bytes::Bytes>>>,
    ) -> Result<(), String> {
        let mut buf: Vec<u8> = Vec::new();
        let mut base = 0u64; // blob offset of buf[0]
        let mut k = 0usize;
        let mut pending: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut hasher = crate::digest::Hasher::default();
        let mut total = 0u64;
        // Bytes no chunk covers (zstd:chunked tar headers and TOC) are written as they pass,
        // so a completed blob is whole; the blob digest checked at the end vouches for them.
        let gaps = self.gaps();
        let mut gap = 0usize;
        let flush = |pending: &mut Vec<(usize, Vec<u8>)>| -> Result<(), String> {
            let refs: Vec<(usize, &[u8])> = pending.iter().map(|(k, b)| (*k, &b[..])).collect();
            self.store_chunks(&refs)
                .map_err(|e| format!("writing: {e}"))?;
            pending.clear();
            Ok(())
        };
        loop {
            // Background completion yields the link to reads that wait (demand first): not
            // reading lets TCP flow control hold the sender back.
            while tee.is_some() && self.remote.demand_active() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let Some(b) = stream.next().await else { break };
            if self.poisoned.load(Ordering::Relaxed) {
                return Err("stopped".into());
            }
            let b = b.map_err(|e| e.to_string())?;
            self.remote
                .fetched
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            total += b.len() as u64;
            if total > self.len {
                return Err("the registry sent more than the blob's size".into());
            }
            hasher.update(&b);
            let at = total - b.len() as u64;
            while gap < gaps.len() && gaps[gap].end <= at {
                gap += 1;
            }
            for g in gaps[gap..].iter().take_while(|g| g.start < total) {
                let (from, to) = (g.start.max(at), g.end.min(total));
                self.file
                    .write_all_at(&b[(from - at) as usize..(to - at) as usize], from)
                    .map_err(|e| format!("writing: {e}"))?;
            }
            // Keep what the chunks from `base` on need (base may lie ahead, past a gap); past
            // the last chunk nothing is (a zstd:chunked blob's table of contents and tar-split
            // follow it, as large as the blob's producer made them).
            if total > base && k < self.chunks.len() {
                let from = base.max(at) - at;
                if buf.is_empty() && at > base {
                    base = at;
                }
                buf.extend_from_slice(&b[from as usize..]);
            }
            if let Some(tx) = &tee {
                if tx.send(Ok(b)).is_err() {
                    return Err("indexer stopped".into());
                }
            }
            while k < self.chunks.len() && base + buf.len() as u64 >= self.chunks[k].end {
                let c = self.chunks[k];
                let bytes = &buf[(c.start - base) as usize..(c.end - base) as usize];
                if !c.verify(bytes) {
                    return Err(format!(
                        "bytes {}..{} do not match their published digest",
                        c.start, c.end
                    ));
                }
                let present = self.lock().present[k];
                if !present {
                    pending.push((k, bytes.to_vec()));
                }
                k += 1;
                let keep_from = self
                    .chunks
                    .get(k)
                    .map_or(base + buf.len() as u64, |n| n.start);
                buf.drain(..((keep_from - base) as usize).min(buf.len()));
                base = keep_from;
                if pending.iter().map(|p| p.1.len()).sum::<usize>() >= 16 << 20 {
                    flush(&mut pending)?;
                }
            }
        }
        flush(&mut pending)?;
        if total != self.len || hasher.finish() != self.digest {
            return Err("the blob does not match its digest".into());
        }
        Ok(())
    }
}

enum Fetch {
    /// Worth retrying (connection, timeout, 5xx).
    Transient(String),
    /// Not worth retrying (404, 401/403, a bad digest).
    Permanent(String),
}

impl From<Error> for Fetch {
    fn from(e: Error) -> Fetch {
        match e {
            Error::NotFound { .. } | Error::Unauthorized { .. } => {
                Fetch::Permanent(format!("{e} (permanent)"))
            }
            e => Fetch::Transient(e.to_string()),
        }
    }
}

impl Blob for Arc<LazyBlob> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn may_fetch(&self) -> bool {
        true
    }

    fn is_local(&self, range: Range<u64>) -> bool {
        if self.poisoned.load(Ordering::Relaxed) {
            return false;
        }
        let need = self.cover(range);
        let local = {
            let st = self.lock();
            need.iter().all(|&k| st.present[k])
        };
        local
            && self
                .windows
                .as_ref()
                .is_none_or(|(w, _)| self.window_ranges(&need).into_iter().all(|r| w.is_local(r)))
    }

    fn window(&self, checkpoint: usize) -> io::Result<Option<Vec<u8>>> {
        let Some((w, spans)) = &self.windows else {
            return Ok(None);
        };
        let &(off, len) = spans
            .get(checkpoint)
            .ok_or_else(|| io::Error::other("checkpoint without a window"))?;
        let r = off..off + len as u64;
        w.ensure(r.clone())?;
        let mut out = vec![0u8; len as usize];
        w.file.read_exact_at(&mut out, off)?;
        Ok(Some(out))
    }

    fn ensure(&self, range: Range<u64>) -> io::Result<()> {
        let need = self.cover(range);
        // The spans' windows are fetched alongside their bytes (started first, waited last).
        let windows = self.window_ranges(&need);
        if let Some((w, _)) = &self.windows {
            for r in &windows {
                w.kick(r.clone());
            }
        }
        self.wait_for(&need)?;
        if let Some((w, _)) = &self.windows {
            for r in windows {
                w.ensure(r)?;
            }
        }
        Ok(())
    }
}

impl LazyBlob {
    /// Starts fetching what `range` needs, without waiting.
    fn kick(self: &Arc<Self>, range: Range<u64>) {
        self.claim_and_fetch(&self.cover(range));
    }

    /// Starts fetches of the chunks of `need` that are neither present nor under way.
    fn claim_and_fetch(self: &Arc<Self>, need: &[usize]) {
        // Every decode of a lazy layer asks: when all is here or under way (as a rule), one
        // look under the lock and nothing more.
        let missing = |st: &State| need.iter().any(|&k| !st.present[k] && !st.inflight[k]);
        if !missing(&self.lock()) {
            return;
        }
        self.adopt_fetched(need);
        let mut st = self.lock();
        let start: Vec<usize> = need
            .iter()
            .copied()
            .filter(|&k| !st.present[k] && !st.inflight[k])
            .collect();
        for &k in &start {
            st.inflight[k] = true;
            st.error[k] = None;
        }
        drop(st);
        if !start.is_empty() {
            self.start_fetches(&start);
        }
    }

    /// Marks present the chunks of `need` that this process does not have but the persisted
    /// map says are local: fetched since the layer was opened by another process serving it
    /// (another mount's daemon, or the image server). Each is read back and checked against
    /// its digest first: the map says what the process that wrote it fetched into its file,
    /// and this process's file may be another one (a partial made again after a completion
    /// renamed the last into a blob, while the old map was still there). Without it, each of
    /// a fleet of lazy mounts fetched again what the others had (8 mounts: 7.7 times the
    /// bytes). One `pread` of the map per miss, and one read and hash per chunk adopted.
    fn adopt_fetched(&self, need: &[usize]) {
        let missing: Vec<usize> = {
            let st = self.lock();
            need.iter()
                .copied()
                .filter(|&k| !st.present[k] && !st.inflight[k])
                .collect()
        };
        let (Some(&lo), Some(&hi)) = (missing.iter().min(), missing.iter().max()) else {
            return;
        };
        let mut map = vec![0u8; hi - lo + 1];
        if self.map.read_exact_at(&mut map, lo as u64).is_err() {
            return; // (fetched, then)
        }
        let good: Vec<usize> = missing
            .into_iter()
            .filter(|&k| map[k - lo] == 1)
            .filter(|&k| {
                let c = self.chunks[k];
                let mut bytes = vec![0u8; (c.end - c.start) as usize];
                self.file.read_exact_at(&mut bytes, c.start).is_ok() && c.verify(&bytes)
            })
            .collect();
        if good.is_empty() {
            return;
        }
        let mut st = self.lock();
        for k in good {
            st.present[k] = true;
            st.error[k] = None;
        }
        self.cond.notify_all();
    }

    /// Fetches the chunks `need` (starting what is not under way) and waits for them.
    fn wait_for(self: &Arc<Self>, need: &[usize]) -> io::Result<()> {
        let deadline = Instant::now() + self.remote.deadline;
        self.claim_and_fetch(need);
        let mut st = self.lock();
        loop {
            if self.poisoned.load(Ordering::Relaxed) {
                return Err(self.poisoned_error());
            }
            let mut waiting = false;
            for &k in need {
                if st.present[k] {
                    continue;
                }
                if !st.inflight[k] {
                    let why = st.error[k]
                        .clone()
                        .unwrap_or_else(|| "fetch abandoned".into());
                    return Err(io::Error::other(format!(
                        "layer {}: {why}",
                        self.digest.short()
                    )));
                }
                waiting = true;
            }
            if !waiting {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "layer {}: bytes not fetched within {:?}",
                        self.digest.short(),
                        self.remote.deadline
                    ),
                ));
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetched chunk is served once it is written: recording it in the persisted map comes
    /// after, and when that fails the read goes on (the next mount fetches it again). Before,
    /// the read waited for the map's fsync, and failed with it.
    #[test]
    fn a_chunk_is_served_once_written_and_recorded_after() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"bytes of a chunk".to_vec();
        let chunks = vec![Chunk {
            start: 0,
            end: data.len() as u64,
            digest: Digest::of(&data),
            uncompressed: None,
        }];
        let reference = crate::registry::parse_reference("127.0.0.1:9/none:here").unwrap();
        let registry = crate::registry::Registry::new(&reference, &Default::default());
        let remote = Remote::new(registry, Duration::from_secs(1)).unwrap();
        let partial = dir.path().join("layer.partial");
        let blob = LazyBlob::open_parts(
            Digest::of(&data),
            data.len() as u64,
            chunks,
            partial.clone(),
            remote.clone(),
            None,
        )
        .unwrap();
        let mut blob = Arc::into_inner(blob).unwrap();
        // The map can no longer be written: recording the chunk fails.
        blob.map = File::open(map_path(&partial)).unwrap();
        blob.store_chunks(&[(0, &data)]).unwrap();
        assert!(blob.is_complete());
        let mut read = vec![0u8; data.len()];
        blob.file.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(read, data);
        assert_eq!(std::fs::read(map_path(&partial)).unwrap(), vec![0]);
        remote.shutdown();
    }

    /// Two processes serving one lazily fetched layer (two mounts' daemons): what one fetched
    /// after the other opened the layer is read from the store, not fetched again. (Nothing
    /// listens at the registry's address: a fetch would fail the read.)
    #[test]
    fn chunks_another_process_fetched_are_not_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let chunks: Vec<Chunk> = [0..1000u64, 1000..2000, 2000..3000]
            .into_iter()
            .map(|r| Chunk {
                digest: Digest::of(&data[r.start as usize..r.end as usize]),
                start: r.start,
                end: r.end,
                uncompressed: None,
            })
            .collect();
        let reference = crate::registry::parse_reference("127.0.0.1:9/none:here").unwrap();
        let registry = crate::registry::Registry::new(&reference, &Default::default());
        let remote = Remote::new(registry, Duration::from_secs(1)).unwrap();
        let open = |name: &str, digest: Digest| {
            let path = dir.path().join(name);
            let len = data.len() as u64;
            LazyBlob::open_parts(digest, len, chunks.clone(), path, remote.clone(), None).unwrap()
        };
        let (first, second) = (
            open("layer.partial", Digest::of(&data)),
            open("layer.partial", Digest::of(&data)),
        );
        // The second has the first chunk; the first fetches the other two (as its fetch
        // stores them), after both opened.
        second.store_chunks(&[(0, &data[..1000])]).unwrap();
        first
            .store_chunks(&[(1, &data[1000..2000]), (2, &data[2000..])])
            .unwrap();
        second.ensure(0..3000).unwrap();
        let mut read = vec![0u8; 3000];
        second.file.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(read, data);
        assert_eq!(remote.requests.load(Ordering::Relaxed), 0, "fetched again");
        // A map saying "present" over a file that does not hold the chunk (another
        // generation's map, a partial made again): not adopted, fetched (and fails here).
        let stale = open("zeros.partial", Digest::of(&data));
        std::fs::write(map_path(&dir.path().join("zeros.partial")), [1u8, 1, 1]).unwrap();
        assert!(
            stale.ensure(0..1000).is_err(),
            "zeros served as the layer's bytes"
        );
        let asked = remote.requests.load(Ordering::Relaxed);
        assert!(asked > 0, "not fetched");
        // What nobody fetched is still fetched (and fails here: nothing listens).
        let third = open("other.partial", Digest::of(b"another layer"));
        assert!(third.ensure(0..1000).is_err());
        assert!(remote.requests.load(Ordering::Relaxed) > asked);
        remote.shutdown();
    }
}
