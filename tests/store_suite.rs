//! One store suite, run against both implementations: SQLite (a file in a
//! temp dir) and PostgreSQL (a fresh database in the cluster at
//! DATABASE_URL, which `scripts/test` starts).

mod support;

use std::sync::Arc;

use credproxy::store::postgres::PgStore;
use credproxy::store::sqlite::SqliteStore;
use credproxy::store::{
    Activity, ConnectSession, ConnectionMeta, ConnectionQuery, ConnectionRow, ConnectionState, DeliveryOutcome,
    KeyUsage, LastTest, NewEvent, OAuthApp, OAuthAppRow, PendingAuthorization, RowUpdate, SealedBytes, SealedTable,
    Store, StoreError,
};

/// Each wait on PostgreSQL (`store.timeout_ms`'s default).
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn row(id: &str, org: &str, t: i64) -> ConnectionRow {
    ConnectionRow {
        meta: ConnectionMeta {
            id: id.into(),
            org_id: org.into(),
            user_id: "u".into(),
            integration: "i".into(),
            auth_method: "m".into(),
            state: ConnectionState::Active,
            created_at: t,
            updated_at: t,
            activity: Activity::default(),
        },
        sealed: SealedBytes {
            key_id: "k".into(),
            wrapped_key: vec![1, 2],
            nonce: vec![3],
            ciphertext: vec![0, 255, 4],
        },
    }
}

fn org(org_id: Option<&str>) -> ConnectionQuery {
    ConnectionQuery { org_id: org_id.map(str::to_owned), limit: 100, ..Default::default() }
}

async fn ids(s: &dyn Store, q: ConnectionQuery) -> Vec<String> {
    s.list_connections(&q).await.unwrap().into_iter().map(|m| m.id).collect()
}

/// Filters and pages: every filter narrows, pages follow (created_at, id)
/// without skipping or repeating rows that share a creation time.
async fn listing(s: &dyn Store) {
    for (i, (user, integration)) in
        [("u1", "gh"), ("u2", "gh"), ("u1", "slack"), ("u1", "gh"), ("u2", "slack")].iter().enumerate()
    {
        let mut r = row(&format!("conn_l{i}"), "ol", 100 + (i as i64) / 2);
        r.meta.user_id = (*user).into();
        r.meta.integration = (*integration).into();
        s.insert_connection(&r, None).await.unwrap();
    }
    s.set_state("conn_l3", ConnectionState::NeedsReauth, 200, None).await.unwrap();
    let base = org(Some("ol"));
    let q = |f: &dyn Fn(&mut ConnectionQuery)| {
        let mut q = base.clone();
        f(&mut q);
        q
    };
    assert_eq!(ids(s, q(&|q| q.user_id = Some("u1".into()))).await, ["conn_l0", "conn_l2", "conn_l3"]);
    assert_eq!(ids(s, q(&|q| q.integration = Some("slack".into()))).await, ["conn_l2", "conn_l4"]);
    assert_eq!(ids(s, q(&|q| q.state = Some(ConnectionState::NeedsReauth))).await, ["conn_l3"]);
    let both = q(&|q| {
        q.user_id = Some("u1".into());
        q.integration = Some("gh".into());
        q.state = Some(ConnectionState::Active);
    });
    assert_eq!(ids(s, both).await, ["conn_l0"]);
    // Pages of two: created_at 100, 100 | 101, 101 | 102.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .list_connections(&q(&|q| {
                q.limit = 2;
                q.after.clone_from(&after);
            }))
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|m| (m.created_at, m.id.clone()));
        seen.extend(page.into_iter().map(|m| m.id));
    }
    assert_eq!(seen, ["conn_l0", "conn_l1", "conn_l2", "conn_l3", "conn_l4"]);
    for id in seen {
        assert!(s.delete_connection(&id, None).await.unwrap());
    }
}

async fn suite(s: Arc<dyn Store>) {
    s.ping().await.unwrap();
    s.insert_connection(&row("c1", "o1", 1), None).await.unwrap();
    s.insert_connection(&row("c2", "o1", 2), None).await.unwrap();
    s.insert_connection(&row("c3", "o2", 3), None).await.unwrap();
    assert!(matches!(s.insert_connection(&row("c1", "o1", 1), None).await, Err(StoreError::Duplicate(_))));
    assert_eq!(s.get_connection("c1").await.unwrap(), Some(row("c1", "o1", 1)));
    assert_eq!(s.get_connection("nope").await.unwrap(), None);
    assert_eq!(ids(&*s, org(Some("o1"))).await, ["c1", "c2"]);
    assert!(ids(&*s, org(Some("o9"))).await.is_empty());
    assert_eq!(ids(&*s, org(None)).await, ["c1", "c2", "c3"], "every organization's, oldest first");

    let sealed = SealedBytes { key_id: "k2".into(), wrapped_key: vec![9], nonce: vec![8], ciphertext: vec![7] };
    assert!(s.update_credential("c2", &sealed, ConnectionState::NeedsReauth, 10, None).await.unwrap());
    let r = s.get_connection("c2").await.unwrap().unwrap();
    assert_eq!((r.sealed, r.meta.state, r.meta.updated_at), (sealed.clone(), ConnectionState::NeedsReauth, 10));
    assert!(!s.update_credential("nope", &sealed, ConnectionState::Active, 10, None).await.unwrap());
    assert!(s.set_state("c2", ConnectionState::Revoked, 11, None).await.unwrap());
    assert_eq!(s.get_connection("c2").await.unwrap().unwrap().meta.state, ConnectionState::Revoked);
    assert!(!s.set_state("nope", ConnectionState::Active, 11, None).await.unwrap());

    // Activity is not a change (updated_at stays); a later use wins.
    let test = LastTest { at: 20, ok: false, code: Some("unexpected_status".into()) };
    assert!(s.record_test("c1", &test, None).await.unwrap());
    assert!(!s.record_test("nope", &test, None).await.unwrap());
    s.record_used(&[("c1".into(), 30), ("c3".into(), 31), ("nope".into(), 1)]).await.unwrap();
    s.record_used(&[("c1".into(), 25)]).await.unwrap();
    let m = s.get_connection("c1").await.unwrap().unwrap().meta;
    assert_eq!(
        (m.activity, m.updated_at),
        (Activity { last_used_at: Some(30), last_test: Some(test), ..Default::default() }, 1)
    );
    let listed = s.list_connections(&org(Some("o2"))).await.unwrap();
    assert_eq!(listed[0].activity, Activity { last_used_at: Some(31), last_test: None, ..Default::default() });
    let ok = LastTest { at: 40, ok: true, code: None };
    assert!(s.record_test("c3", &ok, None).await.unwrap());
    assert_eq!(s.get_connection("c3").await.unwrap().unwrap().meta.activity.last_test, Some(ok));

    assert!(s.delete_connection("c1", None).await.unwrap());
    assert!(!s.delete_connection("c1", None).await.unwrap());
    assert_eq!(s.get_connection("c1").await.unwrap(), None);

    let p = PendingAuthorization {
        state_hash: "h1".into(),
        org_id: "o".into(),
        user_id: "u".into(),
        integration: "i".into(),
        auth_method: "m".into(),
        redirect_uri: "http://127.0.0.1/cb".into(),
        return_to: Some("https://app.example/done".into()),
        connection_id: None,
        verifier: SealedBytes { key_id: "k".into(), wrapped_key: vec![1], nonce: vec![2], ciphertext: vec![3] },
        created_at: 100,
        expires_at: 700,
        connect_session: Some("cs_1".into()),
    };
    s.insert_pending(&p).await.unwrap();
    assert_eq!(s.take_pending("h1").await.unwrap(), Some(p.clone()), "round trip");
    assert_eq!(s.take_pending("h1").await.unwrap(), None, "single use");
    s.insert_pending(&p).await.unwrap();
    let later = PendingAuthorization {
        state_hash: "h2".into(),
        created_at: 800,
        expires_at: 1400,
        connection_id: Some("c3".into()),
        ..p
    };
    s.insert_pending(&later).await.unwrap();
    assert_eq!(s.take_pending("h1").await.unwrap(), None, "expired ones are swept");
    assert_eq!(s.take_pending("h2").await.unwrap().unwrap().connection_id.as_deref(), Some("c3"));

    connect_sessions(&*s).await;
    listing(&*s).await;
    events(&*s).await;
    deliveries(&*s).await;
    rotation(&*s).await;
    oauth_apps(&*s).await;
}

/// Organizations' own OAuth apps: one per (org, integration, method), a
/// replacement keeps created_at, listed per organization, part of the
/// rotation walk and the key counts.
async fn oauth_apps(s: &dyn Store) {
    let app = |org: &str, method: &str, client: &str, t: i64, key: &str| OAuthAppRow {
        app: OAuthApp {
            org_id: org.into(),
            integration: "oidc".into(),
            auth_method: method.into(),
            client_id: client.into(),
            created_at: t,
            updated_at: t,
        },
        sealed: SealedBytes { key_id: key.into(), wrapped_key: vec![1], nonce: vec![2], ciphertext: vec![3] },
    };
    assert_eq!(s.get_oauth_app("oa", "oidc", "code").await.unwrap(), None);
    s.put_oauth_app(&app("oa", "code", "client-1", 100, "k")).await.unwrap();
    s.put_oauth_app(&app("oa", "machine", "client-2", 101, "k")).await.unwrap();
    s.put_oauth_app(&app("ob", "code", "client-3", 102, "k")).await.unwrap();
    // Replaced: the new client id and secret, created_at from the first.
    let mut replaced = app("oa", "code", "client-1b", 200, "k2");
    s.put_oauth_app(&replaced).await.unwrap();
    replaced.app.created_at = 100;
    assert_eq!(s.get_oauth_app("oa", "oidc", "code").await.unwrap(), Some(replaced.clone()));
    let listed = s.list_oauth_apps("oa").await.unwrap();
    assert_eq!(listed.iter().map(|a| a.app.client_id.as_str()).collect::<Vec<_>>(), ["client-1b", "client-2"]);
    // Rotation sees them, keyed by integration/method/org.
    let walk = s.sealed_not_under(SealedTable::OAuthApps, "k2", "", 10).await.unwrap();
    assert_eq!(
        walk.iter().map(|r| (r.id.as_str(), r.org_id.as_str())).collect::<Vec<_>>(),
        [("oidc/code/ob", "ob"), ("oidc/machine/oa", "oa")]
    );
    assert!(s.rewrap(SealedTable::OAuthApps, "oidc/code/ob", &walk[0].sealed, "k2", &[9]).await.unwrap());
    let usage = s.key_usage().await.unwrap();
    let apps: Vec<_> =
        usage.iter().filter(|u| u.table == SealedTable::OAuthApps).map(|u| (u.key_id.as_str(), u.records)).collect();
    assert_eq!(apps, [("k", 1), ("k2", 2)]);
    assert!(s.delete_oauth_app("oa", "oidc", "code").await.unwrap());
    assert!(!s.delete_oauth_app("oa", "oidc", "code").await.unwrap());
    assert_eq!(s.list_oauth_apps("oa").await.unwrap().len(), 1);
}

/// Connect sessions: found by token hash, claimed at most once (and only
/// before they expire), released when nothing was made, swept a day after.
async fn connect_sessions(s: &dyn Store) {
    let cs = ConnectSession {
        id: "cs_1".into(),
        token_hash: "th1".into(),
        org_id: "o".into(),
        user_id: "u".into(),
        integrations: Some(vec!["a".into(), "b".into()]),
        connection_id: None,
        return_to: Some("https://app.example/done?x=1".into()),
        created_at: 1000,
        expires_at: 1600,
        claimed_at: None,
        connection_made: None,
    };
    s.insert_connect_session(&cs).await.unwrap();
    assert_eq!(s.connect_session("th1").await.unwrap(), Some(cs.clone()), "round trip");
    assert_eq!(s.connect_session("th2").await.unwrap(), None);
    assert!(!s.claim_connect_session("cs_1", 1600).await.unwrap(), "an expired session cannot be claimed");
    assert!(s.claim_connect_session("cs_1", 1100).await.unwrap());
    assert!(!s.claim_connect_session("cs_1", 1101).await.unwrap(), "claimed once");
    s.finish_connect_session("cs_1", None).await.unwrap();
    assert!(s.claim_connect_session("cs_1", 1102).await.unwrap(), "released: claimable again");
    s.finish_connect_session("cs_1", Some("conn_x")).await.unwrap();
    s.finish_connect_session("cs_1", None).await.unwrap();
    let done = s.connect_session("th1").await.unwrap().unwrap();
    assert_eq!(
        (done.claimed_at, done.connection_made.as_deref()),
        (Some(1102), Some("conn_x")),
        "a made session stays claimed"
    );
    assert!(!s.claim_connect_session("cs_1", 1103).await.unwrap());
    let all = ConnectSession {
        id: "cs_2".into(),
        token_hash: "th2".into(),
        integrations: None,
        created_at: 1600 + 86_401,
        expires_at: 1600 + 90_000,
        ..cs
    };
    s.insert_connect_session(&all).await.unwrap();
    assert_eq!(s.connect_session("th1").await.unwrap(), None, "swept a day after it expired");
    assert_eq!(s.connect_session("th2").await.unwrap().unwrap().integrations, None);
}

fn event(id: &str, org: &str, conn: &str) -> NewEvent {
    NewEvent {
        id: id.into(),
        kind: "connection.test".into(),
        org_id: org.into(),
        connection_id: conn.into(),
        payload: format!("{{\"id\":\"{id}\"}}"),
        created_at: 5,
    }
}

/// The outbox: an event is written with its change, in one transaction —
/// none when the change changes nothing or fails — and read back in order.
async fn events(s: &dyn Store) {
    let before = s.list_events(None, 0, 1000).await.unwrap().len();
    assert_eq!(before, 0);
    s.insert_connection(&row("e1", "oe", 40), Some(&event("evt_1", "oe", "e1"))).await.unwrap();
    // A failed insert (duplicate id) rolls back: no event.
    let dup = s.insert_connection(&row("e1", "oe", 40), Some(&event("evt_dup", "oe", "e1"))).await;
    assert!(matches!(dup, Err(StoreError::Duplicate(_))), "{dup:?}");
    let sealed = SealedBytes { key_id: "k".into(), wrapped_key: vec![1], nonce: vec![2], ciphertext: vec![3] };
    assert!(s
        .update_credential("e1", &sealed, ConnectionState::Active, 41, Some(&event("evt_2", "oe", "e1")))
        .await
        .unwrap());
    assert!(!s
        .update_credential("gone", &sealed, ConnectionState::Active, 41, Some(&event("evt_x1", "oe", "gone")))
        .await
        .unwrap());
    assert!(s.set_state("e1", ConnectionState::NeedsReauth, 42, Some(&event("evt_3", "oe", "e1"))).await.unwrap());
    assert!(!s.set_state("gone", ConnectionState::Active, 42, Some(&event("evt_x2", "oe", "gone"))).await.unwrap());
    let test = LastTest { at: 43, ok: false, code: Some("unexpected_status".into()) };
    assert!(s.record_test("e1", &test, Some(&event("evt_4", "oe", "e1"))).await.unwrap());
    s.insert_connection(&row("e2", "other", 44), Some(&event("evt_5", "other", "e2"))).await.unwrap();
    // Under the row lock, as a refresh writes it.
    let lock = s.lock_connection("e1", std::time::Duration::from_secs(5)).await.unwrap().unwrap();
    lock.commit(Some(RowUpdate::State(ConnectionState::Active)), 45, Some(&event("evt_6", "oe", "e1"))).await.unwrap();
    let lock = s.lock_connection("e1", std::time::Duration::from_secs(5)).await.unwrap().unwrap();
    lock.commit(None, 46, Some(&event("evt_x3", "oe", "e1"))).await.unwrap();
    // A failure streak: its start is recorded (with its event) once.
    for (at, ev) in [(47, "evt_f1"), (48, "evt_x5")] {
        let lock = s.lock_connection("e1", std::time::Duration::from_secs(5)).await.unwrap().unwrap();
        lock.commit(Some(RowUpdate::RefreshFailed), at, Some(&event(ev, "oe", "e1"))).await.unwrap();
    }
    let a = s.get_connection("e1").await.unwrap().unwrap().meta.activity;
    assert_eq!((a.refresh_failed_at, a.last_refreshed_at), (Some(47), None));
    // A refreshed credential ends it and is the last refresh.
    let lock = s.lock_connection("e1", std::time::Duration::from_secs(5)).await.unwrap().unwrap();
    lock.commit(Some(RowUpdate::Credential(sealed.clone())), 49, Some(&event("evt_r1", "oe", "e1"))).await.unwrap();
    let a = s.get_connection("e1").await.unwrap().unwrap().meta.activity;
    assert_eq!((a.refresh_failed_at, a.last_refreshed_at), (None, Some(49)));
    assert!(s.delete_connection("e1", Some(&event("evt_7", "oe", "e1"))).await.unwrap());
    assert!(!s.delete_connection("e1", Some(&event("evt_x4", "oe", "e1"))).await.unwrap());

    let all = s.list_events(None, 0, 1000).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|e| e.event.id.as_str()).collect();
    assert_eq!(
        ids,
        ["evt_1", "evt_2", "evt_3", "evt_4", "evt_5", "evt_6", "evt_f1", "evt_r1", "evt_7"],
        "in order, no event of a non-change"
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(all[0].event, event("evt_1", "oe", "e1"), "round trip");
    let org: Vec<String> = s.list_events(Some("oe"), 0, 1000).await.unwrap().into_iter().map(|e| e.event.id).collect();
    assert_eq!(org.len(), 8, "{org:?}");
    let page = s.list_events(None, all[1].seq, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.event.id.as_str()).collect::<Vec<_>>(), ["evt_3", "evt_4"], "after and limit");
    assert!(s.delete_connection("e2", None).await.unwrap());
}

/// The delivery queue over the events above (nine events, created at 5;
/// evt_5 is org `other`'s): queued once per endpoint with its filters,
/// claimed under a lease, finished, redelivered.
async fn deliveries(s: &dyn Store) {
    let all = |k: &[&str]| k.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    assert_eq!(s.enqueue_deliveries("a", &[], None, 0).await.unwrap(), 9);
    assert_eq!(s.enqueue_deliveries("a", &[], None, 0).await.unwrap(), 0, "queued once");
    assert_eq!(s.enqueue_deliveries("b", &[], Some("other"), 0).await.unwrap(), 1, "org filter");
    assert_eq!(s.enqueue_deliveries("c", &all(&["connection.none"]), None, 0).await.unwrap(), 0, "type filter");
    assert_eq!(s.enqueue_deliveries("d", &[], None, 6).await.unwrap(), 0, "older than `since`");
    assert_eq!(s.delivery_counts().await.unwrap(), (10, 0));

    let first = s.claim_deliveries(100, 130, 5).await.unwrap();
    assert_eq!(first.len(), 5);
    assert_eq!((first[0].event_id.as_str(), first[0].attempts, first[0].created_at), ("evt_1", 0, 5));
    assert!(first[0].payload.contains("evt_1"));
    let rest = s.claim_deliveries(100, 130, 50).await.unwrap();
    assert_eq!(rest.len(), 5, "claimed rows are not claimed again while leased");
    assert!(s.claim_deliveries(120, 150, 50).await.unwrap().is_empty());
    let d = &first[0];
    s.finish_delivery(&d.endpoint, &d.event_id, 101, &DeliveryOutcome::Delivered).await.unwrap();
    let r = &first[1];
    let retry = DeliveryOutcome::Retry { next_attempt_at: 200, error: "503".into() };
    s.finish_delivery(&r.endpoint, &r.event_id, 101, &retry).await.unwrap();
    let f = &first[2];
    s.finish_delivery(&f.endpoint, &f.event_id, 101, &DeliveryOutcome::Failed { error: "gave up".into() })
        .await
        .unwrap();
    assert_eq!(s.delivery_counts().await.unwrap(), (8, 1));
    // The lease ran out for the unfinished ones; the retry is not due yet.
    let again = s.claim_deliveries(131, 160, 50).await.unwrap();
    assert_eq!(again.len(), 7, "{again:?}");
    assert!(again.iter().all(|x| x.event_id != r.event_id));
    for x in &again {
        s.finish_delivery(&x.endpoint, &x.event_id, 140, &DeliveryOutcome::Delivered).await.unwrap();
    }
    let due = s.claim_deliveries(200, 230, 50).await.unwrap();
    assert_eq!((due.len(), due[0].attempts), (1, 1), "the retry, with its attempt counted");
    s.finish_delivery(&due[0].endpoint, &due[0].event_id, 201, &DeliveryOutcome::Delivered).await.unwrap();
    assert_eq!(s.delivery_counts().await.unwrap(), (0, 1));
    assert_eq!(s.redeliver(&d.event_id, 300).await.unwrap(), 1);
    assert_eq!(s.redeliver(&f.event_id, 300).await.unwrap(), 1, "a failed one too");
    assert_eq!(s.redeliver("evt_unknown", 300).await.unwrap(), 0);
    let re = s.claim_deliveries(300, 330, 50).await.unwrap();
    assert_eq!(re.iter().map(|x| x.attempts).collect::<Vec<_>>(), [0, 0]);
    for x in &re {
        s.finish_delivery(&x.endpoint, &x.event_id, 301, &DeliveryOutcome::Delivered).await.unwrap();
    }
    assert_eq!(s.delivery_counts().await.unwrap(), (0, 0));
}

/// What `keys rotate` needs: a resumable walk of records not under a key,
/// compare-and-set rewrap, and per-key counts.
async fn rotation(s: &dyn Store) {
    // Left from above: c2 under k2, c3 under k. Add more under k.
    for (i, id) in ["r1", "r2", "r3"].iter().enumerate() {
        s.insert_connection(&row(id, "o3", 20 + i as i64), None).await.unwrap();
    }
    let pending = PendingAuthorization {
        state_hash: "h9".into(),
        org_id: "o3".into(),
        user_id: "u".into(),
        integration: "i".into(),
        auth_method: "m".into(),
        redirect_uri: "http://127.0.0.1/cb".into(),
        return_to: None,
        connection_id: None,
        verifier: SealedBytes { key_id: "k".into(), wrapped_key: vec![5], nonce: vec![6], ciphertext: vec![7] },
        created_at: 2000,
        expires_at: 2600,
        connect_session: None,
    };
    s.insert_pending(&pending).await.unwrap();
    let usage = s.key_usage().await.unwrap();
    let expect = |table, key_id: &str, records| KeyUsage { table, key_id: key_id.into(), records };
    assert_eq!(
        usage,
        [
            expect(SealedTable::Connections, "k", 4),
            expect(SealedTable::Connections, "k2", 1),
            expect(SealedTable::PendingAuthorizations, "k", 1),
        ]
    );

    // Walk everything not under k2, two at a time, in id order.
    let page = |after: &'static str| async move {
        let recs = s.sealed_not_under(SealedTable::Connections, "k2", after, 2).await.unwrap();
        recs.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    assert_eq!(page("").await, ["c3", "r1"]);
    assert_eq!(page("r1").await, ["r2", "r3"]);
    assert!(page("r3").await.is_empty());
    let p = s.sealed_not_under(SealedTable::PendingAuthorizations, "k2", "", 10).await.unwrap();
    assert_eq!((p.len(), p[0].id.as_str(), p[0].org_id.as_str()), (1, "h9", "o3"));
    assert_eq!(p[0].sealed, pending.verifier);

    // Compare-and-set: a stale view loses, the current one wins; nonce and
    // ciphertext are kept.
    let old = row("r1", "o3", 20).sealed;
    let rewritten = SealedBytes { key_id: "k".into(), wrapped_key: vec![42], nonce: vec![43], ciphertext: vec![44] };
    assert!(s.update_credential("r1", &rewritten, ConnectionState::Active, 30, None).await.unwrap());
    assert!(!s.rewrap(SealedTable::Connections, "r1", &old, "k2", &[1]).await.unwrap());
    assert_eq!(s.get_connection("r1").await.unwrap().unwrap().sealed, rewritten);
    assert!(s.rewrap(SealedTable::Connections, "r1", &rewritten, "k2", &[50, 51]).await.unwrap());
    let now = s.get_connection("r1").await.unwrap().unwrap().sealed;
    assert_eq!(now, SealedBytes { key_id: "k2".into(), wrapped_key: vec![50, 51], ..rewritten });
    assert!(!s.rewrap(SealedTable::Connections, "gone", &old, "k2", &[1]).await.unwrap());
    assert!(s.rewrap(SealedTable::PendingAuthorizations, "h9", &pending.verifier, "k2", &[60]).await.unwrap());
    assert_eq!(page("").await, ["c3", "r2"], "r1 is now under k2");
    let usage = s.key_usage().await.unwrap();
    assert_eq!(
        usage,
        [
            expect(SealedTable::Connections, "k", 3),
            expect(SealedTable::Connections, "k2", 2),
            expect(SealedTable::PendingAuthorizations, "k2", 1),
        ]
    );
}

#[tokio::test]
async fn sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap())).await;
}

#[tokio::test]
async fn postgres_store_passes_the_suite_and_migrations_are_idempotent() {
    let url = support::fresh_postgres_database().await;
    suite(Arc::new(PgStore::open(&url, 4, STORE_TIMEOUT).await.unwrap())).await;
    // Several instances starting at once: migrations serialize and apply once.
    let (a, b) = tokio::join!(PgStore::open(&url, 2, STORE_TIMEOUT), PgStore::open(&url, 2, STORE_TIMEOUT));
    a.unwrap();
    let b = b.unwrap();
    assert!(b.get_connection("c3").await.unwrap().is_some(), "data survives re-opening");
}
