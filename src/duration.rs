//! Durations written as text in resources and configuration: `500ms`, `30s`, `5m`, `24h`,
//! `1h 30m`. Read with `humantime`, written back in the same form.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration that reads and writes as text like `30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationText(pub Duration);

/// Parses `30s`, `5m`, `24h`; the error says what was expected.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}` is not a duration like 30s, 5m or 24h ({e})"))
}

impl DurationText {
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map(DurationText).map_err(serde::de::Error::custom)
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
    fn a_bad_duration_says_what_was_expected() {
        let err = serde_json::from_value::<DurationText>(serde_json::json!("soon")).unwrap_err().to_string();
        assert!(err.contains("`soon` is not a duration"), "{err}");
    }
}
