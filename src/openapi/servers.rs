//! Server URLs → `base_url`, `upstream_scheme` and `allowed_hosts`.
//!
//! Variables are expanded from their `enum`s; one without an enum takes
//! its default, except a variable that is a whole leftmost host label
//! (`https://{tenant}.example.com`), which the document says may be any
//! subdomain: `*.example.com`, noted in the report. Hosts are lower-cased.
//! Relative URLs (and a document without `servers`, whose server is `/`)
//! need a base URL from the caller.

use oas3::spec::Server;

use super::document::DocumentError;
use super::{Report, Skipped};

/// At most this many URLs from one server's variables.
const MAX_EXPANSIONS: usize = 64;

struct Expanded {
    scheme: String,
    /// `host`, `host:port` or `*.rest`.
    pattern: String,
    /// The URL with every variable at its default.
    url: String,
    top: bool,
    from: String,
}

/// Fills `report`'s hosts, scheme and base URL; `None` when no server
/// gives a host.
pub(super) fn resolve(
    servers: &[(String, Server)],
    top_declared: bool,
    base: Option<&str>,
    report: &mut Report,
) -> Result<Option<()>, DocumentError> {
    if let Some(b) = base {
        let ok = b
            .parse::<http::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            return Err(DocumentError::at("(--base-url)", "must be an absolute http(s) URL"));
        }
    }
    let default_root = Server {
        url: "/".to_owned(),
        description: None,
        variables: Default::default(),
        extensions: Default::default(),
    };
    let mut list: Vec<(&str, &Server)> = servers.iter().map(|(at, s)| (at.as_str(), s)).collect();
    if !top_declared {
        list.insert(0, ("/servers", &default_root));
    }
    let mut out: Vec<Expanded> = Vec::new();
    for (at, server) in list {
        match expand(at, server, base, report) {
            Ok(e) => {
                for e in e {
                    if is_local(&e.pattern) && base.is_none_or(|b| !b.contains(&e.pattern)) {
                        report.not_imported.push(Skipped {
                            at: e.from.clone(),
                            what: format!("server {}", e.url),
                            reason: "a loopback or private-network host (a development server?): add it to \
                                     allowed_hosts by hand if credentials should go there"
                                .into(),
                        });
                    } else {
                        out.push(e);
                    }
                }
            }
            Err(reason) => report.not_imported.push(Skipped {
                at: at.to_owned(),
                what: format!("server {:?}", server.url),
                reason,
            }),
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    let scheme = if out.iter().any(|e| e.scheme == "https") { "https" } else { "http" };
    let mut hosts: Vec<String> = Vec::new();
    for e in out.iter().filter(|e| e.scheme == scheme) {
        if !hosts.contains(&e.pattern) {
            hosts.push(e.pattern.clone());
        }
    }
    for e in out.iter().filter(|e| e.scheme != scheme) {
        if !hosts.contains(&e.pattern) {
            report.not_imported.push(Skipped {
                at: e.from.clone(),
                what: format!("server {}", e.url),
                reason: format!(
                    "uses {}, the integration's other servers {scheme}; one scheme per integration",
                    e.scheme
                ),
            });
        }
    }
    let chosen = out.iter().filter(|e| e.scheme == scheme);
    let first = chosen.clone().find(|e| e.top).or_else(|| chosen.clone().next());
    report.base_url = first.map(|e| e.url.clone());
    report.upstream_scheme = Some(if scheme == "https" { "https" } else { "http" });
    report.allowed_hosts = hosts;
    Ok(Some(()))
}

/// One server's URLs, or why it gives none.
fn expand(at: &str, server: &Server, base: Option<&str>, report: &mut Report) -> Result<Vec<Expanded>, String> {
    let url = server.url.trim();
    // The variables, in order of appearance.
    let mut names: Vec<&str> = Vec::new();
    let mut rest = url;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or("unbalanced { in the URL")?;
        let name = &after[..close];
        if !server.variables.contains_key(name) {
            return Err(format!("variable {{{name}}} is not defined in its `variables`"));
        }
        if !names.contains(&name) {
            names.push(name);
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err("unbalanced } in the URL".into());
    }
    let default_of = |n: &str| server.variables.get(n).map(|v| v.default.clone()).unwrap_or_default();
    let subst = |template: &str, values: &[(&str, String)]| {
        let mut s = template.to_owned();
        for (n, v) in values {
            s = s.replace(&format!("{{{n}}}"), v);
        }
        s
    };
    let defaults: Vec<(&str, String)> = names.iter().map(|n| (*n, default_of(n))).collect();
    let split = |u: &str| -> Option<(String, String)> {
        let (scheme, after) = u.split_once("://")?;
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        Some((format!("{scheme}://{}", &after[..end]), after[end..].to_owned()))
    };
    // A variable whose default holds URL structure (`{basePath}` =
    // "/v1", `{endpoint}` = "https://…") takes its default first.
    let structural: Vec<(&str, String)> =
        defaults.iter().filter(|(_, d)| d.contains(['/', ':', '?', '#'])).cloned().collect();
    for (n, d) in &structural {
        if !server.variables[*n].substitutions_enum.is_empty() || d.contains("://") {
            report.notes.push(format!("{at}: variable {{{n}}} holds part of the URL; only its default {d:?} is used"));
        }
    }
    let url = subst(url, &structural);
    let names: Vec<&str> = names.into_iter().filter(|n| !structural.iter().any(|(s, _)| s == n)).collect();

    // A relative URL is joined to the caller's base.
    let template = if url.contains("://") {
        url.clone()
    } else if let (Some(net), None) = (url.strip_prefix("//"), base) {
        // Scheme-relative: the host is stated; https is assumed (never
        // plain http for a credential on a guess).
        report.notes.push(format!("{at}: {url:?} names no scheme; https is assumed"));
        format!("https://{net}")
    } else {
        let Some(b) = base else {
            return Err(format!(
                "relative server URL {url:?}: pass --base-url (base_url) to say where the API is served"
            ));
        };
        let b = b.trim_end_matches('/');
        let (origin, _) = split(b).ok_or("the base URL has no scheme")?;
        if let Some(net) = url.strip_prefix("//") {
            format!("{}://{net}", origin.split("://").next().unwrap_or("https"))
        } else if url.starts_with('/') {
            // Per the specification a relative server URL resolves
            // against the document's location; the base URL stands in.
            format!("{b}{}", url.trim_end_matches('/'))
        } else {
            format!("{b}/{}", url.trim_end_matches('/'))
        }
    };
    let (authority_t, _) = split(&template).ok_or("not a URL")?;
    let mut per_var: Vec<(&str, Vec<String>)> = Vec::new();
    let host_start = authority_t.find("://").map(|i| i + 3).unwrap_or(0);
    for n in &names {
        let token = format!("{{{n}}}");
        if !authority_t.contains(&token) {
            continue;
        }
        let var = &server.variables[*n];
        if !var.substitutions_enum.is_empty() {
            per_var.push((n, var.substitutions_enum.clone()));
            continue;
        }
        let host_t = &authority_t[host_start..];
        let remainder = host_t.strip_prefix(&format!("{token}."));
        let wildcard = remainder.is_some_and(|r| !r.is_empty() && authority_t.matches(&token).count() == 1);
        if wildcard {
            report.notes.push(format!(
                "{at}: host variable {{{n}}} has no enum, so any subdomain is allowed (*.{}); base_url uses its default {:?}",
                remainder.unwrap_or_default().split(':').next().unwrap_or_default(),
                var.default
            ));
            per_var.push((n, vec!["*".to_owned()]));
        } else {
            report.notes.push(format!(
                "{at}: host variable {{{n}}} has no enum; only its default {:?} is allowed",
                var.default
            ));
            per_var.push((n, vec![var.default.clone()]));
        }
    }
    // Every combination of the host variables' values.
    let mut combos: Vec<Vec<(&str, String)>> = vec![Vec::new()];
    for (n, values) in &per_var {
        let mut next = Vec::new();
        for c in &combos {
            for v in values {
                let mut c = c.clone();
                c.push((*n, v.clone()));
                next.push(c);
            }
        }
        if next.len() > MAX_EXPANSIONS {
            return Err(format!("its variables give more than {MAX_EXPANSIONS} hosts"));
        }
        combos = next;
    }
    let defaults: Vec<(&str, String)> = defaults.into_iter().filter(|(n, _)| names.contains(n)).collect();
    let full_default = subst(&template, &defaults);
    let (scheme, base_url) = absolute(&full_default)?;
    let mut out = Vec::new();
    for c in combos {
        let authority = subst(&authority_t, &c);
        let (s, hostport) = authority.split_once("://").ok_or("not a URL")?;
        if s.to_ascii_lowercase() != scheme {
            return Err("a variable changes the scheme".into());
        }
        let pattern = host_pattern(&scheme, hostport)?;
        out.push(Expanded {
            scheme: scheme.clone(),
            pattern,
            url: base_url.clone(),
            top: at.starts_with("/servers"),
            from: at.to_owned(),
        });
    }
    Ok(out)
}

/// Addresses the SSRF guard refuses, and `.local`/`.localhost`/`.internal` names.
fn is_local(pattern: &str) -> bool {
    let host = match pattern.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => pattern,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        // What the SSRF guard would refuse (loopback, private, link-local, …).
        return crate::policy::ssrf::classify(ip).is_some();
    }
    host == "localhost" || host.ends_with(".localhost") || host.ends_with(".local") || host.ends_with(".internal")
}

/// The scheme and the URL as a base URL (no trailing `/`), checked.
fn absolute(url: &str) -> Result<(String, String), String> {
    let u: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a valid URL"))?;
    let scheme = u.scheme_str().unwrap_or_default().to_ascii_lowercase();
    if !matches!(scheme.as_str(), "http" | "https") {
        return Err(format!("scheme {scheme:?}: only http and https servers are proxied"));
    }
    let authority = u.authority().ok_or("no host")?;
    if authority.as_str().contains('@') {
        return Err("the URL carries user information".into());
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = authority.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    let path = u.path().trim_end_matches('/');
    Ok((scheme.clone(), format!("{scheme}://{host}{port}{path}")))
}

/// `hostport` as an `allowed_hosts` entry (the port kept unless it is the
/// scheme's default).
fn host_pattern(scheme: &str, hostport: &str) -> Result<String, String> {
    if hostport.contains('@') {
        return Err("the URL carries user information".into());
    }
    let lower = hostport.to_ascii_lowercase();
    let default = if scheme == "https" { ":443" } else { ":80" };
    let p = lower.strip_suffix(default).unwrap_or(&lower).trim_end_matches('.').to_owned();
    crate::policy::hosts::HostPattern::parse(&p).map_err(|r| format!("host {p:?}: {r}"))?;
    Ok(p)
}
