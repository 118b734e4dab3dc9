//! Bakes libtorch's directory into the rpath of this crate's test binaries, so that
//! `cargo test` runs without LD_LIBRARY_PATH (scripts/setup exports LIBTORCH).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
