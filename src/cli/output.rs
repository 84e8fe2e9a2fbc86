//! What the command line prints: sizes, counts, one-line errors, progress lines and bars.

use super::*;

/// The error and its causes on one line, each said once: the library's messages already
/// carry their causes' words, which `source()` also hands to callers that match on them.
pub(super) fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if out.contains(&said) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&said);
    }
    out
}

/// `1 layer`, `2 layers`.
pub(super) fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `1 entry`, `2 entries`.
pub(super) fn entries_word(n: usize) -> String {
    format!("{n} {}", if n == 1 { "entry" } else { "entries" })
}

pub(super) fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// Progress on stderr: a bar per layer on a terminal, plain lines otherwise; with `timings`,
/// plain lines each with the seconds since the process started (the pull's timeline).
pub(super) fn progress_printer(timings: bool) -> crate::pull::ProgressFn {
    if timings {
        Arc::new(|p: Progress| {
            if let Some(line) = progress_line(&p) {
                eprintln!("{:>8.3} s  {}", since_start(), line.trim_start());
            }
        })
    } else if std::io::stderr().is_terminal() {
        bars()
    } else {
        Arc::new(|p: Progress| {
            if let Some(line) = progress_line(&p) {
                eprintln!("{line}");
            }
        })
    }
}

/// Seconds since this process started (from `/proc/self/stat`, so that the time before the
/// command ran, loading and parsing the arguments, counts too).
pub(super) fn since_start() -> f64 {
    let started = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().nth(19)?.parse::<f64>().ok()
        });
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    match (started, uptime) {
        (Some(start), Some(up)) if ticks > 0.0 => (up - start / ticks).max(0.0),
        _ => 0.0,
    }
}

/// The line printed for an event when not on a terminal (byte counts are skipped).
pub(super) fn progress_line(p: &Progress) -> Option<String> {
    Some(match p {
        Progress::Resolved {
            reference,
            manifest,
            layers,
        } => {
            let total: u64 = layers.iter().map(|l| l.1).sum();
            format!(
                "{reference}: manifest {}, {}, {}",
                manifest.short(),
                plural(layers.len() as u64, "layer"),
                human(total)
            )
        }
        Progress::Cached { reference } => format!("{reference}: already in the store"),
        Progress::LayerCached { layer } => format!("  {} already stored", layer.short()),
        Progress::LayerBytes { .. } => return None,
        Progress::LayerResumed {
            layer,
            offset,
            total,
        } => format!(
            "  {} resuming at {} of {} (left by an earlier pull)",
            layer.short(),
            human(*offset),
            human(*total)
        ),
        Progress::LayerDone { layer, entries } => {
            format!(
                "  {} pulled and indexed ({})",
                layer.short(),
                entries_word(*entries)
            )
        }
        Progress::Merged { inodes } => format!("  merged tree: {inodes} inodes"),
        Progress::Warning { reference, message } => format!("{reference}: warning: {message}"),
        Progress::MetadataImage { bytes } => {
            format!(
                "  metadata image (EROFS, small files included): {}",
                human(*bytes)
            )
        }
    })
}

pub(super) fn bars() -> crate::pull::ProgressFn {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    /// The bars of one pull: once they are gone, the terminal's cursor goes below them (the
    /// last redraw leaves it at the end of the bottom bar, where the next output would follow).
    struct Bars {
        multi: MultiProgress,
        bars: std::sync::Mutex<std::collections::HashMap<crate::Digest, ProgressBar>>,
    }
    impl Drop for Bars {
        fn drop(&mut self) {
            let bars = self.bars.get_mut().unwrap_or_else(|e| e.into_inner());
            if !bars.is_empty() && !self.multi.is_hidden() {
                eprintln!();
            }
        }
    }
    let state = Bars {
        multi: MultiProgress::new(),
        bars: Default::default(),
    };
    // One bar per line at any terminal width: the bar takes what the numbers leave.
    let style = ProgressStyle::with_template(
        "{prefix} {bytes:>9}/{total_bytes:<9} {bytes_per_sec:>11} [{wide_bar}] {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    Arc::new(move |p: Progress| {
        let (multi, mut bars) = (
            &state.multi,
            state.bars.lock().unwrap_or_else(|e| e.into_inner()),
        );
        match &p {
            Progress::Resolved { layers, .. } => {
                multi.suspend(|| terminal_line(&progress_line(&p).unwrap_or_default()));
                for (d, size) in layers {
                    let bar = multi.add(ProgressBar::new(*size));
                    bar.set_style(style.clone());
                    bar.set_prefix(d.short());
                    bars.insert(*d, bar);
                }
            }
            Progress::LayerBytes { layer, done, .. } => {
                if let Some(b) = bars.get(layer) {
                    b.set_position(*done);
                }
            }
            Progress::LayerDone { layer, entries } => {
                if let Some(b) = bars.get(layer) {
                    b.finish_with_message(format!("indexed, {}", entries_word(*entries)));
                }
            }
            Progress::LayerCached { layer } => {
                if let Some(b) = bars.get(layer) {
                    b.finish_with_message("already stored");
                }
            }
            _ => {
                multi.suspend(|| terminal_line(&progress_line(&p).unwrap_or_default()));
            }
        }
    })
}

/// Writes a line on the terminal below the bars (which `suspend` takes away and draws again):
/// from the line's start, clearing what was there, and ended with a newline. (indicatif's
/// `println` pads a line to the width it reads from the terminal instead of ending it, for the
/// terminal to wrap: where that width is wrong, as on a terminal that reports none, the next
/// output runs on in the same line.)
pub(super) fn terminal_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[K{line}\n");
    let _ = err.flush();
}

/// How long ago `secs` (since the epoch) was, shortly.
pub(super) fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let d = now.saturating_sub(secs);
    match d {
        _ if secs == 0 => "never".into(),
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}
