//! Connection lifecycle events: what happened to a connection, as the JSON
//! body the store keeps with the change that caused it (the outbox) and the
//! admin API's feed (`GET /v1/events`) serves as is. Never a credential:
//! ids, names, the state and a problem code.
//!
//! Uses `store` (its row types) and `ids`.

use serde_json::json;

use crate::store::{ConnectionMeta, ConnectionState, NewEvent};

/// The kinds of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A connection was made (admin API, connect page, OAuth2 callback).
    Created,
    /// Its credential was replaced (OAuth2 re-authorization, a connect
    /// page's re-authorization session); it is `active` again.
    Reauthorized,
    /// The provider refused its refresh token (`invalid_grant`).
    NeedsReauth,
    /// A refresh failed for a passing reason (the token endpoint was down,
    /// or refused for a reason other than `invalid_grant`): the first
    /// failure of a streak only.
    RefreshFailed,
    /// The first successful refresh after a failed one.
    Recovered,
    /// A connection test failed.
    TestFailed,
    /// Deleted (with the provider revocation's result).
    Deleted,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Self::Created,
        Self::Reauthorized,
        Self::NeedsReauth,
        Self::RefreshFailed,
        Self::Recovered,
        Self::TestFailed,
        Self::Deleted,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "connection.created",
            Self::Reauthorized => "connection.reauthorized",
            Self::NeedsReauth => "connection.needs_reauth",
            Self::RefreshFailed => "connection.refresh_failed",
            Self::Recovered => "connection.recovered",
            Self::TestFailed => "connection.test_failed",
            Self::Deleted => "connection.deleted",
        }
    }
}

/// An event about `meta` (as it is after the change: `state`), with the
/// problem `code` that caused it and, for a deletion, the provider
/// revocation's result.
pub fn connection_event(
    kind: Kind,
    meta: &ConnectionMeta,
    state: ConnectionState,
    code: Option<&str>,
    provider_revocation: Option<&str>,
) -> NewEvent {
    let id = crate::ids::new_id("evt_");
    let now = std::time::SystemTime::now();
    let created_at = crate::telemetry::unix_now();
    let mut data = json!({
        "connection_id": meta.id,
        "org_id": meta.org_id,
        "user_id": meta.user_id,
        "integration": meta.integration,
        "auth_method": meta.auth_method,
        "state": state.as_str(),
        "code": code,
    });
    if let Some(r) = provider_revocation {
        data["provider_revocation"] = json!(r);
    }
    // The Standard Webhooks payload shape: type, timestamp, data.
    let payload = json!({
        "id": id,
        "type": kind.as_str(),
        "timestamp": humantime::format_rfc3339_seconds(now).to_string(),
        "data": data,
    });
    NewEvent {
        id,
        kind: kind.as_str().to_owned(),
        org_id: meta.org_id.clone(),
        connection_id: meta.id.clone(),
        payload: payload.to_string(),
        created_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_the_connection_and_nothing_secret() {
        let meta = ConnectionMeta {
            id: "conn_x".into(),
            org_id: "org_a".into(),
            user_id: "u".into(),
            integration: "github".into(),
            auth_method: "oauth".into(),
            state: ConnectionState::Active,
            created_at: 1,
            updated_at: 2,
            activity: Default::default(),
        };
        let e = connection_event(Kind::Deleted, &meta, ConnectionState::Active, None, Some("revoked"));
        assert!(e.id.starts_with("evt_"));
        let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(v["type"], "connection.deleted");
        assert_eq!(v["id"], e.id.as_str());
        assert_eq!(v["data"]["provider_revocation"], "revoked");
        assert_eq!(v["data"]["connection_id"], "conn_x");
        let keys: Vec<&String> = v["data"].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "auth_method",
                "code",
                "connection_id",
                "integration",
                "org_id",
                "provider_revocation",
                "state",
                "user_id"
            ]
        );
    }
}
