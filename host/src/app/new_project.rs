//! `jobhook new`: writes a standalone handler project — the handler, a sample context, the WIT
//! (for languages other than Rust), and a README with the exact build, test and run commands —
//! so that a handler author's first component builds and runs before they change a line.
//!
//! The templates are files under `host/templates/<lang>/`, compiled into the binary. A project
//! never depends on where it was created: a Rust project is a workspace of its own and depends on
//! the SDK by an absolute path (the source this binary was built from, or `--sdk-path`); the
//! other languages get a copy of the engine's WIT.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

/// The WIT the engine was built from, which non-Rust projects build against.
pub const WIT: &str = include_str!("../../../wit/jobhook.wit");

/// Where the project's copy of the WIT goes.
const WIT_FILE: &str = "wit/jobhook.wit";

/// The `jobhook-sdk` source this binary was built from: the Rust template's default dependency.
const BUILT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-sdk");

/// The toolchain versions the README and build scripts name; the same as the pins of
/// `scripts/lang-toolchains.sh` (a unit test holds them together).
pub const COMPONENTIZE_QJS: &str = "0.4.5";
/// See [`COMPONENTIZE_QJS`].
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// See [`COMPONENTIZE_QJS`]; the version the C template's bindings were generated with.
pub const WIT_BINDGEN: &str = "0.63.0";

/// Longest project name. Cargo has no limit of its own, but the name becomes a directory, a crate
/// and a file name; 64 characters is plenty and keeps paths short.
pub const MAX_NAME_CHARS: usize = 64;

/// Largest `Cargo.toml` read to check that `--sdk-path` is the SDK (the real one is under 1 KiB).
const MAX_SDK_MANIFEST_BYTES: u64 = 64 * 1024;

/// Names a project may not have: Rust keywords (not valid crate names), crates every Rust
/// program can reach (`std`, `core`, ...) or a handler depends on, `test` (cargo's own test
/// crate), and names Windows reserves for devices (not valid file names there).
const RESERVED_NAMES: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "jobhook",
    "jobhook_sdk",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "union",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "wit_bindgen",
    "yield",
    "con",
    "prn",
    "aux",
    "nul",
    "com1",
    "com2",
    "com3",
    "com4",
    "com5",
    "com6",
    "com7",
    "com8",
    "com9",
    "lpt1",
    "lpt2",
    "lpt3",
    "lpt4",
    "lpt5",
    "lpt6",
    "lpt7",
    "lpt8",
    "lpt9",
];

/// The language of a new handler project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust with the `jobhook-sdk` crate (unit tests against its test double).
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-qjs (QuickJS).
    Js,
    /// C, built with clang, wasi-libc and wasm-component-ld.
    C,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
            Lang::C => "C",
        })
    }
}

/// What `jobhook new` is asked to create.
#[derive(Debug, Clone)]
pub struct NewProject {
    /// The project's name (also its crate name, and the `.wasm` file's name with `_` for `-`).
    pub name: String,
    /// Its language.
    pub lang: Lang,
    /// The directory to create; `./<name>` by default.
    pub dir: Option<PathBuf>,
    /// The SDK source a Rust project depends on; the one this binary was built from by default.
    pub sdk_path: Option<PathBuf>,
}

/// What a template file holds.
enum Contents {
    /// Text with `{{placeholders}}`.
    Template(&'static str),
    /// Bytes written as they are.
    Bytes(&'static [u8]),
}

/// One file of a project.
struct File {
    /// Its path inside the project.
    path: &'static str,
    contents: Contents,
    /// Whether it is a script to run (mode 0755 on Unix).
    executable: bool,
}

const fn template(path: &'static str, text: &'static str) -> File {
    File {
        path,
        contents: Contents::Template(text),
        executable: false,
    }
}

const fn script(path: &'static str, text: &'static str) -> File {
    File {
        path,
        contents: Contents::Template(text),
        executable: true,
    }
}

const fn bytes(path: &'static str, data: &'static [u8]) -> File {
    File {
        path,
        contents: Contents::Bytes(data),
        executable: false,
    }
}

/// The sample context every project gets (a failed job, so the warning path runs).
const CONTEXT: File = template(
    "context.json",
    include_str!("../../templates/common/context.json"),
);

/// The files of a project in `lang`, besides the WIT.
fn files(lang: Lang) -> Vec<File> {
    let mut files = match lang {
        Lang::Rust => vec![
            template(
                "Cargo.toml",
                include_str!("../../templates/rust/Cargo.toml.tmpl"),
            ),
            template(
                "src/lib.rs",
                include_str!("../../templates/rust/src/lib.rs.tmpl"),
            ),
            template(
                "README.md",
                include_str!("../../templates/rust/README.md.tmpl"),
            ),
            template(".gitignore", include_str!("../../templates/rust/gitignore")),
        ],
        Lang::Python => vec![
            template("app.py", include_str!("../../templates/python/app.py.tmpl")),
            script(
                "build.sh",
                include_str!("../../templates/python/build.sh.tmpl"),
            ),
            template(
                "README.md",
                include_str!("../../templates/python/README.md.tmpl"),
            ),
            template(
                ".gitignore",
                include_str!("../../templates/python/gitignore"),
            ),
        ],
        Lang::Js => vec![
            template(
                "handler.js",
                include_str!("../../templates/js/handler.js.tmpl"),
            ),
            script("build.sh", include_str!("../../templates/js/build.sh.tmpl")),
            // The project's own package.json: `npm install` installs into the project even when
            // a directory above it has one (npm uses the nearest).
            template(
                "package.json",
                include_str!("../../templates/js/package.json.tmpl"),
            ),
            template(
                "README.md",
                include_str!("../../templates/js/README.md.tmpl"),
            ),
            template(".gitignore", include_str!("../../templates/js/gitignore")),
        ],
        Lang::C => vec![
            template(
                "handler.c",
                include_str!("../../templates/c/handler.c.tmpl"),
            ),
            script("build.sh", include_str!("../../templates/c/build.sh.tmpl")),
            template(
                "README.md",
                include_str!("../../templates/c/README.md.tmpl"),
            ),
            template(".gitignore", include_str!("../../templates/c/gitignore")),
            bytes(
                "bindings/handler.h",
                include_bytes!("../../templates/c/bindings/handler.h"),
            ),
            bytes(
                "bindings/handler.c",
                include_bytes!("../../templates/c/bindings/handler.c"),
            ),
            bytes(
                "bindings/handler_component_type.o",
                include_bytes!("../../templates/c/bindings/handler_component_type.o"),
            ),
        ],
    };
    files.push(CONTEXT);
    if lang != Lang::Rust {
        files.push(bytes(WIT_FILE, WIT.as_bytes()));
    }
    files
}

/// Why a name cannot be a project's name, or `None` when it can.
pub fn name_error(name: &str) -> Option<String> {
    let rule = "a name starts with an ASCII letter and has only ASCII letters, digits, `-` and `_` \
                (it becomes the directory, the crate and the .wasm file name), e.g. `failure-mailer`";
    let Some(first) = name.chars().next() else {
        return Some(format!("the name is empty; {rule}"));
    };
    // A path separator is named first: `../x` is a path, whatever else is wrong with it.
    let bad = name.chars().find(|c| matches!(c, '/' | '\\')).or_else(|| {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    });
    if let Some(bad) = bad {
        let what = match bad {
            '/' | '\\' => {
                "a path separator (use --dir to choose where the project goes)".to_owned()
            }
            '.' => "a dot".to_owned(),
            c => format!("{:?}", c),
        };
        return Some(format!(
            "{name:?} is not a valid handler name: it contains {what}; {rule}"
        ));
    }
    if !first.is_ascii_alphabetic() {
        return Some(format!(
            "{name:?} is not a valid handler name: it does not start with a letter; {rule}"
        ));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Some(format!(
            "the name is longer than {MAX_NAME_CHARS} characters; {rule}"
        ));
    }
    let normal = name.to_ascii_lowercase().replace('-', "_");
    if RESERVED_NAMES.contains(&normal.as_str()) {
        return Some(format!(
            "{name:?} cannot be a handler name: it is a Rust keyword, a name cargo or the SDK \
             reserves, or a device name on Windows; choose another, e.g. `{name}-handler`"
        ));
    }
    None
}

/// The package version declared by `package jobhook:handler@X.Y.Z;` in `wit`.
pub fn wit_version(wit: &str) -> Option<&str> {
    wit.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("package jobhook:handler@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .map(str::trim)
}

/// What the placeholders of the templates stand for.
struct Values {
    name: String,
    crate_name: String,
    sdk_path_toml: String,
    wit_version: String,
}

impl Values {
    /// `template` with each `{{key}}` replaced, in one pass: a value is never read again, so a
    /// value that contains a placeholder (an SDK path with `{{wit_version}}` in it) stays as it
    /// is. An unknown key is left as written.
    fn fill(&self, template: &str) -> String {
        let value = |key: &str| -> Option<&str> {
            Some(match key {
                "name" => &self.name,
                "crate_name" => &self.crate_name,
                "sdk_path_toml" => &self.sdk_path_toml,
                "wit_version" => &self.wit_version,
                "componentize_qjs" => COMPONENTIZE_QJS,
                "componentize_py" => COMPONENTIZE_PY,
                "wit_bindgen" => WIT_BINDGEN,
                _ => return None,
            })
        };
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            let (before, from) = rest.split_at(start);
            out.push_str(before);
            let after = from.get(2..).unwrap_or_default();
            let filled = after.find("}}").and_then(|end| {
                let key = after.get(..end)?;
                Some((value(key)?, after.get(end + 2..)?))
            });
            match filled {
                Some((text, remaining)) => {
                    out.push_str(text);
                    rest = remaining;
                }
                None => {
                    out.push_str("{{");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// The SDK source directory a Rust project depends on, checked: it must hold the `jobhook-sdk`
/// package. Returned absolute, so the project builds from wherever it is.
fn sdk_dir(requested: Option<&Path>) -> anyhow::Result<PathBuf> {
    let (dir, how) = match requested {
        Some(p) => (p.to_path_buf(), "--sdk-path"),
        None => (
            PathBuf::from(BUILT_SDK),
            "the SDK source this jobhook was built from",
        ),
    };
    let fix = "pass --sdk-path with the `guest-sdk` directory of a jobhook checkout";
    let dir = std::fs::canonicalize(&dir)
        .with_context(|| format!("{how} ({}) is not there; {fix}", dir.display()))?;
    let manifest = dir.join("Cargo.toml");
    let mut text = String::new();
    std::fs::File::open(&manifest)
        .and_then(|f| f.take(MAX_SDK_MANIFEST_BYTES).read_to_string(&mut text))
        .with_context(|| format!("{how}: cannot read {}; {fix}", manifest.display()))?;
    let name = toml::from_str::<toml::Table>(&text).ok().and_then(|t| {
        t.get("package")
            .and_then(|p| p.get("name"))
            .and_then(|n| n.as_str().map(str::to_owned))
    });
    if name.as_deref() != Some("jobhook-sdk") {
        bail!(
            "{how}: {} is not the jobhook-sdk package ({}); {fix}",
            manifest.display(),
            match name {
                Some(n) => format!("its package is {n:?}"),
                None => "it names no package".into(),
            }
        );
    }
    Ok(dir)
}

/// Checks that `dir` can take a new project: absent, or an empty directory.
fn check_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot use {}", dir.display())),
        Ok(meta) if !meta.is_dir() => bail!(
            "{} exists and is not a directory; choose another --dir",
            dir.display()
        ),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read the directory {}", dir.display()))?;
            if entries.next().is_some() {
                bail!(
                    "{} exists and is not empty; jobhook new writes only into a new or empty \
                     directory (choose another name or --dir)",
                    dir.display()
                );
            }
            Ok(())
        }
    }
}

/// Creates the project; returns the directory it was written to.
pub fn create(request: &NewProject) -> anyhow::Result<PathBuf> {
    if let Some(e) = name_error(&request.name) {
        bail!("{e}");
    }
    if request.lang != Lang::Rust && request.sdk_path.is_some() {
        bail!(
            "--sdk-path is for Rust projects; a {} project builds against the WIT it is given",
            request.lang
        );
    }
    let dir = request
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&request.name));
    check_dir(&dir)?;
    let sdk_path_toml = if request.lang == Lang::Rust {
        let sdk = sdk_dir(request.sdk_path.as_deref())?;
        let text = sdk.to_str().with_context(|| {
            format!(
                "the SDK path {} is not UTF-8, which Cargo.toml cannot hold; use --sdk-path",
                sdk.display()
            )
        })?;
        toml::Value::String(text.to_owned()).to_string()
    } else {
        String::new()
    };
    let values = Values {
        name: request.name.clone(),
        crate_name: request.name.replace('-', "_"),
        sdk_path_toml,
        wit_version: wit_version(WIT)
            .context("the embedded WIT declares no jobhook:handler version")?
            .to_owned(),
    };

    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    for file in files(request.lang) {
        let path = dir.join(file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create the directory {}", parent.display()))?;
        }
        let filled;
        let data = match file.contents {
            Contents::Template(text) => {
                filled = values.fill(text);
                filled.as_bytes()
            }
            Contents::Bytes(data) => data,
        };
        write_new(&path, data, file.executable)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// Writes a file that must not exist yet (nothing is ever overwritten).
fn write_new(path: &Path, data: &[u8], executable: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if executable { 0o755 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = executable;
    let mut file = options.open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// `text` as one word a POSIX shell reads back as it is: unchanged when it holds only characters
/// no shell treats specially, else in single quotes (a `'` inside as `'\''`); a word starting
/// with `-` gets `./` in front, so that `cd` does not take it for an option. Control characters
/// are escaped for the terminal afterwards, which no shell would read back: such a directory
/// is shown, not pasted.
fn shell_word(text: &str) -> String {
    let text = if text.starts_with('-') {
        format!("./{text}")
    } else {
        text.to_owned()
    };
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./-+:,=@%".contains(c));
    let word = if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    };
    crate::escape::escape(&word).into_owned()
}

/// What to do next, printed after the project is created.
pub fn next_steps(request: &NewProject, dir: &Path) -> String {
    let crate_name = request.name.replace('-', "_");
    let dir = shell_word(&dir.display().to_string());
    let (build, wasm) = match request.lang {
        Lang::Rust => (
            format!("cargo test && {}", crate::runtime::loader::BUILD_COMMAND),
            format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
        ),
        _ => ("./build.sh".to_owned(), format!("{crate_name}.wasm")),
    };
    format!(
        "created the {} handler `{}` in {dir}\n\nnext (README.md has the details and the toolchain):\n  cd {dir}\n  {build}\n  jobhook run {wasm} --context context.json\n",
        request.lang, request.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str, lang: Lang, dir: &Path) -> NewProject {
        NewProject {
            name: name.into(),
            lang,
            dir: Some(dir.to_path_buf()),
            sdk_path: None,
        }
    }

    /// The printed `cd` line is one shell word, whatever the directory's name: pasted, it runs
    /// no command substitution and names the directory.
    #[test]
    fn the_next_steps_quote_the_directory_for_a_shell() {
        for (dir, shown) in [
            ("handlers/h1", "cd handlers/h1\n"),
            ("my dir", "cd 'my dir'\n"),
            ("$(touch pwned)", "cd '$(touch pwned)'\n"),
            ("it's", "cd 'it'\\''s'\n"),
            ("-x", "cd ./-x\n"),
            ("a`b`", "cd 'a`b`'\n"),
        ] {
            let text = next_steps(&request("h1", Lang::C, Path::new(dir)), Path::new(dir));
            assert!(text.contains(shown), "{dir}: {text}");
        }
        // A control character is escaped for the terminal: shown, never sent raw.
        let text = next_steps(
            &request("h1", Lang::C, Path::new("a\u{1b}[31mred")),
            Path::new("a\u{1b}[31mred"),
        );
        assert!(!text.contains('\u{1b}'), "{text:?}");
    }

    #[test]
    fn placeholders_are_filled_once_and_values_are_not_read_again() {
        let values = Values {
            name: "hook".into(),
            crate_name: "hook".into(),
            sdk_path_toml: "\"/src/{{wit_version}}/guest-sdk\"".into(),
            wit_version: "0.2.0".into(),
        };
        assert_eq!(
            values.fill("{{name}} {{sdk_path_toml}} {{wit_version}} {{unknown}} {{ {{name"),
            "hook \"/src/{{wit_version}}/guest-sdk\" 0.2.0 {{unknown}} {{ {{name"
        );
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "failure-mailer", "Hook_2", &"x".repeat(MAX_NAME_CHARS)] {
            assert_eq!(name_error(good), None, "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("../evil", "path separator"),
            ("a/b", "path separator"),
            ("a\\b", "path separator"),
            ("..", "a dot"),
            ("a.b", "a dot"),
            ("1st", "start with a letter"),
            ("-x", "start with a letter"),
            ("_x", "start with a letter"),
            ("with space", "' '"),
            ("é", "'é'"),
            ("fn", "Rust keyword"),
            ("Self", "Rust keyword"),
            ("test", "reserve"),
            ("jobhook-sdk", "reserve"),
            ("CON", "Windows"),
            (&"x".repeat(MAX_NAME_CHARS + 1), "longer than"),
        ] {
            let e = name_error(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_embedded_wit_is_the_version_the_engine_implements() {
        let (major, minor, patch) = crate::runtime::loader::WIT_VERSION;
        assert_eq!(
            wit_version(WIT),
            Some(format!("{major}.{minor}.{patch}").as_str())
        );
        assert_eq!(
            wit_version("package jobhook:handler@1.2.3;\n"),
            Some("1.2.3")
        );
        assert_eq!(wit_version("package other:x@1.0.0;"), None);
    }

    #[test]
    fn the_toolchain_versions_are_the_pinned_ones() {
        let script = include_str!("../../../scripts/lang-toolchains.sh");
        for pin in [
            format!("COMPONENTIZE_QJS={COMPONENTIZE_QJS}\n"),
            format!("COMPONENTIZE_PY={COMPONENTIZE_PY}\n"),
            format!("WIT_BINDGEN={WIT_BINDGEN}\n"),
        ] {
            assert!(
                script.contains(&pin),
                "scripts/lang-toolchains.sh lacks {pin}"
            );
        }
        let generated = include_str!("../../templates/c/bindings/GENERATED");
        assert!(
            generated.contains(&format!("wit-bindgen-cli {WIT_BINDGEN}")),
            "{generated}"
        );
    }

    #[test]
    fn every_placeholder_is_filled() {
        let values = Values {
            name: "n".into(),
            crate_name: "n".into(),
            sdk_path_toml: "\"/x\"".into(),
            wit_version: "0.1.0".into(),
        };
        for lang in Lang::value_variants() {
            for file in files(*lang) {
                if let Contents::Template(text) = file.contents {
                    let filled = values.fill(text);
                    assert!(!filled.contains("{{"), "{lang} {}: {filled}", file.path);
                }
            }
        }
    }

    #[test]
    fn a_project_is_written_with_the_name_and_the_wit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let created = create(&request("my-hook", Lang::Js, &dir)).unwrap();
        assert_eq!(created, dir);
        let js = std::fs::read_to_string(dir.join("handler.js")).unwrap();
        assert!(js.contains("jobhook:handler/log@0."), "{js}");
        assert_eq!(
            std::fs::read_to_string(dir.join("wit/jobhook.wit")).unwrap(),
            WIT
        );
        let build = std::fs::read_to_string(dir.join("build.sh")).unwrap();
        assert!(build.contains("-o my_hook.wasm"), "{build}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("build.sh"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "{mode:o}");
        }
        let ctx = std::fs::read(dir.join("context.json")).unwrap();
        crate::context::JobContext::from_json_bytes(&ctx).unwrap();
    }

    #[test]
    fn a_rust_project_depends_on_the_sdk_by_absolute_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        create(&request("r", Lang::Rust, &dir)).unwrap();
        let manifest: toml::Table =
            toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap();
        let path = manifest["dependencies"]["jobhook-sdk"]["path"]
            .as_str()
            .unwrap();
        assert!(Path::new(path).is_absolute(), "{path}");
        assert!(Path::new(path).join("src/lib.rs").exists(), "{path}");
        assert!(manifest.contains_key("workspace"), "a workspace of its own");
        assert_eq!(manifest["lib"]["crate-type"][0].as_str(), Some("cdylib"));
        assert!(!dir.join("wit").exists(), "the SDK carries the WIT");
    }

    #[test]
    fn bad_requests_are_refused_with_what_to_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let full = tmp.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("keep.txt"), "mine").unwrap();
        let e = create(&request("x", Lang::C, &full)).unwrap_err();
        assert!(format!("{e:#}").contains("is not empty"), "{e:#}");
        assert_eq!(
            std::fs::read_to_string(full.join("keep.txt")).unwrap(),
            "mine"
        );

        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = create(&request("x", Lang::C, &file)).unwrap_err();
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");

        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        create(&request("x", Lang::Python, &empty)).unwrap();
        assert!(empty.join("app.py").exists());

        let mut wrong_sdk = request("x", Lang::Rust, &tmp.path().join("w"));
        wrong_sdk.sdk_path = Some(tmp.path().to_path_buf());
        let e = create(&wrong_sdk).unwrap_err();
        assert!(format!("{e:#}").contains("--sdk-path"), "{e:#}");
        let mut not_rust = request("x", Lang::Js, &tmp.path().join("j"));
        not_rust.sdk_path = Some(PathBuf::from(BUILT_SDK));
        let e = create(&not_rust).unwrap_err();
        assert!(format!("{e:#}").contains("for Rust projects"), "{e:#}");
        assert!(!tmp.path().join("w").exists() && !tmp.path().join("j").exists());
    }
}
