//! Conformance cases for [`AccountStore`](crate::AccountStore): users and their unique keys,
//! login sessions (cap, expiry), login-failure counters (fixed windows, exact under
//! concurrency).

use super::*;
use crate::{AccountStore, SessionRecord, UserRecord};

const T0: u64 = 1_700_000_000_000;

fn user(id: &str, email: &str) -> UserRecord {
    UserRecord {
        id: id.to_owned(),
        email: email.to_owned(),
        role: Role::Operator,
        scope: None,
        password_hash: None,
        password_set_sha256: None,
        password_set_expires_at_ms: None,
        disabled: false,
        oidc_subject: None,
        created_at_ms: T0,
        updated_at_ms: T0,
    }
}

fn session(id: &str, user_id: &str, last_used_at_ms: u64) -> SessionRecord {
    SessionRecord {
        id_sha256: id.to_owned(),
        user_id: user_id.to_owned(),
        csrf_sha256: format!("csrf-{id}"),
        created_at_ms: T0,
        last_used_at_ms,
        expires_at_ms: T0 + 86_400_000,
        source: "192.0.2.7".to_owned(),
        user_agent: "Mozilla/5.0 (X11; Linux x86_64)".to_owned(),
    }
}

fn kind<T: std::fmt::Debug>(r: crate::Result<T>) -> &'static str {
    r.expect_err("must fail").kind()
}

pub async fn user_create_then_find_by_each_key<S: AccountStore + ?Sized>(store: &S) {
    let full = UserRecord {
        role: Role::Installer,
        scope: Some("site=north".into()),
        password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        password_set_sha256: Some("set-1".into()),
        password_set_expires_at_ms: Some(T0 + 3_600_000),
        disabled: true,
        oidc_subject: Some("https://idp.example sub-1".into()),
        updated_at_ms: T0 + 5,
        ..user("usr_1", "ada@example.com")
    };
    store.create_user(full.clone()).await.expect("create");
    let bare = user("usr_2", "bob@example.com");
    store.create_user(bare.clone()).await.expect("create bare");

    let some = Some(full.clone());
    assert_eq!(store.get_user("usr_1").await.expect("get"), some);
    assert_eq!(
        store
            .find_user_by_email("ada@example.com")
            .await
            .expect("email"),
        some
    );
    assert_eq!(
        store.find_user_by_password_set("set-1").await.expect("set"),
        some
    );
    assert_eq!(
        store
            .find_user_by_oidc_subject("https://idp.example sub-1")
            .await
            .expect("oidc"),
        some
    );
    assert_eq!(store.get_user("usr_2").await.expect("get"), Some(bare));
    // Exact matches only: emails are stored lowercase by the caller, compared byte for byte.
    assert_eq!(
        store
            .find_user_by_email("Ada@example.com")
            .await
            .expect("email"),
        None
    );
    assert_eq!(store.get_user("usr_3").await.expect("get"), None);
    assert_eq!(
        store.find_user_by_password_set("set-2").await.expect("set"),
        None
    );
    assert_eq!(
        store
            .find_user_by_oidc_subject("sub-1")
            .await
            .expect("oidc"),
        None
    );
}

pub async fn user_unique_keys_are_already_exists<S: AccountStore + ?Sized>(store: &S) {
    let first = UserRecord {
        password_set_sha256: Some("set-1".into()),
        oidc_subject: Some("idp sub-1".into()),
        ..user("usr_1", "ada@example.com")
    };
    store.create_user(first.clone()).await.expect("create");
    // Users without a password-set link or an OIDC identity do not collide on them.
    store
        .create_user(user("usr_2", "bob@example.com"))
        .await
        .expect("second");
    store
        .create_user(user("usr_3", "cy@example.com"))
        .await
        .expect("third");
    let taken = [
        user("usr_1", "new@example.com"),
        user("usr_9", "ada@example.com"),
        UserRecord {
            password_set_sha256: Some("set-1".into()),
            ..user("usr_9", "new@example.com")
        },
        UserRecord {
            oidc_subject: Some("idp sub-1".into()),
            ..user("usr_9", "new@example.com")
        },
    ];
    for u in taken {
        assert_eq!(
            kind(store.create_user(u.clone()).await),
            "already_exists",
            "{u:?}"
        );
    }
    assert_eq!(store.list_users(100, None).await.expect("list").len(), 3);
    assert_eq!(store.get_user("usr_1").await.expect("get"), Some(first));
    assert_eq!(store.get_user("usr_9").await.expect("get"), None);
}

pub async fn user_update_replaces_the_row_and_refuses_a_taken_key<S: AccountStore + ?Sized>(
    store: &S,
) {
    store
        .create_user(UserRecord {
            password_set_sha256: Some("set-1".into()),
            ..user("usr_1", "ada@example.com")
        })
        .await
        .expect("create");
    store
        .create_user(UserRecord {
            oidc_subject: Some("idp sub-2".into()),
            ..user("usr_2", "bob@example.com")
        })
        .await
        .expect("create");

    let changed = UserRecord {
        email: "ada@new.example".into(),
        role: Role::Viewer,
        scope: Some("site=south".into()),
        password_hash: Some("$argon2id$new".into()),
        password_set_sha256: None,
        password_set_expires_at_ms: None,
        disabled: true,
        oidc_subject: Some("idp sub-1".into()),
        updated_at_ms: T0 + 10,
        ..user("usr_1", "")
    };
    assert!(store.update_user(changed.clone()).await.expect("update"));
    assert_eq!(
        store.get_user("usr_1").await.expect("get"),
        Some(changed.clone())
    );
    assert_eq!(
        store
            .find_user_by_email("ada@example.com")
            .await
            .expect("old email"),
        None
    );
    assert_eq!(
        store
            .find_user_by_password_set("set-1")
            .await
            .expect("old link"),
        None
    );
    assert_eq!(
        store
            .find_user_by_email("ada@new.example")
            .await
            .expect("new email"),
        Some(changed.clone())
    );

    // Another user's email or OIDC identity: refused, and nothing changes.
    for taken in [
        UserRecord {
            email: "bob@example.com".into(),
            ..changed.clone()
        },
        UserRecord {
            oidc_subject: Some("idp sub-2".into()),
            ..changed.clone()
        },
    ] {
        assert_eq!(kind(store.update_user(taken).await), "already_exists");
    }
    assert_eq!(store.get_user("usr_1").await.expect("get"), Some(changed));

    // Keeping its own unique values is no conflict; an absent user is `false`.
    let same = store.get_user("usr_2").await.expect("get").expect("usr_2");
    assert!(store.update_user(same).await.expect("same values"));
    assert!(!store
        .update_user(user("usr_9", "nobody@example.com"))
        .await
        .expect("absent"));
    assert_eq!(store.get_user("usr_9").await.expect("get"), None);
}

pub async fn user_list_pages_by_email<S: AccountStore + ?Sized>(store: &S) {
    for (id, email) in [
        ("usr_1", "dan@example.com"),
        ("usr_2", "ada@example.com"),
        ("usr_3", "Zed@example.com"),
        ("usr_4", "cy@example.com"),
        ("usr_5", "bob@example.com"),
    ] {
        store.create_user(user(id, email)).await.expect("create");
    }
    let page = |limit: usize, after: Option<&'static str>| async move {
        store
            .list_users(limit, after)
            .await
            .expect("list")
            .into_iter()
            .map(|u| u.email)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        page(100, None).await,
        [
            "Zed@example.com",
            "ada@example.com",
            "bob@example.com",
            "cy@example.com",
            "dan@example.com"
        ],
        "byte order"
    );
    assert_eq!(page(2, None).await, ["Zed@example.com", "ada@example.com"]);
    assert_eq!(
        page(2, Some("ada@example.com")).await,
        ["bob@example.com", "cy@example.com"]
    );
    assert_eq!(page(2, Some("cy@example.com")).await, ["dan@example.com"]);
    assert_eq!(
        page(2, Some("c")).await,
        ["cy@example.com", "dan@example.com"]
    );
    assert!(page(2, Some("dan@example.com")).await.is_empty());
    assert!(page(0, None).await.is_empty());
}

pub async fn user_delete_removes_its_sessions<S: AccountStore + ?Sized>(store: &S) {
    store
        .create_user(user("usr_1", "ada@example.com"))
        .await
        .expect("create");
    store
        .create_user(user("usr_2", "bob@example.com"))
        .await
        .expect("create");
    for (s, u) in [("s1", "usr_1"), ("s2", "usr_1"), ("s3", "usr_2")] {
        store
            .create_session(session(s, u, T0), 10)
            .await
            .expect("session");
    }
    assert!(store.delete_user("usr_1").await.expect("delete"));
    assert!(!store.delete_user("usr_1").await.expect("delete again"));
    assert_eq!(store.get_user("usr_1").await.expect("get"), None);
    assert_eq!(
        store
            .find_user_by_email("ada@example.com")
            .await
            .expect("email"),
        None
    );
    assert_eq!(store.find_session("s1").await.expect("find"), None);
    assert_eq!(store.find_session("s2").await.expect("find"), None);
    assert!(store.find_session("s3").await.expect("find").is_some());
    // The email is free again.
    store
        .create_user(user("usr_3", "ada@example.com"))
        .await
        .expect("email reused");
}

/// PostgreSQL text cannot hold U+0000: no backend stores it in a user or a session, and a
/// lookup by such a text finds nothing (never an error).
pub async fn user_text_with_nul_is_invalid_input<S: AccountStore + ?Sized>(store: &S) {
    let bad_users = [
        user("usr_\u{0}", "ada@example.com"),
        user("usr_1", "ada@example.com\u{0}"),
        UserRecord {
            scope: Some("\u{0}".into()),
            ..user("usr_1", "ada@example.com")
        },
        UserRecord {
            password_hash: Some("\u{0}".into()),
            ..user("usr_1", "ada@example.com")
        },
        UserRecord {
            password_set_sha256: Some("a\u{0}".into()),
            ..user("usr_1", "ada@example.com")
        },
        UserRecord {
            oidc_subject: Some("idp \u{0}".into()),
            ..user("usr_1", "ada@example.com")
        },
    ];
    for u in &bad_users {
        assert_eq!(
            kind(store.create_user(u.clone()).await),
            "invalid_input",
            "{u:?}"
        );
    }
    assert!(store.list_users(10, None).await.expect("list").is_empty());
    let good = user("usr_1", "ada@example.com");
    store.create_user(good.clone()).await.expect("create");
    let renamed = user("usr_1", "ada\u{0}@example.com");
    assert_eq!(kind(store.update_user(renamed).await), "invalid_input");
    assert_eq!(store.get_user("usr_1").await.expect("get"), Some(good));

    assert_eq!(store.get_user("usr_\u{0}").await.expect("get"), None);
    let nul = "ada\u{0}@example.com";
    assert_eq!(store.find_user_by_email(nul).await.expect("email"), None);
    assert_eq!(
        store.find_user_by_password_set(nul).await.expect("set"),
        None
    );
    assert_eq!(
        store.find_user_by_oidc_subject(nul).await.expect("oidc"),
        None
    );
    assert!(!store.delete_user("usr_\u{0}").await.expect("delete"));

    let bad_session = SessionRecord {
        user_agent: "curl\u{0}".into(),
        ..session("s1", "usr_1", T0)
    };
    assert_eq!(
        kind(store.create_session(bad_session, 10).await),
        "invalid_input"
    );
    assert_eq!(store.find_session("s1").await.expect("find"), None);
    assert_eq!(store.find_session("s\u{0}").await.expect("find"), None);
    store.touch_session("s\u{0}", T0).await.expect("touch");
    assert!(!store.delete_session("s\u{0}").await.expect("delete"));
    assert_eq!(
        store
            .delete_user_sessions("usr_\u{0}")
            .await
            .expect("delete"),
        0
    );

    assert_eq!(
        kind(store.record_login_failure("acct:\u{0}", T0, 60_000).await),
        "invalid_input"
    );
    assert_eq!(
        store
            .login_failures("acct:\u{0}", T0, 60_000)
            .await
            .expect("read"),
        0
    );
    store
        .clear_login_failures("acct:\u{0}")
        .await
        .expect("clear");
}

pub async fn session_create_find_touch_delete<S: AccountStore + ?Sized>(store: &S) {
    store
        .create_user(user("usr_1", "ada@example.com"))
        .await
        .expect("user");
    store
        .create_user(user("usr_2", "bob@example.com"))
        .await
        .expect("user");
    let s1 = session("s1", "usr_1", T0 + 100);
    store.create_session(s1.clone(), 10).await.expect("create");
    assert_eq!(
        store.find_session("s1").await.expect("find"),
        Some(s1.clone())
    );
    assert_eq!(store.find_session("s9").await.expect("find"), None);
    assert_eq!(
        kind(store.create_session(session("s1", "usr_2", T0), 10).await),
        "already_exists",
        "a session id is unique"
    );

    let used = |id: &'static str| async move {
        store
            .find_session(id)
            .await
            .expect("find")
            .expect("stored")
            .last_used_at_ms
    };
    store.touch_session("s1", T0 + 200).await.expect("touch");
    assert_eq!(used("s1").await, T0 + 200);
    store.touch_session("s1", T0 + 150).await.expect("touch");
    assert_eq!(
        used("s1").await,
        T0 + 200,
        "an older use never moves it back"
    );
    store
        .touch_session("s9", T0 + 300)
        .await
        .expect("unknown is ignored");

    assert!(store.delete_session("s1").await.expect("delete"));
    assert!(!store.delete_session("s1").await.expect("delete again"));
    assert_eq!(store.find_session("s1").await.expect("find"), None);

    for (s, u) in [
        ("s2", "usr_1"),
        ("s3", "usr_1"),
        ("s4", "usr_1"),
        ("s5", "usr_2"),
    ] {
        store
            .create_session(session(s, u, T0), 10)
            .await
            .expect("create");
    }
    assert_eq!(
        store.delete_user_sessions("usr_1").await.expect("delete"),
        3
    );
    assert_eq!(store.delete_user_sessions("usr_1").await.expect("again"), 0);
    assert_eq!(store.delete_user_sessions("usr_9").await.expect("none"), 0);
    assert_eq!(store.find_session("s2").await.expect("find"), None);
    assert!(store.find_session("s5").await.expect("find").is_some());
    assert!(
        store.get_user("usr_1").await.expect("get").is_some(),
        "the user stays"
    );
}

pub async fn session_for_a_missing_user_is_not_found<S: AccountStore + ?Sized>(store: &S) {
    assert_eq!(
        kind(store.create_session(session("s1", "usr_9", T0), 10).await),
        "not_found"
    );
    assert_eq!(store.find_session("s1").await.expect("find"), None);
    store
        .create_user(user("usr_9", "ada@example.com"))
        .await
        .expect("user");
    assert!(store.delete_user("usr_9").await.expect("delete"));
    assert_eq!(
        kind(store.create_session(session("s1", "usr_9", T0), 10).await),
        "not_found",
        "a deleted user"
    );
}

pub async fn session_cap_keeps_the_most_recently_used<S: AccountStore + ?Sized>(store: &S) {
    store
        .create_user(user("usr_1", "ada@example.com"))
        .await
        .expect("user");
    store
        .create_user(user("usr_2", "bob@example.com"))
        .await
        .expect("user");
    store
        .create_session(session("other", "usr_2", T0), 3)
        .await
        .expect("other user's");
    for (i, s) in ["s1", "s2", "s3"].into_iter().enumerate() {
        let used = T0 + 10 * u64::try_from(i).expect("small");
        store
            .create_session(session(s, "usr_1", used), 3)
            .await
            .expect("create");
    }
    // s1 is used again: s2 is now the least recently used, and goes when s4 comes.
    store.touch_session("s1", T0 + 100).await.expect("touch");
    store
        .create_session(session("s4", "usr_1", T0 + 110), 3)
        .await
        .expect("s4");
    let alive = |ids: [&'static str; 5]| async move {
        let mut alive = Vec::new();
        for id in ids {
            if store.find_session(id).await.expect("find").is_some() {
                alive.push(id);
            }
        }
        alive
    };
    assert_eq!(
        alive(["s1", "s2", "s3", "s4", "other"]).await,
        ["s1", "s3", "s4", "other"]
    );
    // A cap of 1 keeps only the newest (the session just created).
    store
        .create_session(session("s5", "usr_1", T0 + 120), 1)
        .await
        .expect("s5");
    assert_eq!(
        alive(["s1", "s3", "s4", "s5", "other"]).await,
        ["s5", "other"]
    );
}

pub async fn session_expiry_by_idle_time_and_absolute_deadline_in_chunks<
    S: AccountStore + ?Sized,
>(
    store: &S,
) {
    store
        .create_user(user("usr_1", "ada@example.com"))
        .await
        .expect("user");
    let now = T0 + 1_000_000;
    let sessions = [
        // Idle: last used before the idle cutoff (now - 1000).
        SessionRecord {
            expires_at_ms: now + 50_000,
            ..session("idle-1", "usr_1", now - 5_000)
        },
        SessionRecord {
            expires_at_ms: now + 50_000,
            ..session("idle-2", "usr_1", now - 1_001)
        },
        // Used exactly at the cutoff: not idle.
        SessionRecord {
            expires_at_ms: now + 50_000,
            ..session("edge-idle", "usr_1", now - 1_000)
        },
        // Past its absolute deadline (at or before now), though recently used.
        SessionRecord {
            expires_at_ms: now,
            ..session("expired-1", "usr_1", now)
        },
        SessionRecord {
            expires_at_ms: now - 10,
            ..session("expired-2", "usr_1", now)
        },
        SessionRecord {
            expires_at_ms: now + 1,
            ..session("live", "usr_1", now)
        },
    ];
    for s in sessions {
        store.create_session(s, 100).await.expect("create");
    }
    let mut deleted = 0;
    loop {
        let n = store
            .delete_expired_sessions(now - 1_000, now, 3)
            .await
            .expect("delete expired");
        assert!(n <= 3, "at most max_rows per call, got {n}");
        if n == 0 {
            break;
        }
        deleted += n;
    }
    assert_eq!(deleted, 4);
    for (id, kept) in [
        ("idle-1", false),
        ("idle-2", false),
        ("edge-idle", true),
        ("expired-1", false),
        ("expired-2", false),
        ("live", true),
    ] {
        assert_eq!(
            store.find_session(id).await.expect("find").is_some(),
            kept,
            "{id}"
        );
    }
    assert_eq!(
        store
            .delete_expired_sessions(now - 1_000, now, 0)
            .await
            .expect("max_rows 0"),
        0
    );
}

pub async fn login_failures_count_within_a_fixed_window<S: AccountStore + ?Sized>(store: &S) {
    const W: u64 = 60_000;
    let key = "acct:ada@example.com";
    let mut counts = Vec::new();
    for at in [T0, T0 + 1, T0 + 30_000, T0 + W - 1] {
        counts.push(
            store
                .record_login_failure(key, at, W)
                .await
                .expect("record"),
        );
    }
    assert_eq!(counts, [1, 2, 3, 4], "one window: counted from its start");
    assert_eq!(
        store
            .login_failures(key, T0 + W - 1, W)
            .await
            .expect("read"),
        4
    );
    // The window started at T0: at T0 + W it is over, reads 0, and the next failure starts a
    // new window at 1.
    assert_eq!(store.login_failures(key, T0 + W, W).await.expect("read"), 0);
    assert_eq!(
        store
            .record_login_failure(key, T0 + W, W)
            .await
            .expect("record"),
        1
    );
    assert_eq!(
        store
            .record_login_failure(key, T0 + W + 10, W)
            .await
            .expect("record"),
        2
    );
    // The new window runs from T0 + W, not from the last failure.
    assert_eq!(
        store
            .login_failures(key, T0 + 2 * W - 1, W)
            .await
            .expect("read"),
        2
    );
    assert_eq!(
        store
            .login_failures(key, T0 + 2 * W, W)
            .await
            .expect("read"),
        0
    );
    // Keys are independent; an unknown key reads 0.
    assert_eq!(
        store
            .record_login_failure("addr:192.0.2.7", T0 + W, W)
            .await
            .expect("record"),
        1
    );
    assert_eq!(
        store
            .login_failures("addr:198.51.100.1", T0, W)
            .await
            .expect("read"),
        0
    );
    // Early times (before one window since the epoch) count like any other.
    assert_eq!(
        store
            .record_login_failure("early", 0, 10)
            .await
            .expect("record"),
        1
    );
    assert_eq!(
        store
            .record_login_failure("early", 5, 10)
            .await
            .expect("record"),
        2
    );
    assert_eq!(store.login_failures("early", 9, 10).await.expect("read"), 2);
    assert_eq!(
        store
            .record_login_failure("early", 10, 10)
            .await
            .expect("record"),
        1
    );
}

pub async fn login_failures_clear_and_prune<S: AccountStore + ?Sized>(store: &S) {
    const W: u64 = 60_000;
    for (key, at) in [("a", T0), ("b", T0 + 10), ("c", T0 + 20), ("d", T0 + 30)] {
        store
            .record_login_failure(key, at, W)
            .await
            .expect("record");
        store
            .record_login_failure(key, at + 1, W)
            .await
            .expect("record");
    }
    store.clear_login_failures("a").await.expect("clear");
    store
        .clear_login_failures("zz")
        .await
        .expect("clear unknown");
    assert_eq!(
        store.login_failures("a", T0 + 100, W).await.expect("read"),
        0
    );
    assert_eq!(
        store
            .record_login_failure("a", T0 + 100, W)
            .await
            .expect("record"),
        1
    );
    assert_eq!(
        store.login_failures("b", T0 + 100, W).await.expect("read"),
        2
    );
    // Windows that started before T0 + 20: b's (a's started again at T0 + 100).
    assert_eq!(store.prune_login_failures(T0 + 20).await.expect("prune"), 1);
    assert_eq!(
        store.login_failures("b", T0 + 100, W).await.expect("read"),
        0
    );
    assert_eq!(
        store.login_failures("c", T0 + 100, W).await.expect("read"),
        2
    );
    assert_eq!(store.prune_login_failures(T0 + 20).await.expect("again"), 0);
    assert_eq!(store.prune_login_failures(u64::MAX).await.expect("all"), 3);
    assert_eq!(
        store.login_failures("a", T0 + 100, W).await.expect("read"),
        0
    );
}

/// 20 failures recorded at once under one key, spread over `a` and `b` (the same store, or two
/// stores on one database: two servers), count exactly 1..=20.
pub async fn login_failures_counted_at_once_are_all_counted<S: AccountStore + ?Sized>(
    a: &S,
    b: &S,
) {
    const W: u64 = 600_000;
    let key = "acct:ada@example.com";
    let calls = (0..20u64).map(|i| {
        let store = if i % 2 == 0 { a } else { b };
        store.record_login_failure(key, T0 + i, W)
    });
    let mut counts: Vec<u32> = futures_join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("record"))
        .collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=20).collect::<Vec<u32>>(),
        "no count lost or repeated"
    );
    assert_eq!(a.login_failures(key, T0 + 20, W).await.expect("read"), 20);
    assert_eq!(b.login_failures(key, T0 + 20, W).await.expect("read"), 20);
}

/// Polls every future to completion concurrently (a minimal `join_all`: this crate does not
/// depend on `futures`).
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, out) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
