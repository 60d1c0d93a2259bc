//! Conformance cases for [`TokenStore`](crate::TokenStore): create, find, get, list pages,
//! last use, delete, uniqueness.

use super::*;

pub async fn token_create_find_list_delete<S: TokenStore + ?Sized>(store: &S) {
    assert!(store.list_tokens(100, None).await.expect("list").is_empty());
    store
        .create_token(token("t2", Role::Service))
        .await
        .expect("create t2");
    store
        .create_token(token("t1", Role::Admin))
        .await
        .expect("create t1");

    let found = store.find_token("hash-t1").await.expect("find");
    assert_eq!(found, Some(token("t1", Role::Admin)));
    let found = store.find_token("hash-t2").await.expect("find");
    assert_eq!(found.map(|t| t.role), Some(Role::Service));
    assert_eq!(store.find_token("hash-x").await.expect("find"), None);

    let ids: Vec<String> = store
        .list_tokens(100, None)
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, ["t1", "t2"]);

    assert!(store.delete_token("t1").await.expect("delete"));
    assert!(!store.delete_token("t1").await.expect("delete again"));
    assert_eq!(store.find_token("hash-t1").await.expect("find"), None);
    assert_eq!(store.list_tokens(100, None).await.expect("list").len(), 1);
}

pub async fn token_duplicate_id_or_secret_is_already_exists<S: TokenStore + ?Sized>(store: &S) {
    store
        .create_token(token("t1", Role::Admin))
        .await
        .expect("create");
    let mut same_id = token("t1", Role::Admin);
    same_id.token_sha256 = "other".into();
    let err = store.create_token(same_id).await.expect_err("same id");
    assert_eq!(err.kind(), "already_exists", "{err:?}");
    let mut same_secret = token("t9", Role::Service);
    same_secret.token_sha256 = "hash-t1".into();
    let err = store
        .create_token(same_secret)
        .await
        .expect_err("same secret hash");
    assert_eq!(err.kind(), "already_exists", "{err:?}");
    assert_eq!(store.list_tokens(100, None).await.expect("list").len(), 1);
}

pub async fn token_scope_expiry_and_last_use_round_trip<S: TokenStore + ?Sized>(store: &S) {
    let full = TokenRecord {
        scope: Some("site=north,floor=2".into()),
        expires_at_ms: Some(1_800_000_000_000),
        last_used_at_ms: Some(1_700_000_000_500),
        ..token("t1", Role::Installer)
    };
    store.create_token(full.clone()).await.expect("create t1");
    let bare = token("t2", Role::Viewer);
    store.create_token(bare.clone()).await.expect("create t2");
    for role in [Role::Operator, Role::Service, Role::Admin] {
        let t = token(&format!("t-{role}"), role);
        store.create_token(t.clone()).await.expect("create");
        assert_eq!(store.get_token(&t.id).await.expect("get"), Some(t));
    }

    assert_eq!(
        store.get_token("t1").await.expect("get"),
        Some(full.clone())
    );
    assert_eq!(store.find_token("hash-t1").await.expect("find"), Some(full));
    assert_eq!(store.get_token("t2").await.expect("get"), Some(bare));
    assert_eq!(store.get_token("hash-t1").await.expect("get by hash"), None);
    assert_eq!(store.get_token("nope").await.expect("get missing"), None);
}

pub async fn token_touch_keeps_the_latest_use<S: TokenStore + ?Sized>(store: &S) {
    store
        .create_token(token("t1", Role::Admin))
        .await
        .expect("create");
    let last_used = || async move {
        store
            .get_token("t1")
            .await
            .expect("get")
            .expect("stored")
            .last_used_at_ms
    };
    assert_eq!(last_used().await, None);
    store.touch_token("t1", 5_000).await.expect("touch");
    assert_eq!(last_used().await, Some(5_000));
    store.touch_token("t1", 4_000).await.expect("touch older");
    assert_eq!(
        last_used().await,
        Some(5_000),
        "an older use never moves it back"
    );
    store.touch_token("t1", 6_000).await.expect("touch newer");
    assert_eq!(last_used().await, Some(6_000));
    store
        .touch_token("nope", 7_000)
        .await
        .expect("an unknown token is ignored");
    assert_eq!(store.get_token("nope").await.expect("get"), None);
}

pub async fn token_list_pages_by_id<S: TokenStore + ?Sized>(store: &S) {
    for id in ["t3", "t1", "t5", "T9", "t2", "t4"] {
        store
            .create_token(token(id, Role::Viewer))
            .await
            .expect("create");
    }
    let page = |limit: usize, after: Option<&'static str>| async move {
        store
            .list_tokens(limit, after)
            .await
            .expect("list")
            .into_iter()
            .map(|t| t.id)
            .collect::<Vec<_>>()
    };
    // Byte order: upper case before lower case.
    assert_eq!(page(100, None).await, ["T9", "t1", "t2", "t3", "t4", "t5"]);
    assert_eq!(page(2, None).await, ["T9", "t1"]);
    assert_eq!(page(2, Some("t1")).await, ["t2", "t3"]);
    assert_eq!(page(2, Some("t3")).await, ["t4", "t5"]);
    assert!(page(2, Some("t5")).await.is_empty());
    // A cursor need not be a stored id.
    assert_eq!(page(2, Some("t2a")).await, ["t3", "t4"]);
    assert_eq!(page(1, Some("t2\u{0}")).await, ["t3"]);
    assert!(page(0, None).await.is_empty());
}

/// PostgreSQL text cannot hold U+0000: no backend stores it in a token, and a lookup by such a
/// text finds nothing (never an error).
pub async fn token_text_with_nul_is_invalid_input<S: TokenStore + ?Sized>(store: &S) {
    let cases = [
        TokenRecord {
            name: "a\u{0}b".into(),
            ..token("t1", Role::Admin)
        },
        token("t\u{0}", Role::Admin),
        TokenRecord {
            token_sha256: "h\u{0}".into(),
            ..token("t1", Role::Admin)
        },
        TokenRecord {
            scope: Some("site=\u{0}".into()),
            ..token("t1", Role::Admin)
        },
    ];
    for t in cases {
        let err = store
            .create_token(t.clone())
            .await
            .expect_err("NUL refused");
        assert_eq!(err.kind(), "invalid_input", "{t:?}: {err:?}");
    }
    assert!(store.list_tokens(10, None).await.expect("list").is_empty());
    assert_eq!(store.find_token("h\u{0}").await.expect("find"), None);
    assert_eq!(store.get_token("t\u{0}").await.expect("get"), None);
    store.touch_token("t\u{0}", 1).await.expect("touch");
    assert!(!store.delete_token("t\u{0}").await.expect("delete"));
}
