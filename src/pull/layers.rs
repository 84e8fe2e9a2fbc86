//! Fetching and indexing the layers not stored yet, several at once: each download streamed
//! through its digest check into the indexer, resumed where a broken one stopped.

use std::io::{self, Read};
use std::sync::Arc;

use futures_util::StreamExt;

use super::stream::{chunk_channel, Tee};
use super::{off_thread, LayerJob, Progress, PullOptions, DEFAULT_STALL};
use crate::index::{self, Compression, LayerIndex};
use crate::source::Source;
use crate::{Digest, Error, Result, Store};

/// Consecutive failed attempts to resume a download before the pull gives up.
const MAX_RESUMES: u32 = 5;

/// A partial download left by an earlier pull is resumed if it has at least this many bytes
/// (less is not worth the extra request), and kept after a failure only then.
const MIN_RESUME: u64 = 1 << 20;

impl Store {
    /// Fetches and indexes the layers not stored yet, several at once.
    pub(crate) async fn fetch_layers(
        &self,
        reg: &Arc<Source>,
        jobs: &[LayerJob],
        opts: &PullOptions,
    ) -> Result<()> {
        let parallel = if opts.parallel == 0 { 3 } else { opts.parallel };
        // Largest first: the pull ends when its last layer does, and a layer is indexed on one
        // core, so the one started last should be short. In the manifest's order the large
        // Debian image's largest layer (120 MB, fifth) started last but one and ran alone at
        // the end (a scheduling model of its layers: 7 % longer than largest first).
        let mut order: Vec<&LayerJob> = jobs.iter().collect();
        order.sort_by_key(|job| std::cmp::Reverse(job.desc.size));
        // The futures are made before they are streamed: a closure inside the stream's type
        // would make this future (and `Store::pull`) not `Send` (rust-lang/rust#102211).
        let fetches: Vec<_> = order
            .into_iter()
            .map(|job| self.ensure_layer(reg.clone(), job, opts))
            .collect();
        let results: Vec<Result<()>> = futures_util::stream::iter(fetches)
            .buffer_unordered(parallel)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Makes sure a layer's blob and index are in the store, fetching and indexing it if not.
    async fn ensure_layer(
        &self,
        reg: Arc<Source>,
        job: &LayerJob,
        opts: &PullOptions,
    ) -> Result<()> {
        let store = self.clone();
        let digest = job.digest;
        // One process fetches a given layer at a time; the others wait, then find it done.
        let lock = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.lock(&Store::layer_lock_name(&digest)))
                .await
                .map_err(|e| Error::io("lock task", io::Error::other(e)))??
        };
        let index_path = self.index_path(&digest);
        let cached = {
            let (store, index_path) = (store.clone(), index_path.clone());
            off_thread("index task", move || {
                if index_path.exists() && store.layer_bytes_present(&digest) {
                    // An index this version cannot read (an older format) is rebuilt below.
                    if let Ok(idx) = LayerIndex::load(&index_path) {
                        return Ok(Some(idx));
                    }
                }
                // What a fetch of this layer killed mid-way left (its partial download is
                // resumed).
                let freed = store.clear_layer_temps(&digest);
                if freed > 0 {
                    tracing::debug!(
                        "layer {}: removed {freed} bytes of stale temp files",
                        digest.short()
                    );
                }
                Ok(None)
            })
            .await?
        };
        if let Some(idx) = cached {
            check_diff_id(&idx, job)?;
            opts.emit(Progress::LayerCached { layer: digest });
            return Ok(());
        }
        let idx = match self.download_layer(&reg, job, opts, true).await {
            Ok(idx) => idx,
            Err(Failed {
                resumed: true,
                network: false,
                error,
            }) => {
                // The bytes kept from an earlier pull did not make the layer with the rest (a
                // partial download damaged on disk, say): once more from the start.
                tracing::warn!(
                    "layer {}: {error}; fetching it again from the start",
                    digest.short()
                );
                self.download_layer(&reg, job, opts, false)
                    .await
                    .map_err(|f| f.error)?
            }
            Err(f) => return Err(f.error),
        };
        check_diff_id(&idx, job)?;
        let entries = idx.entries.len();
        off_thread("index task", move || idx.save(&index_path)).await?;
        drop(lock);
        opts.emit(Progress::LayerDone {
            layer: digest,
            entries,
        });
        Ok(())
    }

    /// Downloads, verifies, stores and indexes a layer in one pass (the caller holds its
    /// lock). The download goes to the layer's partial download file
    /// ([`Store::ingest_path`]); with `resume`, bytes left there by an earlier pull are read
    /// back (and indexed) first and only the rest is requested, by Range. A download that
    /// fails on the network (the registry gone, the link stalled) keeps what it got there for
    /// the next pull; any other failure removes it.
    async fn download_layer(
        &self,
        reg: &Arc<Source>,
        job: &LayerJob,
        opts: &PullOptions,
        resume: bool,
    ) -> std::result::Result<LayerIndex, Failed> {
        let digest = job.digest;
        let total = job.desc.size;
        let min_resume = if resume { MIN_RESUME } else { u64::MAX };
        let (blob, kept) = self
            .ingest(digest, total, min_resume)
            .map_err(|error| Failed {
                error,
                resumed: false,
                network: false,
            })?;
        let offset = blob.on_disk();
        let opened = if offset == 0 {
            reg.blob_stream(&digest).await
        } else if offset < total {
            reg.blob_stream_from(&digest, offset, total).await
        } else {
            Ok(futures_util::stream::empty().boxed())
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                // Nothing changed on disk: what an earlier pull left stays for the next.
                if offset == 0 {
                    self.discard_ingest(&digest);
                }
                return Err(Failed {
                    error: e,
                    resumed: offset > 0,
                    network: true,
                });
            }
        };
        if offset > 0 {
            tracing::info!(
                "layer {}: resuming at byte {offset} of {total}",
                digest.short()
            );
            opts.emit(Progress::LayerResumed {
                layer: digest,
                offset,
                total,
            });
            opts.emit(Progress::LayerBytes {
                layer: digest,
                done: offset,
                total,
            });
        }
        let (tx, rx) = chunk_channel();
        let compression = job.compression;
        let small_max = crate::mount::shared::small_files_kept(opts.small_files);
        let store = self.clone();
        let indexer = tokio::task::spawn_blocking(move || {
            // The bytes on disk first (the writer hashes them without writing them again),
            // then the network's: the indexer reads the whole blob in one pass.
            let input = kept.chain(rx);
            index_layer(&store, digest, compression, small_max, blob, input)
        });
        let mut done = offset;
        let mut last_report = offset;
        let mut failures = 0u32;
        let mut network_failed = false;
        let mut network_cause = None;
        let stall = opts.stall_timeout.unwrap_or(DEFAULT_STALL);
        loop {
            let cause = match tokio::time::timeout(stall, stream.next()).await {
                Ok(None) => break,
                Ok(Some(Ok(c))) => {
                    done += c.len() as u64;
                    failures = 0;
                    // A send fails only when the indexer stopped early (it has an error).
                    if tx.send(Ok(c)).await.is_err() {
                        break;
                    }
                    if done - last_report >= 1 << 20 {
                        last_report = done;
                        opts.emit(Progress::LayerBytes {
                            layer: digest,
                            done,
                            total,
                        });
                    }
                    continue;
                }
                Ok(Some(Err(e))) => crate::registry::describe_io(&e),
                Err(_) => format!("no data for {} s (stalled)", stall.as_secs_f64()),
            };
            // The connection broke or stalled: go on from the bytes already received (the
            // hash and the indexer keep their state), after a pause, a few times in a row.
            let mut cause = cause;
            let resumed = loop {
                failures += 1;
                if failures > MAX_RESUMES || done >= total {
                    break None;
                }
                tracing::info!("layer {}: {cause}; resuming at byte {done}", digest.short());
                let pause = (250u64 << failures).min(2000);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                let attempt =
                    tokio::time::timeout(stall, reg.blob_stream_from(&digest, done, total));
                match attempt.await.unwrap_or_else(|_| {
                    Err(Error::registry_transient(
                        digest.to_string(),
                        format!("no answer for {} s (stalled)", stall.as_secs_f64()),
                    ))
                }) {
                    Ok(s) => break Some(s),
                    Err(e @ (Error::NotFound { .. } | Error::Unauthorized { .. })) => {
                        cause = e.to_string();
                        failures = MAX_RESUMES;
                    }
                    Err(e) => cause = e.to_string(),
                }
            };
            match resumed {
                Some(s) => stream = s,
                None => {
                    network_failed = true;
                    let said = format!("download failed after {done} of {total} bytes: {cause}");
                    network_cause = Some(said.clone());
                    let _ = tx
                        .send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, said)))
                        .await;
                    break;
                }
            }
        }
        drop(tx);
        let result = indexer
            .await
            .map_err(|e| Error::io("indexer task", io::Error::other(e)))
            .and_then(|r| r);
        match result {
            Ok(idx) => {
                opts.emit(Progress::LayerBytes {
                    layer: digest,
                    done,
                    total,
                });
                Ok(idx)
            }
            Err(error) => {
                let path = self.ingest_path(&digest);
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                if network_failed && len >= MIN_RESUME {
                    // Kept for the next pull to resume: made durable first.
                    if let Ok(f) = std::fs::File::open(&path) {
                        let _ = f.sync_all();
                    }
                    tracing::info!(
                        "layer {}: kept {len} bytes downloaded for the next pull to resume",
                        digest.short()
                    );
                } else {
                    self.discard_ingest(&digest);
                }
                // Given up on the network: a registry error the caller may retry (the next
                // pull resumes), with what the indexer saw as its cause.
                let error = if network_failed {
                    Error::Registry {
                        reference: format!("layer {digest}"),
                        detail: network_cause.unwrap_or_else(|| error.to_string()),
                        status: None,
                        transient: true,
                        source: Some(Box::new(error)),
                    }
                } else {
                    error
                };
                Err(Failed {
                    error,
                    resumed: offset > 0,
                    network: network_failed,
                })
            }
        }
    }
}

fn check_diff_id(idx: &LayerIndex, job: &LayerJob) -> Result<()> {
    if idx.diff_id != job.diff_id {
        return Err(Error::CorruptLayer {
            layer: job.digest,
            detail: format!(
                "uncompressed content {} does not match the config's diff_id {}",
                idx.diff_id, job.diff_id
            ),
        });
    }
    Ok(())
}

/// Why a layer's download failed.
struct Failed {
    error: Error,
    /// It went on from bytes an earlier pull left.
    resumed: bool,
    /// The download gave up on the network (what it got is kept to resume).
    network: bool,
}

/// Blocking half of a layer pull: verify + store the blob (`blob`, a writer of the layer's
/// partial download) while indexing it; `input` is the whole blob from its first byte.
fn index_layer(
    store: &Store,
    digest: Digest,
    compression: Compression,
    small_max: u64,
    mut blob: crate::store::BlobWriter,
    input: impl Read,
) -> Result<LayerIndex> {
    let mut seekable_tmp = None;
    // Trust the bytes over the media type, as containerd does: a gzip or zstd magic number
    // decides, whatever the manifest says.
    let mut input = io::BufReader::with_capacity(1 << 16, input);
    let compression = match io::BufRead::fill_buf(&mut input) {
        Ok([0x1f, 0x8b, ..]) => Compression::Gzip,
        Ok([0x28, 0xb5, 0x2f, 0xfd, ..]) => Compression::Zstd,
        Ok(head) if head.len() >= 4 => Compression::None,
        _ => compression,
    };
    // The small files' bytes go to disk as they are read: indexing holds their records only.
    let small_tmp = store.temp_path(&format!("{}.small", digest.hex()));
    let small = index::small::SmallFiles::spilling(small_max, small_tmp)?;
    let mut idx = {
        let mut tee = Tee {
            inner: input,
            out: &mut blob,
        };
        match compression {
            Compression::Zstd => {
                let tmp = store.temp_path(&format!("{}.zst", digest.hex()));
                let file = std::fs::File::create(&tmp)
                    .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
                seekable_tmp = Some(TempFile(tmp));
                let mut out = io::BufWriter::new(file);
                let idx =
                    index::build_keeping(&mut tee, compression, digest, Some(&mut out), small)?;
                let file = out
                    .into_inner()
                    .map_err(|e| Error::io("writing seekable copy", e.into_error()))?;
                file.sync_all()
                    .map_err(|e| Error::io("syncing seekable copy", e))?;
                idx
            }
            _ => index::build_keeping(&mut tee, compression, digest, None, small)?,
        }
    };
    idx.compressed_size = blob.len();
    let blob_path = blob.commit(&format!("layer {digest}"))?;
    if let Some(tmp) = seekable_tmp {
        // The verified original is not needed to serve reads once its seekable copy exists.
        let dest = store.seekable_path(&digest);
        std::fs::rename(&tmp.0, &dest)
            .map_err(|e| Error::io(format!("storing {}", dest.display()), e))?;
        crate::store::sync_dir(&dest);
        let _ = std::fs::remove_file(blob_path);
    }
    Ok(idx)
}

/// Removes a temp file when dropped (a no-op once it was renamed into place).
struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
