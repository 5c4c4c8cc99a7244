//! Strict decoding, as the API server's strict field validation (what
//! `kubectl apply` asks for by default): a document with a repeated key,
//! or an object with a field its type does not have, is refused, never
//! read as a narrower or wider object than the one written. A typo such
//! as `form:` for `from:` would otherwise drop the rule's peers and admit
//! every source.
//!
//! Bounded too: a document nested deeper than [`MAX_DEPTH`] is refused
//! before it is parsed, as the YAML parser's work grows with nesting.
use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Deepest nesting of mappings and sequences a document may have. The
/// objects netpol reads nest about 10 deep; Kubernetes' own JSON decoder
/// stops at 10,000, its YAML one far earlier.
pub const MAX_DEPTH: usize = 64;

/// One document as a JSON value: every mapping key a string, given once;
/// nested at most [`MAX_DEPTH`] deep.
///
/// # Errors
/// The parser's error, or what is wrong: `duplicate key "spec" at
/// metadata`, a key that is not a string, nesting too deep.
pub fn document<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Seed {
        depth: 0,
        path: &mut String::new(),
    }
    .deserialize(d)
}

/// The deepest nesting of flow brackets (`{`, `[`) outside quotes and
/// comments: what a text nests at least, read without parsing it.
#[must_use]
pub fn flow_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            _ if comment => comment = c != '\n',
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some('\''), '\'') if chars.peek() == Some(&'\'') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') if prev.is_whitespace() => comment = true,
            (None, '{' | '[') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (None, '}' | ']') => depth = depth.saturating_sub(1),
            // The rest of a quote, and plain characters.
            _ => {}
        }
        prev = c;
    }
    deepest
}

/// Paths of the fields of `input` that `decoded` (the same object decoded
/// into its type and encoded again) lacks: fields the type does not have.
/// A field written as `null` is as good as absent.
#[must_use]
pub fn unknown_fields(input: &Value, decoded: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(input, decoded, &mut String::new(), &mut out);
    out
}

fn walk(input: &Value, decoded: &Value, path: &mut String, out: &mut Vec<String>) {
    match (input, decoded) {
        (Value::Object(i), Value::Object(d)) => {
            for (k, v) in i {
                if v.is_null() {
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match d.get(k) {
                    Some(dv) => walk(v, dv, path, out),
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(i), Value::Array(d)) => {
            for (n, (v, dv)) in i.iter().zip(d).enumerate() {
                let len = path.len();
                // Writing to a `String` cannot fail.
                let _ = write!(path, "[{n}]");
                walk(v, dv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

struct Seed<'p> {
    depth: usize,
    path: &'p mut String,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Seed<'_> {
    fn deeper<E: de::Error>(&mut self) -> Result<Seed<'_>, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "nested more than {MAX_DEPTH} deep at {}",
                at(self.path)
            )));
        }
        Ok(Seed {
            depth: self.depth + 1,
            path: self.path,
        })
    }
}

fn at(path: &str) -> &str {
    if path.is_empty() { "the top" } else { path }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        let len = self.path.len();
        loop {
            // Writing to a `String` cannot fail.
            let _ = write!(self.path, "[{}]", out.len());
            let next = seq.next_element_seed(self.deeper()?)?;
            self.path.truncate(len);
            match next {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let len = self.path.len();
        while let Some(key) = map.next_key_seed(Key)? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {key:?} at {}",
                    at(self.path)
                )));
            }
            if !self.path.is_empty() {
                self.path.push('.');
            }
            self.path.push_str(&key);
            let value = map.next_value_seed(self.deeper()?);
            self.path.truncate(len);
            out.insert(key, value?);
        }
        Ok(Value::Object(out))
    }
}

/// A mapping key: a string, as JSON (and so Kubernetes) has them.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for Key {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    // YAML reads `80:` or `true:` as a number or a boolean; JSON has only
    // string keys, and Kubernetes refuses the others.
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Err(E::custom(format_args!("key {v} is not a string")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Err(E::custom(format_args!("key {v} is not a string")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Err(E::custom(format_args!("key {v} is not a string")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Err(E::custom(format_args!("key {v} is not a string")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Err(E::custom("key null is not a string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Result<Value, String> {
        document(serde_yaml::Deserializer::from_str(text)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_repeated_key_is_refused_with_where_it_is() {
        let e = yaml("spec:\n  ingress: []\n  ingress: [{}]\n").expect_err("duplicate");
        assert!(e.contains("duplicate key \"ingress\" at spec"), "{e}");
        let e = yaml("spec: {}\nspec: {}\n").expect_err("duplicate");
        assert!(e.contains("duplicate key \"spec\" at the top"), "{e}");
        let e = document(&mut serde_json::Deserializer::from_str(
            r#"{"a": 1, "a": 2}"#,
        ))
        .expect_err("json duplicate");
        assert!(e.to_string().contains("duplicate key \"a\""), "{e}");
        assert_eq!(
            yaml("a: {b: [1, {c: x}]}\n").expect("fine"),
            serde_json::json!({"a": {"b": [1, {"c": "x"}]}})
        );
    }

    #[test]
    fn keys_must_be_strings() {
        let e = yaml("labels: {80: x}\n").expect_err("number key");
        assert!(e.contains("key 80 is not a string"), "{e}");
        assert!(yaml("labels: {\"80\": x}\n").is_ok());
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let e = yaml(&deep).expect_err("too deep");
        assert!(e.contains("nested more than 64 deep"), "{e}");
        let fine = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(yaml(&fine).is_ok());
        assert_eq!(flow_depth(&deep), MAX_DEPTH + 1);
        assert_eq!(flow_depth("a: '[[[' # [[[\nb: \"{{\\\"\" \nc: [{}]"), 2);
    }

    #[test]
    fn fields_the_type_lacks_are_named_by_path() {
        let input = serde_json::json!({
            "spec": {"ingress": [{"form": [{}], "ports": [{"port": 80}]}], "podSelector": {}},
            "metadata": {"name": "p", "creationTimestamp": null},
        });
        let decoded = serde_json::json!({
            "spec": {"ingress": [{"ports": [{"port": 80}]}], "podSelector": {}},
            "metadata": {"name": "p"},
        });
        assert_eq!(
            unknown_fields(&input, &decoded),
            vec!["spec.ingress[0].form"]
        );
        assert!(unknown_fields(&decoded, &decoded).is_empty());
    }
}
