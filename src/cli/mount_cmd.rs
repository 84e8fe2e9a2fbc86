//! `bux-fuse mount`: pull if needed, then mount over the image's shared server, or start a
//! daemon of the mount's own (or serve in the foreground).

use super::*;

/// Runs `bux-fuse mount` with `args` (the store from `--store`, `quiet` from `-q`).
pub(super) fn run(store_arg: &Option<PathBuf>, quiet: bool, args: MountArgs) -> Result<()> {
    let MountArgs {
        reference,
        dir,
        foreground,
        threads,
        cache_mb,
        writable,
        disk,
        upper,
        allow_other,
        lazy,
        trust_index,
        prefetch,
        record_trace,
        read_timeout,
        wait_complete,
        notify_ready,
        own_server,
        mut pull,
    } = args;
    pull.quiet = quiet;
    let store = open_store(store_arg)?;
    let mut opts = pull.options(false)?;
    let budget = match notify_ready {
        true => None, // a daemon: its parent keeps the budget
        false => budget(&store, pull.max_store_size.as_deref())?,
    };
    // Held until the mount has leased its image: no eviction between pull and lease.
    let hold = store.pull_guard()?;
    let image = if lazy {
        let (image, outcome) =
            runtime()?.block_on(store.pull_lazy(&reference, &opts, trust_index))?;
        opts.progress = None; // the bars end before what follows is said
        if let Some(note) = outcome.note.filter(|_| !pull.quiet) {
            eprintln!("{}: {note}", image.reference);
        }
        image
    } else {
        runtime()?.block_on(store.pull(&reference, &opts))?
    };
    opts.progress = None;
    if !(read_timeout > 0.0 && read_timeout < 86400.0) {
        bail!("--read-timeout must be between 0 and 86400 seconds");
    }
    let upper = upper.map(|u| std::path::absolute(&u).unwrap_or(u));
    let mopts = crate::MountOptions {
        threads,
        cache_bytes: cache_mb << 20,
        writable: writable || upper.is_some(),
        disk,
        upper,
        registry: opts.registry.clone(),
        read_deadline: std::time::Duration::from_secs_f64(read_timeout),
        // (Waiting for the image whole means having it completed, whatever --prefetch says.)
        prefetch: match prefetch.as_str() {
            _ if wait_complete => crate::mount::Prefetch::All,
            "none" => crate::mount::Prefetch::None,
            "trace" => crate::mount::Prefetch::Trace,
            _ => crate::mount::Prefetch::All,
        },
        record_trace,
        allow_other: allow_other || crate::MountOptions::default().allow_other,
        shared_server: if own_server {
            None
        } else {
            Some(std::env::current_exe().context("finding own executable")?)
        },
    };
    if !quiet && !notify_ready {
        if let Some(n) = std::fs::read_dir(&dir)
            .ok()
            .map(|d| d.count())
            .filter(|n| *n > 0)
        {
            eprintln!(
                "warning: {} is not empty: the mount hides its {} until it is unmounted",
                dir.display(),
                entries_word(n)
            );
        }
    }
    let shared = match foreground || notify_ready {
        true => None,
        false => crate::mount::mount_if_shared(&store, &image.reference, &dir, &mopts)?,
    };
    if let Some(m) = shared {
        // Nothing of this process serves it: leave it mounted.
        let path = m.path().to_path_buf();
        if m.detach().is_err() {
            bail!("mounting {}: expected a shared mount", dir.display());
        }
        drop(hold);
        apply_budget(&store, budget, &[], quiet)?;
        if pull.timings && !quiet {
            eprintln!("{:>8.3} s  mounted", since_start());
        }
        if !quiet {
            eprintln!(
                "{} mounted at {} (shared image server; `bux-fuse umount {}` to unmount)",
                image.reference,
                path.display(),
                path.display()
            );
            if let Some(note) = writable_note(&mopts, &dir) {
                eprintln!("{note}");
            }
        }
        if wait_complete {
            // (An image fetched lazily: its server completes it, asked to by this mount.)
            wait_complete_layers(&store, &image.record, &path)?;
        }
        return Ok(());
    }
    if foreground || notify_ready {
        drop(hold);
        apply_budget(
            &store,
            budget,
            std::slice::from_ref(&image.reference),
            quiet,
        )?;
        serve(&store, &image.reference, &dir, &mopts, notify_ready)
    } else {
        spawn_daemon(&store, &image.reference, &dir, &mopts, &pull, lazy)?;
        if pull.timings && !quiet {
            eprintln!("{:>8.3} s  mounted", since_start());
        }
        drop(hold);
        apply_budget(&store, budget, &[], quiet)?;
        if wait_complete {
            wait_complete_layers(&store, &image.record, &dir)?;
        }
        Ok(())
    }
}
