//! OpenAPI 3.0 and 3.1 documents turned into integration files.
//!
//! An integration is what credproxy enforces — the hosts a credential may
//! go to, the auth methods, where each puts its credential — so an import
//! never guesses: it writes what the document states (`servers`,
//! `components.securitySchemes`, the operations' security requirements)
//! and lists in its [`Report`] everything it did not turn into
//! configuration and why. The file is checked exactly as `check-config`
//! checks it before it is offered.
//!
//! Parsing: the document is read as one JSON value (JSON or YAML via
//! `yaml_serde`), every local `$ref` is checked, and the pieces used —
//! servers and security schemes — are read through the `oas3` crate's
//! types (maintained, OpenAPI 3.1; `openapiv3` reads 3.0 only). The whole
//! document is not deserialized into `oas3::Spec`: its schema types follow
//! 3.1's JSON Schema, and 3.0 documents (`nullable`, boolean
//! `exclusiveMinimum`) would be refused for parts an integration never uses.

mod document;
mod servers;

use std::collections::{BTreeMap, BTreeSet};

use oas3::spec::{Flows, SecurityScheme, Server};
use serde::Serialize;
use serde_json::Value;

use document::{escape_pointer, Document};
pub use document::{DocumentError, Version, MAX_DOCUMENT_BYTES};

/// What the caller adds to the document.
#[derive(Debug, Default, Clone)]
pub struct ImportOptions {
    /// The integration id (default: from `info.title`).
    pub id: Option<String>,
    /// Where relative server URLs (and a document without `servers`) point.
    pub base_url: Option<String>,
    /// OpenID Connect discovery documents the caller fetched, by the
    /// `openIdConnectUrl` they came from.
    pub discovery: BTreeMap<String, Discovery>,
    /// Leave `[test]` out even when a safe request exists.
    pub no_test: bool,
}

/// The parts of an OpenID Connect discovery document an auth method uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Discovery {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
}

/// An import: the integration file (when the document yields one) and the
/// report.
#[derive(Debug)]
pub struct Import {
    pub file: Option<String>,
    pub report: Report,
}

/// What an import did, and what it did not and why.
#[derive(Debug, Serialize)]
pub struct Report {
    pub integration_id: String,
    pub name: String,
    /// The `openapi` field as written.
    pub openapi: String,
    pub version: Version,
    pub base_url: Option<String>,
    pub upstream_scheme: Option<&'static str>,
    pub allowed_hosts: Vec<String>,
    pub auth_methods: Vec<MethodReport>,
    /// Environment variables the file refers to (OAuth2 client ids and
    /// secrets are never written into it).
    pub needs_env: Vec<String>,
    pub operations: Operations,
    pub test: Option<TestPick>,
    /// `openIdConnect` discovery URLs the document names.
    pub openid_connect_urls: Vec<String>,
    /// Everything in the document not turned into configuration.
    pub not_imported: Vec<Skipped>,
    /// Notes on choices made (a wildcard host, a default variable value).
    pub notes: Vec<String>,
    /// References to other documents (not followed), by where they are.
    pub external_refs: Vec<String>,
    /// Set when no file is written: why.
    pub no_file_because: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The JSON pointer of the security scheme it came from.
    pub from: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    /// A JSON pointer into the document.
    pub at: String,
    pub what: String,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Operations {
    pub total: usize,
    /// Operations per first tag (`(untagged)` for none).
    pub by_tag: BTreeMap<String, usize>,
    /// Operations that accept each security scheme.
    pub by_security: BTreeMap<String, usize>,
    /// Operations that need no authentication (`security: []` or `{}`).
    pub public: usize,
    /// Operations whose requirement names no declared scheme.
    pub undeclared_security: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestPick {
    pub method: &'static str,
    pub path: String,
    pub operation_id: Option<String>,
}

/// An auth method about to be written.
struct Method {
    id: String,
    report: MethodReport,
    toml: String,
}

/// Imports `bytes` (an OpenAPI 3.0/3.1 document, JSON or YAML). `Err` for
/// a document that cannot be read (syntax, version, a dangling `$ref`, a
/// member of the wrong type), naming the location; `Ok` with `file: None`
/// when it reads but states no usable hosts or auth methods (the report
/// says why).
pub fn import(source_name: &str, bytes: &[u8], opts: &ImportOptions) -> Result<Import, DocumentError> {
    let doc = Document::parse(bytes)?;
    let root = &doc.root;
    let title = match root.pointer("/info/title") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(clean(s, 80)),
        _ => None,
    };
    let id = match &opts.id {
        Some(id) => {
            if !crate::integrations::is_slug(id) {
                return Err(DocumentError::at("(--id)", "must be 1-64 characters of [a-z0-9_-]"));
            }
            id.clone()
        }
        None => title.as_deref().map(slug).filter(|s| !s.is_empty()).unwrap_or_else(|| "imported".to_owned()),
    };
    let mut report = Report {
        integration_id: id.clone(),
        name: title.clone().unwrap_or_else(|| id.clone()),
        openapi: doc.version_text.clone(),
        version: doc.version,
        base_url: None,
        upstream_scheme: None,
        allowed_hosts: Vec::new(),
        auth_methods: Vec::new(),
        needs_env: Vec::new(),
        operations: Operations::default(),
        test: None,
        openid_connect_urls: Vec::new(),
        not_imported: Vec::new(),
        notes: Vec::new(),
        external_refs: doc.external_refs.clone(),
        no_file_because: None,
    };

    // Servers: the document's, each path's and each operation's.
    let mut all_servers: Vec<(String, Server)> = Vec::new();
    let top: Vec<Server> = match root.get("servers") {
        Some(v) => doc.typed(v, "/servers")?,
        None => Vec::new(),
    };
    let top_declared = !top.is_empty();
    for (i, s) in top.into_iter().enumerate() {
        all_servers.push((format!("/servers/{i}"), s));
    }

    // Operations (and their servers).
    let schemes_value = root.pointer("/components/securitySchemes");
    let declared: BTreeSet<String> = match schemes_value {
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        Some(_) => return Err(DocumentError::at("/components/securitySchemes", "must be a mapping of schemes")),
        None => BTreeSet::new(),
    };
    let ops = operations::walk(&doc, &declared, &mut all_servers)?;
    report.operations = ops.summary;

    let hosts = servers::resolve(&all_servers, top_declared, opts.base_url.as_deref(), &mut report)?;

    // Security schemes → auth methods.
    let mut methods: Vec<Method> = Vec::new();
    if let Some(Value::Object(schemes)) = schemes_value {
        for (name, value) in schemes {
            let at = format!("/components/securitySchemes/{}", escape_pointer(name));
            scheme_methods(&doc, name, value, &at, &id, &ops.scopes, opts, &mut methods, &mut report)?;
        }
    }
    report.auth_methods = methods.iter().map(|m| m.report.clone()).collect();
    report.needs_env.sort();
    report.needs_env.dedup();

    let usable: BTreeSet<&str> = methods.iter().map(|m| m.report.from.as_str()).collect();
    if !opts.no_test {
        report.test = ops
            .test_candidates
            .iter()
            .filter(|c| {
                c.schemes.is_empty()
                    || c.schemes
                        .iter()
                        .any(|s| usable.contains(format!("/components/securitySchemes/{}", escape_pointer(s)).as_str()))
            })
            .min_by_key(|c| c.rank())
            .map(|c| TestPick { method: "GET", path: c.path.clone(), operation_id: c.operation_id.clone() });
    }

    let why = if hosts.is_none() {
        Some("no server URL gives a host to allow (see not_imported)".to_owned())
    } else if methods.is_empty() {
        Some(if declared.is_empty() {
            "the document declares no components.securitySchemes: how it authenticates is not stated in a form \
             credproxy can use (often prose or an ordinary parameter); write the auth method by hand"
                .to_owned()
        } else {
            "none of the document's security schemes can be used by credproxy (see not_imported)".to_owned()
        })
    } else {
        None
    };
    if let Some(why) = why {
        report.no_file_because = Some(why);
        return Ok(Import { file: None, report });
    }
    let file = render(source_name, &report, &methods);
    // The file must pass what check-config checks (the environment
    // variables it names set to placeholders).
    let env: BTreeMap<String, String> =
        report.needs_env.iter().map(|k| (k.clone(), "placeholder".to_owned())).collect();
    if let Err(e) = crate::integrations::Integration::from_toml_str(&format!("{id}.toml"), &file, &env) {
        report.no_file_because = Some(format!("the integration file it would write is refused: {e}"));
        return Ok(Import { file: None, report });
    }
    Ok(Import { file: Some(file), report })
}

/// The `openIdConnectUrl`s of a document's security schemes (what a caller
/// may fetch and pass back as [`ImportOptions::discovery`]).
pub fn openid_connect_urls(bytes: &[u8]) -> Result<Vec<String>, DocumentError> {
    let doc = Document::parse(bytes)?;
    let mut out = Vec::new();
    if let Some(Value::Object(schemes)) = doc.root.pointer("/components/securitySchemes") {
        for (name, v) in schemes {
            let at = format!("/components/securitySchemes/{}", escape_pointer(name));
            let (v, _) = doc.deref(v, &at)?;
            if v.get("type").and_then(Value::as_str) == Some("openIdConnect") {
                if let Some(u) = v.get("openIdConnectUrl").and_then(Value::as_str) {
                    out.push(u.to_owned());
                }
            }
        }
    }
    Ok(out)
}

const KNOWN_TYPES: [&str; 5] = ["apiKey", "http", "oauth2", "openIdConnect", "mutualTLS"];

#[allow(clippy::too_many_arguments)]
fn scheme_methods(
    doc: &Document,
    name: &str,
    value: &Value,
    at: &str,
    integration: &str,
    scopes: &BTreeMap<String, BTreeSet<String>>,
    opts: &ImportOptions,
    methods: &mut Vec<Method>,
    report: &mut Report,
) -> Result<(), DocumentError> {
    let skip = |report: &mut Report, what: String, reason: String| {
        report.not_imported.push(Skipped { at: at.to_owned(), what, reason });
    };
    let (resolved, _) = doc.deref(value, at)?;
    match resolved.get("type") {
        Some(Value::String(t)) if KNOWN_TYPES.contains(&t.as_str()) => {}
        Some(Value::String(t)) => {
            skip(report, format!("security scheme {name:?}"), format!("type {t:?} is not an OpenAPI 3 scheme type"));
            return Ok(());
        }
        _ => return Err(DocumentError::at(format!("{at}/type"), "missing or not a string")),
    }
    // Relative OAuth2 URLs resolve against the server URL (OpenAPI 3.1.1).
    let mut owned = resolved.clone();
    if let Some(Value::Object(flows)) = owned.get_mut("flows") {
        for (flow, f) in flows.iter_mut() {
            let Value::Object(f) = f else { continue };
            for key in ["authorizationUrl", "tokenUrl", "refreshUrl"] {
                let Some(Value::String(u)) = f.get_mut(key) else { continue };
                if u.contains("://") {
                    continue;
                }
                let joined = report
                    .base_url
                    .as_deref()
                    .and_then(|b| url::Url::parse(&format!("{b}/")).ok())
                    .and_then(|b| b.join(u).ok());
                match joined {
                    Some(j) => {
                        report.notes.push(format!("{at}: {flow}.{key} {u:?} is relative; resolved to {j}"));
                        *u = j.to_string();
                    }
                    None => {
                        skip(
                            report,
                            format!("security scheme {name:?}"),
                            format!("{flow}.{key} {u:?} is relative and there is no server URL to resolve it against"),
                        );
                        return Ok(());
                    }
                }
            }
        }
    }
    let scheme: SecurityScheme = doc.typed(&owned, at)?;
    let used: Vec<String> = scopes.get(name).map(|s| s.iter().cloned().collect()).unwrap_or_default();
    let base_id = unique_id(&slug_id(name), methods);
    let describe = |d: &Option<String>| d.as_deref().map(|d| clean(d, 500)).filter(|d| !d.is_empty());
    let push = |methods: &mut Vec<Method>, id: String, kind: &'static str, scopes: Vec<String>, toml: String| {
        methods.push(Method { id: id.clone(), report: MethodReport { id, kind, from: at.to_owned(), scopes }, toml });
    };
    match scheme {
        SecurityScheme::ApiKey { description, name: key, location } => {
            let sigv4 = resolved
                .get("x-amazon-apigateway-authtype")
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("awsSigv4"))
                || description.as_deref().is_some_and(|d| d.contains("Signature") && d.contains("v4"));
            if sigv4 {
                skip(
                    report,
                    format!("security scheme {name:?}"),
                    "AWS Signature Version 4 signs each request; a stored static key cannot".into(),
                );
                return Ok(());
            }
            let place = location.to_ascii_lowercase();
            if !matches!(place.as_str(), "header" | "query" | "cookie") {
                skip(
                    report,
                    format!("security scheme {name:?}"),
                    format!("apiKey in {location:?} (header, query or cookie are)"),
                );
                return Ok(());
            }
            if let Some(reason) = crate::integrations::api_key_name_error(&place, &key) {
                skip(report, format!("security scheme {name:?}"), format!("apiKey name {key:?}: {reason}"));
                return Ok(());
            }
            let mut t = format!("type = \"api_key\"\nin = \"{place}\"\nname = {}\n", lit(&key));
            t.push_str(&form_block(
                "api_key",
                Some(&format!("API key ({key} {place})")),
                describe(&description).as_deref(),
            ));
            push(methods, base_id, "api_key", Vec::new(), t);
        }
        SecurityScheme::Http { description, scheme, .. } => match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let t =
                    format!("type = \"basic\"\n{}", form_block("username", None, describe(&description).as_deref()));
                push(methods, base_id, "basic", Vec::new(), t);
            }
            "bearer" => {
                let t = format!("type = \"bearer\"\n{}", form_block("token", None, describe(&description).as_deref()));
                push(methods, base_id, "bearer", Vec::new(), t);
            }
            other => skip(
                report,
                format!("security scheme {name:?}"),
                format!("HTTP authentication scheme {other:?} is not supported (basic and bearer are)"),
            ),
        },
        SecurityScheme::OAuth2 { flows, .. } => {
            let Flows { implicit, password, client_credentials, authorization_code, .. } = flows;
            if implicit.is_some() {
                skip(
                    report,
                    format!("{name:?} implicit flow"),
                    "the implicit flow is not supported (no refresh, token in the URL)".into(),
                );
            }
            if password.is_some() {
                skip(
                    report,
                    format!("{name:?} password flow"),
                    "the resource owner password flow is not supported".into(),
                );
            }
            // Endpoints an integration file could not hold (a scheme other
            // than http(s), one `http` cannot parse) are reported here, not
            // left for the written file to fail on (the `openapi_import`
            // fuzz target's oracle).
            let usable = |report: &mut Report, flow: &str, urls: &[&str]| {
                let bad =
                    urls.iter().find_map(|u| crate::integrations::oauth_url(u).err().map(|e| format!("{u:?}: {e}")));
                bad.map(|why| skip(report, format!("{name:?} {flow} flow"), why)).is_none()
            };
            let authorization_code = authorization_code
                .filter(|f| usable(report, "authorizationCode", &[f.authorization_url.as_str(), f.token_url.as_str()]));
            let client_credentials =
                client_credentials.filter(|f| usable(report, "clientCredentials", &[f.token_url.as_str()]));
            let both = authorization_code.is_some() && client_credentials.is_some();
            if let Some(f) = authorization_code {
                let id = base_id.clone();
                let (t, env) = oauth2_block(
                    integration,
                    &id,
                    "authorization_code",
                    Some(f.authorization_url.as_str()),
                    f.token_url.as_str(),
                    None,
                    &used,
                );
                report.needs_env.extend(env);
                if f.refresh_url.as_ref().is_some_and(|r| r != &f.token_url) {
                    report.notes.push(format!(
                        "{name:?}: refreshUrl differs from tokenUrl; credproxy refreshes at the token URL"
                    ));
                }
                push(methods, id, "oauth2", used.clone(), t);
            }
            if let Some(f) = client_credentials {
                let id = if both { unique_id(&format!("{base_id}_client"), methods) } else { base_id.clone() };
                let (t, env) =
                    oauth2_block(integration, &id, "client_credentials", None, f.token_url.as_str(), None, &used);
                report.needs_env.extend(env);
                push(methods, id, "oauth2", used.clone(), t);
            }
        }
        SecurityScheme::OpenIdConnect { open_id_connect_url, .. } => {
            report.openid_connect_urls.push(open_id_connect_url.clone());
            match opts.discovery.get(&open_id_connect_url) {
                Some(d) => {
                    let mut s = vec!["openid".to_owned()];
                    s.extend(used.iter().filter(|x| *x != "openid").cloned());
                    let (t, env) = oauth2_block(
                        integration,
                        &base_id,
                        "authorization_code",
                        Some(&d.authorization_endpoint),
                        &d.token_endpoint,
                        d.revocation_endpoint.as_deref(),
                        &s,
                    );
                    report.needs_env.extend(env);
                    report.notes.push(format!("{name:?}: configured from OpenID Connect discovery at {open_id_connect_url}"));
                    push(methods, base_id, "oauth2", s, t);
                }
                None => skip(
                    report,
                    format!("security scheme {name:?}"),
                    format!(
                        "openIdConnect: discovery at {open_id_connect_url} was not fetched (pass --fetch-discovery to the CLI)"
                    ),
                ),
            }
        }
        SecurityScheme::MutualTls { .. } => skip(
            report,
            format!("security scheme {name:?}"),
            "mutualTLS: client certificates are not a credential credproxy injects".into(),
        ),
    }
    Ok(())
}

/// `[auth_methods.form.<field>]` with a label and description, if any.
fn form_block(field: &str, label: Option<&str>, description: Option<&str>) -> String {
    if label.is_none() && description.is_none() {
        return String::new();
    }
    let mut t = format!("\n[auth_methods.form.{field}]\n");
    if let Some(l) = label {
        t.push_str(&format!("label = {}\n", lit(&clean(l, 80))));
    }
    if let Some(d) = description {
        t.push_str(&format!("description = {}\n", lit(d)));
    }
    t
}

/// `[auth_methods.oauth2]`, and the environment variables it names.
fn oauth2_block(
    integration: &str,
    method: &str,
    grant: &str,
    authorize: Option<&str>,
    token: &str,
    revocation: Option<&str>,
    scopes: &[String],
) -> (String, Vec<String>) {
    let env = |what: &str| format!("{}_{}_{what}", integration, method).to_ascii_uppercase().replace('-', "_");
    let (cid, secret) = (env("CLIENT_ID"), env("CLIENT_SECRET"));
    let mut t = format!("type = \"oauth2\"\n\n[auth_methods.oauth2]\ngrant = \"{grant}\"\n");
    if let Some(a) = authorize {
        t.push_str(&format!("authorize_url = {}\n", lit(a)));
    }
    t.push_str(&format!("token_url = {}\n", lit(token)));
    if let Some(r) = revocation {
        t.push_str(&format!("revocation_url = {}\n", lit(r)));
    }
    let scopes: Vec<String> = scopes.iter().map(|s| lit(s)).collect();
    t.push_str(&format!("scopes = [{}]\n", scopes.join(", ")));
    t.push_str(&format!("client_id = \"${{{cid}}}\"\nclient_secret = \"${{{secret}}}\"\n"));
    (t, vec![cid, secret])
}

fn render(source: &str, r: &Report, methods: &[Method]) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "# Imported by `credproxy integrations import` from {} (OpenAPI {}).\n",
        comment(source),
        comment(&r.openapi)
    ));
    t.push_str("# Review the hosts and auth methods before use: credentials go only to allowed_hosts.\n");
    for n in &r.notes {
        t.push_str(&format!("# Note: {}\n", comment(n)));
    }
    for s in &r.not_imported {
        t.push_str(&format!("# Not imported: {} at {}: {}\n", comment(&s.what), comment(&s.at), comment(&s.reason)));
    }
    t.push_str(&format!("id = {}\nname = {}\n", lit(&r.integration_id), lit(&r.name)));
    let hosts: Vec<String> = r.allowed_hosts.iter().map(|h| lit(h)).collect();
    t.push_str(&format!("allowed_hosts = [{}]\n", hosts.join(", ")));
    if let Some(s) = r.upstream_scheme {
        t.push_str(&format!("upstream_scheme = \"{s}\"\n"));
    }
    if let Some(b) = &r.base_url {
        t.push_str(&format!("base_url = {}\n", lit(b)));
    }
    for m in methods {
        t.push_str(&format!(
            "\n# From {}.\n[[auth_methods]]\nid = {}\n{}",
            comment(&m.report.from),
            lit(&m.id),
            m.toml
        ));
    }
    if let Some(test) = &r.test {
        t.push_str(&format!("\n[test]\nmethod = \"{}\"\npath = {}\n", test.method, lit(&test.path)));
    }
    t
}

/// A TOML string of `s`, with `$` doubled (strings in integration files
/// substitute `${VAR}`).
fn lit(s: &str) -> String {
    crate::integrations::toml_basic_string(&s.replace('$', "$$"))
}

/// `s` on one comment line.
fn comment(s: &str) -> String {
    clean(s, 300)
}

/// Whitespace collapsed, control characters dropped, at most `max`
/// characters (an ellipsis marks a cut).
fn clean(s: &str, max: usize) -> String {
    let words: Vec<&str> = s.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()).collect();
    let joined = words.join(" ");
    if joined.chars().count() <= max {
        return joined;
    }
    let mut out: String = joined.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// A title as an id: lower-case letters and digits, `-` between words.
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let mut out: String = out.trim_end_matches('-').chars().take(64).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// A scheme name as a method id (`[a-z0-9_-]`).
fn slug_id(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '_' })
        .take(56)
        .collect();
    if out.is_empty() || out.chars().all(|c| c == '_') {
        "auth".to_owned()
    } else {
        out
    }
}

fn unique_id(base: &str, methods: &[Method]) -> String {
    let mut id = base.to_owned();
    let mut n = 2;
    while methods.iter().any(|m| m.id == id) {
        id = format!("{base}_{n}");
        n += 1;
    }
    id
}

mod operations {
    //! The operations: counted per tag and security scheme, their servers
    //! collected, the scopes each scheme is asked for, and the GETs a
    //! `[test]` could use.

    use std::collections::{BTreeMap, BTreeSet};

    use oas3::spec::Server;
    use serde_json::Value;

    use super::document::{escape_pointer, Document, DocumentError};
    use super::Operations;

    pub(super) struct Walk {
        pub summary: Operations,
        /// Scopes the operations require, per scheme name.
        pub scopes: BTreeMap<String, BTreeSet<String>>,
        pub test_candidates: Vec<Candidate>,
    }

    pub(super) struct Candidate {
        pub path: String,
        pub operation_id: Option<String>,
        /// The schemes any of which the operation accepts (empty: public).
        pub schemes: Vec<String>,
    }

    impl Candidate {
        /// Lower is better: one that needs a credential (a test should
        /// check it), a "who am I" style path, fewer segments, shorter,
        /// then by name.
        pub fn rank(&self) -> (bool, u8, usize, usize, String) {
            let p = self.path.to_ascii_lowercase();
            let words = ["/me", "/user", "/self", "/account", "/whoami", "/profile", "/ping", "/status"];
            let hint = if words.iter().any(|w| p.ends_with(w) || p.contains(&format!("{w}/"))) { 0 } else { 1 };
            (self.schemes.is_empty(), hint, p.matches('/').count(), p.len(), p)
        }
    }

    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

    pub(super) fn walk(
        doc: &Document,
        declared: &BTreeSet<String>,
        servers: &mut Vec<(String, Server)>,
    ) -> Result<Walk, DocumentError> {
        let mut w = Walk { summary: Operations::default(), scopes: BTreeMap::new(), test_candidates: Vec::new() };
        let top_security = doc.root.get("security");
        let paths = match doc.root.get("paths") {
            None => return Ok(w),
            Some(Value::Object(p)) => p,
            Some(_) => return Err(DocumentError::at("/paths", "must be a mapping of paths")),
        };
        for (path, item) in paths {
            if path.starts_with("x-") {
                continue; // a specification extension, not a path
            }
            let item_at = format!("/paths/{}", escape_pointer(path));
            let (item, item_at) = doc.deref(item, &item_at)?;
            let Value::Object(item_map) = item else {
                return Err(DocumentError::at(item_at, "a path item must be a mapping"));
            };
            if let Some(v) = item_map.get("servers") {
                let s: Vec<Server> = doc.typed(v, &format!("{item_at}/servers"))?;
                servers.extend(s.into_iter().enumerate().map(|(i, s)| (format!("{item_at}/servers/{i}"), s)));
            }
            let shared_params = item_map.get("parameters");
            for m in METHODS {
                let Some(op) = item_map.get(m) else { continue };
                let op_at = format!("{item_at}/{m}");
                let (op, op_at) = doc.deref(op, &op_at)?;
                let Value::Object(op_map) = op else {
                    return Err(DocumentError::at(op_at, "an operation must be a mapping"));
                };
                w.summary.total += 1;
                let tag = match op_map.get("tags") {
                    Some(Value::Array(t)) => t.first().and_then(Value::as_str).unwrap_or("(untagged)"),
                    _ => "(untagged)",
                };
                *w.summary.by_tag.entry(tag.to_owned()).or_default() += 1;
                if let Some(v) = op_map.get("servers") {
                    let s: Vec<Server> = doc.typed(v, &format!("{op_at}/servers"))?;
                    servers.extend(s.into_iter().enumerate().map(|(i, s)| (format!("{op_at}/servers/{i}"), s)));
                }
                let (security, sec_at) = match op_map.get("security") {
                    Some(s) => (Some(s), format!("{op_at}/security")),
                    None => (top_security, "/security".to_owned()),
                };
                let mut schemes = Vec::new();
                let mut public = security.is_none();
                match security {
                    None => {}
                    Some(Value::Array(reqs)) => {
                        public |= reqs.is_empty();
                        for (i, req) in reqs.iter().enumerate() {
                            let Value::Object(req) = req else {
                                return Err(DocumentError::at(
                                    format!("{sec_at}/{i}"),
                                    "a security requirement must be a mapping",
                                ));
                            };
                            public |= req.is_empty();
                            for (name, scopes) in req {
                                if !schemes.contains(name) {
                                    schemes.push(name.clone());
                                }
                                if let Value::Array(list) = scopes {
                                    let set = w.scopes.entry(name.clone()).or_default();
                                    set.extend(list.iter().filter_map(Value::as_str).map(str::to_owned));
                                }
                            }
                        }
                    }
                    Some(_) => return Err(DocumentError::at(sec_at, "must be a list of security requirements")),
                }
                if public {
                    w.summary.public += 1;
                }
                let mut undeclared = false;
                for s in &schemes {
                    if declared.contains(s) {
                        *w.summary.by_security.entry(s.clone()).or_default() += 1;
                    } else {
                        undeclared = true;
                    }
                }
                if undeclared {
                    w.summary.undeclared_security += 1;
                }
                // A path key must begin with `/` (OpenAPI 3 "Paths"); one
                // that does not cannot be `[test]` (found by the
                // `openapi_import` fuzz target).
                if m == "get"
                    && path.starts_with('/')
                    && !path.contains('{')
                    && !op_map.get("deprecated").is_some_and(|d| d == &Value::Bool(true))
                    && !needs_parameters(doc, shared_params, &item_at)?
                    && !needs_parameters(doc, op_map.get("parameters"), &op_at)?
                {
                    w.test_candidates.push(Candidate {
                        path: path.clone(),
                        operation_id: op_map.get("operationId").and_then(Value::as_str).map(str::to_owned),
                        schemes: if public { Vec::new() } else { schemes },
                    });
                }
            }
        }
        Ok(w)
    }

    /// Whether a parameter list has a required parameter (or a reference
    /// this importer cannot read, which counts as required).
    fn needs_parameters(doc: &Document, params: Option<&Value>, at: &str) -> Result<bool, DocumentError> {
        let Some(params) = params else { return Ok(false) };
        let Value::Array(list) = params else {
            return Err(DocumentError::at(format!("{at}/parameters"), "must be a list"));
        };
        for (i, p) in list.iter().enumerate() {
            let Ok((p, _)) = doc.deref(p, &format!("{at}/parameters/{i}")) else { return Ok(true) };
            let required =
                p.get("required") == Some(&Value::Bool(true)) || p.get("in").and_then(Value::as_str) == Some("path");
            if required {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lit` reads back as the string it was given (`$` doubled), for the
    /// characters TOML escapes and for a run of quotes toml's own writer
    /// overflowed on.
    #[test]
    fn a_literal_reads_back_as_its_string() {
        let quotes = "\"".repeat(300);
        for s in [
            "plain",
            "a \"quoted\" \\ path\\",
            "tab\there",
            "nl\nand\rcr\u{0}\u{7f}\u{1b}",
            "ünï 💡",
            "${VAR}",
            &quotes,
        ] {
            let doc = format!("v = {}\n", lit(s));
            let parsed: toml::Table = toml::from_str(&doc).unwrap_or_else(|e| panic!("{doc:?}: {e}"));
            assert_eq!(parsed["v"].as_str(), Some(s.replace('$', "$$").as_str()), "{doc:?}");
        }
    }
}
