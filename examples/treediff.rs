//! The project's tree comparison on the command line (the one the integration tests use, see
//! `tests/common/treediff.rs`), for `scripts/debian-e2e.sh`:
//!
//! ```text
//! cargo run --release --locked --example treediff -- [options] A B
//! ```
//!
//! Prints one line per difference and, last, `N differences`; exits 0 when the trees are equal,
//! 1 when they are not, 2 on a usage error.

#[path = "../tests/common/treediff.rs"]
mod treediff;

use std::ffi::OsString;
use std::path::PathBuf;

fn main() {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: treediff [options] A B   (options: see tests/common/treediff.rs)");
        std::process::exit(2);
    }
    let b = PathBuf::from(args.pop().unwrap());
    let a = PathBuf::from(args.pop().unwrap());
    let opts = treediff::Options::parse(&args).unwrap_or_else(|e| {
        eprintln!("treediff: {e}");
        std::process::exit(2);
    });
    for d in [&a, &b] {
        if !d.is_dir() {
            eprintln!("treediff: {}: not a directory", d.display());
            std::process::exit(2);
        }
    }
    let diff = treediff::compare(&a, &b, &opts);
    print!("{}", diff.report);
    std::process::exit(if diff.equal() { 0 } else { 1 });
}
