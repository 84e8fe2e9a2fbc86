//! Pulling an image lazily: manifest, config and the image's index only — its published
//! bux-fuse index, or its layers' own zstd:chunked tables of contents — so it mounts before its
//! layers are downloaded. Layers without an index are pulled whole, and the outcome says so.

use std::sync::Arc;

use futures_util::StreamExt;

use crate::index::chunked::TocLocation;
use crate::index::published::PublishedLayer;
use crate::index::{self, Compression};
use crate::publish::IndexSource;
use crate::pull::{LayerJob, Progress, PullOptions, PullPolicy, PulledImage};
use crate::source::{Location, Source};
use crate::{Digest, Error, Result, Store};

/// Reads `len` bytes of a blob from `offset` (a whole-blob answer is read up to them).
async fn fetch_range(
    reg: &crate::registry::Registry,
    digest: &Digest,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let (mut stream, skip) = match reg.blob_range(digest, offset, len).await? {
        crate::registry::RangeBody::Partial(s) => (s, 0),
        crate::registry::RangeBody::Full(s) => (s, offset),
    };
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = 0u64;
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| Error::io(format!("reading blob {digest}"), e))?;
        let (from, to) = (pos, pos + b.len() as u64);
        pos = to;
        let lo = skip.max(from);
        let hi = (skip + len).min(to);
        if lo < hi {
            out.extend_from_slice(&b[(lo - from) as usize..(hi - from) as usize]);
        }
        if pos >= skip + len {
            break;
        }
    }
    if out.len() as u64 != len {
        return Err(Error::registry_transient(
            digest.to_string(),
            format!("short range: {} of {len} bytes", out.len()),
        ));
    }
    Ok(out)
}

/// Largest published read trace accepted.
const MAX_TRACE: u64 = 16 << 20;

/// Largest published layer index accepted (a 500k-file layer's is ~30 MB).
const MAX_PUBLISHED_INDEX: u64 = 512 << 20;

/// What a lazy pull did.
#[derive(Debug, Clone, Default)]
pub struct LazyOutcome {
    /// The index manifest used, if any.
    pub index: Option<Digest>,
    /// Layers left to fetch on demand.
    pub lazy_layers: usize,
    /// Of those, layers served from their own table of contents (zstd:chunked, eStargz).
    pub chunked_layers: usize,
    /// Why the pull was (partly) not lazy, or how the index was trusted.
    pub note: Option<String>,
}

impl Store {
    /// Like [`Store::pull`], but fetches only manifest, config and the image's published
    /// index (see [`crate::publish`]), so the image mounts before its layers are downloaded;
    /// layers are then fetched as they are read. Layers without an index (zstd, or an image
    /// never indexed) are pulled whole, and the outcome says so. An index found only as a
    /// referrer is used only when `trust_referrer` is set.
    pub async fn pull_lazy(
        &self,
        reference: &str,
        opts: &PullOptions,
        trust_referrer: bool,
    ) -> Result<(PulledImage, LazyOutcome)> {
        let (image, outcome) = self
            .pull_lazy_candidates(reference, opts, trust_referrer)
            .await?;
        self.keep_budget(opts.budget, &image.reference).await;
        Ok((image, outcome))
    }

    async fn pull_lazy_candidates(
        &self,
        reference: &str,
        opts: &PullOptions,
        trust_referrer: bool,
    ) -> Result<(PulledImage, LazyOutcome)> {
        // A short name with several search registries to try: each in turn, as `pull` does.
        let names = match crate::pull::candidate_names(reference) {
            Ok(names) => names,
            // Stored by Docker Hub's meaning of the name (as `pull` finds it).
            Err(e) => match crate::pull::normalize_reference(reference) {
                Ok(n) if opts.policy != PullPolicy::Always && self.image(&n)?.is_some() => {
                    vec![n]
                }
                _ => return Err(e),
            },
        };
        if names.len() > 1 {
            if opts.policy != PullPolicy::Always {
                if let Some(n) = names
                    .iter()
                    .find(|n| self.image(n).is_ok_and(|i| i.is_some()))
                {
                    return Box::pin(self.pull_lazy_candidates(n, opts, trust_referrer)).await;
                }
            }
            // Each search registry in turn, whatever stopped the one before (as `pull`).
            let mut last = None;
            for n in &names {
                match Box::pin(self.pull_lazy_candidates(n, opts, trust_referrer)).await {
                    Ok(r) => return Ok(r),
                    Err(e) => last = Some(e),
                }
            }
            return Err(last.unwrap_or_else(|| Error::NotFound {
                reference: reference.to_string(),
                detail: String::new(),
            }));
        }
        let loc = Location::parse(reference)?;
        let name = loc.key();
        if !matches!(loc, Location::Registry(_)) {
            let image = self.pull(reference, opts).await?;
            return Ok((image, LazyOutcome::default()));
        }
        let _guard = self.hold_pull_guard().await?;
        if opts.policy != PullPolicy::Always {
            if let Some(record) = self.stored_image(&name, opts, true)? {
                opts.emit(Progress::Cached {
                    reference: name.clone(),
                });
                let outcome = self.stored_outcome(&record);
                return Ok((self.pulled(record)?, outcome));
            }
            if opts.policy == PullPolicy::Never {
                return Err(Error::NotFound {
                    reference: name,
                    detail: " in the local store (pull policy is never)".into(),
                });
            }
            // Stored for another platform than the host's, none asked for: as `pull` does,
            // resolved again for the host, and served as stored if the answer is the same or
            // does not come.
            if let Some(record) = self.stored_for_another_platform(&name, opts, true)? {
                if !self.host_resolves_elsewhere(&loc, &record, opts).await {
                    let outcome = self.stored_outcome(&record);
                    return Ok((self.serve_stored(record, opts)?, outcome));
                }
            }
        }
        self.pull_lazy_from(&loc, opts, trust_referrer)
            .await
            .map_err(|e| e.for_image(&name))
    }

    /// What a lazy pull that found the image stored did: its layers not yet whole.
    fn stored_outcome(&self, record: &crate::store::ImageRecord) -> LazyOutcome {
        LazyOutcome {
            lazy_layers: record
                .layers
                .iter()
                .filter(|l| !self.layer_local(l))
                .count(),
            ..Default::default()
        }
    }

    async fn pull_lazy_from(
        &self,
        loc: &Location,
        opts: &PullOptions,
        trust_referrer: bool,
    ) -> Result<(PulledImage, LazyOutcome)> {
        let src = Arc::new(crate::pull::open_source(loc, opts).await?);
        let r = self.resolve(&src, &loc.key(), opts).await?;
        let Source::Registry(reg, reference) = &*src else {
            unreachable!("checked by the caller")
        };
        let mut outcome = LazyOutcome::default();
        // A layer the manifest names twice is fetched and served once. Layers stored whole
        // need nothing.
        let mut seen = std::collections::HashSet::new();
        let todo: Vec<&LayerJob> = r
            .jobs
            .iter()
            .filter(|job| seen.insert(job.digest))
            .filter(|job| {
                !(self.index_path(&job.digest).exists() && self.layer_bytes_present(&job.digest))
            })
            .collect();
        // The tables of contents that layers' descriptors pin (zstd:chunked, eStargz) are
        // fetched while the published index is looked for, not after: each chain is a few
        // round trips, and an image rarely has both (a table the index makes needless is
        // dropped).
        let pinned: Vec<&LayerJob> = todo
            .iter()
            .copied()
            .filter(|j| own_table(j) == OwnTable::Pinned)
            .collect();
        let (published, pinned_tables) = tokio::join!(
            self.published_layers(&src, reg, reference, &r, trust_referrer, &mut outcome),
            self.own_tables(reg, &pinned),
        );
        let mut lazy = published?;
        let index = outcome.index;
        // An index made for other layers (one that survived a conversion of the image, say)
        // serves none of these: say so, or the whole pull that follows looks unexplained.
        if let Some(index) = index {
            let unlisted = r
                .jobs
                .iter()
                .filter(|j| !lazy.iter().any(|(l, _)| *l == j.digest))
                .filter(|j| {
                    !(self.index_path(&j.digest).exists() && self.layer_bytes_present(&j.digest))
                })
                .count();
            if unlisted > 0 {
                outcome.note = Some(format!(
                    "index {} ({}) names {} of this image's {} layers: it was made for other layers \
                     (e.g. before the image was converted); the others are not served from it",
                    index.short(),
                    crate::publish::ANNOTATION_INDEX,
                    r.jobs.len() - unlisted,
                    r.jobs.len()
                ));
            }
        }
        // The layers the index does not serve: their own tables, pinned (fetched above) or
        // not (a gzip layer's footer, read to say why it is not lazy).
        let rest: Vec<&LayerJob> = todo
            .iter()
            .copied()
            .filter(|j| !lazy.iter().any(|(l, _)| *l == j.digest))
            .collect();
        let unpinned: Vec<&LayerJob> = rest
            .iter()
            .copied()
            .filter(|j| own_table(j) == OwnTable::Footer)
            .collect();
        let mut tables = pinned_tables;
        tables.extend(self.own_tables(reg, &unpinned).await);
        let mut refused = Vec::new();
        let mut prefetch = Vec::new();
        let mut usable = Vec::new();
        for job in rest {
            let Some(pos) = tables.iter().position(|(d, _)| *d == job.digest) else {
                continue; // neither kind of layer
            };
            let published = match tables.swap_remove(pos).1? {
                Table::Chunked(p) => p,
                Table::Estargz(Estargz::Table(p, bytes, Some(end))) => {
                    prefetch.push((job.digest, p.chunks.first().map_or(0, |c| c.start), end));
                    Ok((p, bytes))
                }
                Table::Estargz(Estargz::Table(p, bytes, None)) => Ok((p, bytes)),
                Table::Estargz(Estargz::Refused(e)) => Err(e),
                Table::Estargz(Estargz::Unpinned) => {
                    refused.push(format!(
                        "layer {} is eStargz but its descriptor has no {} annotation, so \
                         nothing the manifest covers vouches for its table of contents: \
                         pulled whole",
                        job.digest.short(),
                        index::estargz::TOC_DIGEST_KEY
                    ));
                    continue;
                }
                Table::Estargz(Estargz::Not) => continue,
            };
            match published {
                Ok(p) => usable.push((job.digest, p)),
                Err(e) => {
                    // A table this version will not serve from (past its bounds, or
                    // broken) costs the layer its laziness, not the image its mount.
                    tracing::warn!("layer {}: {e}: pulled whole", job.digest);
                    let kind = match job.compression {
                        Compression::Zstd => "zstd:chunked",
                        _ => "eStargz",
                    };
                    refused.push(format!(
                        "layer {}: its {kind} table was not used ({e}): pulled whole",
                        job.digest.short()
                    ));
                }
            }
        }
        // Saved on the blocking pool, each layer apart: each waits for its files to be
        // durable, and one after another those waits added up before the mount.
        let saves: Vec<_> = usable
            .into_iter()
            .map(|(layer, (published, bytes))| {
                let store = self.clone();
                crate::pull::off_thread("layer table task", move || {
                    let blob = Digest::of(&bytes);
                    store.put_blob(&blob, &bytes, "layer table")?;
                    published
                        .to_index()
                        .save(&store.lazy_index_path(&layer, &blob))?;
                    Ok((layer, blob))
                })
            })
            .collect();
        let saved = futures_util::future::try_join_all(saves).await?;
        outcome.chunked_layers = saved.len();
        lazy.extend(saved);
        // The eStargz prefetch landmarks: what comes before them is fetched first, as a
        // recorded trace would be (a published or recorded trace takes precedence).
        let trace = self.trace_path(&r.digest);
        if !prefetch.is_empty() && !trace.exists() {
            let entries: Vec<_> = prefetch
                .into_iter()
                .filter(|(_, start, end)| start < end)
                .map(|(layer, start, end)| crate::trace::Entry { layer, start, end })
                .collect();
            // (None before the landmarks: no trace, so the first mount records one.)
            if !entries.is_empty() {
                crate::trace::save(&trace, &entries)?;
            }
        }
        if outcome.chunked_layers > 0 && index.is_none() {
            outcome.note = None; // the zstd:chunked tables made it lazy after all
        }
        if !refused.is_empty() {
            outcome.note = Some(
                outcome
                    .note
                    .take()
                    .into_iter()
                    .chain(refused)
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        outcome.lazy_layers = lazy.len();
        let whole: Vec<LayerJob> = r
            .jobs
            .iter()
            .filter(|j| !lazy.iter().any(|(l, _)| *l == j.digest))
            .map(|j| LayerJob {
                desc: j.desc.clone(),
                digest: j.digest,
                compression: j.compression,
                diff_id: j.diff_id,
            })
            .collect();
        self.fetch_layers(&src, &whole, opts).await?;
        let image = self.record(r, &lazy, opts).await?;
        Ok((image, outcome))
    }

    /// The layers the image's published index serves (see [`crate::publish`]): each layer's
    /// digest and its index blob's, decoded and saved. Says in `outcome` which index was used
    /// and why none was.
    async fn published_layers(
        &self,
        src: &Arc<Source>,
        reg: &crate::registry::Registry,
        reference: &oci_client::Reference,
        r: &crate::pull::Resolved,
        trust_referrer: bool,
        outcome: &mut LazyOutcome,
    ) -> Result<Vec<(Digest, Digest)>> {
        let found = crate::publish::find_index(self, reg, &r.digest, &r.bytes).await?;
        let index = match found {
            Some(IndexSource::Pinned(d)) => Some(d),
            Some(IndexSource::Referrer(d)) if trust_referrer => {
                outcome.note = Some(format!(
                    "using index {} found as a referrer (trusted by request; not covered by the manifest digest)",
                    d.short()
                ));
                Some(d)
            }
            Some(IndexSource::Referrer(d)) => {
                outcome.note = Some(format!(
                    "index {} was found only as a referrer, which the manifest digest does not cover: not trusted, pulled whole (--trust-index to use it)",
                    d.short()
                ));
                None
            }
            None => {
                outcome.note = Some(
                    "no bux-fuse index was published for this image (bux-fuse push-index): pulled whole"
                        .into(),
                );
                None
            }
        };
        outcome.index = index;
        let Some(index) = index else {
            return Ok(Vec::new());
        };
        let (bytes, _) = reg
            .manifest(&reference.clone_with_digest(index.to_string()))
            .await?;
        let listed = crate::publish::index_layers(&bytes)?;
        let trace = async {
            if let Some((trace, size)) = crate::publish::index_trace(&bytes) {
                let path = self.trace_path(&r.digest);
                if size <= MAX_TRACE && !path.exists() {
                    let t = src.small_blob(&trace, MAX_TRACE).await?;
                    crate::trace::parse(&t)?;
                    crate::store::write_atomic(&path, &t)?;
                }
            }
            Ok::<_, Error>(())
        };
        // The trace and each layer's index, all at once (a round trip each otherwise).
        // (Collected before streaming: a closure in the stream's type makes the future
        // not `Send`.)
        let fetches: Vec<_> = r
            .jobs
            .iter()
            .filter_map(|job| {
                let &(_, blob, size) = listed.iter().find(|(l, _, _)| *l == job.digest)?;
                if self.index_path(&job.digest).exists() && self.layer_bytes_present(&job.digest) {
                    return None; // already stored whole
                }
                let src = src.clone();
                let (layer, layer_size, diff_id) = (job.digest, job.desc.size, job.diff_id);
                Some(async move {
                    if size > MAX_PUBLISHED_INDEX {
                        return Err(Error::InvalidManifest {
                            what: format!("index of layer {layer}"),
                            detail: format!("{size} bytes, more than {MAX_PUBLISHED_INDEX}"),
                        });
                    }
                    let bytes = src.small_blob(&blob, MAX_PUBLISHED_INDEX).await?;
                    Ok((layer, layer_size, diff_id, blob, bytes))
                })
            })
            .collect();
        let fetched = futures_util::stream::iter(fetches)
            .buffered(8)
            .collect::<Vec<Result<_>>>();
        let (traced, fetched) = tokio::join!(trace, fetched);
        traced?;
        // Decoded and saved on the blocking pool, each layer apart (tables of large layers
        // run to megabytes, and each save waits for its files to be durable).
        let saves = fetched
            .into_iter()
            .map(|f| {
                let (layer, size, diff_id, blob, bytes) = f?;
                let store = self.clone();
                Ok(crate::pull::off_thread("index task", move || {
                    let published = PublishedLayer::decode(&bytes, layer, size)?;
                    if published.diff_id != diff_id {
                        return Err(Error::CorruptLayer {
                            layer,
                            detail: "published index disagrees with the config's diff_id".into(),
                        });
                    }
                    store.put_blob(&blob, &bytes, "layer index")?;
                    // Keyed by this index too: another image naming the same layer with
                    // another index (honest or forged) never replaces what this one reads by.
                    published
                        .to_index()
                        .save(&store.lazy_index_path(&layer, &blob))?;
                    Ok((layer, blob))
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        futures_util::future::try_join_all(saves).await
    }

    /// The own tables of contents of `jobs` (fetched and decoded several at once: a round trip
    /// or two each, which one after another cost a slow link's latency per layer), each with
    /// its layer's digest; a layer with none is left out.
    async fn own_tables(
        &self,
        reg: &crate::registry::Registry,
        jobs: &[&LayerJob],
    ) -> Vec<(Digest, Result<Table>)> {
        let fetches: Vec<_> = jobs
            .iter()
            .map(|&job| async move {
                let annotations = job.desc.annotations.clone().unwrap_or_default();
                let table = match TocLocation::from_annotations(&annotations, job.desc.size) {
                    Some(loc) if job.compression == Compression::Zstd => {
                        self.chunked_table(reg, job, loc).await.map(Table::Chunked)
                    }
                    _ if job.compression == Compression::Gzip => self
                        .estargz_table(reg, job, &annotations)
                        .await
                        .map(Table::Estargz),
                    _ => return None,
                };
                Some((job.digest, table))
            })
            .collect();
        futures_util::stream::iter(fetches)
            .buffered(8)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// A zstd:chunked layer's table, fetched and decoded (off the async threads: megabytes of
    /// JSON for a large layer), with its encoding; `Ok(Err(_))`: one this version will not
    /// serve from.
    async fn chunked_table(
        &self,
        reg: &crate::registry::Registry,
        job: &LayerJob,
        loc: TocLocation,
    ) -> Result<Result<(PublishedLayer, Vec<u8>)>> {
        let toc = fetch_range(reg, &job.digest, loc.offset, loc.length).await?;
        let (digest, size, diff_id) = (job.digest, job.desc.size, job.diff_id);
        crate::pull::off_thread("decoding a zstd:chunked table", move || {
            Ok(index::chunked::parse(&toc, &loc, digest, size, diff_id))
        })
        .await
    }
}

/// Which table of its own a layer may have, by its descriptor.
#[derive(PartialEq)]
enum OwnTable {
    /// One its descriptor pins: zstd:chunked's TOC location, or eStargz's TOC digest.
    Pinned,
    /// A gzip layer without a pinned TOC: its footer says whether it is eStargz.
    Footer,
    /// None.
    None,
}

fn own_table(job: &LayerJob) -> OwnTable {
    let annotations = job.desc.annotations.clone().unwrap_or_default();
    match job.compression {
        Compression::Zstd
            if TocLocation::from_annotations(&annotations, job.desc.size).is_some() =>
        {
            OwnTable::Pinned
        }
        Compression::Gzip if index::estargz::toc_digest(&annotations).is_some() => OwnTable::Pinned,
        Compression::Gzip => OwnTable::Footer,
        _ => OwnTable::None,
    }
}

/// A layer's own table of contents, as fetched.
enum Table {
    /// A zstd:chunked layer's, decoded with its encoding (or why it will not be served from).
    Chunked(Result<(PublishedLayer, Vec<u8>)>),
    /// What a gzip layer's tail says.
    Estargz(Estargz),
}

/// What a gzip layer's tail says.
enum Estargz {
    /// Not eStargz (no footer).
    Not,
    /// eStargz, but no annotation pins its TOC.
    Unpinned,
    /// Its TOC, pinned, that this version does not serve from (the layer is pulled whole).
    Refused(Error),
    /// Its table, its encoding, and where its prefetch landmark starts.
    Table(PublishedLayer, Vec<u8>, Option<u64>),
}

impl Store {
    /// Reads an eStargz layer's TOC: the blob's tail (footer and, usually, the TOC with it)
    /// in one request. An annotation that is not a digest, or a TOC that does not match it,
    /// fails the pull: the image contradicts itself.
    async fn estargz_table(
        &self,
        reg: &crate::registry::Registry,
        job: &crate::pull::LayerJob,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<Estargz> {
        use index::estargz;
        let size = job.desc.size;
        let pinned = match estargz::toc_digest(annotations) {
            Some(Ok(d)) => Some(d),
            Some(Err(why)) => {
                return Err(Error::CorruptLayer {
                    layer: job.digest,
                    detail: why,
                })
            }
            None => None,
        };
        if size < estargz::FOOTER_SIZE {
            return Ok(Estargz::Not);
        }
        // Without the annotation only the footer is read, to say why the layer is not lazy.
        let want = if pinned.is_some() {
            estargz::TAIL.min(size)
        } else {
            estargz::FOOTER_SIZE
        };
        let mut tail = fetch_range(reg, &job.digest, size - want, want).await?;
        let Some((toc, end)) = estargz::footer(&tail, size) else {
            return Ok(if pinned.is_some() {
                Estargz::Refused(Error::CorruptLayer {
                    layer: job.digest,
                    detail: format!(
                        "annotated {} but it has no eStargz footer",
                        estargz::TOC_DIGEST_KEY
                    ),
                })
            } else {
                Estargz::Not
            });
        };
        let Some(pinned) = pinned else {
            return Ok(Estargz::Unpinned);
        };
        if end - toc > index::chunked::MAX_TOC {
            return Ok(Estargz::Refused(Error::CorruptLayer {
                layer: job.digest,
                detail: format!("eStargz table of contents of {} bytes", end - toc),
            }));
        }
        if toc < size - want {
            // A TOC larger than the tail: the rest of it.
            let mut head = fetch_range(reg, &job.digest, toc, size - want - toc).await?;
            head.append(&mut tail);
            tail = head;
        }
        let from = (toc - (size - tail.len() as u64)) as usize;
        let member = &tail[from..from + (end - toc) as usize];
        Ok(
            match estargz::parse(member, toc, &pinned, job.digest, size, job.diff_id)? {
                estargz::Parsed::Table(p, bytes, prefetch) => Estargz::Table(p, bytes, prefetch),
                estargz::Parsed::Unusable(e) => Estargz::Refused(e),
            },
        )
    }
}
