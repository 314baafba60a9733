//! Field values in the human log format, with the characters that could forge a log line
//! or drive a terminal escaped.
//!
//! Log fields carry text from requests (an event's `source`, a token's subject, a CEL
//! error quoting the data). tracing-subscriber's default field formatter writes `%value`
//! fields and the message as they are, so a `source` holding `\n2026-… INFO …` would
//! start a line of its own, and ANSI escapes would recolour or rewrite the terminal. The
//! JSON format escapes them already; [`EscapedFields`] does it for the human format.
//!
//! Invariant: whatever a field holds, one event is one line, with no control character
//! (C0, DEL, C1), no Unicode line or paragraph separator and no bidirectional override
//! in it. Those are written as escapes (`\n`, `\r`, `\t`, `\u{1b}`, `\u{2028}`); other
//! text, `\` included, is written as it is. Text fields (`field = "…"`) are quoted as
//! Rust's `Debug` quotes them, as the default formatter does.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// The human format's field formatter (see the module documentation).
#[derive(Clone, Copy, Debug, Default)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let ansi = writer.has_ansi_escapes();
        let mut visitor = Visitor { writer, ansi, result: Ok(()), first: true };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    /// Whether field names are styled (a terminal): italic names, a dimmed `=`.
    ansi: bool,
    result: fmt::Result,
    first: bool,
}

impl Visitor<'_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.writer.write_char(' ')?;
            }
            let name = field.name();
            if name != "message" {
                let name = name.strip_prefix("r#").unwrap_or(name);
                match self.ansi {
                    true => write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?,
                    false => write!(self.writer, "{name}=")?,
                }
            }
            Escaping(&mut self.writer).write_fmt(value)
        })();
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.field(field, format_args!("{value}")),
            _ => self.field(field, format_args!("{value:?}")),
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, format_args!("{}", Chain(value)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

/// An error and its sources, `outer: inner: innermost`.
struct Chain<'e>(&'e (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// Whether `c` is written as an escape.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Writes what it is given with [`needs_escape`] characters escaped.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one event logs through a human-format subscriber with [`EscapedFields`].
    fn logged(event: impl FnOnce()) -> String {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .fmt_fields(EscapedFields)
            .finish();
        tracing::subscriber::with_default(subscriber, event);
        let bytes = buffer.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn control_characters_in_any_field_are_escaped_and_one_event_is_one_line() {
        let hostile =
            "shop\n2026-12-02T00:00:00Z  INFO forged: admin logged in\r\x1b[31mred\x1b[0m\u{2028}\u{202e}x\u{85}";
        let error = std::io::Error::other(hostile.to_owned());
        let text = logged(
            || tracing::info!(source = %hostile, text = hostile, debug = ?hostile, error = &error as &dyn std::error::Error, "got {hostile}"),
        );
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        assert!(!text.chars().any(|c| c != '\n' && needs_escape(c)), "{text:?}");
        let escaped =
            r"shop\n2026-12-02T00:00:00Z  INFO forged: admin logged in\r\u{1b}[31mred\u{1b}[0m\u{2028}\u{202e}x\u{85}";
        assert!(text.contains(&format!("got {escaped} source={escaped} ")), "{text}");
        assert!(text.contains(&format!("error={escaped}")), "{text}");
        // Text and Debug fields are quoted as Rust quotes them, as before.
        assert!(text.contains(r#"text="shop\n2026"#) && text.contains(r#"debug="shop\n2026"#), "{text}");
    }

    #[test]
    fn plain_fields_read_as_the_default_format_writes_them() {
        let text = logged(|| tracing::info!(event_id = %"evt_1", count = 3, r#type = "a", "event accepted"));
        assert_eq!(text, " INFO event accepted event_id=evt_1 count=3 type=\"a\"\n");
    }
}
