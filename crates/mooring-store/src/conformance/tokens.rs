//! Conformance cases for [`TokenStore`](crate::TokenStore): create, find, list, delete, uniqueness.

use super::*;

pub async fn token_create_find_list_delete<S: TokenStore + ?Sized>(store: &S) {
    assert!(store.list_tokens().await.expect("list").is_empty());
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
        .list_tokens()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, ["t1", "t2"]);

    assert!(store.delete_token("t1").await.expect("delete"));
    assert!(!store.delete_token("t1").await.expect("delete again"));
    assert_eq!(store.find_token("hash-t1").await.expect("find"), None);
    assert_eq!(store.list_tokens().await.expect("list").len(), 1);
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
    assert_eq!(store.list_tokens().await.expect("list").len(), 1);
}
