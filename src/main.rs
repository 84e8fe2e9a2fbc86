//! `bux-fuse`: see `bux-fuse --help`. All logic lives in the library; this only runs the CLI.

fn main() {
    // The image servers root's mounts share are this executable, started again: serve if so.
    bux_fuse::serve_if_requested();
    std::process::exit(bux_fuse::cli::main());
}
