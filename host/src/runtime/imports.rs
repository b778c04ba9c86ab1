//! Reading a component's outer surface — its top-level imports and exports — straight from the
//! binary, without validating or compiling it.
//!
//! Compiling an 18 MB Python component takes 5–16 s; reading its import and export sections takes
//! milliseconds. The load gate reads them first, so a component that cannot fit (an ungranted
//! capability, an interface the engine does not provide, a missing `run-handler` export) is
//! refused before any compile, and `jobhook inspect` can say what it found even then. Nested
//! core modules and components are skipped by their declared length, never parsed. Nothing here
//! trusts the bytes: every length is bounds-checked by `wasmparser` or here, and a malformed
//! binary is an error, not a panic. The full check (validation, compile, type-checking every
//! import against the linker) still follows for anything that passes.

/// Most top-level imports plus exports read from one component. A real handler has a few
/// dozen (Python: 30); the bound keeps a hostile binary with millions of tiny entries from
/// making the gate build a huge list before it refuses.
pub const MAX_SURFACE_ITEMS: usize = 10_000;

/// The kind of one top-level import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKind {
    /// An instance: a WIT interface (`jobhook:handler/log@0.1.0`, `wasi:io/streams@0.2.6`).
    Instance,
    /// Anything else: a bare function, value, type, core module or component.
    Other,
}

/// The top-level imports and exports of a component, in binary order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Surface {
    /// Import names (control characters and quotes escaped) with their kind.
    pub imports: Vec<(String, ImportKind)>,
    /// Export names (escaped).
    pub exports: Vec<String>,
    /// Core module instances the component creates at its top level (each `instantiate` of its
    /// core instance sections; bags of exports are not instances). Instances nested components
    /// make are not counted: the count is never more than the component makes.
    pub core_instances: usize,
}

/// Why the surface could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SurfaceError {
    /// The binary is malformed where the parser looked.
    #[error("malformed component binary: {0}")]
    Malformed(String),
    /// More than [`MAX_SURFACE_ITEMS`] imports and exports.
    #[error("the component declares more than {MAX_SURFACE_ITEMS} top-level imports and exports")]
    TooMany,
}

/// Reads the top-level imports and exports of the component in `bytes` (which must start with
/// the component header; the load gate checks that first).
pub fn read_surface(bytes: &[u8]) -> Result<Surface, SurfaceError> {
    use wasmparser::{ComponentTypeRef, Instance, Payload, TypeBounds};

    let malformed = |e: wasmparser::BinaryReaderError| SurfaceError::Malformed(e.to_string());
    let mut surface = Surface::default();
    top_level(bytes, |payload| {
        match payload {
            Payload::ComponentImportSection(reader) => {
                for import in reader {
                    let import = import.map_err(malformed)?;
                    let kind = match import.ty {
                        ComponentTypeRef::Instance(_) => ImportKind::Instance,
                        // `import job-context: type (eq ..)`: a name for a type another import
                        // already brings (componentize-py emits these); there is nothing to link
                        // and wasmtime does not list it among the component's imports either.
                        ComponentTypeRef::Type(TypeBounds::Eq(_)) => continue,
                        _ => ImportKind::Other,
                    };
                    surface.imports.push((printable(import.name.0), kind));
                    check_count(&surface)?;
                }
            }
            Payload::ComponentExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(malformed)?;
                    surface.exports.push(printable(export.name.0));
                    check_count(&surface)?;
                }
            }
            Payload::InstanceSection(reader) => {
                for instance in reader {
                    if let Instance::Instantiate { .. } = instance.map_err(malformed)? {
                        surface.core_instances = surface.core_instances.saturating_add(1);
                    }
                }
            }
            Payload::CodeSectionStart { .. } => {
                // Only core modules have code sections, and the outer binary is a component.
                return Err(SurfaceError::Malformed(
                    "a code section at the top level of a component".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(surface)
}

/// Hands each payload of the component's top level to `visit`, to its end. Nested modules and
/// components are skipped whole: only their declared length is read, and checked against the
/// bytes there are.
fn top_level<'a>(
    bytes: &'a [u8],
    mut visit: impl FnMut(wasmparser::Payload<'a>) -> Result<(), SurfaceError>,
) -> Result<(), SurfaceError> {
    use wasmparser::{Chunk, Parser, Payload};

    let malformed = |e: wasmparser::BinaryReaderError| SurfaceError::Malformed(e.to_string());
    let mut parser = Parser::new(0);
    let mut data = bytes;
    loop {
        let (consumed, payload) = match parser.parse(data, true).map_err(malformed)? {
            Chunk::Parsed { consumed, payload } => (consumed, payload),
            // With `eof = true` the parser reports missing bytes as an error, never this.
            Chunk::NeedMoreData(_) => {
                return Err(SurfaceError::Malformed(
                    "unexpected end of the binary".into(),
                ));
            }
        };
        let skip = match &payload {
            Payload::ModuleSection {
                unchecked_range, ..
            }
            | Payload::ComponentSection {
                unchecked_range, ..
            } => unchecked_range.len(),
            _ => 0,
        };
        if let Payload::End(_) = payload {
            return Ok(());
        }
        visit(payload)?;
        data = consumed
            .checked_add(skip)
            .and_then(|end| data.get(end..))
            .ok_or_else(|| {
                SurfaceError::Malformed("a nested module or component runs past the end".into())
            })?;
    }
}

/// A name from the binary as it may be printed: unvalidated, so it may hold anything; control
/// characters and quotes are escaped (valid WIT names are unchanged).
fn printable(name: &str) -> String {
    name.escape_debug().to_string()
}

fn check_count(surface: &Surface) -> Result<(), SurfaceError> {
    if surface.imports.len() + surface.exports.len() > MAX_SURFACE_ITEMS {
        Err(SurfaceError::TooMany)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn reads_top_level_imports_and_exports_only() {
        let bytes = component(
            r#"(component
                (import "wasi:io/streams@0.2.6" (instance))
                (import "f" (func $f))
                (core module $m (import "x" "y" (func)))
                (component $inner (import "hidden:inner/thing@1.0.0" (instance)))
                (import "jobhook:handler/log@0.1.0" (instance))
                (type $t u32)
                (import "an-alias" (type (eq $t)))
                (export "run-handler" (func $f))
            )"#,
        );
        let s = read_surface(&bytes).unwrap();
        assert_eq!(
            s.imports,
            vec![
                ("wasi:io/streams@0.2.6".to_owned(), ImportKind::Instance),
                ("f".to_owned(), ImportKind::Other),
                ("jobhook:handler/log@0.1.0".to_owned(), ImportKind::Instance),
            ]
        );
        assert_eq!(s.exports, vec!["run-handler".to_owned()]);
    }

    #[test]
    fn malformed_and_truncated_binaries_are_errors_not_panics() {
        let bytes = component(
            r#"(component
                (core module $m (func (export "f")))
                (import "wasi:io/streams@0.2.6" (instance))
            )"#,
        );
        for end in 8..bytes.len() {
            // Every prefix is either read (the sections it has) or refused; none panics.
            let _ = read_surface(&bytes[..end]);
        }
        assert!(read_surface(&bytes[..bytes.len() - 1]).is_err());
        let mut garbage = bytes[..8].to_vec();
        garbage.extend_from_slice(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
        assert!(matches!(
            read_surface(&garbage),
            Err(SurfaceError::Malformed(_))
        ));
    }
}
