//! The baseline bux-fuse is measured against: what runtimes do today. Fetch every layer (same
//! HTTP client, in parallel), then untar each into a directory in order with flate2/zstd + tar,
//! applying OCI whiteouts, preserving modes, owners, mtimes and xattrs.
//!
//! `extract_baseline REF DEST`
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use bux_fuse::registry::manifest::{self, ManifestOrIndex, Platform};
use bux_fuse::registry::RegistryOptions;
use bux_fuse::source::{Location, Source};
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (reference, dest) = (&args[1], PathBuf::from(&args[2]));
    let src = Source::open(&Location::parse(reference)?, &RegistryOptions::default())?;
    let (mut bytes, _) = src.top_manifest().await?;
    let mut m: ManifestOrIndex = serde_json::from_slice(&bytes)?;
    if m.is_index() {
        let entries = m.manifests.clone().unwrap_or_default();
        let chosen = manifest::select(&entries, &Platform::host()).ok_or("no platform")?;
        bytes = src.manifest_by_digest(&chosen.digest.parse()?).await?;
        m = serde_json::from_slice(&bytes)?;
    }
    let layers = m.layers.unwrap_or_default();
    let tmp = dest.with_extension("blobs");
    std::fs::create_dir_all(&tmp)?;
    let downloads = layers.iter().enumerate().map(|(i, l)| {
        let (src, tmp) = (&src, &tmp);
        async move {
            let path = tmp.join(i.to_string());
            let mut f = tokio::fs::File::create(&path).await?;
            let mut s = src.blob_stream(&l.digest.parse()?).await?;
            while let Some(c) = s.next().await {
                tokio::io::AsyncWriteExt::write_all(&mut f, &c?).await?;
            }
            Ok::<_, Box<dyn std::error::Error>>(path)
        }
    });
    let paths: Vec<PathBuf> = futures_util::future::try_join_all(downloads).await?;
    std::fs::create_dir_all(&dest)?;
    for (l, p) in layers.iter().zip(&paths) {
        let f = std::fs::File::open(p)?;
        let r: Box<dyn Read> = if l.media_type.ends_with("gzip") {
            Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
                f,
            )))
        } else if l.media_type.ends_with("zstd") {
            Box::new(zstd::stream::read::Decoder::new(f)?)
        } else {
            Box::new(f)
        };
        apply_layer(r, &dest)?;
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

fn remove_all(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => drop(std::fs::remove_dir_all(p)),
        Ok(_) => drop(std::fs::remove_file(p)),
        Err(_) => {}
    }
}

fn apply_layer(r: impl Read, dest: &Path) -> std::io::Result<()> {
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel: PathBuf = path
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            if let Ok(rd) = std::fs::read_dir(&parent) {
                for e in rd.flatten() {
                    if !created.contains(&e.path()) {
                        remove_all(&e.path());
                    }
                }
            }
            continue;
        }
        if let Some(target) = name.strip_prefix(".wh.") {
            remove_all(&parent.join(target));
            continue;
        }
        let full = dest.join(&rel);
        if let Ok(m) = std::fs::symlink_metadata(&full) {
            if !(m.is_dir() && entry.header().entry_type().is_dir()) {
                remove_all(&full);
            }
        }
        entry.unpack_in(dest)?;
        created.insert(full);
    }
    Ok(())
}
