//! Credential injection as pure functions: an auth method plus a credential
//! give [`Edits`]; edits are applied to request parts (headers, query, cookies)
//! and, for body placements, to a buffered body. No I/O here.
//!
//! Imports `integrations` (auth method shapes), `creds::Credential`, `secret` and the
//! leaf `h1` (field-name rules) only.

use base64::Engine as _;
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use zeroize::Zeroizing;

use crate::creds::Credential;
use crate::h1;
use crate::integrations::{AuthKind, AuthMethod, Part, Placement, Target, Template};
use crate::secret::SecretValue;

mod scrub;
pub use scrub::{StreamScrubber, MASK};

/// What to change in a request. `Debug` never shows values: header values
/// are marked sensitive (`Sensitive`), the others are [`SecretValue`]s.
#[derive(Debug, Default)]
pub struct Edits {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub query: Vec<(String, SecretValue)>,
    pub cookies: Vec<(String, SecretValue)>,
    pub json_fields: Vec<(String, SecretValue)>,
    pub form_fields: Vec<(String, SecretValue)>,
    /// A header name among `headers` has a `-` (so `_` lookalikes of it
    /// may be among the caller's fields).
    pub dashed_header: bool,
}

impl Edits {
    pub fn edits_body(&self) -> bool {
        !self.json_fields.is_empty() || !self.form_fields.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the credential cannot be placed in {0}: it contains characters that are not allowed there")]
    InvalidValue(&'static str),
    #[error("this connection places a credential in a JSON body field, but the request body is not a JSON object")]
    BodyNotJson,
    #[error("this connection places a credential in a form field, but the request body is not application/x-www-form-urlencoded")]
    BodyNotForm,
    #[error("the request URI cannot carry the credential query parameter")]
    BadUri,
}

fn render(t: &Template, cred: &Credential) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for part in t.parts() {
        match part {
            Part::Lit(s) => out.push_str(s),
            Part::Field(i) => out.push_str(cred.value(*i).expose()),
        }
    }
    out
}

/// A header value from pieces, built in place: one allocation, and no
/// intermediate copy of the secret to clean up.
fn header_from<'a>(pieces: impl Iterator<Item = &'a str> + Clone) -> Result<HeaderValue, InjectError> {
    let mut buf = bytes::BytesMut::with_capacity(pieces.clone().map(str::len).sum());
    for p in pieces {
        buf.extend_from_slice(p.as_bytes());
    }
    let mut v = HeaderValue::from_maybe_shared(buf.freeze()).map_err(|_| InjectError::InvalidValue("a header"))?;
    // Keeps it out of HPACK tables and marks it for any header dumper.
    v.set_sensitive(true);
    Ok(v)
}

fn sensitive(value: &str, place: &'static str) -> Result<HeaderValue, InjectError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| InjectError::InvalidValue(place))?;
    // Keeps it out of HPACK tables and marks it for any header dumper.
    v.set_sensitive(true);
    Ok(v)
}

/// The edits an auth method makes with a credential.
pub fn edits(method: &AuthMethod, cred: &Credential) -> Result<Edits, InjectError> {
    let mut e = Edits::default();
    match &method.kind {
        AuthKind::Bearer => {
            let v = header_from(["Bearer ", cred.value(0).expose()].into_iter())?;
            e.headers.push((AUTHORIZATION, v));
        }
        AuthKind::Basic => {
            let raw = Zeroizing::new(format!("{}:{}", cred.value(0).expose(), cred.value(1).expose()));
            let v =
                Zeroizing::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())));
            e.headers.push((AUTHORIZATION, sensitive(&v, "a header")?));
        }
        AuthKind::ApiKey(p) => place(&mut e, p, cred)?,
        AuthKind::OAuth2(o) => place(&mut e, &o.placement, cred)?,
        AuthKind::Custom(ps) => {
            // A placement that uses a left-out optional field is left out.
            let absent = |p: &&Placement| {
                p.template
                    .parts()
                    .iter()
                    .any(|part| matches!(part, Part::Field(i) if cred.value(*i).expose().is_empty()))
            };
            for p in ps.iter().filter(|p| !absent(p)) {
                place(&mut e, p, cred)?;
            }
        }
    }
    Ok(e)
}

fn place(e: &mut Edits, p: &Placement, cred: &Credential) -> Result<(), InjectError> {
    match &p.target {
        Target::Header(name) => {
            let pieces = p.template.parts().iter().map(|part| match part {
                Part::Lit(s) => s.as_str(),
                Part::Field(i) => cred.value(*i).expose(),
            });
            e.dashed_header |= name.as_str().as_bytes().contains(&b'-');
            e.headers.push((name.clone(), header_from(pieces)?));
        }
        Target::Query(name) => e.query.push((name.clone(), render(&p.template, cred).into())),
        Target::Cookie(name) => {
            let value = render(&p.template, cred);
            if value.bytes().any(|b| b == b';' || b == b',' || b <= b' ' || b == b'"' || b == b'\\' || b == 0x7f) {
                return Err(InjectError::InvalidValue("a cookie"));
            }
            e.cookies.push((name.clone(), value.into()));
        }
        Target::JsonField(name) => e.json_fields.push((name.clone(), render(&p.template, cred).into())),
        Target::FormField(name) => e.form_fields.push((name.clone(), render(&p.template, cred).into())),
    }
    Ok(())
}

/// The header edits of a credential alone: what a request without query,
/// cookie or body placements gets. Kept between a keep-alive caller's
/// requests and cloned into each (the values are shared, not copied).
#[derive(Debug, Default)]
pub struct HeaderEdits {
    headers: Vec<(HeaderName, HeaderValue)>,
    dashed_header: bool,
}

impl Edits {
    /// The header edits, taken out, if headers are all these edits change.
    pub fn take_header_only(&mut self) -> Option<HeaderEdits> {
        let header_only = self.query.is_empty() && self.cookies.is_empty() && !self.edits_body();
        header_only
            .then(|| HeaderEdits { headers: std::mem::take(&mut self.headers), dashed_header: self.dashed_header })
    }
}

impl HeaderEdits {
    /// Removes the caller's fields named like an injected one but for `_`
    /// for `-`, for a request whose injected fields are written by the
    /// upstream side from [`HeaderEdits::fields`] (which replace any field
    /// of their own names there).
    pub fn clear_lookalikes(&self, headers: &mut HeaderMap) {
        if self.dashed_header {
            remove_lookalikes(headers, &self.headers);
        }
    }

    /// The fields to set, in order.
    pub fn fields(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }
}

/// `X_Api_Key` beside an injected `X-Api-Key` is one field to a CGI-style
/// upstream: the caller's lookalike goes.
fn remove_lookalikes(headers: &mut HeaderMap, injected: &[(HeaderName, HeaderValue)]) {
    let alike: Vec<HeaderName> = headers
        .keys()
        .filter(|k| injected.iter().any(|(n, _)| h1::names_alike(k.as_str().as_bytes(), n.as_str().as_bytes())))
        .cloned()
        .collect();
    for name in alike {
        headers.remove(name);
    }
}

/// Applies header, query and cookie edits. A header the caller sent under the
/// same name (e.g. `Authorization`) is replaced, never duplicated.
/// The header edits are moved into `headers` (`e.headers` is left empty).
pub fn apply_head(uri: &mut Uri, headers: &mut HeaderMap, e: &mut Edits) -> Result<(), InjectError> {
    if e.dashed_header {
        remove_lookalikes(headers, &e.headers);
    }
    for (name, value) in e.headers.drain(..) {
        headers.insert(name, value);
    }
    if !e.query.is_empty() {
        *uri = with_query(uri, &e.query)?;
    }
    if !e.cookies.is_empty() {
        let mut pairs: Vec<String> = Vec::new();
        for v in headers.get_all(COOKIE) {
            let Ok(s) = v.to_str() else { continue };
            for pair in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
                if !e.cookies.iter().any(|(n, _)| n == name) {
                    pairs.push(pair.to_owned());
                }
            }
        }
        let mut out = Zeroizing::new(pairs.join("; "));
        for (n, v) in &e.cookies {
            if !out.is_empty() {
                out.push_str("; ");
            }
            out.push_str(n);
            out.push('=');
            out.push_str(v.expose());
        }
        headers.insert(COOKIE, sensitive(&out, "a cookie")?);
    }
    Ok(())
}

/// Replaces same-named query parameters, keeping the caller's other
/// parameters byte for byte.
fn with_query(uri: &Uri, params: &[(String, SecretValue)]) -> Result<Uri, InjectError> {
    let path = uri.path();
    let mut q = Zeroizing::new(String::new());
    if let Some(existing) = uri.query() {
        for seg in existing.split('&').filter(|s| !s.is_empty()) {
            let name = form_urlencoded::parse(seg.as_bytes()).next().map(|(n, _)| n.into_owned()).unwrap_or_default();
            if !params.iter().any(|(n, _)| *n == name) {
                if !q.is_empty() {
                    q.push('&');
                }
                q.push_str(seg);
            }
        }
    }
    for (n, v) in params {
        if !q.is_empty() {
            q.push('&');
        }
        q.extend(form_urlencoded::byte_serialize(n.as_bytes()));
        q.push('=');
        q.extend(form_urlencoded::byte_serialize(v.expose().as_bytes()));
    }
    let pq = Zeroizing::new(format!("{path}?{}", q.as_str()));
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq.as_str()).map_err(|_| InjectError::BadUri)?);
    Uri::from_parts(parts).map_err(|_| InjectError::BadUri)
}

/// Applies JSON / form body edits to a buffered body. Returns the new body and
/// the content type to set when the caller sent none (empty body).
pub fn apply_body(
    headers: &HeaderMap,
    body: &[u8],
    e: &Edits,
) -> Result<(Zeroizing<Vec<u8>>, Option<HeaderValue>), InjectError> {
    let ctype = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let mut out = Zeroizing::new(body.to_vec());
    let mut set_type = None;
    if !e.json_fields.is_empty() {
        let is_json =
            ctype.starts_with("application/json") || (ctype.starts_with("application/") && ctype.contains("+json"));
        let mut obj = if body.iter().all(u8::is_ascii_whitespace) && (ctype.is_empty() || is_json) {
            if ctype.is_empty() {
                set_type = Some(HeaderValue::from_static("application/json"));
            }
            serde_json::Map::new()
        } else if is_json {
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err(InjectError::BodyNotJson),
            }
        } else {
            return Err(InjectError::BodyNotJson);
        };
        for (n, v) in &e.json_fields {
            obj.insert(n.clone(), serde_json::Value::String(v.expose().to_owned()));
        }
        out = Zeroizing::new(serde_json::to_vec(&obj).map_err(|_| InjectError::BodyNotJson)?);
    }
    if !e.form_fields.is_empty() {
        let is_form = ctype.starts_with("application/x-www-form-urlencoded");
        if !(is_form || ctype.is_empty() && body.is_empty()) {
            return Err(InjectError::BodyNotForm);
        }
        if ctype.is_empty() {
            set_type = Some(HeaderValue::from_static("application/x-www-form-urlencoded"));
        }
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (n, v) in form_urlencoded::parse(&out) {
            if !e.form_fields.iter().any(|(f, _)| *f == n) {
                ser.append_pair(&n, &v);
            }
        }
        for (n, v) in &e.form_fields {
            ser.append_pair(n, v.expose());
        }
        out = Zeroizing::new(ser.finish().into_bytes());
    }
    Ok((out, set_type))
}

/// Shortest value scrubbed from response fields: shorter credential parts
/// (a two-letter account name) would take ordinary text with them.
const MIN_SCRUBBED: usize = 4;

/// What a connection injects, to take back out of response fields that
/// name a URL (an upstream that redirects with the request's query, or
/// echoes a header into a link): every credential value and every rendered
/// placement (with its template's literal text), and the Basic pair.
pub fn injected_values(method: &AuthMethod, cred: &Credential) -> Vec<Zeroizing<String>> {
    let mut out: Vec<Zeroizing<String>> = cred.values().iter().map(|v| Zeroizing::new(v.expose().to_owned())).collect();
    let placements: &[Placement] = match &method.kind {
        AuthKind::ApiKey(p) => std::slice::from_ref(p),
        AuthKind::OAuth2(o) => std::slice::from_ref(&o.placement),
        AuthKind::Custom(ps) => ps,
        AuthKind::Bearer | AuthKind::Basic => &[],
    };
    out.extend(placements.iter().map(|p| render(&p.template, cred)));
    if let AuthKind::Basic = method.kind {
        let raw = Zeroizing::new(format!("{}:{}", cred.value(0).expose(), cred.value(1).expose()));
        out.push(Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())));
    }
    out.retain(|v| v.len() >= MIN_SCRUBBED);
    // Longest first: a rendered `Token {key}` goes whole before `{key}` alone.
    out.sort_by_key(|v| std::cmp::Reverse(v.len()));
    out
}

/// Takes `secrets` out of the value of a field that names a URL
/// (`Location`, `Content-Location`, `Link`, `Refresh`). `None`: nothing to
/// take out. A query parameter whose (percent-decoded) name or value holds a
/// secret goes whole, with its separator (and the `?` when none is left);
/// any other occurrence, raw or percent-encoded, is cut out. If a secret
/// still shows once the result is percent-decoded, the value is given up:
/// `Some` of an empty value, and the field is dropped.
pub fn scrub_url_field(value: &[u8], secrets: &[Zeroizing<String>]) -> Option<Vec<u8>> {
    let holds = |b: &[u8]| secrets.iter().any(|s| memchr::memmem::find(b, s.as_bytes()).is_some());
    let decoded_holds = |b: &[u8]| holds(&percent_decode(b, false)) || holds(&percent_decode(b, true));
    if !holds(value) && !decoded_holds(value) {
        return None;
    }
    let mut out = drop_query_params(value, &|p: &[u8]| decoded_holds(p));
    for s in secrets {
        for form in encodings(s) {
            while let Some(at) = memchr::memmem::find(&out, form.as_bytes()) {
                out.drain(at..at + form.len());
            }
        }
    }
    if decoded_holds(&out) {
        out.clear();
    }
    Some(out)
}

/// A secret as it may appear in a URL: raw, form-encoded, percent-encoded
/// (upper- and lower-case hex).
fn encodings(s: &str) -> Vec<Zeroizing<String>> {
    let form = Zeroizing::new(form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>());
    let (mut upper, mut lower) = (Zeroizing::new(String::new()), Zeroizing::new(String::new()));
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            upper.push(b as char);
            lower.push(b as char);
        } else {
            upper.push_str(&format!("%{b:02X}"));
            lower.push_str(&format!("%{b:02x}"));
        }
    }
    let mut v: Vec<Zeroizing<String>> = Vec::with_capacity(4);
    for e in [Zeroizing::new(s.to_owned()), form, upper, lower] {
        if !v.iter().any(|x| x.as_str() == e.as_str()) {
            v.push(e);
        }
    }
    v
}

/// Percent-decodes (and with `plus`, reads `+` as a space).
fn percent_decode(b: &[u8], plus: bool) -> Zeroizing<Vec<u8>> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Zeroizing::new(Vec::with_capacity(b.len()));
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            (b'+', ..) if plus => out.push(b' '),
            (c, ..) => out.push(c),
        }
        i += 1;
    }
    out
}

/// Removes the query parameters `doomed` picks from every URL query in
/// `value` (a query runs from `?` to `#`, `>`, `<`, a quote or white space:
/// the ends of a URL inside `Link`'s `<…>` or `Refresh`'s `url=`).
fn drop_query_params(value: &[u8], doomed: &dyn Fn(&[u8]) -> bool) -> Vec<u8> {
    let ends = |c: u8| matches!(c, b'#' | b'>' | b'<' | b'"' | b'\'' | b' ' | b'\t');
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(q) = memchr::memchr(b'?', &value[i..]).map(|q| q + i) {
        out.extend_from_slice(&value[i..q]);
        let end = value[q + 1..].iter().position(|c| ends(*c)).map_or(value.len(), |e| e + q + 1);
        let kept: Vec<&[u8]> = value[q + 1..end].split(|c| *c == b'&').filter(|p| !doomed(p)).collect();
        if !kept.is_empty() {
            out.push(b'?');
            out.extend_from_slice(&kept.join(&b'&'));
        }
        i = end;
    }
    out.extend_from_slice(&value[i..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrations::Integration;
    use crate::secret::SecretValue;
    use std::collections::BTreeMap;

    fn method(toml_methods: &str) -> std::sync::Arc<AuthMethod> {
        let text = format!("id = \"t\"\nname = \"T\"\nallowed_hosts = [\"x.test\"]\n{toml_methods}");
        let i = Integration::from_toml_str("t.toml", &text, &BTreeMap::new()).unwrap();
        i.auth_methods[0].clone()
    }

    fn cred(m: &AuthMethod, pairs: &[(&str, &str)]) -> Credential {
        Credential::from_fields(m, pairs.iter().map(|(k, v)| (k.to_string(), SecretValue::from(*v))).collect()).unwrap()
    }

    fn run(m: &AuthMethod, c: &Credential, uri: &str, hdrs: &[(&str, &str)]) -> (Uri, HeaderMap) {
        let mut uri: Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        apply_head(&mut uri, &mut h, &mut edits(m, c).unwrap()).unwrap();
        (uri, h)
    }

    #[test]
    fn bearer_replaces_callers_authorization() {
        let m = method("[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n");
        let c = cred(&m, &[("token", "tkn")]);
        let (_, h) = run(&m, &c, "http://x.test/", &[("authorization", "Bearer caller"), ("authorization", "Basic x")]);
        let all: Vec<_> = h.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(all, ["Bearer tkn"]);
        assert!(all[0].is_sensitive());
    }

    #[test]
    fn basic() {
        let m = method("[[auth_methods]]\nid = \"b\"\ntype = \"basic\"\n");
        let c = cred(&m, &[("username", "aladdin"), ("password", "open sesame")]);
        let (_, h) = run(&m, &c, "http://x.test/", &[]);
        assert_eq!(h[AUTHORIZATION], "Basic YWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }

    #[test]
    fn api_key_header_query_cookie() {
        let m = method("[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"header\"\nname = \"X-Api-Key\"\ntemplate = \"Token {api_key}\"\n");
        let (_, h) = run(&m, &cred(&m, &[("api_key", "k1")]), "http://x.test/", &[("x-api-key", "caller")]);
        assert_eq!(h.get_all("x-api-key").iter().collect::<Vec<_>>(), ["Token k1"]);

        let m = method("[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"query\"\nname = \"api_key\"\n");
        let (u, _) = run(&m, &cred(&m, &[("api_key", "a b&c")]), "http://x.test/p?x=1&api_key=caller&y=%20", &[]);
        assert_eq!(u.to_string(), "http://x.test/p?x=1&y=%20&api_key=a+b%26c");
        let (u, _) = run(&m, &cred(&m, &[("api_key", "k")]), "http://x.test/p", &[]);
        assert_eq!(u.to_string(), "http://x.test/p?api_key=k");

        let m = method("[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"cookie\"\nname = \"sid\"\n");
        let (_, h) = run(
            &m,
            &cred(&m, &[("api_key", "k1")]),
            "http://x.test/",
            &[("cookie", "a=1; sid=caller"), ("cookie", "b=2")],
        );
        assert_eq!(h.get_all(COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2; sid=k1"]);
        let e = edits(&m, &cred(&m, &[("api_key", "x;y")])).unwrap_err();
        assert_eq!(e, InjectError::InvalidValue("a cookie"));
    }

    const CUSTOM: &str = "[[auth_methods]]\nid = \"c\"\ntype = \"custom\"\nfields = [\"account\", \"secret\"]\n\
        [[auth_methods.placements]]\nin = \"header\"\nname = \"X-Account\"\ntemplate = \"{account}\"\n\
        [[auth_methods.placements]]\nin = \"json\"\nname = \"api_secret\"\ntemplate = \"{secret}\"\n\
        [[auth_methods.placements]]\nin = \"form\"\nname = \"sig\"\ntemplate = \"{account}:{secret}\"\n";

    #[test]
    fn custom_json_and_form_bodies() {
        let m = method(CUSTOM);
        let c = cred(&m, &[("account", "acct-7"), ("secret", "s&=x")]);
        let e = edits(&m, &c).unwrap();
        assert!(e.edits_body());
        let dbg = format!("{e:?}");
        assert!(!dbg.contains("acct-7") && !dbg.contains("s&=x"), "{dbg}");
        assert!(dbg.contains("(\"x-account\", Sensitive)") && dbg.contains("(\"sig\", [redacted])"), "{dbg}");

        let mut only_json = edits(&m, &c).unwrap();
        only_json.form_fields.clear();
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        let (b, t) = apply_body(&h, br#"{"a":1,"api_secret":"caller"}"#, &only_json).unwrap();
        assert_eq!(&b[..], br#"{"a":1,"api_secret":"s&=x"}"#);
        assert!(t.is_none());
        let (b, t) = apply_body(&HeaderMap::new(), b"", &only_json).unwrap();
        assert_eq!(&b[..], br#"{"api_secret":"s&=x"}"#);
        assert_eq!(t.unwrap(), "application/json");
        assert_eq!(apply_body(&h, b"[1]", &only_json).unwrap_err(), InjectError::BodyNotJson);

        let mut only_form = edits(&m, &c).unwrap();
        only_form.json_fields.clear();
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, "application/x-www-form-urlencoded".parse().unwrap());
        let (b, _) = apply_body(&h, b"q=1&sig=caller", &only_form).unwrap();
        assert_eq!(&b[..], b"q=1&sig=acct-7%3As%26%3Dx");
        h.insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(apply_body(&h, b"x", &only_form).unwrap_err(), InjectError::BodyNotForm);
    }

    #[test]
    fn injected_values_come_back_out_of_url_fields() {
        let m = method("[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"header\"\nname = \"X-Api-Key\"\ntemplate = \"Token {api_key}\"\n");
        let secrets = injected_values(&m, &cred(&m, &[("api_key", "Key-91c7 x")]));
        assert_eq!(secrets.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["Token Key-91c7 x", "Key-91c7 x"]);
        let scrub = |v: &str| scrub_url_field(v.as_bytes(), &secrets).map(|b| String::from_utf8(b).unwrap());
        assert_eq!(scrub("/dir/?x=1"), None, "nothing injected in it");
        assert_eq!(scrub("/dir/?key=key-91C7%20x&x=1#f"), None, "secrets are case-sensitive");
        for (given, want) in [
            ("/dir/?x=1&key=Key-91c7%20x", "/dir/?x=1"),
            ("/dir/?key=Key-91c7+x&x=1", "/dir/?x=1"),
            ("/d?t=Token%20Key-91c7%20x", "/d"),
            ("/d?a=1&t=Token+Key%2D91c7+x&b=2", "/d?a=1&b=2"),
            (
                "</n?k=Key%2d91c7%20x>; rel=\"next\", </o?k=1>; rel=\"prev\"",
                "</n>; rel=\"next\", </o?k=1>; rel=\"prev\"",
            ),
            ("5; url=/r?u=Key-91c7%20x", "5; url=/r"),
            ("/Key-91c7 x/doc", "//doc"),
            ("/Key-91c7%20x/doc?q=1", "//doc?q=1"),
            ("/Key-91c7+x/doc", "//doc"),
            // Encoded some other way (an encoded letter): the field is given up.
            ("/%4Bey-91c7%20x/doc", ""),
        ] {
            assert_eq!(scrub(given).as_deref(), Some(want), "{given}");
        }
        // Basic: the base64 pair, and each part.
        let m = method("[[auth_methods]]\nid = \"b\"\ntype = \"basic\"\n");
        let secrets = injected_values(&m, &cred(&m, &[("username", "ab"), ("password", "open sesame")]));
        let forms: Vec<&str> = secrets.iter().map(|s| s.as_str()).collect();
        assert_eq!(forms, ["YWI6b3BlbiBzZXNhbWU=", "open sesame"], "the 2-letter user is too short to scrub");
    }
}
