//! Memory for decompressed spans, touched before a read needs it. A cold random read
//! decompresses a span into memory the process has never used; on this project's test machines
//! (guests of a software hypervisor) each fresh page costs 2.5–4.5 µs to fault in, about 72 of
//! them for a 256 KiB span and its 32 KiB window: a tenth of the read. Memory freed by the
//! span cache's evictions is used again without faults (the image servers keep freed memory:
//! [`crate::mount::tune_allocator_for_serving`]), but until the cache is full every span is
//! fresh memory. So a kept thread keeps a few span-sized buffers with their pages faulted in
//! already, on a core the read is not using, and a read takes one instead of allocating.

use std::sync::{Condvar, Mutex, OnceLock};

/// What one buffer holds: a 256 KiB span (the checkpoints' spacing) after its 32 KiB window
/// (libdeflate's output starts with the window). Larger requests allocate.
pub(crate) const BUFFER: usize = super::gzip::WINDOW + (256 << 10);

/// Buffers kept ready: a cold read takes one or two (a read split across a checkpoint), and
/// the thread faults in one in about a quarter of a read's time, so a few outlast any burst of
/// reads that have to wait for their bytes anyway. Their cost: 2.3 MiB of a serving process.
const SPARE: usize = 8;

struct Spare {
    buffers: Mutex<Vec<Vec<u8>>>,
    /// Signalled when a buffer is taken.
    taken: Condvar,
}

/// An empty vector with room for `capacity` bytes: a prepared one when `capacity` is close to
/// [`BUFFER`] (a span and its window, or a span alone) and one is ready, else newly allocated.
/// Not for much less: the span cache counts what a span holds, not its vector's capacity, so a
/// small zstd:chunked frame in a prepared buffer would hold memory the cache does not see (at
/// most a quarter of a buffer here, an eighth for a 256 KiB span). The first call starts the
/// thread that prepares them, from the reading thread, whose seccomp filter and Landlock
/// domain it inherits (as [`super::beside`]'s threads do).
pub(crate) fn take(capacity: usize) -> Vec<u8> {
    if !(BUFFER - BUFFER / 4..=BUFFER).contains(&capacity) {
        return Vec::with_capacity(capacity);
    }
    let Some(spare) = spare() else {
        return Vec::with_capacity(capacity);
    };
    let taken = spare
        .buffers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop();
    spare.taken.notify_one();
    taken.unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// The kept buffers, their thread started at the first call (`None` if it could not be).
fn spare() -> Option<&'static Spare> {
    static SPARE_BUFFERS: OnceLock<Option<&'static Spare>> = OnceLock::new();
    *SPARE_BUFFERS.get_or_init(|| {
        let spare: &'static Spare = Box::leak(Box::new(Spare {
            buffers: Mutex::new(Vec::with_capacity(SPARE)),
            taken: Condvar::new(),
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
        {
            let mut buffers = spare.buffers.lock().unwrap_or_else(|p| p.into_inner());
            while buffers.len() >= SPARE {
                buffers = spare.taken.wait(buffers).unwrap_or_else(|p| p.into_inner());
            }
        }
        let buffer = faulted_in(BUFFER);
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

    #[test]
    fn buffers_are_empty_and_large_enough_and_refilled() {
        let mut seen = Vec::new();
        // More than the spare ones: the thread prepares more as they are taken, and a request
        // it cannot meet at once still gets a vector.
        for round in 0..4 * SPARE {
            for capacity in [1, 4096, 256 << 10, BUFFER - 1, BUFFER] {
                let mut v = take(capacity);
                assert!(v.is_empty() && v.capacity() >= capacity, "round {round}");
                // A small request never holds a whole buffer the cache would not count.
                assert!(
                    capacity > BUFFER / 2 || v.capacity() < BUFFER / 2,
                    "{capacity}"
                );
                v.extend(std::iter::repeat_n(round as u8, capacity));
                assert!(v.iter().all(|&b| b == round as u8));
                seen.push(v);
            }
        }
        let big = take(BUFFER + 1);
        assert!(big.is_empty() && big.capacity() > BUFFER);
        // The thread keeps up: after a pause the spare buffers are back.
        let spare = spare().expect("the thread started");
        for _ in 0..500 {
            if spare.buffers.lock().unwrap().len() == SPARE {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the spare buffers were not prepared again within 5 s");
    }
}
