//! Untrusted text made plain for a human reader.
//!
//! Context fields and Keyfactor's job message come from orchestrators and servers a handler does
//! not control. Put into a mail, a chat card or a ticket, their invisible characters can make a
//! name read backwards (bidirectional overrides), hide text (zero-width and tag characters), or
//! start new lines in a one-line field (line and paragraph separators). [`plain`] removes the
//! whole class once, for every handler.

/// What [`plain`] does with line breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// Every line break (and tab) becomes a space: for one-line fields.
    Join,
    /// Line breaks are kept as `\n` (CR LF, a bare CR, U+0085, U+2028 and U+2029 become `\n`),
    /// and tabs are kept: for a message body.
    Keep,
}

/// `text` as plain text: control characters become spaces (line breaks as `lines` says), format
/// characters are dropped ([`is_invisible`]), and the result is cut to `max_chars` characters,
/// with `…` where it was cut.
pub fn plain(text: &str, max_chars: usize, lines: Lines) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(4)));
    let mut count = 0usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let c = match c {
            '\r' if chars.peek() == Some(&'\n') => continue,
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => match lines {
                Lines::Keep => '\n',
                Lines::Join => ' ',
            },
            '\t' if lines == Lines::Keep => '\t',
            c if c.is_control() => ' ',
            c if is_invisible(c) => continue,
            c => c,
        };
        if count == max_chars {
            out.push('…');
            return out;
        }
        out.push(c);
        count += 1;
    }
    out
}

/// Whether `c` is a format character (Unicode general category Cf) — the bidirectional marks,
/// embeddings, overrides and isolates, zero-width spaces and joiners, the soft hyphen, the byte
/// order mark, interlinear annotation controls, prefixed number signs, invisible operators and
/// the tag characters — which change how neighbouring text is shown without being seen.
pub fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{AD}'
        | '\u{600}'..='\u{605}'
        | '\u{61C}'
        | '\u{6DD}'
        | '\u{70F}'
        | '\u{890}'..='\u{891}'
        | '\u{8E2}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}'
        | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0001}'
        | '\u{E0020}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_character_is_dropped() {
        let format = [
            '\u{AD}',
            '\u{600}',
            '\u{605}',
            '\u{61C}',
            '\u{6DD}',
            '\u{70F}',
            '\u{890}',
            '\u{8E2}',
            '\u{180E}',
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{200E}',
            '\u{200F}',
            '\u{202A}',
            '\u{202B}',
            '\u{202C}',
            '\u{202D}',
            '\u{202E}',
            '\u{2060}',
            '\u{2063}',
            '\u{2064}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{206A}',
            '\u{206F}',
            '\u{FEFF}',
            '\u{FFF9}',
            '\u{FFFB}',
            '\u{110BD}',
            '\u{13430}',
            '\u{1BCA0}',
            '\u{1D173}',
            '\u{E0001}',
            '\u{E0020}',
            '\u{E0041}',
            '\u{E007F}',
        ];
        for c in format {
            for lines in [Lines::Join, Lines::Keep] {
                assert_eq!(
                    plain(&format!("a{c}b"), 10, lines),
                    "ab",
                    "U+{:04X}",
                    c as u32
                );
            }
        }
        // Neighbours of the ranges stay.
        for c in ['\u{2065}', '\u{2070}', '\u{FFFC}', '\u{E0080}', 'é', '😀'] {
            assert_eq!(plain(&format!("a{c}b"), 10, Lines::Join), format!("a{c}b"));
        }
    }

    #[test]
    fn controls_and_line_breaks_follow_lines() {
        let text = "a\r\nb\rc\nd\u{85}e\u{2028}f\u{2029}g\th\u{0}i\u{1b}j\u{7f}k\u{9b}l";
        assert_eq!(plain(text, 100, Lines::Join), "a b c d e f g h i j k l");
        assert_eq!(
            plain(text, 100, Lines::Keep),
            "a\nb\nc\nd\ne\nf\ng\th i j k l"
        );
    }

    #[test]
    fn length_is_counted_in_characters_and_the_cut_is_marked() {
        assert_eq!(plain("abcdef", 3, Lines::Join), "abc…");
        assert_eq!(plain("abc", 3, Lines::Join), "abc");
        assert_eq!(plain("", 3, Lines::Join), "");
        assert_eq!(plain("😀😀😀😀", 2, Lines::Keep), "😀😀…");
        // Dropped characters do not count.
        assert_eq!(plain("a\u{200B}\u{200B}bc", 3, Lines::Join), "abc");
    }
}
