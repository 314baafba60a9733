//! Prefixed, time-ordered identifiers (`evt_01J…`), one newtype per kind of id.
//!
//! Every id is a prefix plus a ULID, so ids sort by creation time, read well in logs and
//! cannot be confused across kinds (a delivery id is never accepted where an event id is).

use std::fmt;

macro_rules! prefixed_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The prefix every id of this kind starts with, underscore included.
            pub const PREFIX: &'static str = $prefix;

            /// A new id, ordered after every id made before it by this process.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, next_ulid()))
            }

            /// Accepts a stored or client-supplied id when it has this kind's shape.
            pub fn parse(raw: &str) -> Result<Self, InvalidId> {
                match raw.strip_prefix($prefix) {
                    Some(rest) if ulid::Ulid::from_string(rest).is_ok() => Ok(Self(raw.to_owned())),
                    _ => Err(InvalidId { expected: $prefix }),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// The next ULID of this process: strictly increasing, even within one millisecond.
fn next_ulid() -> ulid::Ulid {
    static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    let mut generator = GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // The random part only overflows after 2^80 ids in one millisecond; a fresh random
    // ULID is then still unique, merely not ordered.
    generator.generate().unwrap_or_else(|_| ulid::Ulid::new())
}

/// A string that does not have the shape of the id kind it was parsed as.
#[derive(Debug, thiserror::Error)]
#[error("not a valid id: expected `{expected}` followed by a 26-character ULID")]
pub struct InvalidId {
    pub expected: &'static str,
}

prefixed_id!(
    /// Hookwarden's own id of an accepted event (the client's CloudEvents `id` is kept apart).
    EventId,
    "evt_"
);

prefixed_id!(
    /// One delivery: an event to one endpoint.
    DeliveryId,
    "dlv_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back_and_sort_by_creation() {
        let a = EventId::generate();
        let b = EventId::generate();
        assert!(a < b);
        assert_eq!(EventId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn ids_of_another_shape_are_refused() {
        assert!(EventId::parse("dlv_01J0000000000000000000000").is_err());
        assert!(EventId::parse("evt_not-a-ulid").is_err());
    }
}
