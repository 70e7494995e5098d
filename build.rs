// The CUDA build compiles the fused kernels (src/model/cuda/kernels.cu, which includes the `.cu`
// files beside each op in src/model/ops/) to PTX with nvcc, and finds
// the CUDA libraries of the machine it runs on in /usr/local/cuda/lib64 without any settings
// (the GPU machines have them there).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,/usr/local/cuda/lib64");
    // Directories: any file under them.
    println!("cargo:rerun-if-changed=src/model/cuda");
    println!("cargo:rerun-if-changed=src/model/ops");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) => PathBuf::from(home).join("bin/nvcc"),
        None => PathBuf::from("nvcc"),
    };
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into()).replace('.', "");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "src/model/cuda/kernels.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {} ({e}): the cuda feature needs the CUDA toolkit's nvcc", nvcc.display())
        });
    assert!(status.success(), "nvcc failed on src/model/cuda/kernels.cu");
}
