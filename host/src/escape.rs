//! Guest and configuration text made safe to print: on an operator's terminal and in the
//! engine's line-oriented log, text a handler controls (log messages, failure reasons, panic
//! messages, stdout/stderr) or a configuration names (handlers, properties) must not be able to
//! end a line and forge the next one, move the cursor, clear the screen, or reorder what the
//! reader sees.
//!
//! [`escape`] writes every such character visibly, Rust-style: `\n`, `\r`, `\t`, `\0`, `\x1b`
//! (other C0 controls and DEL), `\u{85}` (C1 controls), `\u{202e}` (bidirectional overrides,
//! embeddings, isolates and marks), `\u{2028}` (line and paragraph separators), `\u{e0041}`
//! (tag characters, which hide text), `\u{200b}` (characters that show nothing: zero-width
//! spaces and joiners, the soft hyphen, the byte-order mark, invisible operators, interlinear
//! annotation marks, Hangul fillers — each lets two texts that look alike differ, or hides
//! where one word ends). Everything else,
//! including a backslash, is kept as it is: the output is for reading, and JSON output (the
//! API, `--json`) is not passed through it, since JSON escaping is already exact.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` is printed escaped by [`escape`].
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
                // Tag characters: invisible, and used to hide text inside what a reader sees.
                | '\u{e0000}'..='\u{e007f}'
                // Characters that show nothing.
                | '\u{00ad}'
                | '\u{034f}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{17b4}'
                | '\u{17b5}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200d}'
                | '\u{2060}'..='\u{2064}'
                | '\u{3164}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

/// `text` with every control, bidi and line-separator character written visibly (see the module
/// documentation); borrowed when there is none.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !needs_escape(c) {
            out.push(c);
            continue;
        }
        let _ = match c {
            '\n' => out.write_str("\\n"),
            '\r' => out.write_str("\\r"),
            '\t' => out.write_str("\\t"),
            '\0' => out.write_str("\\0"),
            c if u32::from(c) < 0x80 => write!(out, "\\x{:02x}", u32::from(c)),
            c => write!(out, "\\u{{{:x}}}", u32::from(c)),
        };
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_bidi_and_separators_are_visible() {
        assert_eq!(
            escape("plain text, ü and \\ stay"),
            "plain text, ü and \\ stay"
        );
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\nb\rc\td\0e\x1b[2J\x7f"),
            "a\\nb\\rc\\td\\0e\\x1b[2J\\x7f"
        );
        assert_eq!(
            escape("\u{85}\u{9b}\u{202e}\u{2066}\u{200f}\u{2028}"),
            "\\u{85}\\u{9b}\\u{202e}\\u{2066}\\u{200f}\\u{2028}"
        );
        assert_eq!(escape("a\u{e0001}\u{e0041}b"), "a\\u{e0001}\\u{e0041}b");
        assert_eq!(
            escape("ad\u{200b}min\u{ad}\u{feff}\u{2060}\u{fffb}\u{3164}x"),
            "ad\\u{200b}min\\u{ad}\\u{feff}\\u{2060}\\u{fffb}\\u{3164}x"
        );
    }

    proptest::proptest! {
        /// Whatever goes in, nothing that ends a line or starts an escape sequence comes out.
        #[test]
        fn the_output_is_one_inert_line(text in proptest::prelude::any::<String>()) {
            let out = escape(&text);
            proptest::prop_assert!(!out.chars().any(needs_escape), "{out:?}");
        }
    }
}
