//! store placeholder
use std::path::Path;
use crate::Result;
use crate::error::IoContext;
/// Writes atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("renaming {}", tmp.display()))
}
