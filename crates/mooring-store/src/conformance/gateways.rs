//! Conformance cases for [`GatewayStore`](crate::GatewayStore): a child attached to one
//! gateway at a time (re-attaching to the same one changes nothing, moving answers the earlier
//! one), the children bound, no chains, keyset pages, and attachments deleted with either device.

use crate::{AttachOutcome, Store, StoreError};

const T0: u64 = 1_700_000_000_000;
/// The children bound the case attaches with.
const MAX: usize = 3;

fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
    rows.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn children(rows: &[(&str, u64)]) -> Vec<(String, u64)> {
    rows.iter().map(|(c, at)| ((*c).to_owned(), *at)).collect()
}

async fn attach(store: &dyn Store, child: &str, gateway: &str, at_ms: u64) -> AttachOutcome {
    store
        .attach_child(child, gateway, at_ms, MAX)
        .await
        .unwrap_or_else(|e| panic!("attach {child} to {gateway}: {e}"))
}

async fn gateway_of(store: &dyn Store, child: &str) -> Option<(String, u64)> {
    store.gateway_of(child).await.expect("gateway_of")
}

pub async fn gateways_attach_detach_bounds_and_no_chains(store: &dyn Store) {
    for d in ["c1", "c2", "c3", "c4", "c5", "g1", "g2", "g3"] {
        store
            .create_device(super::new_device(d))
            .await
            .expect("device");
    }
    let attached = |g: Option<&str>| AttachOutcome::Attached(g.map(str::to_owned));

    // Attach, then again to the same gateway: nothing changes, `attached_at_ms` included.
    assert_eq!(gateway_of(store, "c1").await, None);
    assert_eq!(attach(store, "c1", "g1", T0).await, attached(None));
    assert_eq!(gateway_of(store, "c1").await, Some(("g1".to_owned(), T0)));
    assert_eq!(
        attach(store, "c1", "g1", T0 + 5).await,
        attached(Some("g1"))
    );
    assert_eq!(gateway_of(store, "c1").await, Some(("g1".to_owned(), T0)));

    // The children bound: full at MAX; a child already there re-attaches at the limit.
    assert_eq!(attach(store, "c2", "g1", T0 + 1).await, attached(None));
    assert_eq!(attach(store, "c3", "g1", T0 + 2).await, attached(None));
    assert_eq!(
        attach(store, "c4", "g1", T0 + 3).await,
        AttachOutcome::GatewayFull
    );
    assert_eq!(gateway_of(store, "c4").await, None, "nothing changed");
    assert_eq!(
        attach(store, "c3", "g1", T0 + 9).await,
        attached(Some("g1"))
    );
    assert_eq!(
        gateway_of(store, "c3").await,
        Some(("g1".to_owned(), T0 + 2))
    );
    assert_eq!(
        store
            .attach_child("c5", "g3", T0, 0)
            .await
            .expect("bound 0"),
        AttachOutcome::GatewayFull
    );

    // Moving to another gateway answers the earlier one and frees its place there.
    assert_eq!(
        attach(store, "c3", "g2", T0 + 10).await,
        attached(Some("g1"))
    );
    assert_eq!(
        gateway_of(store, "c3").await,
        Some(("g2".to_owned(), T0 + 10))
    );
    assert_eq!(attach(store, "c4", "g1", T0 + 11).await, attached(None));
    // A move to a full gateway changes nothing.
    assert_eq!(
        attach(store, "c3", "g1", T0 + 12).await,
        AttachOutcome::GatewayFull
    );
    assert_eq!(
        gateway_of(store, "c3").await,
        Some(("g2".to_owned(), T0 + 10))
    );

    // Unknown devices.
    for (child, gateway) in [("nope", "g2"), ("c5", "nope"), ("nope", "nope")] {
        match store.attach_child(child, gateway, T0, MAX).await {
            Err(StoreError::NotFound(_)) => {}
            other => panic!("attach {child} to {gateway}: {other:?}"),
        }
    }

    // No chains: not its own gateway, a child is no gateway, a gateway with children no child.
    for (child, gateway) in [
        ("c5", "c5"),
        ("g3", "g3"),
        ("c5", "c1"),
        ("c5", "c3"),
        ("g1", "g2"),
        ("g2", "g3"),
        ("g1", "g1"),
        ("c\0", "g3"),
    ] {
        match store.attach_child(child, gateway, T0, MAX).await {
            Err(StoreError::InvalidInput(_)) => {}
            other => panic!("attach {child:?} to {gateway}: {other:?}"),
        }
    }
    assert_eq!(gateway_of(store, "c5").await, None);
    assert_eq!(gateway_of(store, "g1").await, None);
    assert_eq!(gateway_of(store, "g2").await, None);

    // Children by id, in pages.
    let all_g1 = children(&[("c1", T0), ("c2", T0 + 1), ("c4", T0 + 11)]);
    assert_eq!(
        store.children_of("g1", None, 10).await.expect("children"),
        all_g1
    );
    assert_eq!(
        store.children_of("g1", None, 2).await.expect("page 1"),
        all_g1[..2].to_vec()
    );
    assert_eq!(
        store
            .children_of("g1", Some("c2"), 2)
            .await
            .expect("page 2"),
        all_g1[2..].to_vec()
    );
    assert_eq!(
        store
            .children_of("g1", Some("c4"), 2)
            .await
            .expect("page 3"),
        Vec::new()
    );
    assert_eq!(
        store
            .children_of("g1", Some("c1"), 0)
            .await
            .expect("limit 0"),
        Vec::new()
    );
    assert_eq!(
        store.children_of("g2", None, 10).await.expect("g2"),
        children(&[("c3", T0 + 10)])
    );
    assert_eq!(
        store.children_of("g3", None, 10).await.expect("g3"),
        Vec::new()
    );
    assert_eq!(
        store.children_of("c1", None, 10).await.expect("a child"),
        Vec::new()
    );

    // Every attachment by child id, in pages.
    let all = pairs(&[("c1", "g1"), ("c2", "g1"), ("c3", "g2"), ("c4", "g1")]);
    assert_eq!(store.list_attachments(None, 10).await.expect("all"), all);
    assert_eq!(
        store.list_attachments(None, 3).await.expect("page 1"),
        all[..3].to_vec()
    );
    assert_eq!(
        store.list_attachments(Some("c3"), 3).await.expect("page 2"),
        all[3..].to_vec()
    );
    assert_eq!(
        store.list_attachments(Some("c4"), 3).await.expect("page 3"),
        Vec::new()
    );
    assert_eq!(
        store
            .list_attachments(Some("c2\0x"), 1)
            .await
            .expect("cursor with NUL"),
        all[2..3].to_vec()
    );

    // Detach answers the gateway once.
    assert_eq!(
        store.detach_child("c4").await.expect("detach"),
        Some("g1".to_owned())
    );
    assert_eq!(store.detach_child("c4").await.expect("detach again"), None);
    assert_eq!(
        store.detach_child("nope").await.expect("detach unknown"),
        None
    );
    assert_eq!(gateway_of(store, "c4").await, None);

    // Deleting a child deletes its attachment; deleting a gateway deletes its children's.
    assert!(store.delete_device("c2").await.expect("delete child"));
    assert_eq!(gateway_of(store, "c2").await, None);
    assert_eq!(
        store.children_of("g1", None, 10).await.expect("children"),
        children(&[("c1", T0)])
    );
    assert!(store.delete_device("g1").await.expect("delete gateway"));
    assert_eq!(gateway_of(store, "c1").await, None);
    assert_eq!(
        store.children_of("g1", None, 10).await.expect("children"),
        Vec::new()
    );
    assert_eq!(
        store.list_attachments(None, 10).await.expect("left"),
        pairs(&[("c3", "g2")])
    );
    match store.attach_child("c1", "g1", T0, MAX).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("attach to a deleted gateway: {other:?}"),
    }
    // A child of a deleted gateway attaches anew; a deleted gateway may be re-created as a child.
    assert_eq!(attach(store, "c1", "g2", T0 + 20).await, attached(None));
    store
        .create_device(super::new_device("g1"))
        .await
        .expect("re-create");
    assert_eq!(attach(store, "g1", "g2", T0 + 21).await, attached(None));
    assert_eq!(
        store.list_attachments(None, 10).await.expect("end"),
        pairs(&[("c1", "g2"), ("c3", "g2"), ("g1", "g2")])
    );
}
