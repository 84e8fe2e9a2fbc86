//! `bux-fuse`: see `bux-fuse --help`. All logic lives in the library; this only runs the CLI.

fn main() {
    std::process::exit(bux_fuse::cli::main());
}
