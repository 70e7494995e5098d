fn main() {
    if let Err(e) = loralab::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
