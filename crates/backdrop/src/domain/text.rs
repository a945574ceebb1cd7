//! Text from outside (catalog cells, server error bodies) made safe to show on a terminal: control
//! characters are shown escaped (`\u{1b}`), never sent raw, so a value cannot move the cursor,
//! recolour the screen, ring the bell or forge a line of output.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The control characters no prompt may hold: C0 except tab, newline and carriage return (which
/// prompts legitimately contain), DEL, and C1.
#[must_use]
pub const fn is_forbidden_in_prompt(c: char) -> bool {
    matches!(c, '\0'..='\x08' | '\x0b' | '\x0c' | '\x0e'..='\x1f' | '\x7f'..='\u{9f}')
}

/// The short name of a control character, for messages: `NUL`, `ESC`, `BEL`, `DEL`...
#[must_use]
pub fn control_name(c: char) -> Option<&'static str> {
    const C0: [&str; 32] = [
        "NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "TAB", "LF", "VT", "FF", "CR", "SO",
        "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM", "SUB", "ESC", "FS", "GS",
        "RS", "US",
    ];
    match c {
        '\x7f' => Some("DEL"),
        '\u{80}'..='\u{9f}' => Some("C1 control"),
        c if (c as u32) < 0x20 => C0.get(c as usize).copied(),
        _ => None,
    }
}

/// `text` with every control character but newline and tab escaped, for messages that span
/// lines (an error with a listing). Borrowed when there is nothing to escape.
#[must_use]
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    escape(text, |c| c.is_control() && c != '\n' && c != '\t')
}

/// `text` on one terminal line: every control character escaped, newlines and tabs included.
#[must_use]
pub fn terminal_safe_line(text: &str) -> Cow<'_, str> {
    escape(text, char::is_control)
}

fn escape(text: &str, unsafe_char: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(&unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' if unsafe_char(c) => out.push_str("\\n"),
            '\t' if unsafe_char(c) => out.push_str("\\t"),
            '\r' if unsafe_char(c) => out.push_str("\\r"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_borrowed() {
        assert!(matches!(terminal_safe("Mug, blue — 12 €"), Cow::Borrowed(_)));
        assert_eq!(
            terminal_safe("a\x1b[31mred\x07\0\x7f\u{9b}b"),
            "a\\u{1b}[31mred\\u{7}\\u{0}\\u{7f}\\u{9b}b"
        );
        assert_eq!(terminal_safe("line 1\n\tline 2\r"), "line 1\n\tline 2\\r");
        assert_eq!(terminal_safe_line("line 1\n\tline 2\r"), "line 1\\n\\tline 2\\r");
    }

    #[test]
    fn the_prompt_rule_allows_tab_newline_and_carriage_return_only() {
        for c in ['\t', '\n', '\r', ' ', 'é', '\u{a0}', '\u{2028}'] {
            assert!(!is_forbidden_in_prompt(c), "{c:?}");
        }
        for c in ['\0', '\x07', '\x08', '\x0b', '\x0c', '\x1b', '\x1f', '\x7f', '\u{80}', '\u{9b}', '\u{9f}']
        {
            assert!(is_forbidden_in_prompt(c), "{c:?}");
        }
        assert_eq!(control_name('\x1b'), Some("ESC"));
        assert_eq!(control_name('\0'), Some("NUL"));
        assert_eq!(control_name('\x07'), Some("BEL"));
        assert_eq!(control_name('\x7f'), Some("DEL"));
        assert_eq!(control_name('a'), None);
    }
}
