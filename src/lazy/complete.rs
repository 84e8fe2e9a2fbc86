//! Background work on lazily mounted layers: fetching the read trace first, then completing
//! each layer — the whole blob streamed in order, chunks verified as they pass, the tar indexed
//! as a pull would — and checking that the layer is what its index said.

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;

use super::{map_path, LazyBlob, ATTEMPTS};
use crate::index::blob::Blob;
use crate::index::published::PublishedLayer;
use crate::index::{self, LayerIndex};
use crate::{Digest, Store};

/// Layers completed at once in the background.
const COMPLETE_PARALLEL: usize = 3;

/// How long a completion waits for a pull-through cache to hold a blob of `len` bytes it is
/// fetching before asking for the blob anyway (a mirror that ignores ranges looks the same):
/// a minute, and a second per 4 MiB, as a cache filling at 4 MB/s or more would.
fn mirror_wait(len: u64) -> std::time::Duration {
    std::time::Duration::from_secs(60 + len / (4 << 20))
}

impl LazyBlob {
    /// Streams the whole layers in the background (`COMPLETE_PARALLEL` at a time, each
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
        let settling = remote.clone();
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
            // With no trace fetched first, completing at once would take the link from the
            // mount's first reads (see `remote::START_QUIET`).
            if n == 0 && !layers.is_empty() {
                settling.settled().await;
            }
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
                        // A failure that is not a mismatch (the link, chunks that failed
                        // their digests on disk and were unmarked) is worth another pass.
                        let mut res = Err(String::new());
                        for attempt in 0..ATTEMPTS {
                            if attempt > 0 {
                                tokio::time::sleep(std::time::Duration::from_secs(1 << attempt))
                                    .await;
                            }
                            res = blob
                                .clone()
                                .complete_inner(store.clone(), published.clone())
                                .await;
                            if res.is_ok() || blob.poisoned.load(Ordering::SeqCst) {
                                break;
                            }
                            tracing::warn!(
                                "completing layer {}: {} (attempt {} of {ATTEMPTS})",
                                blob.digest,
                                res.as_ref().err().map_or("", |e| e.as_str()),
                                attempt + 1
                            );
                        }
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
        let dest = store.blob_path(&self.digest);
        if dest.exists() {
            // Completed (and verified) by another mount, or pulled whole: its own index says
            // what the layer holds, and this image's published index must agree.
            return self.check_against_whole(&store, &published);
        }
        // One completion of a partial blob at a time, across processes: two mounts of the
        // image would otherwise stream it twice, and the later rename would fail.
        let name = self
            .partial_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lock_store = store.clone();
        let _lock =
            tokio::task::spawn_blocking(move || lock_store.lock(&format!("complete-{name}")))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        if dest.exists() {
            return self.check_against_whole(&store, &published);
        }
        // From a mirror that holds the blob, or the registry; a pull-through cache that is
        // fetching it is waited for (`mirror_wait` at most): asked now, it would have the origin
        // send the blob a second time.
        let waited = std::time::Instant::now();
        let stream = loop {
            self.remote.requests.fetch_add(1, Ordering::Relaxed);
            match self.remote.registry.blob_stream_held(&self.digest).await {
                Ok(Some(s)) => break s,
                Ok(None) if waited.elapsed() < mirror_wait(self.len) => {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await
                }
                Ok(None) => {
                    break self
                        .remote
                        .registry
                        .blob_stream(&self.digest)
                        .await
                        .map_err(|e| e.to_string())?
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let (digest, compression) = (self.digest, published.compression);
        let small_max = crate::mount::shared::small_files_kept(None);
        // Small files' bytes go to disk as they come, as a pull's do: not held (up to
        // `KEEP_MAX` a layer) until the index is saved.
        let small_tmp = store.temp_path(&format!("{}.small", digest.hex()));
        let indexer = tokio::task::spawn_blocking(move || {
            // A zstd:chunked blob is served through its own frames: no re-framed copy needed.
            let mut sink = io::sink();
            let copy: Option<&mut dyn io::Write> =
                (compression == index::Compression::Zstd).then_some(&mut sink);
            let small = index::small::SmallFiles::spilling(small_max, small_tmp)?;
            index::build_keeping(
                crate::pull::ChannelReader::new(rx),
                compression,
                digest,
                copy,
                small,
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
                cp.window = data[off as usize..off as usize + len as usize]
                    .to_vec()
                    .into();
            }
        }
        if let Some(why) = differences(&idx, &published) {
            self.poisoned.store(true, Ordering::SeqCst);
            self.cond.notify_all();
            return Err(format!("layer {}: {why}", self.digest));
        }
        // The file is what gets promoted, not the stream: chunks fetched earlier were skipped
        // above, and a wrong byte among them (disk damage, a bug) must not become a blob
        // named by a digest it does not have.
        self.file.sync_all().map_err(|e| e.to_string())?;
        let file_digest = {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.file_digest())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading back: {e}"))?
        };
        if file_digest != self.digest {
            let bad = self.forget_bad_chunks().map_err(|e| e.to_string())?;
            return Err(format!(
                "the fetched file does not match the layer digest (it is {file_digest}); \
                 {bad} chunks failed their digests and will be fetched again; not promoted"
            ));
        }
        if matches!(published.access, index::Access::Frames(_)) {
            // A table of contents addresses contents, not the tar: each file's bytes in the
            // tar must be the ones its chunks vouch for, or the tree served is not the layer.
            let (me, real, p) = (self.clone(), idx.clone(), published.clone());
            let differ = tokio::task::spawn_blocking(move || {
                let file = me.file.try_clone()?;
                contents_differ(io::BufReader::new(ReadFile(file, 0)), &real, &p)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading back: {e}"))?;
            if let Some(why) = differ {
                self.poisoned.store(true, Ordering::SeqCst);
                self.cond.notify_all();
                return Err(format!("layer {}: {why}", self.digest));
            }
        }
        // An ordinary stored layer from now on: blob in place (our descriptor stays valid),
        // index as a pull writes it (its bytes hashed to the layer's digest), no map.
        let by_place = !matches!(published.access, index::Access::Frames(_));
        if by_place {
            // (A zstd:chunked layer keeps the table it was served with: its offsets address
            // the contents laid end to end, which its frames serve as well as ever.)
            idx.save(&store.index_path(&self.digest))
                .map_err(|e| e.to_string())?;
        }
        if let Some(keyed) = self.index_path.as_ref().filter(|_| by_place) {
            // It proved to say what the published index says, offsets and checkpoints alike:
            // from now on the image reads the whole blob by it (with the windows inline, which
            // a published index may keep apart, and the small files kept from the bytes).
            idx.save(keyed).map_err(|e| e.to_string())?;
        }
        if let Err(e) = std::fs::rename(&self.partial_path, &dest) {
            if dest.exists() {
                return Ok(());
            }
            return Err(format!(
                "renaming {} into {}: {e}",
                self.partial_path.display(),
                dest.display()
            ));
        }
        crate::store::sync_dir(&dest);
        let _ = std::fs::remove_file(map_path(&self.partial_path));
        if let Some((w, _)) = self.windows.as_ref().filter(|_| by_place) {
            // The windows are inline in the image's index now.
            let _ = std::fs::remove_file(&w.partial_path);
            let _ = std::fs::remove_file(map_path(&w.partial_path));
        }
        Ok(())
    }

    /// A layer stored whole by someone else: this image's published index is compared with
    /// the index of those bytes (written only from bytes that hashed to the layer), and a
    /// difference stops serving, as a completion that streamed the layer itself would.
    fn check_against_whole(&self, store: &Store, published: &PublishedLayer) -> Result<(), String> {
        let Ok(real) = LayerIndex::load(&store.index_path(&self.digest)) else {
            return Ok(());
        };
        let why = if matches!(published.access, index::Access::Frames(_)) {
            // Its table addresses the contents, not the tar: entries and contents compared.
            let differ = match differences(&real, published) {
                Some(why) => Some(why),
                None => std::fs::File::open(store.blob_path(&self.digest))
                    .and_then(|f| {
                        contents_differ(io::BufReader::new(ReadFile(f, 0)), &real, published)
                    })
                    .map_err(|e| format!("reading layer {}: {e}", self.digest))?,
            };
            match differ {
                None => return Ok(()),
                Some(why) => why,
            }
        } else {
            if same_as_published(&real, published) {
                return Ok(());
            }
            differences(&real, published).unwrap_or_default()
        };
        self.poisoned.store(true, Ordering::SeqCst);
        self.cond.notify_all();
        Err(format!("layer {}: {why}", self.digest))
    }

    /// The digest of the partial file as it is on disk.
    fn file_digest(&self) -> std::io::Result<Digest> {
        let mut h = crate::digest::Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < self.len {
            let n = self.file.read_at(&mut buf, off)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file cut short",
                ));
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
        Ok(h.finish())
    }

    /// Re-verifies every chunk marked present and unmarks those whose bytes fail (in memory
    /// and in the map), so they are fetched again; returns how many failed.
    pub(super) fn forget_bad_chunks(&self) -> io::Result<usize> {
        let mut bad = Vec::new();
        for (k, c) in self.chunks.iter().enumerate() {
            if !self.lock().present[k] {
                continue;
            }
            let mut buf = vec![0u8; (c.end - c.start) as usize];
            self.file.read_exact_at(&mut buf, c.start)?;
            if !c.verify(&buf) {
                bad.push(k);
            }
        }
        for &k in &bad {
            self.map.write_all_at(&[0], k as u64)?;
        }
        self.map.sync_data()?;
        let mut st = self.lock();
        for &k in &bad {
            st.present[k] = false;
        }
        Ok(bad.len())
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

/// A lazily served layer of an image that is stored whole now (completed by any mount, or
/// pulled whole): the index the image reads by (its published one) must say what the index
/// of the layer's bytes says — else the image's tree describes another layer. Agreeing, the
/// image reads by the latter from then on (same entries, its gzip windows inline).
pub fn whole_layer_agrees(store: &Store, l: &crate::store::LayerRecord) -> Result<(), String> {
    let keyed = store.layer_index_path(l);
    let real = store.index_path(&l.digest);
    let (Ok(a), Ok(b)) = (std::fs::read(&keyed), std::fs::read(&real)) else {
        return Ok(()); // no index of its bytes (a zstd:chunked layer keeps its table)
    };
    if a == b {
        return Ok(());
    }
    let (Ok(k), Ok(r)) = (LayerIndex::load(&keyed), LayerIndex::load(&real)) else {
        return Ok(());
    };
    if matches!(k.access, index::Access::Frames(_)) {
        return Ok(()); // its table addresses the contents, not the tar: its chunks vouch
    }
    let positions = |x: &index::Access| match x {
        index::Access::Gzip(cps) => cps.iter().map(|c| (c.uoff, c.coff, c.bits)).collect(),
        _ => Vec::new(),
    };
    if k.diff_id != r.diff_id || k.uncompressed_size != r.uncompressed_size {
        return Err(format!(
            "layer {}: its tar stream is not the published one",
            l.digest
        ));
    }
    if let Some((e, _)) = k.entries.iter().zip(&r.entries).find(|(a, b)| a != b) {
        return Err(format!(
            "layer {}: entry {:?} differs from the published index",
            l.digest,
            String::from_utf8_lossy(&e.path)
        ));
    }
    // (At the published spacing: a layer pulled whole has denser checkpoints, those among them.)
    if k.entries.len() != r.entries.len()
        || positions(&k.access.published()) != positions(&r.access.published())
    {
        return Err(format!(
            "layer {}: it differs from the published index",
            l.digest
        ));
    }
    r.save(&keyed).map_err(|e| e.to_string())
}

/// Whether a layer's index built from its bytes says what its published index says (with the
/// published windows, if kept apart, not compared: the caller has none).
pub fn same_as_published(real: &LayerIndex, published: &PublishedLayer) -> bool {
    let mut published = published.clone();
    if let (Some(_), index::Access::Gzip(cps), index::Access::Gzip(real_cps)) = (
        &published.windows,
        &mut published.access,
        &real.access.published(),
    ) {
        for (p, r) in cps.iter_mut().zip(real_cps) {
            p.window = r.window.clone();
        }
    }
    differences(real, &published).is_none()
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
    // (A table of contents leaves out the eStargz writer's own entries: landmarks, itself.)
    let real_entries: Vec<&index::TarEntry> = real
        .entries
        .iter()
        .filter(|e| by_place || !index::chunked::is_format_entry(&e.path))
        .collect();
    if real_entries.len() != published.entries.len() {
        return Some(format!(
            "its tar has {} entries, the published index {}",
            real_entries.len(),
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
    if let Some((r, _)) = real_entries
        .iter()
        .copied()
        .zip(&published.entries)
        .find(|(r, p)| !same(r, p))
    {
        return Some(format!(
            "entry {:?} differs from the published index",
            String::from_utf8_lossy(&r.path)
        ));
    }
    // (At the published spacing: the real index's checkpoints are denser, those among them.)
    if by_place && !same_access(&real.access.published(), &published.access.published()) {
        return Some("its checkpoints differ from the published ones".into());
    }
    None
}

/// Checkpoints equal, windows compared by content (see [`index::gzip::same_checkpoints`]).
fn same_access(a: &index::Access, b: &index::Access) -> bool {
    match (a, b) {
        (index::Access::Gzip(x), index::Access::Gzip(y)) => {
            index::gzip::same_checkpoints(x, y, false)
        }
        _ => postcard::to_allocvec(a).ok() == postcard::to_allocvec(b).ok(),
    }
}

/// A file read from an offset on (a positioned reader over a shared descriptor).
struct ReadFile(std::fs::File, u64);

impl io::Read for ReadFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read_at(buf, self.1)?;
        self.1 += n as u64;
        Ok(n)
    }
}

/// Whether the files of a layer (`blob`, the whole compressed layer, and `real`, its index)
/// hold what a table of contents (`published`, entries already compared) says: each chunk of
/// each file's content, read from the tar stream, hashed against its chunk digest. A file
/// whose contents the table misplaces (another file's frame, say) is named. Sparse files are
/// compared by their metadata only.
fn contents_differ(
    blob: impl io::Read,
    real: &LayerIndex,
    published: &PublishedLayer,
) -> io::Result<Option<String>> {
    use io::Read;
    let index::Access::Frames(frames) = &published.access else {
        return Ok(None);
    };
    let mut stream: Box<dyn io::Read> = match published.compression {
        index::Compression::Gzip => Box::new(index::gzip::GzipReader::new(blob, None)?),
        index::Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob)?),
        index::Compression::None => Box::new(blob),
    };
    let real_entries = real
        .entries
        .iter()
        .filter(|e| !index::chunked::is_format_entry(&e.path));
    let mut pos = 0u64;
    let mut buf = vec![0u8; 128 << 10];
    for (r, p) in real_entries.zip(&published.entries) {
        if r.kind != index::EntryKind::File || r.size == 0 || r.sparse.is_some() {
            continue;
        }
        let first = frames.partition_point(|f| f.uoff < p.offset);
        let mut at = 0u64;
        for (f, c) in frames[first..].iter().zip(&published.chunks[first..]) {
            if at >= r.size {
                break;
            }
            let len = c.uncompressed.unwrap_or(0).min(r.size - at);
            let from = r.offset + at;
            if from < pos {
                return Ok(Some(format!(
                    "{:?}: its content overlaps another's",
                    String::from_utf8_lossy(&r.path)
                )));
            }
            io::copy(&mut (&mut stream).take(from - pos), &mut io::sink())?;
            let mut h = crate::digest::Hasher::default();
            let mut left = len;
            while left > 0 {
                let n = (buf.len() as u64).min(left) as usize;
                stream.read_exact(&mut buf[..n])?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
            pos = from + len;
            if f.uoff != p.offset + at || h.finish() != c.digest {
                return Ok(Some(format!(
                    "the content of {:?} is not what its table of contents says (chunk at \
                     blob offset {})",
                    String::from_utf8_lossy(&r.path),
                    c.start
                )));
            }
            at += len;
        }
    }
    Ok(None)
}
