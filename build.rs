//! The `cuda` build links llama.cpp as shared libraries (dynamic backends,
//! docs/gpu.md); the binary looks for them beside itself, where the archive
//! of `make cuda` puts them.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    }
}
