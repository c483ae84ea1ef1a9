//! Reading an OpenAPI document: JSON or YAML into one JSON value, the
//! version checked, every local `$ref` checked to point at something, and
//! the typed pieces the importer uses read through `oas3`'s types with
//! errors located by JSON pointer.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a document cannot be read: where (a JSON pointer, or a line and
/// column for syntax errors) and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    pub location: String,
    pub reason: String,
}

impl DocumentError {
    pub(crate) fn at(location: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { location: location.into(), reason: reason.into() }
    }
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

impl std::error::Error for DocumentError {}

/// Which OpenAPI line a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Version {
    #[serde(rename = "3.0")]
    V3_0,
    #[serde(rename = "3.1")]
    V3_1,
}

/// A parsed document whose local references all resolve.
pub(crate) struct Document {
    pub root: Value,
    pub version: Version,
    /// The `openapi` field as written.
    pub version_text: String,
    /// `$ref`s to other files or URLs (not followed): where they are.
    pub external_refs: Vec<String>,
}

/// Documents larger than this are refused before parsing.
pub const MAX_DOCUMENT_BYTES: usize = 64 << 20;
/// `$ref` chains longer than this are refused (a cycle of references).
const MAX_REF_HOPS: usize = 32;

impl Document {
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(DocumentError::at(
                "(document)",
                format!("{} bytes is more than the {} MiB this importer reads", bytes.len(), MAX_DOCUMENT_BYTES >> 20),
            ));
        }
        let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        let root: Value = if first == Some(&b'{') {
            serde_json::from_slice(bytes).map_err(|e| {
                DocumentError::at(format!("line {} column {}", e.line(), e.column()), format!("invalid JSON: {e}"))
            })?
        } else {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                DocumentError::at(format!("byte {}", e.valid_up_to()), "not UTF-8 text (YAML and JSON are UTF-8)")
            })?;
            yaml_serde::from_str(text).map_err(|e| {
                let at = match e.location() {
                    Some(l) => format!("line {} column {}", l.line(), l.column()),
                    None => "(document)".to_owned(),
                };
                DocumentError::at(at, format!("invalid YAML: {e}"))
            })?
        };
        let Value::Object(top) = &root else {
            return Err(DocumentError::at("/", "an OpenAPI document is a mapping (object) at the top"));
        };
        if let Some(v) = top.get("swagger") {
            return Err(DocumentError::at(
                "/swagger",
                format!(
                    "Swagger {} (OpenAPI 2.0) is not supported: convert it to OpenAPI 3 first (e.g. npm swagger2openapi)",
                    scalar_text(v)
                ),
            ));
        }
        let version_text = match top.get("openapi") {
            Some(Value::String(s)) => s.clone(),
            // `openapi: 3.0` unquoted in YAML is a number.
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Err(DocumentError::at("/openapi", "must be a version string such as \"3.1.0\"")),
            None => {
                return Err(DocumentError::at(
                    "/openapi",
                    "missing: not an OpenAPI document (no `openapi` version field)",
                ))
            }
        };
        let version = if version_text.starts_with("3.0") {
            Version::V3_0
        } else if version_text.starts_with("3.1") {
            Version::V3_1
        } else {
            return Err(DocumentError::at(
                "/openapi",
                format!("version {version_text:?} is not supported: OpenAPI 3.0.x and 3.1.x are"),
            ));
        };
        let external_refs = check_refs(&root)?;
        Ok(Self { root, version, version_text, external_refs })
    }

    /// The value at `pointer`, following `$ref`s (local ones) until a value
    /// that is not a reference; with the pointer it was found at.
    pub(crate) fn deref<'a>(&'a self, value: &'a Value, pointer: &str) -> Result<(&'a Value, String), DocumentError> {
        let mut v = value;
        let mut at = pointer.to_owned();
        for _ in 0..MAX_REF_HOPS {
            let Some(Value::String(r)) = v.get("$ref") else { return Ok((v, at)) };
            let Some(target) = local_pointer(r) else {
                return Err(DocumentError::at(
                    format!("{at}/$ref"),
                    format!("{r:?} refers to another document; only references inside this one (#/…) are followed"),
                ));
            };
            // check_refs made sure it resolves.
            v = self
                .root
                .pointer(&target)
                .ok_or_else(|| DocumentError::at(format!("{at}/$ref"), format!("{r:?} points at nothing")))?;
            at = target;
        }
        Err(DocumentError::at(
            format!("{pointer}/$ref"),
            format!("more than {MAX_REF_HOPS} references in a row (a cycle)"),
        ))
    }

    /// `value` (at `pointer`, references followed) read as `T`; a wrong
    /// type names the pointer of the offending member.
    pub(crate) fn typed<T: DeserializeOwned>(&self, value: &Value, pointer: &str) -> Result<T, DocumentError> {
        let (v, at) = self.deref(value, pointer)?;
        serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
            let mut loc = at.clone();
            for seg in e.path().iter() {
                use serde_path_to_error::Segment;
                match seg {
                    Segment::Seq { index } => loc.push_str(&format!("/{index}")),
                    Segment::Map { key } | Segment::Enum { variant: key } => {
                        loc.push('/');
                        loc.push_str(&escape_pointer(key));
                    }
                    Segment::Unknown => {}
                }
            }
            DocumentError::at(if loc.is_empty() { "/".to_owned() } else { loc }, e.into_inner().to_string())
        })
    }
}

/// `#/a/b` → `/a/b` (percent-decoded; `~0`/`~1` left for the pointer);
/// None for references to other documents.
fn local_pointer(r: &str) -> Option<String> {
    let frag = r.strip_prefix('#')?;
    Some(percent_decode(frag))
}

fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON pointer segment for `key` (RFC 6901).
pub(crate) fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Every `$ref` in the document: local ones must resolve (else the error
/// names where the reference is); the others are listed.
fn check_refs(root: &Value) -> Result<Vec<String>, DocumentError> {
    let mut external = Vec::new();
    let mut stack: Vec<(&Value, String)> = vec![(root, String::new())];
    while let Some((v, at)) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    match local_pointer(r) {
                        Some(p) if root.pointer(&p).is_none() => {
                            return Err(DocumentError::at(
                                format!("{at}/$ref"),
                                format!("dangling reference {r:?}: nothing in this document is at that pointer"),
                            ))
                        }
                        Some(_) => {}
                        None => external.push(format!("{at}/$ref")),
                    }
                }
                for (k, child) in map {
                    if matches!(child, Value::Object(_) | Value::Array(_)) {
                        stack.push((child, format!("{at}/{}", escape_pointer(k))));
                    }
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    if matches!(child, Value::Object(_) | Value::Array(_)) {
                        stack.push((child, format!("{at}/{i}")));
                    }
                }
            }
            _ => {}
        }
    }
    external.sort();
    Ok(external)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_read_alike_and_versions_are_checked() {
        let y = Document::parse(b"openapi: 3.1.0\ninfo: {title: t, version: '1'}\npaths:\n  /a:\n    get:\n      responses:\n        200: {description: ok}\n").unwrap();
        assert_eq!(y.version, Version::V3_1);
        // An integer YAML key reads as a string key.
        assert!(y.root.pointer("/paths/~1a/get/responses/200").is_some());
        let j = Document::parse(br#" {"openapi":"3.0.3","info":{"title":"t","version":"1"},"paths":{}}"#).unwrap();
        assert_eq!(j.version, Version::V3_0);
        let e = Document::parse(b"swagger: '2.0'\n").err().unwrap();
        assert!(e.reason.contains("Swagger 2.0") && e.location == "/swagger", "{e}");
        let e = Document::parse(b"openapi: 4.0.0\n").err().unwrap();
        assert_eq!(e.location, "/openapi");
        let e = Document::parse(b"info: {}\n").err().unwrap();
        assert!(e.reason.contains("not an OpenAPI document"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = Document::parse(b"openapi: 3.1.0\npaths:\n  /a: [unclosed\n").err().unwrap();
        assert!(e.location.starts_with("line "), "{e}");
        let e = Document::parse(b"{\"openapi\": \"3.1.0\",\n \"paths\": {,}}").err().unwrap();
        assert_eq!(e.location, "line 2 column 12", "{e}");
    }

    #[test]
    fn dangling_references_are_located_and_chains_followed() {
        let e = Document::parse(
            br##"{"openapi":"3.1.0","paths":{"/p":{"get":{"responses":{"200":{"$ref":"#/components/responses/Gone"}}}}}}"##,
        )
        .err()
        .unwrap();
        assert_eq!(e.location, "/paths/~1p/get/responses/200/$ref", "{e}");
        let d = Document::parse(
            br##"{"openapi":"3.1.0","components":{"securitySchemes":{"a":{"$ref":"#/components/securitySchemes/b"},
            "b":{"$ref":"#/components/x%20y"}},"x y":{"type":"http","scheme":"basic"}}, "y": {"$ref": "other.yaml#/z"}}"##,
        )
        .unwrap();
        let a = d.root.pointer("/components/securitySchemes/a").unwrap();
        let (v, at) = d.deref(a, "/components/securitySchemes/a").unwrap();
        assert_eq!(v["scheme"], "basic");
        assert_eq!(at, "/components/x y");
        assert_eq!(d.external_refs, vec!["/y/$ref".to_owned()]);
        let cyc = Document::parse(br##"{"openapi":"3.1.0","a":{"$ref":"#/b"},"b":{"$ref":"#/a"}}"##).unwrap();
        let e = cyc.deref(cyc.root.pointer("/a").unwrap(), "/a").err().unwrap();
        assert!(e.reason.contains("cycle"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_member() {
        let d = Document::parse(
            br#"{"openapi":"3.1.0","servers":[{"url":"https://a.test","variables":{"v":{"default":7}}}]}"#,
        )
        .unwrap();
        let e = d.typed::<Vec<oas3::spec::Server>>(&d.root["servers"], "/servers").err().unwrap();
        assert_eq!(e.location, "/servers/0/variables/v/default", "{e}");
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("/a%7Bb%7D"), "/a{b}");
        assert_eq!(percent_decode("/a%zz%"), "/a%zz%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
