//! Operator and guest text cut short for a message: a name, key, value or path echoed in an
//! error stays recognisable, while a 100,000-character mistake does not flood the terminal or
//! the log. Only cutting and quoting happen here; making the text safe to print is
//! [`crate::escape`]'s.

use std::borrow::Cow;

/// Most characters of a name, key or value an error message quotes: enough to recognise it,
/// while a 100,000-character mistake does not flood the terminal or the log.
pub const MAX_QUOTED_CHARS: usize = 64;

/// The first `max` characters of `text`, or `None` when it has no more than `max`.
fn cut(text: &str, max: usize) -> Option<&str> {
    let (end, _) = text.char_indices().nth(max)?;
    text.get(..end)
}

/// `text` cut to its first `max` characters, with `…` appended when it was longer: operator
/// text (a name, a key, a path) echoed in an error stays readable whatever its length.
pub fn excerpt(text: &str, max: usize) -> Cow<'_, str> {
    match cut(text, max) {
        None => Cow::Borrowed(text),
        Some(head) => Cow::Owned(format!("{head}…")),
    }
}

/// `text` quoted for an error message (Rust string syntax) and cut to [`MAX_QUOTED_CHARS`]
/// characters: `"long-nam"…` when it was longer.
pub fn quoted(text: &str) -> String {
    match cut(text, MAX_QUOTED_CHARS) {
        None => format!("{text:?}"),
        Some(head) => format!("{head:?}…"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_and_quoted_cut_at_characters() {
        assert_eq!(excerpt("short", 10), "short");
        assert_eq!(excerpt("ééééé", 3), "ééé…");
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        assert_eq!(quoted(&"x".repeat(65)), format!("\"{}\"…", "x".repeat(64)));
    }
}
