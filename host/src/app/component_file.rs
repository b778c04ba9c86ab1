//! Reading a handler's component file for `jobhook run`, `inspect`, `check` and `serve`, with
//! the fix for the most common first mistake: a Rust handler crate without
//! `crate-type = ["cdylib"]`, for which cargo writes an `.rlib` and no `.wasm` at all.

use std::path::Path;

use anyhow::{Context as _, bail};

/// What to do when cargo wrote no component: the fix named by every message about it. It ends
/// with [`crate::runtime::loader::BUILD_COMMAND`], written out so that it stays a constant.
pub const CDYLIB_FIX: &str = "cargo writes a .wasm for a library crate only with `[lib] crate-type = [\"cdylib\"]` in its Cargo.toml (add \"rlib\" too to keep native unit tests), then rebuild with `cargo build --release --target wasm32-wasip2`";

/// Reads the component at `path`, refusing a file over `max` bytes (by its size before reading
/// it, and by what it yields while reading, should it grow in between) and anything that is not
/// a regular file: a FIFO would block the read until something writes to it, a device never
/// ends. `setting` is where the operator sets `max`, named when the file is too big.
pub fn read_component(path: &Path, max: usize, setting: Option<&str>) -> anyhow::Result<Vec<u8>> {
    use crate::files::ReadError;
    let cannot_read = || format!("cannot read {}", path.display());
    let too_big = |size: String| {
        let fix = setting
            .map(|s| format!(" (raise {s} or build a smaller component)"))
            .unwrap_or_default();
        anyhow::anyhow!(
            "{} is {size} bytes; the component size limit is {max} bytes{fix}",
            path.display()
        )
    };
    if let Ok(meta) = std::fs::metadata(path)
        && meta.is_file()
        && meta.len() > max as u64
    {
        return Err(too_big(meta.len().to_string()));
    }
    match crate::files::read_regular(path, max as u64) {
        Ok(bytes) => Ok(bytes),
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(hint) = missing_build_output_hint(path) {
                bail!("cannot read {}: no such file; {hint}", path.display());
            }
            Err(e).with_context(cannot_read)
        }
        Err(ReadError::Io(e)) => Err(e).with_context(cannot_read),
        Err(ReadError::TooLarge(_)) => Err(too_big(format!("more than {max}"))),
        Err(not_regular @ ReadError::NotRegular(_)) => Err(anyhow::anyhow!(
            "cannot read {}: {not_regular} (a component, built as a .wasm file)",
            path.display()
        )),
    }
}

/// For a missing `.wasm` where cargo puts its `wasm32-wasip2` output: why it is likely missing
/// and what to change (`None` for any other path).
pub fn missing_build_output_hint(path: &Path) -> Option<String> {
    let in_cargo_output = path.components().any(|c| c.as_os_str() == "wasm32-wasip2");
    if !in_cargo_output || path.extension().is_none_or(|e| e != "wasm") {
        return None;
    }
    // No wasm32-wasip2 output at all under this target directory: the build did not run, or
    // cargo wrote elsewhere (CARGO_TARGET_DIR, `build.target-dir`).
    let target_output = path
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "wasm32-wasip2"));
    if target_output.is_some_and(|dir| !dir.exists()) {
        let elsewhere = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => format!(
                "CARGO_TARGET_DIR is set to {} here, so cargo writes under that directory: give \
                 the component's path there",
                crate::escape::escape(&std::path::Path::new(&dir).display().to_string())
            ),
            None => "if CARGO_TARGET_DIR or `build.target-dir` (.cargo/config.toml) was set for \
                     the build, cargo wrote under that directory: give the component's path there"
                .to_owned(),
        };
        return Some(format!(
            "nothing was built for wasm32-wasip2 here; build the handler with `{}`, or, {elsewhere}",
            crate::runtime::loader::BUILD_COMMAND
        ));
    }
    let rlib = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .and_then(|stem| Some(path.parent()?.join(format!("lib{stem}.rlib"))));
    Some(match rlib {
        Some(rlib) if rlib.exists() => format!(
            "cargo built {} instead, a Rust library rather than a component: {CDYLIB_FIX}",
            rlib.display()
        ),
        _ => format!(
            "if the build ran, the crate is probably not a cdylib: {CDYLIB_FIX} (the .wasm is named after the crate, with `_` for `-`)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cargo_output_names_the_cdylib_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let release = tmp.path().join("target/wasm32-wasip2/release");
        std::fs::create_dir_all(&release).unwrap();
        let wasm = release.join("my_hook.wasm");

        let e = format!("{:#}", read_component(&wasm, 1 << 20, None).unwrap_err());
        assert!(e.contains("crate-type = [\"cdylib\"]"), "{e}");
        assert!(e.contains("no such file"), "{e}");

        std::fs::write(release.join("libmy_hook.rlib"), b"!<arch>\n").unwrap();
        let e = format!("{:#}", read_component(&wasm, 1 << 20, None).unwrap_err());
        assert!(e.contains("libmy_hook.rlib instead"), "{e}");
        assert!(e.contains("crate-type = [\"cdylib\"]"), "{e}");
        // The rebuild it names is the release build every other hint names.
        let build = format!("`{}`", crate::runtime::loader::BUILD_COMMAND);
        assert!(CDYLIB_FIX.ends_with(&build), "{CDYLIB_FIX}");

        // No wasm32-wasip2 output at all: the build did not run here, or wrote elsewhere.
        let unbuilt = tmp
            .path()
            .join("other/target/wasm32-wasip2/release/my_hook.wasm");
        let e = format!("{:#}", read_component(&unbuilt, 1 << 20, None).unwrap_err());
        assert!(
            e.contains("nothing was built for wasm32-wasip2 here"),
            "{e}"
        );
        assert!(e.contains("CARGO_TARGET_DIR"), "{e}");
        assert!(!e.contains("cdylib"), "{e}");

        // Elsewhere a missing file is only that.
        let e = format!(
            "{:#}",
            read_component(&tmp.path().join("h.wasm"), 1 << 20, None).unwrap_err()
        );
        assert!(!e.contains("cdylib"), "{e}");
        assert!(e.contains("h.wasm"), "{e}");

        std::fs::write(&wasm, [0u8; 16]).unwrap();
        assert_eq!(read_component(&wasm, 16, None).unwrap().len(), 16);
        // A device never ends, and a FIFO would block until something writes to it: neither is
        // read.
        let e = format!(
            "{:#}",
            read_component(Path::new("/dev/zero"), 1024, None).unwrap_err()
        );
        assert!(e.contains("not a regular file"), "{e}");
        #[cfg(unix)]
        {
            let fifo = tmp.path().join("fifo.wasm");
            let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path; mkfifo has no other precondition.
            assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
            let e = format!("{:#}", read_component(&fifo, 1024, None).unwrap_err());
            assert!(e.contains("a named pipe (FIFO), not a regular file"), "{e}");
        }
        let e = format!("{:#}", read_component(&wasm, 15, None).unwrap_err());
        assert!(e.contains("size limit is 15 bytes"), "{e}");
        // Where the limit is a setting, the setting is named.
        let e = format!(
            "{:#}",
            read_component(&wasm, 15, Some("[engine] max_component_bytes")).unwrap_err()
        );
        assert!(
            e.contains(
                "size limit is 15 bytes (raise [engine] max_component_bytes or build a smaller \
                 component)"
            ),
            "{e}"
        );
    }
}
