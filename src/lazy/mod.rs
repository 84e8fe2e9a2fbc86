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
//! [`LazyBlob::complete`] streams the whole blob in order in the background: it fills the
//! missing chunks, checks the blob's digest, and re-indexes the tar as a pull would; if the
//! layer's real table differs from the published one the image is marked bad and reads stop.
//! A complete blob becomes an ordinary stored blob.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::index::blob::Blob;
use crate::index::published::{Chunk, PublishedLayer};
use crate::index::{self, LayerIndex};
use crate::registry::{RangeBody, Registry};
use crate::{Digest, Error, Store};

/// Most bytes asked for in one Range request (neighbouring missing chunks are coalesced).
const MAX_RUN: u64 = 8 << 20;
/// Layers completed at once in the background.
const COMPLETE_PARALLEL: usize = 3;
/// Attempts per fetch before a read gives up (the next read tries again).
const ATTEMPTS: u32 = 3;

/// The registry end of lazy fetching, shared by every lazy layer of a mount.
pub struct Remote {
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    registry: Registry,
    /// How long a read waits for its bytes before failing with `EIO`.
    pub deadline: Duration,
    /// Bytes received from the registry.
    pub fetched: AtomicU64,
    /// Range requests sent.
    pub requests: AtomicU64,
    /// Fetches that a read waits for, in flight: background completion yields to them.
    demand: std::sync::atomic::AtomicUsize,
    /// When the last of those ended (milliseconds since `started`).
    last_demand: AtomicU64,
    started: Instant,
}

/// Background completion waits this long after the last read that waited: reads come in
/// bursts (a program starting), and each gap in a burst is shorter than this.
const DEMAND_QUIET: Duration = Duration::from_millis(200);

impl Remote {
    /// A fetcher for blobs of `registry`'s repository.
    pub fn new(registry: Registry, deadline: Duration) -> io::Result<Arc<Remote>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bux-fuse-fetch")
            .enable_all()
            .build()?;
        Ok(Arc::new(Remote {
            rt: Mutex::new(Some(rt)),
            registry,
            deadline,
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            demand: std::sync::atomic::AtomicUsize::new(0),
            last_demand: AtomicU64::new(0),
            started: Instant::now(),
        }))
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &*self.rt.lock().unwrap_or_else(|p| p.into_inner()) {
            rt.spawn(f);
        }
    }

    /// Whether reads are waiting on fetches, or did a moment ago.
    fn demand_active(&self) -> bool {
        let last = self.last_demand.load(Ordering::SeqCst);
        let now = self.started.elapsed().as_millis() as u64;
        self.demand.load(Ordering::SeqCst) > 0
            || (last > 0 && now.saturating_sub(last) < DEMAND_QUIET.as_millis() as u64)
    }

    /// Cancels every fetch in flight (unmount). Never blocks, so an async caller may call it.
    /// Reads waiting on a cancelled fetch fail at their deadline.
    pub fn shutdown(&self) {
        if let Some(rt) = self.rt.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.shutdown();
    }
}

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
    state: Mutex<State>,
    cond: Condvar,
    remote: Arc<Remote>,
    /// Set when the layer proved different from its published index: nothing more is served.
    poisoned: AtomicBool,
    completing: AtomicBool,
    /// The gzip checkpoints' windows, when published apart from the index: a blob of their
    /// own, fetched like this one, a window per chunk; and each checkpoint's range in it.
    windows: Option<(Arc<LazyBlob>, Vec<(u64, u32)>)>,
}

fn partial_path(store: &Store, d: &Digest) -> PathBuf {
    store
        .root()
        .join("layers/sha256")
        .join(format!("{}.partial", d.hex()))
}

fn map_path(store: &Store, d: &Digest) -> PathBuf {
    store
        .root()
        .join("layers/sha256")
        .join(format!("{}.present", d.hex()))
}

/// Bytes of a lazily fetched layer already local (`None` if the layer is not partial).
pub fn local_bytes(store: &Store, layer: &Digest, published: &PublishedLayer) -> Option<u64> {
    let map = std::fs::read(map_path(store, layer)).ok()?;
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
    /// Opens (creating if needed) the partial blob of `layer` in `store`.
    pub fn open(
        store: &Store,
        layer: &PublishedLayer,
        remote: Arc<Remote>,
    ) -> crate::Result<Arc<LazyBlob>> {
        let windows = match &layer.windows {
            Some(w) => {
                let dir = store.root().join("layers/sha256");
                let blob = Self::open_parts(
                    w.digest,
                    w.size,
                    w.chunks(),
                    dir.join(format!("{}.windows.partial", layer.digest.hex())),
                    dir.join(format!("{}.windows.present", layer.digest.hex())),
                    remote.clone(),
                    None,
                )?;
                Some((blob, w.spans.clone()))
            }
            None => None,
        };
        Self::open_parts(
            layer.digest,
            layer.compressed_size,
            layer.chunks.clone(),
            partial_path(store, &layer.digest),
            map_path(store, &layer.digest),
            remote,
            windows,
        )
    }

    fn open_parts(
        digest: Digest,
        len: u64,
        chunks: Vec<Chunk>,
        ppath: PathBuf,
        mpath: PathBuf,
        remote: Arc<Remote>,
        windows: Option<(Arc<LazyBlob>, Vec<(u64, u32)>)>,
    ) -> crate::Result<Arc<LazyBlob>> {
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
            // New, or from something else: start empty.
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

    /// Writes verified chunks, makes them durable, then marks them present.
    fn store_chunks(&self, chunks: &[(usize, &[u8])]) -> io::Result<()> {
        for (k, bytes) in chunks {
            self.file.write_all_at(bytes, self.chunks[*k].start)?;
        }
        self.file.sync_data()?;
        for (k, _) in chunks {
            self.map.write_all_at(&[1], *k as u64)?;
        }
        self.map.sync_data()?;
        let mut st = self.lock();
        for (k, _) in chunks {
            st.present[*k] = true;
            st.inflight[*k] = false;
            st.error[*k] = None;
        }
        self.cond.notify_all();
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
            // Keep what the chunks from `base` on need (base may lie ahead, past a gap).
            if total > base {
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

    /// Streams the whole layers in the background ([`COMPLETE_PARALLEL`] at a time, each
    /// yielding to reads that wait); `done` is called per layer with the outcome and whether
    /// the layer proved different from its index.
    ///
    /// Before that, `trace` (ranges a boot read, in order) is fetched, a few ranges at a time.
    pub fn prefetch(
        trace: Vec<(Arc<LazyBlob>, Range<u64>)>,
        layers: Vec<(Arc<LazyBlob>, Arc<PublishedLayer>)>,
        store: Store,
        done: impl Fn(Digest, Result<(), String>, bool) + Send + Sync + 'static,
    ) {
        let Some(remote) = trace
            .first()
            .map(|(b, _)| b.remote.clone())
            .or_else(|| layers.first().map(|(b, _)| b.remote.clone()))
        else {
            return;
        };
        remote.spawn(async move {
            let n = trace.len();
            let fetched = futures_util::stream::iter(trace)
                .map(|(blob, range)| async move {
                    // (Not held back for reads: the trace is what the reads are about to ask.)
                    let r = range.start.min(blob.len)..range.end.min(blob.len);
                    tokio::task::spawn_blocking(move || blob.ensure(r).is_ok())
                        .await
                        .unwrap_or(false)
                })
                .buffered(4)
                .filter(|ok| std::future::ready(*ok))
                .count()
                .await;
            tracing::info!("prefetched {fetched} of {n} traced ranges");
            // Several layers at once, as a pull does: checking and indexing a layer is CPU
            // work, and one layer at a time left the link idle (measured: 1.75x a full pull).
            let done = &done;
            futures_util::stream::iter(layers)
                .for_each_concurrent(COMPLETE_PARALLEL, |(blob, published)| {
                    let store = store.clone();
                    async move {
                        if blob.completing.swap(true, Ordering::SeqCst) {
                            return;
                        }
                        let res = blob.clone().complete_inner(store, published).await;
                        if res.is_err() {
                            blob.completing.store(false, Ordering::SeqCst);
                        }
                        done(blob.digest, res, blob.poisoned.load(Ordering::SeqCst));
                    }
                })
                .await;
        });
    }

    async fn complete_inner(
        self: Arc<Self>,
        store: Store,
        published: Arc<PublishedLayer>,
    ) -> Result<(), String> {
        self.remote.requests.fetch_add(1, Ordering::Relaxed);
        let stream = self
            .remote
            .registry
            .blob_stream(&self.digest)
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let (digest, compression) = (self.digest, published.compression);
        let indexer = tokio::task::spawn_blocking(move || {
            // A zstd:chunked blob is served through its own frames: no re-framed copy needed.
            let mut sink = io::sink();
            let copy: Option<&mut dyn io::Write> =
                (compression == index::Compression::Zstd).then_some(&mut sink);
            index::build(
                crate::pull::ChannelReader::new(rx),
                compression,
                digest,
                copy,
            )
        });
        let streamed = self.clone().stream_chunks(stream, Some(tx)).await;
        let idx = indexer.await.map_err(|e| e.to_string())?;
        streamed?;
        let mut idx = idx.map_err(|e| e.to_string())?;
        idx.compressed_size = self.len;
        let windows = match &self.windows {
            Some((w, _)) => Some(read_whole(w.clone()).await?),
            None => None,
        };
        let mut published = (*published).clone();
        if let (Some(data), Some(w), index::Access::Gzip(cps)) =
            (&windows, &published.windows, &mut published.access)
        {
            // Put the published windows back inline to compare them with the real ones.
            for (cp, &(off, len)) in cps.iter_mut().zip(&w.spans) {
                cp.window = data[off as usize..off as usize + len as usize].to_vec();
            }
        }
        if let Some(why) = differences(&idx, &published) {
            self.poisoned.store(true, Ordering::SeqCst);
            self.cond.notify_all();
            return Err(format!("layer {}: {why}", self.digest));
        }
        // An ordinary stored layer from now on: blob in place (our descriptor stays valid),
        // index as a pull writes it, no map.
        self.file.sync_all().map_err(|e| e.to_string())?;
        if !matches!(published.access, index::Access::Frames(_)) {
            // (A zstd:chunked layer keeps the table it was served with: its offsets address
            // the contents laid end to end, which its frames serve as well as ever.)
            idx.save(&store.index_path(&self.digest))
                .map_err(|e| e.to_string())?;
        }
        let dest = store.blob_path(&self.digest);
        std::fs::rename(&self.partial_path, &dest).map_err(|e| e.to_string())?;
        crate::store::sync_dir(&dest);
        let _ = std::fs::remove_file(map_path(&store, &self.digest));
        Ok(())
    }
}

/// All of a lazily fetched blob (waiting as long as fetching keeps making progress).
async fn read_whole(blob: Arc<LazyBlob>) -> Result<Vec<u8>, String> {
    tokio::task::spawn_blocking(move || {
        let mut last = String::new();
        for _ in 0..ATTEMPTS * 4 {
            match blob.ensure(0..blob.len) {
                Ok(()) => {
                    let mut out = vec![0u8; blob.len as usize];
                    blob.file
                        .read_exact_at(&mut out, 0)
                        .map_err(|e| e.to_string())?;
                    return Ok(out);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// How a layer's real index differs from its published one, if it does.
fn differences(real: &LayerIndex, published: &PublishedLayer) -> Option<String> {
    if real.diff_id != published.diff_id {
        return Some("its tar stream is not the published diff_id".into());
    }
    // zstd:chunked tables address a stream of contents only, not the tar stream: compare
    // what an entry is, not where its bytes are (their digests were checked as they came).
    let by_place = !matches!(published.access, index::Access::Frames(_));
    if by_place && real.uncompressed_size != published.uncompressed_size {
        return Some("its tar stream has another size than published".into());
    }
    if real.entries.len() != published.entries.len() {
        return Some(format!(
            "its tar has {} entries, the published index {}",
            real.entries.len(),
            published.entries.len()
        ));
    }
    let same = |r: &index::TarEntry, p: &index::TarEntry| {
        if by_place {
            return r == p;
        }
        let mut r = r.clone();
        r.offset = p.offset;
        r.sparse = p.sparse.clone();
        r == *p
    };
    if let Some((r, _)) = real
        .entries
        .iter()
        .zip(&published.entries)
        .find(|(r, p)| !same(r, p))
    {
        return Some(format!(
            "entry {:?} differs from the published index",
            String::from_utf8_lossy(&r.path)
        ));
    }
    if by_place && !same_access(&real.access, &published.access) {
        return Some("its checkpoints differ from the published ones".into());
    }
    None
}

/// Checkpoints equal, windows compared by content (two zstd builds may compress differently).
fn same_access(a: &index::Access, b: &index::Access) -> bool {
    let window = |w: &[u8]| zstd::bulk::decompress(w, index::gzip::WINDOW).ok();
    match (a, b) {
        (index::Access::Gzip(x), index::Access::Gzip(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(p, q)| {
                    (p.uoff, p.coff, p.bits, p.member_start)
                        == (q.uoff, q.coff, q.bits, q.member_start)
                        && (p.window == q.window || window(&p.window) == window(&q.window))
                })
        }
        _ => postcard::to_allocvec(a).ok() == postcard::to_allocvec(b).ok(),
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
        let need = self.cover(range);
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

    /// Fetches the chunks `need` (starting what is not under way) and waits for them.
    fn wait_for(self: &Arc<Self>, need: &[usize]) -> io::Result<()> {
        let need = need.to_vec();
        let deadline = Instant::now() + self.remote.deadline;
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
        if !start.is_empty() {
            self.start_fetches(&start);
        }
        loop {
            if self.poisoned.load(Ordering::Relaxed) {
                return Err(self.poisoned_error());
            }
            let mut waiting = false;
            for &k in &need {
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
