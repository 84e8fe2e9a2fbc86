//! The project's slow link: a TCP proxy from 127.0.0.1 to 127.0.0.1 that behaves like a distant
//! network link (this kernel has no netem), for tests and the lazy-start benchmark.
//!
//! * Every chunk waits half the round trip in each direction, order kept; a new connection
//!   costs one round trip before it reaches the target.
//! * What goes to clients (the download direction) shares one bandwidth cap across all
//!   connections, as one link would: chunks are paced on one clock, each after the last.
//! * It counts the bytes sent to clients ([`SlowLink::bytes_sent`]).
//! * [`SlowLink::cut`] cuts every open connection.
//! * [`SlowLink::pause`] stalls the link, both ways and for new connections, with every
//!   connection kept open (a registry that stops answering); [`SlowLink::unpause`] resumes it.
//! * Dropping it stops it: the listener closes and every connection is cut.
//!
//! Only loopback: it listens on 127.0.0.1 and connects to 127.0.0.1, never anywhere else.
//! Used by the integration tests (`common::Proxy`) and, as `bench/slow_link.rs`, by
//! `bench/lazy.py`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes read at a time: what one chunk on the link is at most.
const CHUNK: usize = 64 << 10;
/// Chunks read ahead of the link per direction (read-ahead is bounded: the sender waits).
const QUEUE: usize = 32;
/// Sleeps are cut in slices this long, so that a stop is noticed.
const SLICE: Duration = Duration::from_millis(50);

pub struct SlowLink {
    port: u16,
    link: Arc<Link>,
    accept: Option<JoinHandle<()>>,
}

struct Link {
    target: u16,
    /// Bytes per second to clients; 0 = no cap.
    rate: f64,
    /// One way.
    half: Duration,
    sent: AtomicU64,
    paused: Mutex<bool>,
    resumed: Condvar,
    stop: AtomicBool,
    /// When the shared download direction is next idle.
    free_at: Mutex<Instant>,
    /// Both sockets of every open connection, to cut them on stop.
    conns: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_id: AtomicU64,
}

impl SlowLink {
    /// A link to 127.0.0.1:`target` at `mbit` Mbit/s (0: no cap) with `rtt_ms` round trips,
    /// listening on a free port of 127.0.0.1.
    pub fn start(target: u16, mbit: f64, rtt_ms: f64) -> std::io::Result<SlowLink> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let link = Arc::new(Link {
            target,
            rate: mbit.max(0.0) * 1e6 / 8.0,
            half: Duration::from_secs_f64(rtt_ms.max(0.0) / 2000.0),
            sent: AtomicU64::new(0),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            stop: AtomicBool::new(false),
            free_at: Mutex::new(Instant::now()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let l = link.clone();
        let accept = std::thread::Builder::new()
            .name("slow-link-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if l.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let l = l.clone();
                    let _ = std::thread::Builder::new()
                        .name("slow-link-conn".into())
                        .spawn(move || l.serve(client));
                }
            })?;
        Ok(SlowLink {
            port,
            link,
            accept: Some(accept),
        })
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes sent to clients so far: counted as they are handed to the client's socket, so all
    /// that a client has received is in it (a chunk cut off by a broken connection too).
    pub fn bytes_sent(&self) -> u64 {
        self.link.sent.load(Ordering::SeqCst)
    }

    /// Stalls the link: nothing more is passed on, either way, and new connections wait; every
    /// connection stays open.
    pub fn pause(&self) {
        *self.link.paused.lock().unwrap() = true;
    }

    /// Resumes a paused link.
    pub fn unpause(&self) {
        *self.link.paused.lock().unwrap() = false;
        self.link.resumed.notify_all();
    }

    /// Cuts every open connection; new ones are still accepted. A registry killed mid-transfer
    /// does not cut its own: what its socket and this link's buffers hold (megabytes on
    /// loopback) still arrives.
    pub fn cut(&self) {
        for [a, b] in self.link.conns.lock().unwrap().values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.link.stop.store(true, Ordering::SeqCst);
        self.link.resumed.notify_all();
        for [a, b] in self.link.conns.lock().unwrap().values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        // Wakes the accept loop, which then sees the stop.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// What the reading half of a direction hands its writing half.
enum Chunk {
    Data(Instant, Vec<u8>),
    Eof(Instant),
    Failed,
}

impl Link {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits while the link is paused; false once it is stopped.
    fn wait_running(&self) -> bool {
        let mut paused = self.paused.lock().unwrap();
        while *paused && !self.stopped() {
            paused = self.resumed.wait_timeout(paused, SLICE).unwrap().0;
        }
        !self.stopped()
    }

    /// Sleeps until `due`; false once the link is stopped.
    fn sleep_until(&self, due: Instant) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                return true;
            }
            std::thread::sleep((due - now).min(SLICE));
        }
    }

    /// One client connection: one round trip, then both directions until they end.
    fn serve(self: Arc<Link>, client: TcpStream) {
        if !self.sleep_until(Instant::now() + 2 * self.half) || !self.wait_running() {
            return;
        }
        let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.target)) else {
            return; // the client sees its connection closed
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.conns.lock().unwrap().insert(id, [c2, s2]);
        if self.stopped() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
        let up = match (client.try_clone(), server.try_clone()) {
            (Ok(c), Ok(s)) => {
                let l = self.clone();
                std::thread::Builder::new()
                    .name("slow-link-up".into())
                    .spawn(move || l.pump(c, s, false))
                    .ok()
            }
            _ => None,
        };
        if up.is_some() {
            self.pump(server, client, true);
        }
        if let Some(up) = up {
            let _ = up.join();
        }
        self.conns.lock().unwrap().remove(&id);
    }

    /// Passes what `from` sends on to `to`, late by half the round trip, paced on the shared
    /// clock when `down` (to the client).
    fn pump(&self, from: TcpStream, mut to: TcpStream, down: bool) {
        let (tx, rx) = sync_channel(QUEUE);
        let reader = match from.try_clone() {
            Ok(f) => {
                let half = self.half;
                std::thread::Builder::new()
                    .name("slow-link-read".into())
                    .spawn(move || read_side(f, tx, half))
                    .ok()
            }
            Err(_) => None,
        };
        let cut = |from: &TcpStream, to: &TcpStream| {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        };
        if reader.is_none() {
            cut(&from, &to);
            return;
        }
        self.write_side(&rx, &from, &mut to, down, cut);
        drop(rx); // a reader still waiting to hand over a chunk gives up
        if let Some(r) = reader {
            let _ = r.join();
        }
    }

    fn write_side(
        &self,
        rx: &Receiver<Chunk>,
        from: &TcpStream,
        to: &mut TcpStream,
        down: bool,
        cut: impl Fn(&TcpStream, &TcpStream),
    ) {
        loop {
            let chunk = loop {
                match rx.recv_timeout(SLICE) {
                    Ok(c) => break c,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !self.stopped() => {}
                    Err(_) => return cut(from, to),
                }
            };
            let (due, data) = match chunk {
                Chunk::Data(due, data) => (due, data),
                Chunk::Eof(due) => {
                    if self.sleep_until(due) && self.wait_running() {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    return cut(from, to);
                }
                Chunk::Failed => return cut(from, to),
            };
            if !self.wait_running() {
                return cut(from, to);
            }
            let mut due = due;
            if down && self.rate > 0.0 {
                let mut free_at = self.free_at.lock().unwrap();
                let start = due.max(*free_at).max(Instant::now());
                *free_at = start + Duration::from_secs_f64(data.len() as f64 / self.rate);
                due = *free_at;
            }
            // Paused on the way: the chunk waits for the link to run again.
            if !self.sleep_until(due) || !self.wait_running() {
                return cut(from, to);
            }
            // Counted as it is handed over: whatever a client has received is counted by then.
            if down {
                self.sent.fetch_add(data.len() as u64, Ordering::SeqCst);
            }
            if to.write_all(&data).is_err() {
                return cut(from, to);
            }
        }
    }
}

/// Reads chunks from `from` and stamps each with when it is due at the other end.
fn read_side(mut from: TcpStream, tx: SyncSender<Chunk>, half: Duration) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let chunk = match from.read(&mut buf) {
            Ok(0) => Chunk::Eof(Instant::now() + half),
            Ok(n) => Chunk::Data(Instant::now() + half, buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => Chunk::Failed,
        };
        let last = !matches!(chunk, Chunk::Data(..));
        if tx.send(chunk).is_err() || last {
            return;
        }
    }
}
