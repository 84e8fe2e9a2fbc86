//! Memory for decompressed spans, touched before a read needs it. A cold random read
//! decompresses a span into memory the process has never used; on this project's test machines
//! (guests of a software hypervisor) each fresh page costs 2.5–4.5 µs to fault in, about 72 of
//! them for a 256 KiB span and its 32 KiB window: a tenth of the read. Memory freed by the
//! span cache's evictions is used again without faults (the image servers keep freed memory:
//! [`crate::mount::tune_allocator_for_serving`]), but until the cache is full every span is
//! fresh memory. So a kept thread keeps a few span-sized buffers with their pages faulted in
//! already, on a core the read is not using, and a read takes one instead of allocating.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, OnceLock};

use super::gzip::WINDOW;

/// The requests prepared buffers are for: spans with or without their window (libdeflate's
/// output starts with it), from a quarter of a span at the checkpoints' spacing (a layer's
/// last span) to a 1 MiB span (gzip streams whose deflate blocks run past the spacing, lazily
/// served layers' 512 KiB spacing). Other requests allocate.
const SMALLEST: usize = 64 << 10;
const LARGEST: usize = WINDOW + (1 << 20);

/// Buffers kept ready: a cold read takes one or two (a read split across a checkpoint), and
/// the thread faults in one in about a quarter of a read's time, so a few outlast any burst of
/// reads that have to wait for their bytes anyway. Their cost: 2.5 MiB of a serving process
/// reading the test images' 256 KiB spans, 8.5 MiB at the largest.
const SPARE: usize = 8;

struct Spare {
    buffers: Mutex<Vec<Vec<u8>>>,
    /// Signalled when a buffer is taken.
    taken: Condvar,
    /// The size buffers are prepared at: the largest request of late (it follows a larger one
    /// at once and decays by 1/256 a hit towards smaller ones), so that both a span with its
    /// window and a span alone, asked for in turns, fit the buffers made for the larger; a
    /// request that finds none of its size sets it.
    size: AtomicUsize,
}

/// An empty vector with room for `capacity` bytes: a prepared one if one is ready whose size
/// is at least `capacity` and at most twice it, cut down to `capacity` (what is cut goes back
/// to the allocator, its pages still in memory, for the buffers prepared next), else newly
/// allocated. Cut, because the span cache counts what a span holds, not its vector's
/// capacity. The first call starts the thread that prepares them, from the reading thread,
/// whose seccomp filter and Landlock domain it inherits (as [`super::beside`]'s threads do).
pub(crate) fn take(capacity: usize) -> Vec<u8> {
    if !(SMALLEST..=LARGEST).contains(&capacity) {
        return Vec::with_capacity(capacity);
    }
    let Some(spare) = spare() else {
        return Vec::with_capacity(capacity);
    };
    // What was taken, and whether buffers were ready but none of them fitted.
    let (taken, unfit) = {
        let mut buffers = spare.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let fits = |v: &Vec<u8>| (capacity..=2 * capacity).contains(&v.capacity());
        match buffers.iter().rposition(fits) {
            Some(at) => (Some(buffers.swap_remove(at)), false),
            None => {
                // None of a size asked for now: the oldest goes, to be made again at it.
                if buffers.len() == SPARE {
                    buffers.remove(0);
                }
                (None, !buffers.is_empty())
            }
        }
    };
    // Buffers of the wrong size make the next ones of this request's (one large span must not
    // leave smaller requests missing for hundreds more); otherwise the largest of late.
    let _ = spare
        .size
        .fetch_update(Relaxed, Relaxed, |size| match unfit {
            true => Some(capacity),
            false => Some(capacity.max(size - size / 256)),
        });
    spare.taken.notify_one();
    match taken {
        Some(mut v) => {
            v.shrink_to(capacity);
            v
        }
        None => Vec::with_capacity(capacity),
    }
}

/// The kept buffers, their thread started at the first call (`None` if it could not be).
fn spare() -> Option<&'static Spare> {
    static SPARE_BUFFERS: OnceLock<Option<&'static Spare>> = OnceLock::new();
    *SPARE_BUFFERS.get_or_init(|| {
        let spare: &'static Spare = Box::leak(Box::new(Spare {
            buffers: Mutex::new(Vec::with_capacity(SPARE)),
            taken: Condvar::new(),
            size: AtomicUsize::new(WINDOW + (256 << 10)),
        }));
        std::thread::Builder::new()
            .name("bux-fuse-memory".into())
            .spawn(move || prepare(spare))
            .ok()
            .map(|_| spare)
    })
}

/// Keeps [`SPARE`] buffers ready, for the life of the process.
fn prepare(spare: &Spare) {
    loop {
        // Rounded up, so that requests a little below the largest still fit in what is made.
        let size = || spare.size.load(Relaxed).next_multiple_of(64 << 10);
        {
            let mut buffers = spare.buffers.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                // Those made for sizes no longer asked for go (their memory to the allocator).
                let now = size();
                buffers.retain(|v| (now / 2..=2 * now).contains(&v.capacity()));
                if buffers.len() < SPARE {
                    break;
                }
                buffers = spare.taken.wait(buffers).unwrap_or_else(|p| p.into_inner());
            }
        }
        let buffer = faulted_in(size());
        spare
            .buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buffer);
    }
}

/// An empty vector of `capacity` bytes whose pages are all in memory: one byte written in each
/// (what it holds is never read: a taker writes before it reads, as into a new vector).
fn faulted_in(capacity: usize) -> Vec<u8> {
    let mut v = Vec::<u8>::with_capacity(capacity);
    let base = v.as_mut_ptr();
    for at in (0..capacity).step_by(4096) {
        // SAFETY: `at` is within the allocation's `capacity` bytes; volatile, so that the write
        // is not dropped as dead (the vector stays empty).
        unsafe { base.add(at).write_volatile(0) };
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asks for `ask` bytes until the thread has `SPARE` buffers ready that `ok` accepts.
    fn prepared(ask: usize, ok: impl Fn(&Vec<u8>) -> bool) -> bool {
        let spare = spare().expect("the thread started");
        for _ in 0..500 {
            {
                let buffers = spare.buffers.lock().unwrap();
                if buffers.len() == SPARE && buffers.iter().all(&ok) {
                    return true;
                }
            }
            // (Asking again makes the thread replace what no longer fits.)
            drop(take(ask));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn buffers_hold_what_is_asked_and_follow_the_sizes_asked() {
        let span = WINDOW + (256 << 10);
        let mut seen = Vec::new();
        // More than the spare ones: the thread prepares more as they are taken, and a request
        // it cannot meet at once still gets a vector.
        for round in 0..4 * SPARE {
            for capacity in [1, 4096, SMALLEST - 1, 256 << 10, span, LARGEST, LARGEST + 1] {
                let mut v = take(capacity);
                // Exactly what was asked: the span cache counts a span's length, and a buffer
                // larger than that would hold memory it does not see.
                assert!(v.is_empty() && v.capacity() == capacity, "round {round}");
                v.extend(std::iter::repeat_n(round as u8, capacity));
                assert!(v.iter().all(|&b| b == round as u8));
                seen.push(v);
            }
        }
        drop(seen);
        // Asked for larger spans, the thread makes buffers of their size; asked for smaller
        // ones again, of theirs (one large span does not leave them missing).
        let large = WINDOW + (400 << 10);
        assert!(
            prepared(large, |v| v.capacity() >= large),
            "no buffers of the larger size within 5 s"
        );
        assert!(
            prepared(SMALLEST, |v| v.capacity() <= 2 * SMALLEST),
            "no buffers of the smaller size within 5 s"
        );
    }
}
