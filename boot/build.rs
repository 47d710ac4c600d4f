fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bin=ally=-T{dir}/linker.ld");
    println!("cargo:rustc-link-arg-bin=ally=-znoexecstack");
    println!("cargo:rerun-if-changed=linker.ld");
}
