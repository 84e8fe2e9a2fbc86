//! Kept threads for the other half of a read split in two (see
//! [`super::reader::LayerReader`]'s cold split): starting a thread for each such read cost
//! 85–100 µs on this project's test machines (guests of a software hypervisor), a tenth of
//! the read it was meant to shorten.

use std::io;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

/// A job for a kept thread: the closure, and where to say it is over.
struct Job {
    run: Box<dyn FnOnce() -> io::Result<()> + Send + 'static>,
    done: SyncSender<io::Result<()>>,
}

/// Threads waiting for jobs: a send succeeds only while one of them waits (a rendezvous
/// channel), so a job never queues behind another. Started at the process's first split read,
/// from the thread making it, whose seccomp filter and Landlock domain they inherit, as the
/// threads started for each read did: a process that confines itself must do so before it
/// reads (the image servers do, before they make their `ImageFs`).
fn threads() -> &'static SyncSender<Job> {
    static THREADS: OnceLock<SyncSender<Job>> = OnceLock::new();
    THREADS.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(0);
        let rx = Arc::new(Mutex::new(rx));
        let n = crate::cpus();
        for i in 0..n {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                // (15 bytes at most: the kernel cuts a thread's name there.)
                .name(format!("bux-fuse-join-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else { return };
                    let r = caught(job.run);
                    // (The closure, and its borrows with it, are gone by now.)
                    let _ = job.done.send(r);
                });
        }
        tx
    })
}

/// Runs `run`, a panic in it an error.
fn caught(run: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(io::Error::other("a read's thread panicked")))
}

/// Runs `other` on a kept thread while `this` runs here, and returns both results (the
/// first error); where no kept thread is free, `other` runs here after `this` (and, should
/// `this` panic, not at all: it is dropped as the panic unwinds).
pub(crate) fn join<'a>(
    other: impl FnOnce() -> io::Result<()> + Send + 'a,
    this: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let (done, over) = sync_channel(1);
    let run: Box<dyn FnOnce() -> io::Result<()> + Send + 'a> = Box::new(other);
    // SAFETY: the closure borrows for 'a; it is erased to 'static only to cross to a kept
    // thread, and this function does not return (nor unwind: see `Wait`) before that thread
    // has said it is over, which it does only after the closure has run and been dropped.
    let run: Box<dyn FnOnce() -> io::Result<()> + Send + 'static> =
        unsafe { std::mem::transmute(run) };
    let sent = threads().try_send(Job { run, done });
    match sent {
        Ok(()) => {
            /// Waits for the kept thread's job even when `this` panics.
            struct Wait(Option<Receiver<io::Result<()>>>);
            impl Drop for Wait {
                fn drop(&mut self) {
                    if let Some(over) = self.0.take() {
                        let _ = over.recv();
                    }
                }
            }
            let mut wait = Wait(Some(over));
            let first = this();
            let over = wait.0.take().expect("taken once");
            let second = over
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("a read's thread is gone")));
            first.and(second)
        }
        Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
            let first = this();
            first.and(caught(job.run))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Both halves run, on two threads when one is free, writing into borrowed buffers; the
    /// first error is returned; with every kept thread busy the other half runs here.
    #[test]
    fn both_halves_run_and_their_errors_come_back() {
        let mut buf = vec![0u8; 1000];
        let (a, b) = buf.split_at_mut(500);
        let here = std::thread::current().id();
        let elsewhere = AtomicUsize::new(0);
        join(
            || {
                a.fill(1);
                if std::thread::current().id() != here {
                    elsewhere.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            },
            || {
                b.fill(2);
                Ok(())
            },
        )
        .unwrap();
        assert!(buf[..500].iter().all(|&x| x == 1) && buf[500..].iter().all(|&x| x == 2));
        let err = join(|| Err(io::Error::other("other")), || Ok(())).unwrap_err();
        assert_eq!(err.to_string(), "other");
        let err = join(|| Ok(()), || Err(io::Error::other("this"))).unwrap_err();
        assert_eq!(err.to_string(), "this");
        // Many at once from many threads: every half runs exactly once.
        let count = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    for _ in 0..50 {
                        join(
                            || {
                                count.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            },
                            || {
                                count.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            },
                        )
                        .unwrap();
                    }
                });
            }
        });
        assert_eq!(count.load(Ordering::Relaxed), 16 * 50 * 2);
        // Kept threads were used at all (a free one waits once the pool has started).
        let mut used = false;
        for _ in 0..100 {
            join(
                || {
                    if std::thread::current().id() != here {
                        elsewhere.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                },
                || {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    Ok(())
                },
            )
            .unwrap();
            used = elsewhere.load(Ordering::Relaxed) > 0;
            if used {
                break;
            }
        }
        assert!(used, "no half ran on a kept thread");
    }

    /// A panic in the other half is an error here (on a kept thread or not), and the kept
    /// threads live on.
    #[test]
    fn a_panicking_half_is_an_error() {
        for _ in 0..20 {
            let e = join(|| panic!("boom"), || Ok(())).unwrap_err();
            assert!(e.to_string().contains("panicked"), "{e}");
        }
        join(|| Ok(()), || Ok(())).unwrap();
    }
}
