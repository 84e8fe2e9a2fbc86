//! Kernel mounts of the mount's own: mount(2), the writable overlay, and the read-ahead root
//! sets on a FUSE mount.

use std::io;
use std::path::Path;

/// mount(2): `source` (a path, or a name such as `overlay`) at `dir`, with `data` options.
pub(crate) fn kernel_mount(
    source: &Path,
    dir: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |b: &[u8]| std::ffi::CString::new(b).map_err(|_| io::Error::other("NUL in a path"));
    let (source, dir) = (
        c(source.as_os_str().as_encoded_bytes())?,
        c(dir.as_os_str().as_encoded_bytes())?,
    );
    let (fstype, data) = (c(fstype.as_bytes())?, c(data.as_bytes())?);
    // SAFETY: valid NUL-terminated strings for mount(2).
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Read-ahead the kernel uses on the mount, in KiB: FUSE's device default (128 KiB) caps
/// sequential reads at ~144 MB/s here; 1 MiB gave ~361 MB/s (see crate-facts).
#[doc(hidden)]
pub const READ_AHEAD_KB: u32 = 1024;

/// Raises the mount's read-ahead through sysfs (`/sys/class/bdi/0:N/read_ahead_kb`), which
/// only root may write; elsewhere the default stays, and nothing else changes.
pub(crate) fn raise_readahead(mount_point: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mount_point) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{READ_AHEAD_KB}\n")) {
        tracing::debug!("raising read-ahead through {path}: {e}");
    }
}

/// Mounts a kernel overlay at `dir`: lower layers `lowerdir` (the image), upper and work dirs
/// under `base`. `data_only` (a `meta::data` lower whose files redirect into `data`) needs
/// metacopy; otherwise older kernels without it get a plain overlay.
pub(super) fn mount_overlay(
    lowerdir: &str,
    data_only: bool,
    base: &Path,
    dir: &Path,
) -> std::result::Result<(), String> {
    let (upper, work) = (base.join("upper"), base.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let base_opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    // redirect_dir lets lower directories be renamed; metacopy keeps chmod/chown from copying
    // file data.
    let tries: &[&str] = match data_only {
        true => &[",redirect_dir=on,metacopy=on"],
        false => &[",redirect_dir=on,metacopy=on", ",redirect_dir=on", ""],
    };
    let mut last = String::new();
    for extra in tries {
        match kernel_mount(
            Path::new("overlay"),
            dir,
            "overlay",
            0,
            &format!("{base_opts}{extra}"),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "mounting the writable overlay (needs root): {last}"
    ))
}
