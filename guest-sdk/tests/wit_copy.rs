//! The crate carries its own copy of the WIT (`guest-sdk/wit/`) so that it can be packaged; the
//! repository's `wit/` is the source of truth. Every `.wit` file directly in `wit/` must be in
//! `guest-sdk/wit/` byte for byte, and the copy must hold nothing else, so the SDK never builds
//! against a contract the engine does not have. After changing `wit/`:
//!
//! ```sh
//! rm guest-sdk/wit/*.wit && cp wit/*.wit guest-sdk/wit/
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `.wit` files directly in `dir`, by name, with their bytes.
fn wit_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "wit"))
        .map(|path| {
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let bytes = std::fs::read(&path).expect("read .wit file");
            (name, bytes)
        })
        .collect()
}

#[test]
fn the_sdk_wit_is_a_copy_of_the_repository_wit() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let source = crate_dir.join("../wit");
    let copy = crate_dir.join("wit");
    let fix = "run: rm guest-sdk/wit/*.wit && cp wit/*.wit guest-sdk/wit/";

    let source_files = wit_files(&source);
    let copy_files = wit_files(&copy);
    assert!(
        source_files.contains_key("jobhook.wit"),
        "{} has no jobhook.wit",
        source.display()
    );
    let names = |files: &BTreeMap<String, Vec<u8>>| files.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&copy_files),
        names(&source_files),
        "guest-sdk/wit/ holds other .wit files than wit/; {fix}"
    );
    for (name, bytes) in &source_files {
        assert!(
            copy_files.get(name) == Some(bytes),
            "guest-sdk/wit/{name} differs from wit/{name}; {fix}"
        );
    }
}
