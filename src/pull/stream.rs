//! The bytes of a download on their way to its indexer: a channel from the async download to
//! the blocking thread that indexes it, bounded by the bytes in flight, and a tee into the
//! blob's temp file.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::Arc;

/// Compressed bytes in flight between a download and its indexer (the download waits while
/// the indexer is this far behind).
const CHANNEL_BYTES: usize = 4 << 20;

/// Feeds downloaded chunks to the blocking indexer as a `Read`.
pub(crate) struct ChannelReader {
    rx: Chunks,
    cur: bytes::Bytes,
    /// What `cur` holds of the byte budget of a [`chunk_channel`], given back once it is read.
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum Chunks {
    Std(mpsc::Receiver<io::Result<bytes::Bytes>>),
    Bounded(tokio::sync::mpsc::Receiver<Chunk>),
}

/// A chunk of a download, with its share of the channel's byte budget.
type Chunk = (
    io::Result<bytes::Bytes>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

impl ChannelReader {
    /// Reads what is sent on `rx` until its sender is dropped.
    pub(crate) fn new(rx: mpsc::Receiver<io::Result<bytes::Bytes>>) -> ChannelReader {
        ChannelReader {
            rx: Chunks::Std(rx),
            cur: bytes::Bytes::new(),
            _held: None,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            self._held = None; // the chunk read: its bytes may be sent again
            let next = match &mut self.rx {
                Chunks::Std(rx) => rx.recv().ok().map(|c| (c, None)),
                Chunks::Bounded(rx) => rx.blocking_recv(),
            };
            match next {
                Some((Ok(b), held)) => (self.cur, self._held) = (b, held),
                Some((Err(e), _)) => return Err(e),
                None => return Ok(0), // sender finished: end of blob
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// The sending half of a [`chunk_channel`]: an async send that waits (without blocking the
/// executor) while the reader holds [`CHANNEL_BYTES`] not read yet.
pub(crate) struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    budget: Arc<tokio::sync::Semaphore>,
}

impl ChunkSender {
    /// Sends a chunk once the budget has room for it (a chunk larger than the whole budget
    /// waits for all of it); `Err` when the reader is gone.
    pub(crate) async fn send(
        &self,
        chunk: io::Result<bytes::Bytes>,
    ) -> std::result::Result<(), ()> {
        let want = match &chunk {
            Ok(b) => b.len().clamp(1, CHANNEL_BYTES) as u32,
            Err(_) => 0,
        };
        let held = match want {
            0 => None,
            n => Some(
                self.budget
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| ())?,
            ),
        };
        self.tx.send((chunk, held)).await.map_err(|_| ())
    }
}

/// A channel from a download (async) to its indexer (a blocking thread), bounded by the bytes
/// in flight ([`CHANNEL_BYTES`]) rather than the chunks, whose size is the HTTP stack's to
/// choose.
pub(crate) fn chunk_channel() -> (ChunkSender, ChannelReader) {
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_BYTES / 1024);
    let budget = Arc::new(tokio::sync::Semaphore::new(CHANNEL_BYTES));
    let reader = ChannelReader {
        rx: Chunks::Bounded(rx),
        cur: bytes::Bytes::new(),
        _held: None,
    };
    (ChunkSender { tx, budget }, reader)
}

/// Copies what is read into a writer (the blob's temp file).
pub(super) struct Tee<'a, R, W> {
    pub(super) inner: R,
    pub(super) out: &'a mut W,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}
