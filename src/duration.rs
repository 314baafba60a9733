//! Durations written as text in resources and configuration: `500ms`, `30s`, `5m`, `24h`,
//! `1h 30m`. Read with `humantime`; written in one canonical form (see [`DurationText`]'s
//! `Display`), the form stored specs are compared in, so one duration has one text.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration that reads and writes as text like `30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationText(pub Duration);

/// What a duration looks like, for messages.
const EXPECTED: &str = "a duration like 30s, 5m or 24h";

/// Parses `30s`, `5m`, `24h`; the error says what was expected.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| format!("`{text}` is not {EXPECTED}"))
}

impl DurationText {
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

/// The canonical text: whole minutes in hours and minutes (`5m`, `24h`, `72h`, `1h 30m`),
/// anything finer in one unit (`90s`, `500ms`, `250us`). Never days, whose length people
/// read differently; always readable by [`parse`].
impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let nanos = d.subsec_nanos();
        let secs = d.as_secs();
        if nanos == 0 && secs.is_multiple_of(60) && secs > 0 {
            let (hours, minutes) = (secs / 3600, secs / 60 % 60);
            return match (hours, minutes) {
                (0, m) => write!(f, "{m}m"),
                (h, 0) => write!(f, "{h}h"),
                (h, m) => write!(f, "{h}h {m}m"),
            };
        }
        if nanos == 0 {
            return write!(f, "{secs}s");
        }
        let total = d.as_nanos();
        match (total % 1_000_000, total % 1_000) {
            (0, _) => write!(f, "{}ms", total / 1_000_000),
            (_, 0) => write!(f, "{}us", total / 1_000),
            _ => write!(f, "{total}ns"),
        }
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = DurationText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DurationText, E> {
                parse(text).map(DurationText).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Text)
    }
}

impl Serialize for DurationText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl schemars::JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as 500ms, 30s, 5m, 24h or 1h 30m.",
            "pattern": "^\\s*([0-9]+\\s*[a-zA-Zµ]+\\s*)+$"
        })
    }
}

/// `#[serde(with = "crate::duration::text")]` for plain `Duration` fields.
pub mod text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        super::DurationText::deserialize(deserializer).map(|d| d.0)
    }

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&super::DurationText(*duration))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_through_text() {
        for (text, seconds) in [("30s", 30), ("5m", 300), ("24h", 86_400), ("1h 30m", 5_400)] {
            let parsed: DurationText = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(parsed.0, Duration::from_secs(seconds));
            let again: DurationText = serde_json::from_value(serde_json::to_value(parsed).unwrap()).unwrap();
            assert_eq!(again, parsed);
        }
    }

    #[test]
    fn durations_are_written_in_their_shortest_common_form() {
        let cases = [
            (Duration::from_secs(86_400), "24h"),
            (Duration::from_secs(3 * 86_400), "72h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(5_400), "1h 30m"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(3_630), "3630s"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_micros(250), "250us"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::ZERO, "0s"),
        ];
        for (duration, text) in cases {
            assert_eq!(DurationText(duration).to_string(), text);
            assert_eq!(parse(text), Ok(duration), "{text} reads back");
        }
        // What an older build wrote still reads, and is written the new way.
        for (old, new) in [("1day", "24h"), ("3days", "72h"), ("1m 30s", "90s"), ("1h 30m", "1h 30m")] {
            assert_eq!(DurationText(parse(old).unwrap()).to_string(), new);
        }
    }

    #[test]
    fn a_bad_duration_says_what_was_expected() {
        let err = serde_json::from_value::<DurationText>(serde_json::json!("ten seconds")).unwrap_err().to_string();
        assert_eq!(err, "`ten seconds` is not a duration like 30s, 5m or 24h");
        let err = serde_json::from_value::<DurationText>(serde_json::json!(10)).unwrap_err().to_string();
        assert_eq!(err, "invalid type: integer `10`, expected a duration like 30s, 5m or 24h");
    }
}
