//! The connect pages' HTML: minijinja templates compiled into the binary
//! (autoescaped: every value is HTML-escaped), one stylesheet, and the
//! security headers every public response carries.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::Environment;
use serde::Serialize;

use crate::problem::Code;

const TEMPLATES: [(&str, &str); 6] = [
    ("layout.html", include_str!("templates/layout.html")),
    ("choose.html", include_str!("templates/choose.html")),
    ("form.html", include_str!("templates/form.html")),
    ("done.html", include_str!("templates/done.html")),
    ("error.html", include_str!("templates/error.html")),
    ("connect.css", include_str!("templates/connect.css")),
];

/// The compiled templates and the headers every page carries.
pub struct Pages {
    env: Environment<'static>,
    headers: HeaderMap,
}

impl Pages {
    /// `form_targets`: origins a form may lead to (through a redirect) besides
    /// this one: `return_to` origins and OAuth2 providers (CSP `form-action`).
    pub fn new(frame_ancestors: &str, form_targets: &[String]) -> Self {
        let mut env = Environment::new();
        for (name, text) in TEMPLATES {
            env.add_template(name, text).expect("the connect templates compile");
        }
        let mut form_action = String::from("'self'");
        for t in form_targets {
            form_action.push(' ');
            form_action.push_str(t);
        }
        // No script at all; styles from our own stylesheet only.
        let csp = format!(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action {form_action}; \
             frame-ancestors {frame_ancestors}; base-uri 'none'"
        );
        let mut headers = HeaderMap::new();
        let mut set = |name: HeaderName, value: &str| {
            headers.insert(name, HeaderValue::from_str(value).expect("checked header values"));
        };
        set(header::CONTENT_SECURITY_POLICY, &csp);
        set(header::REFERRER_POLICY, "no-referrer");
        set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        set(header::CACHE_CONTROL, "no-store");
        set(HeaderName::from_static("cross-origin-opener-policy"), "same-origin");
        if frame_ancestors.trim() == "'none'" {
            set(header::X_FRAME_OPTIONS, "DENY");
        }
        Self { env, headers }
    }

    /// The headers every public response carries.
    pub fn secure(&self, mut r: Response) -> Response {
        for (k, v) in &self.headers {
            r.headers_mut().entry(k).or_insert_with(|| v.clone());
        }
        r
    }

    fn html(&self, template: &str, ctx: impl Serialize) -> Result<String, minijinja::Error> {
        self.env.get_template(template).and_then(|t| t.render(ctx))
    }

    /// A page from `template` with `ctx`.
    pub fn render(&self, status: StatusCode, template: &str, ctx: impl Serialize) -> Response {
        match self.html(template, ctx) {
            Ok(html) => {
                (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], Body::from(html)).into_response()
            }
            Err(e) => {
                tracing::error!(template, error = %e, "rendering a connect page failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
            }
        }
    }

    /// The error page for `code`.
    pub fn error(&self, code: Code, detail: &str) -> Response {
        let status = code.status();
        let mut r = self.render(
            status,
            "error.html",
            minijinja::context! { title => code.title(), detail, code => code.as_str(), status => status.as_u16() },
        );
        r.extensions_mut().insert(code);
        r
    }

    pub fn stylesheet(&self) -> Response {
        let css = self.env.get_template("connect.css").ok().map(|t| t.source().to_owned()).unwrap_or_default();
        ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], css).into_response()
    }
}

/// A 303 to `location`.
pub fn see_other(location: &str) -> Response {
    match HeaderValue::try_from(location) {
        Ok(v) => (StatusCode::SEE_OTHER, [(header::LOCATION, v)]).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "bad redirect").into_response(),
    }
}

/// `url` with `key=value` added to its query (values are ours: ids and codes).
pub fn with_query(url: &str, key: &str, value: &str) -> String {
    let (base, fragment) = url.split_once('#').map_or((url, None), |(b, f)| (b, Some(f)));
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut out = format!("{base}{sep}{key}={}", form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>());
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_escape_what_they_show() {
        let p = Pages::new("'none'", &["https://app.example".into()]);
        let ctx =
            minijinja::context! { title => "t", detail => "<script>alert(1)</script>\"'", code => "c", status => 404 };
        let html = p.html("error.html", ctx).unwrap();
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("\"'"), "quotes are escaped too: {html}");
        let csp = p.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"), "{csp}");
        assert!(csp.contains("form-action 'self' https://app.example;"), "{csp}");
        assert_eq!(p.error(Code::SessionNotFound, "x").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn query_parameters_are_added_before_the_fragment() {
        assert_eq!(with_query("https://a.example/done", "error", "x y"), "https://a.example/done?error=x+y");
        assert_eq!(
            with_query("https://a.example/d?k=1#top", "connection_id", "conn_1"),
            "https://a.example/d?k=1&connection_id=conn_1#top"
        );
    }
}
