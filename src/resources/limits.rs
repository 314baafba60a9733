//! Bounds on reading resource YAML, so that hostile text cannot freeze or exhaust the
//! process that reads it.
//!
//! What a YAML text costs is not its size. An alias repeats a whole subtree (a list of a
//! thousand values repeated twelve thousand times is twelve million values from a 38 KB
//! text), and the YAML scanner (libyaml, inside `yaml_serde`) does work proportional to
//! the flow nesting (`[[[…`) for every token it reads, so deep flow nesting costs the
//! square of its depth. Reading is therefore bounded in three places:
//!
//! - **Before the parser runs**, [`check_brackets`] counts the `[` and `{` characters of
//!   each document, wherever they stand (in quoted text and comments too). The parser's
//!   flow nesting can never exceed that count: a line that starts with `---` or `...`
//!   always ends a document or stops the parser with an error, and each document starts
//!   outside any flow collection. This is an over-estimate that needs no YAML parsing,
//!   which is the point: the real nesting is only known once the parser has paid for it.
//! - **While values are built**, [`Budget::read_value`] counts every value the document
//!   expands to, aliases included (`*l` counts every value of what `l` names, each time),
//!   and the bytes of its texts, against one budget for the whole read, and refuses
//!   nesting deeper than `maxDepth` at the value that crosses it.
//! - **Documents** are counted against `maxDocuments` as they are read.
//!
//! Invariant: however hostile the input, a read builds at most `maxNodes` values holding
//! at most `maxExpandedBytes` of text, nested at most `maxDepth` deep, and never hands
//! the parser a document with more than `maxBracketsPerDocument` flow brackets.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde::Deserialize;
use yaml_serde::value::{Tag, TaggedValue};
use yaml_serde::{Mapping, Value};

/// The limits of one apply (the `apply` section of the config file). The body size is
/// the API's; the others bound every read of resource YAML. The defaults are generous
/// for hand-written and generated resource sets alike: a resource is a few dozen values,
/// nested five or six deep.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ApplyLimits {
    /// Largest `POST /v1/apply` body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Most documents in one apply (empty ones included).
    pub max_documents: usize,
    /// Deepest nesting of lists and mappings in a document; the document is depth 1.
    pub max_depth: usize,
    /// Most values (scalars, lists, mappings, mapping keys) in one apply, after every
    /// alias is expanded.
    pub max_nodes: usize,
    /// Most bytes of scalar text in one apply, after every alias is expanded.
    pub max_expanded_bytes: usize,
    /// Most `[` and `{` characters in one document, counted on its text before it is
    /// parsed (see the module documentation).
    pub max_brackets_per_document: usize,
}

impl ApplyLimits {
    /// `yaml_serde` refuses nesting deeper than 128 on its own, with a message that names
    /// no setting; ours must trip first.
    pub const MAX_DEPTH: usize = 100;

    /// Refuses limits that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes < 1024 {
            return Err("apply.maxBodyBytes must be at least 1024".into());
        }
        if self.max_documents == 0 || self.max_nodes < 100 || self.max_brackets_per_document == 0 {
            return Err(
                "apply.maxDocuments and apply.maxBracketsPerDocument must be at least 1, apply.maxNodes at least 100"
                    .into(),
            );
        }
        if !(8..=Self::MAX_DEPTH).contains(&self.max_depth) {
            return Err(format!("apply.maxDepth must be from 8 (resources nest that deep) to {}", Self::MAX_DEPTH));
        }
        if self.max_expanded_bytes < self.max_body_bytes {
            return Err(
                "apply.maxExpandedBytes must be at least apply.maxBodyBytes: a body without aliases would not fit"
                    .into(),
            );
        }
        Ok(())
    }
}

impl Default for ApplyLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_documents: 1000,
            max_depth: 32,
            max_nodes: 100_000,
            max_expanded_bytes: 4 * 1024 * 1024,
            max_brackets_per_document: 256,
        }
    }
}

/// A document with more flow brackets than allowed, found before parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooManyBrackets {
    /// The document, numbered from 0 as the parser numbers them.
    pub document: usize,
    /// The line (from 1) of the bracket over the limit.
    pub line: usize,
    pub limit: usize,
}

impl fmt::Display for TooManyBrackets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the document holds more than {} `[` and `{{` characters; at most {} are allowed in one document (apply.maxBracketsPerDocument)",
            self.limit, self.limit
        )
    }
}

/// Whether `line` (without its `\n`) is a document marker: `---` or `...` at the start of
/// a line, followed by a blank or the end of the line. Only `\n` starts a line here; the
/// parser also breaks lines at `\r` and a few Unicode breaks, which can only make our
/// documents longer than its, so our counts higher.
fn marker(line: &str) -> Option<bool> {
    let bytes = line.as_bytes();
    let start = bytes.starts_with(b"---");
    if !start && !bytes.starts_with(b"...") {
        return None;
    }
    matches!(bytes.get(3), None | Some(b' ' | b'\t' | b'\r')).then_some(start)
}

/// Counts the `[` and `{` of every document of `text` (see the module documentation).
pub fn check_brackets(text: &str, limit: usize) -> Result<(), TooManyBrackets> {
    let mut count = 0usize;
    let mut starts = 0usize;
    // Whether the text before the first `---` holds a document of its own.
    let mut first_has_content = false;
    for (index, line) in text.split('\n').enumerate() {
        match marker(line) {
            Some(true) => {
                starts += 1;
                count = 0;
            }
            Some(false) => count = 0,
            None if starts == 0 && !first_has_content => {
                let code = line.trim_start_matches([' ', '\t', '\r', '\u{feff}']);
                first_has_content = !(code.is_empty() || code.starts_with('#') || code.starts_with('%'));
            }
            None => {}
        }
        count += line.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
        if count > limit {
            let document = (starts + usize::from(first_has_content)).saturating_sub(1);
            return Err(TooManyBrackets { document, line: index + 1, limit });
        }
    }
    Ok(())
}

/// Which limit a read ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    Documents,
    Nodes,
    ExpandedBytes,
    Depth,
}

impl Exceeded {
    /// Whether the read can go on with the next document: only a too-deep document is a
    /// problem of that document alone; the others exhaust the read.
    pub fn ends_the_read(self) -> bool {
        self != Exceeded::Depth
    }

    /// The problem in words, naming the setting.
    pub fn message(self, limits: &ApplyLimits) -> String {
        match self {
            Exceeded::Documents => format!(
                "more than {} documents; at most {} are allowed in one apply (apply.maxDocuments)",
                limits.max_documents, limits.max_documents
            ),
            Exceeded::Nodes => format!(
                "the documents expand to more than {} values, aliases counted as what they repeat; at most {} are allowed in one apply (apply.maxNodes)",
                limits.max_nodes, limits.max_nodes
            ),
            Exceeded::ExpandedBytes => format!(
                "the documents expand to more than {} bytes of text, aliases counted as what they repeat; at most {} are allowed in one apply (apply.maxExpandedBytes)",
                limits.max_expanded_bytes, limits.max_expanded_bytes
            ),
            Exceeded::Depth => format!(
                "lists and mappings nest deeper than {} levels; at most {} are allowed (apply.maxDepth)",
                limits.max_depth, limits.max_depth
            ),
        }
    }
}

/// What one read has spent of its [`ApplyLimits`]. One budget spans every file of an
/// apply, so that many files cannot multiply the limits.
#[derive(Debug)]
pub struct Budget<'l> {
    limits: &'l ApplyLimits,
    documents: usize,
    nodes: usize,
    bytes: usize,
    exceeded: Option<Exceeded>,
}

impl<'l> Budget<'l> {
    pub fn new(limits: &'l ApplyLimits) -> Self {
        Self { limits, documents: 0, nodes: 0, bytes: 0, exceeded: None }
    }

    pub fn limits(&self) -> &'l ApplyLimits {
        self.limits
    }

    /// Counts one more document.
    pub fn take_document(&mut self) -> Result<(), Exceeded> {
        self.documents += 1;
        if self.documents > self.limits.max_documents {
            return Err(Exceeded::Documents);
        }
        Ok(())
    }

    /// Reads one document into a value, counting what it expands to. An error that came
    /// from a limit is returned with it; any other is the parser's.
    pub fn read_value<'de, D>(&mut self, document: D) -> Result<Value, (D::Error, Option<Exceeded>)>
    where
        D: Deserializer<'de>,
    {
        self.exceeded = None;
        Counted { budget: self, depth: 0 }.deserialize(document).map_err(|e| (e, self.exceeded.take()))
    }

    fn spend<E: de::Error>(&mut self, text_bytes: usize) -> Result<(), E> {
        self.nodes += 1;
        self.bytes = self.bytes.saturating_add(text_bytes);
        if self.nodes > self.limits.max_nodes {
            return Err(self.exceed(Exceeded::Nodes));
        }
        if self.bytes > self.limits.max_expanded_bytes {
            return Err(self.exceed(Exceeded::ExpandedBytes));
        }
        Ok(())
    }

    fn exceed<E: de::Error>(&mut self, limit: Exceeded) -> E {
        self.exceeded = Some(limit);
        E::custom(limit.message(self.limits))
    }
}

/// Builds a [`Value`] as `yaml_serde`'s own `Deserialize` does, spending the budget for
/// every value as it is built, before anything is allocated for it.
struct Counted<'b, 'l> {
    budget: &'b mut Budget<'l>,
    /// Lists and mappings around this value.
    depth: usize,
}

impl<'l> Counted<'_, 'l> {
    fn child(&mut self) -> Counted<'_, 'l> {
        Counted { budget: &mut *self.budget, depth: self.depth + 1 }
    }

    fn collection<E: de::Error>(&mut self) -> Result<(), E> {
        if self.depth + 1 > self.budget.limits.max_depth {
            return Err(self.budget.exceed(Exceeded::Depth));
        }
        self.budget.spend(0)
    }
}

impl<'de> DeserializeSeed<'de> for Counted<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counted<'_, '_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.budget.spend(s.len())?;
        no_nul(s)?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.budget.spend(s.len())?;
        no_nul(&s)?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        self.collection()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.child())? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        self.collection()?;
        let mut mapping = Mapping::new();
        while let Some(key) = map.next_key_seed(self.child())? {
            if mapping.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate entry with key {}", key_text(&key))));
            }
            let value = map.next_value_seed(self.child())?;
            mapping.insert(key, value);
        }
        Ok(Value::Mapping(mapping))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        // A tagged node (`!tag value`): the tag is no value of its own.
        let (tag, contents) = data.variant_seed(TagSeed)?;
        let value = contents.newtype_variant_seed(self)?;
        Ok(Value::Tagged(Box::new(TaggedValue { tag, value })))
    }
}

/// Refuses a text (a value or a key) holding a NUL character (`"\0"`, `"\x00"` or
/// `"\u0000"` in YAML), which no database column of text can hold; like a repeated key,
/// it is told with its line.
fn no_nul<E: de::Error>(text: &str) -> Result<(), E> {
    if text.contains('\0') {
        return Err(E::custom("a text holds a NUL character (\\0); texts must not contain one"));
    }
    Ok(())
}

/// A mapping key as `yaml_serde` names it in its duplicate-key error.
fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => format!("{s:?}"),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => n.to_string(),
        Value::Null => "null".to_owned(),
        _ => "of another kind".to_owned(),
    }
}

/// The tag of a tagged node.
struct TagSeed;

impl<'de> DeserializeSeed<'de> for TagSeed {
    type Value = Tag;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Tag, D::Error> {
        deserializer.deserialize_string(self)
    }
}

impl Visitor<'_> for TagSeed {
    type Value = Tag;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a YAML tag")
    }

    fn visit_str<E: de::Error>(self, tag: &str) -> Result<Tag, E> {
        if tag.is_empty() {
            return Err(E::custom("empty YAML tag is not allowed"));
        }
        Ok(Tag::new(tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, limits: &ApplyLimits) -> Vec<Result<Value, Option<Exceeded>>> {
        let mut budget = Budget::new(limits);
        yaml_serde::Deserializer::from_str(text).map(|d| budget.read_value(d).map_err(|(_, limit)| limit)).collect()
    }

    #[test]
    fn values_are_read_as_yaml_serde_reads_them() {
        let text = "a: [1, -2, 2.5, x, true, null, ~]\nb: {c: !tagged {d: e}}\n'3': &x [f]\ng: *x\n";
        let ours = read(text, &ApplyLimits::default()).remove(0).unwrap();
        let theirs: Value = yaml_serde::from_str(text).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn aliases_count_as_what_they_repeat() {
        let list = vec!["x"; 100].join(", ");
        let text = format!("l: &l [{list}]\nbig: [{}]\n", vec!["*l"; 100].join(", "));
        let limits = ApplyLimits { max_nodes: 5_000, ..ApplyLimits::default() };
        assert_eq!(read(&text, &limits).remove(0), Err(Some(Exceeded::Nodes)));
        let text = format!("l: &l {}\nbig: [{}]\n", "x".repeat(10_000), vec!["*l"; 500].join(", "));
        let limits = ApplyLimits { max_body_bytes: 1024, max_expanded_bytes: 1_000_000, ..ApplyLimits::default() };
        assert_eq!(read(&text, &limits).remove(0), Err(Some(Exceeded::ExpandedBytes)));
    }

    #[test]
    fn nesting_is_refused_at_the_level_over_the_limit() {
        let limits = ApplyLimits { max_depth: 8, ..ApplyLimits::default() };
        let nested = |n: usize| format!("a: {}{}\n", "[".repeat(n), "]".repeat(n));
        assert!(read(&nested(7), &limits).remove(0).is_ok(), "the document and 7 lists are 8 levels");
        assert_eq!(read(&nested(8), &limits).remove(0), Err(Some(Exceeded::Depth)));
    }

    #[test]
    fn a_nul_character_in_a_text_or_a_key_is_refused_with_its_line() {
        for text in ["a: b\nreason: \"x\\0y\"\n", "a: b\nreason: \"x\\x00y\"\n", "a: b\n\"k\\u0000\": 1\n"] {
            let limits = ApplyLimits::default();
            let mut budget = Budget::new(&limits);
            let document = yaml_serde::Deserializer::from_str(text).next().unwrap();
            let (e, limit) = budget.read_value(document).unwrap_err();
            assert_eq!(limit, None, "{text}");
            assert!(e.to_string().contains("NUL"), "{text}: {e}");
            assert_eq!(e.location().map(|l| l.line()), Some(2), "{text}: {e}");
        }
    }

    #[test]
    fn brackets_are_counted_per_document_and_located() {
        assert_eq!(check_brackets("a: [[x]]\n---\nb: [[y]]\n", 2), Ok(()));
        assert_eq!(
            check_brackets("a: [[x]]\n--- [\nb: [[y]]\n", 2),
            Err(TooManyBrackets { document: 1, line: 3, limit: 2 })
        );
        // A comment before the first marker is no document; `---x` is no marker.
        assert_eq!(
            check_brackets("# c\n---\na: {}\n---x\nb: {}\n...\nc: {}\n", 1),
            Err(TooManyBrackets { document: 0, line: 5, limit: 1 })
        );
        assert_eq!(check_brackets("a: '[[[[[['\n", 5).unwrap_err().line, 1, "quoted text counts too");
    }

    #[test]
    fn the_defaults_are_valid_and_nonsense_is_named() {
        assert_eq!(ApplyLimits::default().validate(), Ok(()));
        let too_deep = ApplyLimits { max_depth: 101, ..ApplyLimits::default() };
        assert!(too_deep.validate().unwrap_err().contains("apply.maxDepth"));
        let small = ApplyLimits { max_expanded_bytes: 1024, ..ApplyLimits::default() };
        assert!(small.validate().unwrap_err().contains("apply.maxExpandedBytes"));
    }
}
