//! The project's slow link on the command line (the one the integration tests use, see
//! `tests/common/slow_link.rs`), for `bench/lazy.py`:
//!
//! ```text
//! slow_link TARGET_PORT [MBIT=200] [RTT_MS=10]
//! ```
//!
//! Forwards a free port of 127.0.0.1 to 127.0.0.1:TARGET_PORT and prints that port as its first
//! line. Then it answers commands on stdin, one a line: `bytes` (prints the bytes sent to
//! clients so far), `pause`, `unpause` (print `ok`). It stops when stdin closes.

#[path = "../tests/common/slow_link.rs"]
mod slow_link;

use std::io::{BufRead, Write};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: f64| -> f64 {
        args.get(i).map_or(default, |a| {
            a.parse()
                .unwrap_or_else(|_| usage(&format!("not a number: {a}")))
        })
    };
    let target: u16 = match args.first().map(|a| a.parse()) {
        Some(Ok(p)) if args.len() <= 3 => p,
        _ => usage("TARGET_PORT is needed"),
    };
    let link = slow_link::SlowLink::start(target, num(1, 200.0), num(2, 10.0))
        .unwrap_or_else(|e| usage(&format!("cannot listen: {e}")));
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", link.port()).unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "bytes" => writeln!(out, "{}", link.bytes_sent()),
            "pause" => {
                link.pause();
                writeln!(out, "ok")
            }
            "unpause" => {
                link.unpause();
                writeln!(out, "ok")
            }
            other => writeln!(out, "unknown command {other:?}"),
        }
        .and_then(|_| out.flush())
        .unwrap_or_else(|_| std::process::exit(0));
    }
}

fn usage(why: &str) -> ! {
    eprintln!("slow_link: {why}\nusage: slow_link TARGET_PORT [MBIT=200] [RTT_MS=10]");
    std::process::exit(2);
}
