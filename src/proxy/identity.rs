//! Who is calling: the run token and connection a caller presents in
//! `Proxy-Authorization` — as the proxy URL's user info
//! (`http://CONNECTION_ID:TOKEN@proxy:8080`, which every HTTP client sends
//! as `Basic`) or as `Bearer TOKEN` — checked against the run-token keys.
//!
//! A keep-alive connection (or a tunnel) that sends the same field again
//! reuses the first check ([`AuthMemo`]): no MAC per request.

use std::sync::Arc;

use base64::Engine as _;

use super::ProxyState;
use crate::config::ProxyMode;
use crate::creds::unix_now;
use crate::h1;
use crate::ids::ConnectionId;
use crate::outbound::ProxyError;
use crate::runtoken::{RunClaims, RunTokenError, RUN_TOKEN_PREFIX};

/// What a caller proved: a run token's claims, and the connection its
/// proxy URL's user name names.
#[derive(Debug, Default)]
pub(crate) struct Caller {
    pub claims: Option<RunClaims>,
    /// `Basic` user name of a connection id's shape: the connection of
    /// requests without `X-Connection-Id`.
    pub connection: Option<ConnectionId>,
}

impl Caller {
    /// The organization requests act for: the token's, else the sidecar's.
    pub fn org<'a>(&'a self, state: &'a ProxyState) -> &'a str {
        self.claims.as_ref().map_or(state.org_id.as_str(), |c| c.org.as_str())
    }
}

/// The last `Proxy-Authorization` a caller connection sent, and what it
/// proved.
#[derive(Default)]
pub(crate) struct AuthMemo {
    last: Option<(h1::OwnValue, Arc<Caller>)>,
}

/// The caller of one request. `presented`: its `Proxy-Authorization`
/// field, already out of its headers (it never goes upstream); more than
/// one is refused. `tunnel`: what the `CONNECT` proved, for a
/// request inside its tunnel (a `Proxy-Authorization` there is not the
/// client's proxy credential and is dropped). `None`: nothing presented,
/// and nothing required.
pub(crate) fn identify(
    state: &ProxyState,
    presented: h1::OwnField,
    tunnel: Option<&Arc<Caller>>,
    memo: &mut AuthMemo,
) -> Result<Option<Arc<Caller>>, ProxyError> {
    let presented = match presented {
        h1::OwnField::Absent => None,
        h1::OwnField::One(field) => Some(field),
        h1::OwnField::Repeated => return Err(ProxyError::RunTokenInvalid("more than one Proxy-Authorization field")),
    };
    if let Some(caller) = tunnel {
        return Ok(Some(caller.clone()));
    }
    let required = state.mode == ProxyMode::Shared || state.require_run_token;
    let Some(field) = presented else {
        return if required { Err(ProxyError::RunTokenMissing) } else { Ok(None) };
    };
    let now = unix_now();
    let fresh = |c: &Caller| c.claims.as_ref().is_none_or(|t| t.exp > now);
    if let Some((_, caller)) = memo.last.as_ref().filter(|(f, c)| *f == field && fresh(c)) {
        return Ok(Some(caller.clone()));
    }
    let caller = Arc::new(check(state, &field, now, required)?);
    memo.last = Some((field, caller.clone()));
    Ok(Some(caller))
}

/// Parses and verifies a `Proxy-Authorization` value.
fn check(state: &ProxyState, field: &h1::OwnValue, now: i64, required: bool) -> Result<Caller, ProxyError> {
    let (user, token) = parse(field.as_bytes()).ok_or(ProxyError::RunTokenInvalid("not Basic or Bearer"))?;
    let connection = user.and_then(|u| ConnectionId::parse(u.as_bytes()));
    // A sidecar that requires no token passes other credentials over (the
    // field is dropped all the same): only what looks like a run token is
    // checked there.
    let token = token.filter(|t| !t.is_empty() && (required || t.starts_with(RUN_TOKEN_PREFIX)));
    let Some(token) = token else {
        return if required { Err(ProxyError::RunTokenMissing) } else { Ok(Caller { claims: None, connection }) };
    };
    let claims = state.run_tokens.verify(&token, now).map_err(|e| match e {
        RunTokenError::Expired => ProxyError::RunTokenExpired,
        RunTokenError::Invalid => ProxyError::RunTokenInvalid("not signed by a key of this proxy, or cut short"),
    })?;
    if state.mode == ProxyMode::Sidecar && claims.org != state.org_id {
        return Err(ProxyError::RunTokenInvalid("minted for another organization than this sidecar's"));
    }
    Ok(Caller { claims: Some(claims), connection })
}

/// `Basic base64(user:password)` → (user, password); `Bearer token` →
/// (none, token). The scheme is case-insensitive (RFC 9110 §11.1).
fn parse(value: &[u8]) -> Option<(Option<String>, Option<String>)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some((None, Some(rest.to_owned())));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':').unwrap_or((decoded.as_str(), ""));
    let user = (!user.is_empty()).then(|| user.to_owned());
    Some((user, Some(password.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_and_bearer_forms() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let basic = format!("Basic {}", b64("conn_x:cprt1.a.b.c"));
        assert_eq!(parse(basic.as_bytes()), Some((Some("conn_x".into()), Some("cprt1.a.b.c".into()))));
        let lower = format!("basic {}", b64(":tok"));
        assert_eq!(parse(lower.as_bytes()), Some((None, Some("tok".into()))));
        let user_only = format!("Basic {}", b64("conn_x"));
        assert_eq!(parse(user_only.as_bytes()), Some((Some("conn_x".into()), Some(String::new()))));
        assert_eq!(parse(b"Bearer cprt1.a.b.c"), Some((None, Some("cprt1.a.b.c".into()))));
        assert_eq!(parse(b"Digest x"), None);
        assert_eq!(parse(b"Basic !!!"), None);
        assert_eq!(parse(b"Bearer"), None);
    }
}
