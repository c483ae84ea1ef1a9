//! Integration definitions: `config/integrations/*.toml`, one integration per
//! file, compiled at start-up into [`Integration`]s whose templates and host
//! patterns are already parsed, so the request path does no parsing.
//!
//! Imports only `config` (errors, substitution) and `policy::hosts`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use http::HeaderName;
use serde::Deserialize;

use crate::config::{deserialize_value, substitute_env_refs, ConfigError};
use crate::policy::hosts::HostPattern;

/// All integrations, by id.
#[derive(Debug, Default)]
pub struct Integrations {
    by_id: HashMap<String, Arc<Integration>>,
    /// Environment variables their `${VAR}` substitutions used.
    pub env_refs: std::collections::BTreeSet<String>,
}

impl Integrations {
    pub fn get(&self, id: &str) -> Option<&Arc<Integration>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Integration>> {
        let mut v: Vec<_> = self.by_id.values().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v.into_iter()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Loads every `*.toml` in `dir` (sorted by file name).
    pub fn load_dir(dir: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let read = std::fs::read_dir(dir)
            .map_err(|e| ConfigError::new(dir.display(), "integrations.dir", format!("cannot read directory: {e}")))?;
        let mut paths: Vec<_> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut out = Self::default();
        for path in paths {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::new(&name, "(file)", format!("cannot read: {e}")))?;
            let integration = Integration::from_toml_str_refs(&name, &text, env, &mut out.env_refs)?;
            out.add(integration, &name)?;
        }
        Ok(out)
    }

    pub fn add(&mut self, integration: Integration, source: &str) -> Result<(), ConfigError> {
        if self.by_id.contains_key(&integration.id) {
            return Err(ConfigError::new(source, "id", format!("integration {:?} is defined twice", integration.id)));
        }
        self.by_id.insert(integration.id.clone(), Arc::new(integration));
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }
}

/// One external service.
#[derive(Debug)]
pub struct Integration {
    pub id: String,
    pub name: String,
    pub allowed_hosts: Vec<HostPattern>,
    /// Scheme used upstream; `https` upgrades a caller's `http://` request.
    pub upstream_scheme: Scheme,
    pub base_url: Option<String>,
    pub auth_methods: Vec<Arc<AuthMethod>>,
    pub test: Option<TestRequest>,
    /// Provider quotas (`[[rate_limits]]`, `[[in_flight_limits]]`,
    /// `[backoff]`); each part left out takes `[limits]`' default.
    pub quotas: crate::config::limits::Declared,
    /// `scrub_response_bodies`: mask injected values (and their base64
    /// and URL-encoded forms) in response bodies. Off by default.
    pub scrub_response_bodies: bool,
}

impl Integration {
    pub fn auth_method(&self, id: &str) -> Option<&Arc<AuthMethod>> {
        self.auth_methods.iter().find(|m| m.id == id)
    }

    pub fn host_allowed(&self, host: &str, port: u16) -> bool {
        self.allowed_hosts.iter().any(|p| p.matches(host, port))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    #[serde(default = "default_test_method")]
    pub method: String,
    pub path: String,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
}

fn default_test_method() -> String {
    "GET".into()
}

fn default_expect_status() -> u16 {
    200
}

/// How an integration authenticates, compiled.
#[derive(Debug)]
pub struct AuthMethod {
    pub id: String,
    pub kind: AuthKind,
    /// Credential fields a connection of this method must supply, in the
    /// order templates refer to them.
    pub fields: Vec<String>,
    /// How a form asks for each field, in the order of `fields`; empty for
    /// OAuth2 (its credential comes from the provider).
    pub form: Vec<FormField>,
}

/// How a connect form shows one credential field, and what a value must
/// look like (`[auth_methods.form.<field>]`; defaults from the type).
#[derive(Debug, Clone)]
pub struct FormField {
    pub name: String,
    pub label: String,
    pub description: Option<String>,
    /// Typed into a password input, never shown back.
    pub secret: bool,
    /// A custom method's field a connection may leave out; placements
    /// that use it are then left out.
    pub optional: bool,
    /// What a value must match, whole (as HTML's `pattern` attribute).
    pub pattern: Option<String>,
    matcher: Option<regex_lite::Regex>,
    pub placeholder: Option<String>,
}

impl FormField {
    /// True if `value` matches the field's `pattern` (or it has none).
    pub fn accepts(&self, value: &str) -> bool {
        self.matcher.as_ref().is_none_or(|m| m.is_match(value))
    }

    /// The defaults for field `name` of a method of `kind`.
    fn default_for(kind: &AuthKind, name: &str) -> Self {
        let label = match (kind, name) {
            (AuthKind::Basic, "username") => "Username".to_owned(),
            (AuthKind::Basic, "password") => "Password".to_owned(),
            (AuthKind::Bearer, _) => "Token".to_owned(),
            (AuthKind::ApiKey(_), _) => "API key".to_owned(),
            _ => humanize(name),
        };
        Self {
            name: name.to_owned(),
            label,
            description: None,
            secret: !matches!((kind, name), (AuthKind::Basic, "username")),
            optional: false,
            pattern: None,
            matcher: None,
            placeholder: None,
        }
    }
}

/// `client_secret` → `Client secret`.
fn humanize(name: &str) -> String {
    let words = name.replace(['_', '-'], " ");
    let mut chars = words.chars();
    chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
}

impl AuthMethod {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            AuthKind::ApiKey(_) => "api_key",
            AuthKind::Basic => "basic",
            AuthKind::Bearer => "bearer",
            AuthKind::Custom(_) => "custom",
            AuthKind::OAuth2(_) => "oauth2",
        }
    }

    pub fn oauth2(&self) -> Option<&OAuth2Method> {
        match &self.kind {
            AuthKind::OAuth2(o) => Some(o),
            _ => None,
        }
    }

    /// True if injecting needs the request body buffered.
    pub fn edits_body(&self) -> bool {
        match &self.kind {
            AuthKind::Custom(ps) => ps.iter().any(|p| matches!(p.target, Target::JsonField(_) | Target::FormField(_))),
            _ => false,
        }
    }
}

#[derive(Debug)]
pub enum AuthKind {
    /// One placement of field `api_key`.
    ApiKey(Placement),
    /// `Authorization: Basic base64(username:password)`.
    Basic,
    /// `Authorization: Bearer {token}`.
    Bearer,
    /// Named fields, each placement rendered from a template.
    Custom(Vec<Placement>),
    /// An OAuth2 token set; the access token (field `access_token`) is placed
    /// like an api_key.
    OAuth2(Box<OAuth2Method>),
}

#[derive(Debug, Clone)]
pub struct Placement {
    pub target: Target,
    pub template: Template,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Header(HeaderName),
    Query(String),
    Cookie(String),
    /// A top-level field of a JSON object body.
    JsonField(String),
    /// A field of an `application/x-www-form-urlencoded` body.
    FormField(String),
}

/// `Token {api_key}`: literal text and credential-field references.
/// `{{` and `}}` are literal braces.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    /// Index into [`AuthMethod::fields`].
    Field(usize),
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.parts).finish()
    }
}

impl Template {
    pub fn parse(s: &str, fields: &[String]) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err("unclosed `{` (write `{{` for a literal brace)".to_owned()),
                        }
                    }
                    // Field names are slugs (checked); the template's text is not echoed.
                    let idx = fields
                        .iter()
                        .position(|f| *f == name)
                        .ok_or_else(|| format!("refers to an unknown field; the fields are: {}", fields.join(", ")))?;
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(idx));
                }
                '}' => return Err("unmatched `}` (write `}}` for a literal brace)".to_owned()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err("uses no credential field".to_owned());
        }
        Ok(Self { parts })
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }
}

// ---- the file format -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IntegrationFile {
    id: String,
    name: String,
    allowed_hosts: Vec<String>,
    #[serde(default = "default_scheme")]
    upstream_scheme: Scheme,
    #[serde(default)]
    base_url: Option<String>,
    /// Read per `type` ([`MethodFile::parse`]).
    auth_methods: Vec<toml::Value>,
    #[serde(default)]
    test: Option<TestRequest>,
    #[serde(default)]
    rate_limits: Option<Vec<crate::config::limits::RateLimit>>,
    #[serde(default)]
    in_flight_limits: Option<Vec<crate::config::limits::InFlightLimit>>,
    #[serde(default)]
    backoff: Option<crate::config::limits::Backoff>,
    #[serde(default)]
    scrub_response_bodies: bool,
}

fn default_scheme() -> Scheme {
    Scheme::Https
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AuthType {
    ApiKey,
    Basic,
    Bearer,
    Custom,
    Oauth2,
}

/// An auth method as written. Which keys a method takes depends on its
/// `type`, so each type has its own table (a key another type uses is an
/// unknown key, named in the error). Read in two steps — the `type`, then
/// the table for it — so errors keep the key's full path (serde's
/// internally tagged enums buffer the table and lose it).
enum MethodFile {
    ApiKey(ApiKeyFile),
    Basic(PlainFile),
    Bearer(PlainFile),
    Custom(CustomFile),
    OAuth2(Box<OAuth2MethodFile>),
}

/// `basic`, `bearer`: the fields and where they go are fixed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainFile {
    id: String,
    #[serde(default)]
    form: BTreeMap<String, FormFieldFile>,
}

/// `[auth_methods.form.<field>]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FormFieldFile {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    secret: Option<bool>,
    #[serde(default)]
    optional: bool,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    placeholder: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyFile {
    id: String,
    /// header | query | cookie
    #[serde(rename = "in")]
    placement: PlaceIn,
    name: String,
    /// Default `{api_key}`.
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    form: BTreeMap<String, FormFieldFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomFile {
    id: String,
    /// The credential's field names.
    fields: Vec<String>,
    /// Where each value goes.
    placements: Vec<PlacementFile>,
    #[serde(default)]
    form: BTreeMap<String, FormFieldFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OAuth2MethodFile {
    id: String,
    /// Where the access token goes: default `Authorization: Bearer {access_token}`.
    #[serde(rename = "in", default)]
    placement: Option<PlaceIn>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    template: Option<String>,
    /// The provider's settings.
    oauth2: OAuth2File,
}

impl MethodFile {
    /// Reads `auth_methods[i]` (`key`) by its `type`.
    fn parse(source: &str, key: &str, value: toml::Value) -> Result<Self, ConfigError> {
        let toml::Value::Table(mut table) = value else {
            return Err(ConfigError::new(source, key, "must be a table ([[auth_methods]])"));
        };
        let Some(kind) = table.remove("type") else {
            return Err(ConfigError::new(
                source,
                format!("{key}.type"),
                "required: api_key, basic, bearer, custom or oauth2",
            ));
        };
        let within = |mut e: ConfigError, at: &str| {
            e.key = if e.key == "(top level)" { at.to_owned() } else { format!("{at}.{}", e.key) };
            e
        };
        let kind: AuthType = deserialize_value(source, kind).map_err(|e| within(e, &format!("{key}.type")))?;
        let table = toml::Value::Table(table);
        let body = |e| within(e, key);
        Ok(match kind {
            AuthType::ApiKey => Self::ApiKey(deserialize_value(source, table).map_err(body)?),
            AuthType::Basic => Self::Basic(deserialize_value(source, table).map_err(body)?),
            AuthType::Bearer => Self::Bearer(deserialize_value(source, table).map_err(body)?),
            AuthType::Custom => Self::Custom(deserialize_value(source, table).map_err(body)?),
            AuthType::Oauth2 => Self::OAuth2(deserialize_value(source, table).map_err(body)?),
        })
    }

    fn id(&self) -> &str {
        match self {
            Self::ApiKey(m) => &m.id,
            Self::Basic(m) | Self::Bearer(m) => &m.id,
            Self::Custom(m) => &m.id,
            Self::OAuth2(m) => &m.id,
        }
    }

    /// The method compiled: templates and names parsed, the rules each
    /// type has checked. Errors name the key under `key`.
    fn compile(mut self, key: &str) -> Result<AuthMethod, FieldError> {
        let at = |(f, r): FieldError| (format!("{key}.{f}"), r);
        let form = match &mut self {
            Self::ApiKey(m) => std::mem::take(&mut m.form),
            Self::Basic(m) | Self::Bearer(m) => std::mem::take(&mut m.form),
            Self::Custom(m) => std::mem::take(&mut m.form),
            Self::OAuth2(_) => BTreeMap::new(),
        };
        let (id, kind, fields) = match self {
            Self::Basic(m) => (m.id, AuthKind::Basic, vec!["username".to_owned(), "password".to_owned()]),
            Self::Bearer(m) => (m.id, AuthKind::Bearer, vec!["token".to_owned()]),
            Self::ApiKey(m) => {
                let (kind, fields) = m.compile().map_err(at)?;
                (m.id, kind, fields)
            }
            Self::Custom(m) => {
                let (kind, fields) = compile_custom(&m.fields, &m.placements).map_err(at)?;
                (m.id, kind, fields)
            }
            Self::OAuth2(m) => {
                let mut m = *m;
                let id = std::mem::take(&mut m.id);
                let (kind, fields) = m.compile().map_err(at)?;
                (id, kind, fields)
            }
        };
        let form = if matches!(kind, AuthKind::OAuth2(_)) {
            Vec::new()
        } else {
            compile_form(&kind, &fields, form).map_err(at)?
        };
        Ok(AuthMethod { id, kind, fields, form })
    }
}

/// The form of a method's `fields`: the type's defaults, with what
/// `[form.<field>]` says.
fn compile_form(
    kind: &AuthKind,
    fields: &[String],
    mut written: BTreeMap<String, FormFieldFile>,
) -> Result<Vec<FormField>, FieldError> {
    if let Some(name) = written.keys().find(|n| !fields.contains(n)) {
        return Err((
            format!("form.{name}"),
            format!("not a field of this method; its fields are: {}", fields.join(", ")),
        ));
    }
    let mut out = Vec::with_capacity(fields.len());
    for name in fields {
        let mut f = FormField::default_for(kind, name);
        let Some(w) = written.remove(name) else {
            out.push(f);
            continue;
        };
        let at = |key: &str| format!("form.{name}.{key}");
        for (key, value, max) in
            [("label", &w.label, 80), ("description", &w.description, 500), ("placeholder", &w.placeholder, 200)]
        {
            if value
                .as_ref()
                .is_some_and(|v| v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control))
            {
                return Err((at(key), format!("must be 1-{max} characters, without control characters")));
            }
        }
        if w.optional && !matches!(kind, AuthKind::Custom(_)) {
            return Err((at("optional"), "only a custom method's fields can be optional".into()));
        }
        if let Some(p) = &w.pattern {
            f.matcher = Some(
                regex_lite::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|_| (at("pattern"), "not a valid regular expression".to_owned()))?,
            );
        }
        f.label = w.label.unwrap_or(f.label);
        f.description = w.description;
        f.secret = w.secret.unwrap_or(f.secret);
        f.optional = w.optional;
        f.pattern = w.pattern;
        f.placeholder = w.placeholder;
        out.push(f);
    }
    if !out.is_empty() && out.iter().all(|f| f.optional) {
        return Err(("form".into(), "at least one field must not be optional".into()));
    }
    Ok(out)
}

impl ApiKeyFile {
    fn compile(&self) -> Result<(AuthKind, Vec<String>), FieldError> {
        let fields = vec!["api_key".to_owned()];
        if matches!(self.placement, PlaceIn::Json | PlaceIn::Form) {
            return Err((
                "in".into(),
                "api_key goes in a header, query or cookie; use type = \"custom\" for body fields".into(),
            ));
        }
        let template = self.template.as_deref().unwrap_or("{api_key}");
        let p = compile_placement(self.placement, &self.name, template, &fields)?;
        Ok((AuthKind::ApiKey(p), fields))
    }
}

fn compile_custom(fields: &[String], placements: &[PlacementFile]) -> Result<(AuthKind, Vec<String>), FieldError> {
    if fields.is_empty() {
        return Err(("fields".into(), "must name at least one field".into()));
    }
    for (i, f) in fields.iter().enumerate() {
        if !is_slug(f) {
            return Err((format!("fields[{i}]"), "must be 1-64 characters of [a-z0-9_-]".into()));
        }
        if fields[..i].contains(f) {
            return Err((format!("fields[{i}]"), format!("field {f:?} is listed twice")));
        }
    }
    if placements.is_empty() {
        return Err(("placements".into(), "must place at least one value".into()));
    }
    let mut out = Vec::new();
    for (i, p) in placements.iter().enumerate() {
        out.push(
            compile_placement(p.placement, &p.name, &p.template, fields)
                .map_err(|(f, r)| (format!("placements[{i}].{f}"), r))?,
        );
    }
    Ok((AuthKind::Custom(out), fields.to_vec()))
}

impl OAuth2MethodFile {
    fn compile(self) -> Result<(AuthKind, Vec<String>), FieldError> {
        let fields = vec!["access_token".to_owned()];
        let place = self.placement.unwrap_or(PlaceIn::Header);
        if matches!(place, PlaceIn::Json | PlaceIn::Form) {
            return Err(("in".into(), "an access token goes in a header, query or cookie".into()));
        }
        let name = self.name.as_deref().unwrap_or("Authorization");
        let template = self.template.as_deref().unwrap_or("Bearer {access_token}");
        let placement = compile_placement(place, name, template, &fields)?;
        let o = self.oauth2;
        let url = |field: &str, v: &str| oauth_url(v).map_err(|e| (format!("oauth2.{field}"), e.to_owned()));
        let authorize_url = o.authorize_url.as_deref().map(|u| url("authorize_url", u)).transpose()?;
        if o.grant == Grant::AuthorizationCode && authorize_url.is_none() {
            return Err(("oauth2.authorize_url".into(), "required for grant = \"authorization_code\"".into()));
        }
        if o.client_id.is_empty() {
            return Err(("oauth2.client_id".into(), "must not be empty".into()));
        }
        let method = OAuth2Method {
            grant: o.grant,
            authorize_url,
            token_url: url("token_url", &o.token_url)?,
            revocation_url: o.revocation_url.as_deref().map(|u| url("revocation_url", u)).transpose()?,
            scopes: o.scopes,
            client_id: o.client_id,
            client_secret: crate::secret::SecretValue::new(o.client_secret),
            client_auth: o.client_auth,
            pkce: o.pkce,
            authorize_params: o.authorize_params.into_iter().collect(),
            token_params: o.token_params.into_iter().collect(),
            refresh_skew_secs: o.refresh_skew_secs,
            default_expires_in_secs: o.default_expires_in_secs.max(1),
            idle_refresh_after: match o.idle_refresh_after_days {
                None => None,
                Some(d) if d.is_finite() && d > 0.0 && d <= 3650.0 && o.grant == Grant::AuthorizationCode => {
                    Some(std::time::Duration::from_secs_f64(d * 86_400.0))
                }
                Some(_) => {
                    return Err((
                        "oauth2.idle_refresh_after_days".into(),
                        "must be more than 0 and at most 3650, on an authorization_code method".into(),
                    ))
                }
            },
            placement,
        };
        Ok((AuthKind::OAuth2(Box::new(method)), fields))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OAuth2File {
    grant: Grant,
    #[serde(default)]
    authorize_url: Option<String>,
    token_url: String,
    #[serde(default)]
    revocation_url: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    client_id: String,
    client_secret: String,
    #[serde(default = "default_client_auth")]
    client_auth: ClientAuth,
    #[serde(default = "default_true")]
    pkce: bool,
    #[serde(default)]
    authorize_params: BTreeMap<String, String>,
    #[serde(default)]
    token_params: BTreeMap<String, String>,
    #[serde(default = "default_skew")]
    refresh_skew_secs: u64,
    #[serde(default = "default_lifetime")]
    default_expires_in_secs: u64,
    #[serde(default)]
    idle_refresh_after_days: Option<f64>,
}

fn default_client_auth() -> ClientAuth {
    ClientAuth::ClientSecretBasic
}
fn default_true() -> bool {
    true
}
fn default_skew() -> u64 {
    DEFAULT_REFRESH_SKEW_SECS
}
fn default_lifetime() -> u64 {
    DEFAULT_EXPIRES_IN_SECS
}

/// Refresh an access token this many seconds before it expires.
pub const DEFAULT_REFRESH_SKEW_SECS: u64 = 60;
/// Lifetime assumed when a token response has no `expires_in`.
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    AuthorizationCode,
    ClientCredentials,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
}

/// An OAuth2 auth method, compiled.
#[derive(Debug)]
pub struct OAuth2Method {
    pub grant: Grant,
    pub authorize_url: Option<http::Uri>,
    pub token_url: http::Uri,
    pub revocation_url: Option<http::Uri>,
    pub scopes: Vec<String>,
    pub client_id: String,
    pub client_secret: crate::secret::SecretValue,
    pub client_auth: ClientAuth,
    pub pkce: bool,
    pub authorize_params: Vec<(String, String)>,
    pub token_params: Vec<(String, String)>,
    pub refresh_skew_secs: u64,
    pub default_expires_in_secs: u64,
    /// Refresh the tokens of connections idle this long (not used, not
    /// refreshed), before the provider lets an unused refresh token lapse.
    /// `idle_refresh_after_days`; off when unset.
    pub idle_refresh_after: Option<std::time::Duration>,
    /// Where the access token goes (default `Authorization: Bearer {access_token}`).
    pub placement: Placement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PlaceIn {
    Header,
    Query,
    Cookie,
    Json,
    Form,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    #[serde(rename = "in")]
    placement: PlaceIn,
    name: String,
    template: String,
}

impl Integration {
    pub fn from_toml_str(source: &str, text: &str, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_toml_str_refs(source, text, env, &mut std::collections::BTreeSet::new())
    }

    /// [`Integration::from_toml_str`], collecting the environment variables
    /// its substitutions used into `refs`.
    pub fn from_toml_str_refs(
        source: &str,
        text: &str,
        env: &BTreeMap<String, String>,
        refs: &mut std::collections::BTreeSet<String>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigError::new(source, "(syntax)", e.message()))?;
        substitute_env_refs(&mut value, env, source, "", refs)?;
        let file: IntegrationFile = deserialize_value(source, value)?;
        let err = |key: String, reason: String| ConfigError::new(source, key, reason);

        if !is_slug(&file.id) {
            return Err(err("id".into(), "must be 1-64 characters of [a-z0-9_-]".into()));
        }
        if file.allowed_hosts.is_empty() {
            return Err(err(
                "allowed_hosts".into(),
                "must list at least one host: credentials are only sent to these".into(),
            ));
        }
        let mut allowed_hosts = Vec::new();
        for (i, h) in file.allowed_hosts.iter().enumerate() {
            allowed_hosts.push(HostPattern::parse(h).map_err(|r| err(format!("allowed_hosts[{i}]"), r))?);
        }
        if file.auth_methods.is_empty() {
            return Err(err("auth_methods".into(), "must define at least one auth method".into()));
        }
        let mut auth_methods: Vec<Arc<AuthMethod>> = Vec::new();
        for (i, m) in file.auth_methods.into_iter().enumerate() {
            let key = format!("auth_methods[{i}]");
            let m = MethodFile::parse(source, &key, m)?;
            if !is_slug(m.id()) {
                return Err(err(format!("{key}.id"), "must be 1-64 characters of [a-z0-9_-]".into()));
            }
            if auth_methods.iter().any(|a| a.id == m.id()) {
                return Err(err(format!("{key}.id"), format!("auth method {:?} is defined twice", m.id())));
            }
            auth_methods.push(Arc::new(m.compile(&key).map_err(|(k, r)| err(k, r))?));
        }
        if let Some(b) = &file.base_url {
            let ok = b
                .parse::<http::Uri>()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                return Err(err("base_url".into(), "must be an absolute http(s) URL".into()));
            }
        }
        if let Some(t) = &file.test {
            if !t.path.starts_with('/') {
                return Err(err("test.path".into(), "must start with /".into()));
            }
            if t.method.parse::<http::Method>().is_err() {
                return Err(err("test.method".into(), "not an HTTP method".into()));
            }
            if t.method.eq_ignore_ascii_case("TRACE") {
                return Err(err("test.method".into(), "TRACE would echo the credential back; use GET".into()));
            }
        }
        let quotas = crate::config::limits::Declared {
            rate_limits: file.rate_limits,
            in_flight_limits: file.in_flight_limits,
            backoff: file.backoff,
        };
        quotas.validate(source, "")?;
        Ok(Self {
            id: file.id,
            name: file.name,
            allowed_hosts,
            upstream_scheme: file.upstream_scheme,
            base_url: file.base_url,
            auth_methods,
            test: file.test,
            quotas,
            scrub_response_bodies: file.scrub_response_bodies,
        })
    }
}

/// An OAuth2 endpoint URL as an integration file must give it: absolute
/// http(s) with a host. (The OpenAPI importer asks this too.)
pub fn oauth_url(v: &str) -> Result<http::Uri, &'static str> {
    let u: http::Uri = v.parse().map_err(|_| "not a URL")?;
    if !matches!(u.scheme_str(), Some("https" | "http")) || u.host().is_none() {
        return Err("must be an absolute http(s) URL");
    }
    Ok(u)
}

/// An id: 1-64 characters of `[a-z0-9_-]`.
pub fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

type FieldError = (String, String);

fn compile_placement(place: PlaceIn, name: &str, template: &str, fields: &[String]) -> Result<Placement, FieldError> {
    let template = Template::parse(template, fields).map_err(|r| ("template".to_owned(), r))?;
    let target = target(place, name).map_err(|r| ("name".to_owned(), r))?;
    Ok(Placement { target, template })
}

/// Where a value named `name` goes in `place`, or why it cannot go there.
fn target(place: PlaceIn, name: &str) -> Result<Target, String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(match place {
        PlaceIn::Header => {
            let h = HeaderName::from_bytes(name.as_bytes()).map_err(|_| "not a valid header name".to_owned())?;
            if is_protected_header(&h) {
                return Err(format!("{h} is managed by the proxy and cannot carry a credential"));
            }
            Target::Header(h)
        }
        PlaceIn::Query => Target::Query(name.to_owned()),
        PlaceIn::Cookie => {
            if name.bytes().any(|b| b <= b' ' || b"=;,\"\\".contains(&b) || b >= 0x7f) {
                return Err("not a valid cookie name".to_owned());
            }
            Target::Cookie(name.to_owned())
        }
        PlaceIn::Json => Target::JsonField(name.to_owned()),
        PlaceIn::Form => Target::FormField(name.to_owned()),
    })
}

/// A TOML basic string holding exactly `s`, for writing integration files:
/// `"`, `\\` and the control characters TOML requires escaped (all but tab,
/// and DEL) escaped. Not toml's serializer: toml_write 0.1 counts a run of
/// quotes in a `u8` and overflows on 256 in a row.
pub fn toml_basic_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push('\t'),
            c if c < ' ' || c == '\u{7f}' => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Why an `api_key` named `name` cannot go `place` (`header`, `query`,
/// `cookie`), as an integration file would be refused for it; `None` if
/// it can. For writers of integration files (the OpenAPI import).
pub fn api_key_name_error(place: &str, name: &str) -> Option<String> {
    let place = match place {
        "header" => PlaceIn::Header,
        "query" => PlaceIn::Query,
        "cookie" => PlaceIn::Cookie,
        other => return Some(format!("an api_key goes in a header, query or cookie, not {other:?}")),
    };
    target(place, name).err()
}

/// Headers the proxy owns: a credential placed there would be stripped,
/// corrupt framing, or be sent to the wrong hop.
fn is_protected_header(h: &HeaderName) -> bool {
    use http::header::*;
    [HOST, CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION, TE, TRAILER, UPGRADE, PROXY_AUTHORIZATION].contains(h)
        || matches!(h.as_str(), "keep-alive" | "proxy-connection" | "x-connection-id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Integration, ConfigError> {
        Integration::from_toml_str("t.toml", text, &BTreeMap::new())
    }

    const FORM: &str = r#"
id = "f"
name = "F"
allowed_hosts = ["f.test"]
[[auth_methods]]
id = "b"
type = "basic"
[[auth_methods]]
id = "k"
type = "api_key"
in = "header"
name = "X-Key"
[auth_methods.form.api_key]
placeholder = "sk_live_..."
[[auth_methods]]
id = "c"
type = "custom"
fields = ["account_id", "secret", "region"]
[auth_methods.form.account_id]
label = "Account"
secret = false
pattern = "[a-z]{3,8}"
[auth_methods.form.region]
optional = true
description = "Leave empty for the default."
[[auth_methods.placements]]
in = "header"
name = "X-A"
template = "{account_id}:{secret}"
[[auth_methods.placements]]
in = "header"
name = "X-R"
template = "{region}"
"#;

    #[test]
    fn form_fields_have_defaults_by_type_and_take_what_the_file_says() {
        let i = parse(FORM).unwrap();
        let show = |m: &str| -> Vec<(String, String, bool, bool)> {
            let m = i.auth_method(m).unwrap();
            m.form.iter().map(|f| (f.name.clone(), f.label.clone(), f.secret, f.optional)).collect()
        };
        let row = |n: &str, l: &str, s, o| (n.to_owned(), l.to_owned(), s, o);
        assert_eq!(show("b"), [row("username", "Username", false, false), row("password", "Password", true, false)]);
        assert_eq!(show("k"), [row("api_key", "API key", true, false)]);
        assert_eq!(i.auth_method("k").unwrap().form[0].placeholder.as_deref(), Some("sk_live_..."));
        assert_eq!(
            show("c"),
            [
                row("account_id", "Account", false, false),
                row("secret", "Secret", true, false),
                row("region", "Region", true, true)
            ]
        );
        let account = &i.auth_method("c").unwrap().form[0];
        assert!(
            account.accepts("acme")
                && !account.accepts("ac")
                && !account.accepts("acme!")
                && !account.accepts("xacmex1")
        );
    }

    #[test]
    fn form_errors_name_the_key() {
        for (from, to, key) in [
            ("[auth_methods.form.region]", "[auth_methods.form.zone]", "auth_methods[2].form.zone"),
            ("pattern = \"[a-z]{3,8}\"", "pattern = \"[a-z\"", "auth_methods[2].form.account_id.pattern"),
            ("placeholder = \"sk_live_...\"", "optional = true", "auth_methods[1].form.api_key.optional"),
            ("label = \"Account\"", "label = \"\"", "auth_methods[2].form.account_id.label"),
            ("label = \"Account\"", "colour = \"red\"", "auth_methods[2].form.account_id"),
        ] {
            let text = FORM.replace(from, to);
            assert_ne!(text, FORM, "{from}");
            let e = parse(&text).unwrap_err();
            assert!(e.key.starts_with(key), "{key}: {e}");
        }
    }

    #[test]
    fn quotas_are_read_and_their_errors_name_the_key() {
        use crate::config::limits::{CooldownScope, Per};
        let base = "id = \"x\"\nname = \"X\"\nallowed_hosts = [\"a.example\"]\n\
                    [[auth_methods]]\nid = \"t\"\ntype = \"bearer\"\n";
        let with = |extra: &str| Integration::from_toml_str("x.toml", &format!("{base}{extra}"), &BTreeMap::new());
        let i = with(
            "[[rate_limits]]\nper = \"connection\"\nrequests = 5\nperiod = \"1s\"\nburst = 5\nmax_wait = \"500ms\"\n\
             [[rate_limits]]\nper = \"integration\"\nrequests = 100\nperiod = 10\npaths = [\"/search/*\"]\n\
             [[in_flight_limits]]\nper = \"connection\"\nmax_in_flight = 2\n\
             [backoff]\nper = \"integration\"\nmax_cooldown = \"2m\"\n",
        )
        .unwrap();
        let rates = i.quotas.rate_limits.as_ref().unwrap();
        assert_eq!((rates[0].per, rates[0].requests, rates[0].burst), (Per::Connection, 5, Some(5)));
        assert_eq!((rates[0].period, rates[0].max_wait), (Duration::from_secs(1), Duration::from_millis(500)));
        assert_eq!((rates[1].period, rates[1].paths.len()), (Duration::from_secs(10), 1));
        assert_eq!(i.quotas.in_flight_limits.as_ref().unwrap()[0].max_in_flight, 2);
        let b = i.quotas.backoff.as_ref().unwrap();
        assert_eq!(
            (b.per, b.max_cooldown, b.respect_retry_after),
            (CooldownScope::Integration, Duration::from_secs(120), true)
        );
        // Left out: `[limits]`' defaults apply.
        assert_eq!(with("").unwrap().quotas, crate::config::limits::Declared::default());
        for (extra, key) in [
            ("[[rate_limits]]\nper = \"connection\"\nrequests = 0\nperiod = \"1s\"\n", "rate_limits[0].requests"),
            ("[[rate_limits]]\nper = \"connection\"\nrequests = 1\nperiod = \"soon\"\n", "rate_limits[0].period"),
            ("[[rate_limits]]\nper = \"user\"\nrequests = 1\nperiod = 1\n", "rate_limits[0].per"),
            ("[[rate_limits]]\nper = \"org\"\nrequests = 1\nperiod = 1\n[[rate_limits]]\nper = \"org\"\nrequests = 2\nperiod = 1\n", "rate_limits[1].name"),
            ("[[rate_limits]]\nper = \"org\"\nrequests = 1\nperiod = 1\npaths = [\"search\"]\n", "rate_limits[0].paths"),
            ("[[in_flight_limits]]\nper = \"org\"\nmax_in_flight = 0\n", "in_flight_limits[0].max_in_flight"),
            ("[backoff]\nreset_headers = [\"bad header\"]\n", "backoff.reset_headers"),
            ("[backoff]\nmax_cooldown = \"2 years\"\n", "backoff.max_cooldown"),
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!((e.source_name.as_str(), e.key.as_str()), ("x.toml", key), "{e}");
        }
    }

    #[test]
    fn shipped_integrations_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/integrations");
        let env: BTreeMap<String, String> = BTreeMap::new();
        let all = Integrations::load_dir(&dir, &env).unwrap();
        assert!(all.len() >= 4, "{}", all.len());
        let gh = all.get("github").unwrap();
        assert_eq!(gh.auth_method("pat").unwrap().kind_name(), "bearer");
        assert!(gh.host_allowed("api.github.com", 443));
        assert!(!gh.host_allowed("evil.test", 443));
        // The README's quickstart connection can be tested: [test] has somewhere to go.
        let hb = all.get("httpbin").unwrap();
        assert_eq!(hb.base_url.as_deref(), Some("http://127.0.0.1:8000"));
        assert!(hb.test.is_some() && hb.host_allowed("127.0.0.1", 8000));
    }

    #[test]
    fn shipped_oauth2_example_loads_with_its_variables() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/hubspot-oauth2.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let env: BTreeMap<String, String> = [("HUBSPOT_CLIENT_ID", "id-1"), ("HUBSPOT_CLIENT_SECRET", "secret-1")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let i = Integration::from_toml_str("hubspot-oauth2.toml", &text, &env).unwrap();
        let o = i.auth_method("oauth").unwrap().oauth2().unwrap();
        assert_eq!(o.client_auth, ClientAuth::ClientSecretPost);
        assert_eq!(o.client_secret.expose(), "secret-1");
        assert!(!format!("{i:?}").contains("secret-1"), "Debug must not show the client secret");
        let e = Integration::from_toml_str("hubspot-oauth2.toml", &text, &BTreeMap::new()).unwrap_err();
        assert!(e.reason.contains("HUBSPOT_CLIENT_ID"), "{e}");
    }

    #[test]
    fn template_parsing() {
        let f = vec!["a".to_owned(), "b".to_owned()];
        let t = Template::parse("x {a}-{b} {{lit}}", &f).unwrap();
        assert_eq!(
            t.parts(),
            &[
                Part::Lit("x ".into()),
                Part::Field(0),
                Part::Lit("-".into()),
                Part::Field(1),
                Part::Lit(" {lit}".into())
            ]
        );
        assert!(Template::parse("{c}", &f).unwrap_err().contains("unknown field"));
        assert!(Template::parse("{a", &f).is_err());
        assert!(Template::parse("plain", &f).unwrap_err().contains("no credential field"));
    }

    #[test]
    fn errors_name_the_key() {
        let base = "id = \"x\"\nname = \"X\"\nallowed_hosts = [\"x.test\"]\n";
        let e =
            parse(&format!("{base}[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"header\"\n")).unwrap_err();
        assert_eq!(e.key, "auth_methods[0].name");
        let e = parse(&format!("{base}[[auth_methods]]\nid = \"k\"\ntype = \"bearer\"\nname = \"X\"\n")).unwrap_err();
        assert_eq!(e.key, "auth_methods[0].name");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = parse(&format!("{base}[[auth_methods]]\nid = \"k\"\ntype = \"oauth2\"\n")).unwrap_err();
        assert_eq!((e.key.as_str(), e.reason.as_str()), ("auth_methods[0].oauth2", "required"));
        let e = parse(&format!("{base}[[auth_methods]]\nid = \"k\"\ntype = \"digest\"\n")).unwrap_err();
        assert_eq!(e.key, "auth_methods[0].type");
        assert!(e.reason.contains("unknown variant"), "{e}");
        let e = parse(&format!("{base}[[auth_methods]]\nid = \"k\"\n")).unwrap_err();
        assert_eq!(e.key, "auth_methods[0].type");
        let e = parse(&format!(
            "{base}[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"header\"\nname = \"Host\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "auth_methods[0].name");
        let e = parse(&format!("{base}[[auth_methods]]\nid = \"k\"\ntype = \"custom\"\nfields = [\"a\"]\n[[auth_methods.placements]]\nin = \"header\"\nname = \"X-A\"\ntemplate = \"{{b}}\"\n")).unwrap_err();
        assert_eq!(e.key, "auth_methods[0].placements[0].template");
        let e = parse(&format!("{base}bogus = 1\n[[auth_methods]]\nid = \"k\"\ntype = \"bearer\"\n")).unwrap_err();
        assert_eq!(e.key, "bogus");
        let e = parse("id = \"x\"\nname = \"X\"\nallowed_hosts = [\"https://x.test\"]\n[[auth_methods]]\nid = \"k\"\ntype = \"bearer\"\n").unwrap_err();
        assert_eq!(e.key, "allowed_hosts[0]");
    }
}
