//! `vpsbackup`: the one binary. Thin: parses the command line and calls the crates.

fn main() {
    eprintln!("vpsbackup: commands are being written (issues 2 and 3)");
    std::process::exit(2);
}
