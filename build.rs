// The CUDA build finds the CUDA libraries of the machine it runs on in /usr/local/cuda/lib64
// without any settings (the GPU machines have them there).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,/usr/local/cuda/lib64");
    }
}
