//! Who is calling: the run token and connection a caller presents in
//! `Proxy-Authorization` — as the proxy URL's user info
//! (`http://CONNECTION_ID:TOKEN@proxy:8080`, which every HTTP client sends
//! as `Basic`) or as `Bearer TOKEN` — checked against the run-token keys.
//!
//! A keep-alive connection (or a tunnel) that sends the same field again
//! reuses the first check ([`AuthMemo`]): no MAC per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The last `Proxy-Authorization` a caller connection sent, what it
/// proved, and until when that holds (its token's expiry as a monotonic
/// deadline, so that a kept answer is checked without reading the wall
/// clock; none: no token, nothing expires).
#[derive(Default)]
pub(crate) struct AuthMemo {
    last: Option<(h1::OwnValue, Arc<Caller>, Option<Instant>)>,
}

/// Until when a check made at `now` (`now_unix` on the wall clock) holds:
/// a token's `exp` less a second, as a deadline on the monotonic clock —
/// never later than the wall clock's check would say (`now_unix` is
/// rounded down, so the token may really have up to a second less left;
/// a check in the last second is made anew each time, by the wall clock).
fn holds_until(claims: Option<&RunClaims>, now_unix: i64, now: Instant) -> Option<Instant> {
    let exp = claims?.exp;
    // At most a day: a far `exp` is checked again then (one MAC).
    let left = exp.saturating_sub(now_unix).saturating_sub(1).clamp(0, HOLD_AT_MOST_SECS);
    Some(now + Duration::from_secs(left as u64))
}

const HOLD_AT_MOST_SECS: i64 = 86_400;

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
    now: Instant,
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
    let fresh = |until: &Option<Instant>| until.is_none_or(|u| now < u);
    if let Some((_, caller, _)) = memo.last.as_ref().filter(|(f, _, until)| *f == field && fresh(until)) {
        return Ok(Some(caller.clone()));
    }
    let now_unix = unix_now();
    let caller = Arc::new(check(state, &field, now_unix, required)?);
    let until = holds_until(caller.claims.as_ref(), now_unix, now);
    memo.last = Some((field, caller.clone(), until));
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

    /// A kept check holds until a second before its token's `exp` (never
    /// past what the wall clock says); without a token, for good.
    #[test]
    fn a_kept_check_holds_until_just_before_expiry() {
        let claims =
            |exp| RunClaims { jti: "rt_1".into(), org: "o".into(), sub: None, conns: None, ints: None, iat: 0, exp };
        let now = Instant::now();
        assert_eq!(holds_until(None, 1_000, now), None);
        assert_eq!(holds_until(Some(&claims(1_060)), 1_000, now), Some(now + Duration::from_secs(59)));
        // Expiring within the second, or already expired: made anew each time.
        for exp in [1_001, 1_000, 10] {
            assert_eq!(holds_until(Some(&claims(exp)), 1_000, now), Some(now), "exp {exp}");
        }
        let day = Duration::from_secs(HOLD_AT_MOST_SECS as u64);
        assert_eq!(holds_until(Some(&claims(i64::MAX)), 1_000, now), Some(now + day));
    }

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
