//! Records the optimisation level the benchmarks were built with, so that every report says
//! whether its figures come from an optimised build.

fn main() {
    let opt = std::env::var("OPT_LEVEL").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=JOBHOOK_BENCH_OPT_LEVEL={opt}");
    println!("cargo:rerun-if-changed=build.rs");
}
