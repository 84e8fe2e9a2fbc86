//! Small files' bytes as extra devices: a layer's small-file table of the current format is an
//! EROFS device of the image (its digest tagged in the device table, so a server mounts the
//! files the image was written for); tables of earlier formats are copied into the image.

use super::*;

/// The metadata image of `tree` with the small files the layers' tables (`tables`, by layer)
/// keep: tables of the current format become extra devices ([`Device`]), the bytes of earlier
/// ones are copied in, in the walk's order until `max_bytes` of them. Laid out here; the
/// copied bytes are written by [`fill_from_tables`].
pub(super) fn lay_out_with_tables<'t>(
    tree: &Tree,
    tables: &'t [Option<crate::index::small::SmallIndex>],
    max_bytes: u64,
) -> Result<Layout<'t>, String> {
    use crate::index::small::Placed;
    let mut devices = Vec::new();
    let mut device_of = vec![None; tables.len()];
    for (layer, t) in tables.iter().enumerate() {
        let Some((t, blocks)) = t.as_ref().and_then(|t| Some((t, t.device_blocks()?))) else {
            continue;
        };
        if devices.len() < DEVICES_MAX {
            devices.push(Device {
                layer: t.layer_hex(),
                blocks,
                table: t.table_digest(),
            });
            device_of[layer] = Some(devices.len() as u16);
        }
    }
    let given = std::cell::Cell::new(0u64);
    let copied = |size: u64| {
        given.set(given.get() + size);
        given.get() <= max_bytes
    };
    let held = |layer: u32, offset: u64, size: u64| {
        let table = tables.get(layer as usize)?.as_ref()?;
        (table.len_at(offset)? == size).then_some(())?;
        match (table.placed_at(offset)?, device_of[layer as usize]) {
            (Placed::Tiny(b), _) => copied(size).then_some(Held::Now(b)),
            (Placed::Block(block), Some(device)) => Some(Held::Device { device, block }),
            _ => copied(size).then_some(Held::Later),
        }
    };
    lay_out(tree, Purpose::Metadata, &held, devices).map_err(|e| e.0)
}

/// Writes the bytes [`lay_out_with_tables`] left for later, a layer at a time, in the order of
/// their tables.
pub(super) fn fill_from_tables(
    layout: &Layout<'_>,
    tables: &[Option<crate::index::small::SmallIndex>],
    out: &mut dyn Out,
) -> Result<(), String> {
    let mut wanted: Vec<(u32, u64, usize)> = layout
        .order
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.later.map(|(layer, offset)| (layer, offset, i)))
        .collect();
    wanted.sort_unstable();
    for (layer, table) in tables.iter().enumerate() {
        let mine: Vec<_> = wanted.iter().filter(|w| w.0 == layer as u32).collect();
        let (Some(table), false) = (table, mine.is_empty()) else {
            continue;
        };
        let mut next = mine.into_iter().peekable();
        table
            .each(|offset, bytes| {
                while let Some(&&(_, o, i)) = next.peek() {
                    if o > offset {
                        break;
                    }
                    next.next();
                    if o == offset {
                        put_data(out, &layout.order[i], bytes)?;
                    }
                }
                Ok(next.peek().is_some())
            })
            .map_err(|e| e.to_string())?;
        if next.peek().is_some() {
            return Err("a small file's bytes are missing from its table".into());
        }
    }
    Ok(())
}

/// The metadata image [`write_metadata_image`] writes, in memory (to check one on disk).
pub(crate) fn metadata_image_with_tables(
    tree: &Tree,
    tables: &[Option<crate::index::small::SmallIndex>],
    max_bytes: u64,
) -> Result<Vec<u8>, String> {
    let mut layout = lay_out_with_tables(tree, tables, max_bytes)?;
    let mut out = vec![0u8; layout.blocks * BLOCK];
    write(tree, &mut layout, &mut out).expect("writing to memory");
    fill_from_tables(&layout, tables, &mut out)?;
    Ok(out)
}

/// The metadata image of `tree` with the small files of the layers' tables (`tables`, by
/// layer; see [`lay_out_with_tables`]) written to `file` (from its start; its length set). It
/// holds the metadata blocks and the tables' records, not the files' bytes: those copied in
/// are read through once, a layer at a time, and written where they go. Returns the image's
/// length.
pub(crate) fn write_metadata_image(
    tree: &Tree,
    tables: &[Option<crate::index::small::SmallIndex>],
    max_bytes: u64,
    file: &std::fs::File,
) -> Result<u64, String> {
    let mut layout = lay_out_with_tables(tree, tables, max_bytes)?;
    let len = (layout.blocks * BLOCK) as u64;
    file.set_len(0)
        .and_then(|_| file.set_len(len))
        .map_err(|e| format!("sizing the image: {e}"))?;
    let mut out = FileOut {
        meta: vec![0u8; layout.meta_blocks * BLOCK],
        file,
    };
    let io = |e: std::io::Error| format!("writing the image: {e}");
    write(tree, &mut layout, &mut out).map_err(io)?;
    fill_from_tables(&layout, tables, &mut out)?;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&out.meta, 0).map_err(io)?;
    Ok(len)
}

/// The extra devices the image at `path` names, in the order of their ids (what `mount -o
/// device=` must give, one per device).
pub fn devices(path: &std::path::Path) -> std::io::Result<Vec<Device>> {
    use std::io::Read;
    let mut head = vec![0u8; BLOCK];
    std::fs::File::open(path)?.read_exact(&mut head)?;
    let s = &head[SUPER_OFFSET..];
    let features = u32::from_le_bytes(s[80..84].try_into().expect("4 bytes"));
    if features & FEATURE_INCOMPAT_DEVICE_TABLE == 0 {
        return Ok(Vec::new());
    }
    let count = u16::from_le_bytes(s[86..88].try_into().expect("2 bytes")) as usize;
    let slot_off = u16::from_le_bytes(s[88..90].try_into().expect("2 bytes")) as usize;
    if slot_off * DEVT_SLOT != DEVT_OFFSET || count > DEVICES_MAX {
        return Err(std::io::Error::other(
            "a device table this version does not write",
        ));
    }
    Ok(head[DEVT_OFFSET..DEVT_OFFSET + count * DEVT_SLOT]
        .chunks_exact(DEVT_SLOT)
        .map(|d| Device {
            layer: String::from_utf8_lossy(&d[..64])
                .trim_end_matches('\0')
                .to_string(),
            blocks: u32::from_le_bytes(d[64..68].try_into().expect("4 bytes")) as u64,
            table: d[DEVT_DIGEST..DEVT_DIGEST + 32]
                .try_into()
                .expect("32 bytes"),
        })
        .collect())
}

/// Where the image finds a small file's bytes: here they are, they are written later, or they
/// are on an extra device.
pub(super) enum Held<'a> {
    Now(&'a [u8]),
    Later,
    Device { device: u16, block: u32 },
}

/// An extra device of an image: a layer's small-file file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The layer's digest, hex.
    pub layer: String,
    pub blocks: u64,
    /// The SHA-256 of its table frame: what ties the image to that very file.
    pub table: [u8; 32],
}
