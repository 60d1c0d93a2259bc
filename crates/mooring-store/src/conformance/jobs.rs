//! Conformance cases for [`JobStore`](crate::JobStore): round trip, compare-and-set, listing
//! newest first with a cursor, the unfinished count, the work queue (claims, leases, results), pruning.

use crate::{JobError, JobRecord, JobState, JobStore, StoreError};

const T0: u64 = 1_700_000_000_000;

fn job(n: u64, created_by: &str) -> JobRecord {
    JobRecord {
        id: format!("job_{:012x}{n:04}", T0 + n),
        action: "tag".to_owned(),
        selector: "tag:site=berlin".to_owned(),
        params: serde_json::json!({"tags": {"fw": "2"}}),
        scope: None,
        state: JobState::Queued,
        total: None,
        done: 0,
        failed: 0,
        errors: Vec::new(),
        cursor: None,
        command_id: None,
        created_by: created_by.to_owned(),
        created_ms: T0 + n,
        started_ms: None,
        finished_ms: None,
        rev: 0,
        worker: None,
        lease_until_ms: None,
        attempts: 0,
        run_after_ms: 0,
        last_error: None,
        result: None,
    }
}

/// Create, get back field for field, duplicate id refused.
pub async fn job_create_get_round_trips<S: JobStore + ?Sized>(store: &S) {
    let mut j = job(1, "ann@example.com");
    j.scope = Some("tag:customer=acme".to_owned());
    j.total = Some(300);
    j.done = 250;
    j.failed = 2;
    j.errors = vec![JobError {
        device_id: "d7".to_owned(),
        message: "device \"d7\" not found — gone".to_owned(),
    }];
    j.cursor = Some("d-250".to_owned());
    j.command_id = Some("f0123".to_owned());
    j.started_ms = Some(T0 + 5);
    j.worker = Some("node-a".to_owned());
    j.lease_until_ms = Some(T0 + 30_000);
    j.attempts = 2;
    j.run_after_ms = T0 + 7;
    j.last_error = Some("store unavailable".to_owned());
    j.result = Some(serde_json::json!({"format": "csv", "rows": 12, "bytes": 345}));
    store.create_job(j.clone()).await.expect("create");
    assert_eq!(store.get_job(&j.id).await.expect("get"), Some(j.clone()));
    assert_eq!(store.get_job("job_missing").await.expect("get"), None);
    match store.create_job(j.clone()).await {
        Err(StoreError::AlreadyExists(_)) => {}
        other => panic!("duplicate job id: {other:?}"),
    }
}

/// An update applies only at the stored rev, and bumps it: two writers from one read, one wins.
pub async fn job_update_is_compare_and_set_on_rev<S: JobStore + ?Sized>(store: &S) {
    let j = job(1, "ann");
    store.create_job(j.clone()).await.expect("create");
    let mut claim = j.clone();
    claim.state = JobState::Running;
    claim.started_ms = Some(T0 + 10);
    let mut cancel = j.clone();
    cancel.state = JobState::Canceled;
    cancel.finished_ms = Some(T0 + 10);
    assert!(store.update_job(claim.clone()).await.expect("claim"));
    assert!(!store.update_job(cancel).await.expect("stale cancel"));
    let stored = store.get_job(&j.id).await.expect("get").expect("job");
    assert_eq!(stored.state, JobState::Running);
    assert_eq!(stored.rev, 1);
    let mut progress = stored.clone();
    progress.done = 100;
    progress.cursor = Some("d-100".to_owned());
    assert!(store.update_job(progress).await.expect("progress"));
    let stored = store.get_job(&j.id).await.expect("get").expect("job");
    assert_eq!((stored.done, stored.rev), (100, 2));
    assert_eq!(stored.cursor.as_deref(), Some("d-100"));
    let mut gone = job(9, "ann");
    gone.rev = 0;
    assert!(!store.update_job(gone).await.expect("missing job"));
}

/// Newest first by id, pages by cursor, every job once.
pub async fn job_list_is_newest_first_with_cursor<S: JobStore + ?Sized>(store: &S) {
    for n in [3, 1, 5, 2, 4] {
        store.create_job(job(n, "ann")).await.expect("create");
    }
    let all = store.list_jobs(100, None).await.expect("list");
    let ids: Vec<u64> = all.iter().map(|j| j.created_ms - T0).collect();
    assert_eq!(ids, vec![5, 4, 3, 2, 1]);
    let first = store.list_jobs(2, None).await.expect("page 1");
    assert_eq!(first.len(), 2);
    let second = store
        .list_jobs(2, Some(&first[1].id))
        .await
        .expect("page 2");
    let third = store
        .list_jobs(2, Some(&second[1].id))
        .await
        .expect("page 3");
    let paged: Vec<u64> = first
        .iter()
        .chain(&second)
        .chain(&third)
        .map(|j| j.created_ms - T0)
        .collect();
    assert_eq!(paged, vec![5, 4, 3, 2, 1]);
    assert!(store
        .list_jobs(2, Some(&third[0].id))
        .await
        .expect("past the end")
        .is_empty());
}

/// The count of unfinished jobs is per creator and leaves final ones out.
pub async fn job_unfinished_count_per_creator<S: JobStore + ?Sized>(store: &S) {
    for n in 1..=4 {
        store.create_job(job(n, "ann")).await.expect("create");
    }
    store.create_job(job(5, "bob")).await.expect("create");
    let mut running = store
        .get_job(&job(2, "ann").id)
        .await
        .expect("get")
        .expect("job");
    running.state = JobState::Running;
    assert!(store.update_job(running).await.expect("run"));
    for n in [3, 4] {
        let mut done = store
            .get_job(&job(n, "ann").id)
            .await
            .expect("get")
            .expect("job");
        done.state = if n == 3 {
            JobState::Succeeded
        } else {
            JobState::Canceled
        };
        done.finished_ms = Some(T0 + 100);
        assert!(store.update_job(done).await.expect("finish"));
    }
    assert_eq!(store.count_unfinished_jobs("ann").await.expect("count"), 2);
    assert_eq!(store.count_unfinished_jobs("bob").await.expect("count"), 1);
    assert_eq!(
        store.count_unfinished_jobs("nobody").await.expect("count"),
        0
    );
}

/// Pruning removes final jobs finished before the cutoff and final jobs beyond the newest
/// `keep_max`, never an unfinished one.
pub async fn job_prune_keeps_unfinished_and_the_newest<S: JobStore + ?Sized>(store: &S) {
    for n in 1..=6 {
        let mut j = job(n, "ann");
        if n != 2 {
            j.state = JobState::Succeeded;
            j.finished_ms = Some(T0 + n * 1000);
        }
        store.create_job(j).await.expect("create");
    }
    // Finished before T0 + 2000: job 1 only.
    assert_eq!(store.prune_jobs(T0 + 2000, 100).await.expect("prune"), 1);
    assert!(store
        .get_job(&job(1, "ann").id)
        .await
        .expect("get")
        .is_none());
    // Keep the newest 3 (6, 5, 4): job 3 goes, job 2 (queued) stays.
    assert_eq!(store.prune_jobs(0, 3).await.expect("prune"), 1);
    let left: Vec<u64> = store
        .list_jobs(100, None)
        .await
        .expect("list")
        .iter()
        .map(|j| j.created_ms - T0)
        .collect();
    assert_eq!(left, vec![6, 5, 4, 2]);
    assert_eq!(store.prune_jobs(0, 3).await.expect("again"), 0);
}

/// Pruning one creator's jobs keeps its newest `keep_max` and its unfinished ones, and never
/// touches another creator's.
pub async fn job_prune_of_one_creator_leaves_the_others<S: JobStore + ?Sized>(store: &S) {
    for n in 1..=8 {
        let who = if n % 2 == 0 { "ann" } else { "bob" };
        let mut j = job(n, who);
        if n != 2 {
            j.state = JobState::Failed;
            j.finished_ms = Some(T0 + n * 1000);
        }
        store.create_job(j).await.expect("create");
    }
    // ann: 8, 6, 4 (final), 2 (queued). Keep her newest 2 (8, 6): 4 goes, 2 stays.
    assert_eq!(store.prune_jobs_of("ann", 2).await.expect("prune"), 1);
    let left: Vec<u64> = store
        .list_jobs(100, None)
        .await
        .expect("list")
        .iter()
        .map(|j| j.created_ms - T0)
        .collect();
    assert_eq!(left, vec![8, 7, 6, 5, 3, 2, 1]);
    assert_eq!(store.prune_jobs_of("ann", 2).await.expect("again"), 0);
    assert_eq!(store.prune_jobs_of("nobody", 0).await.expect("nobody"), 0);
    // Keep none of bob's: all four final ones go.
    assert_eq!(store.prune_jobs_of("bob", 0).await.expect("bob"), 4);
    assert_eq!(store.list_jobs(100, None).await.expect("list").len(), 3);
}

/// The work queue: a claim takes the job waiting longest whose time has come and whose lease
/// is free or expired, leases it (rev + 1), never to two workers; a lease taken over after it
/// expired counts an attempt; final jobs are never claimed.
pub async fn job_claims_lease_one_worker_and_take_over_expired_leases<S: JobStore + ?Sized>(
    store: &S,
) {
    let now = T0 + 1_000;
    let mut later = job(1, "ann");
    later.run_after_ms = now + 500;
    let first = job(2, "bob");
    let mut done = job(3, "cy");
    done.state = JobState::Succeeded;
    for j in [&later, &first, &done] {
        store.create_job(j.clone()).await.expect("create");
    }
    let a = store
        .claim_job("a", now, 1_000)
        .await
        .expect("claim")
        .expect("a job");
    assert_eq!(a.id, first.id, "the one whose time has come");
    assert_eq!(
        (a.worker.as_deref(), a.lease_until_ms, a.rev, a.attempts),
        (Some("a"), Some(now + 1_000), 1, 0)
    );
    assert_eq!(store.get_job(&a.id).await.expect("get"), Some(a.clone()));
    // Leased: nobody else gets it; the other is not due yet.
    assert_eq!(
        store.claim_job("b", now + 50, 100).await.expect("claim"),
        None
    );
    // After run_after_ms, b gets the other one.
    let b = store
        .claim_job("b", now + 500, 100_000)
        .await
        .expect("claim")
        .expect("due");
    assert_eq!(b.id, later.id);
    // a's lease expired without a write (a crashed): c takes it over, one attempt counted,
    // and a's next write fails.
    let c = store
        .claim_job("c", now + 1_000, 100)
        .await
        .expect("claim")
        .expect("expired");
    assert_eq!(
        (c.id.as_str(), c.worker.as_deref(), c.attempts, c.rev),
        (first.id.as_str(), Some("c"), 1, 2)
    );
    assert_eq!(
        c.last_error.as_deref(),
        Some("worker a stopped mid-turn (its lease ran out)")
    );
    let mut stale = a.clone();
    stale.done = 5;
    assert!(
        !store.update_job(stale).await.expect("update"),
        "a lost its lease"
    );
    // A released job (no lease) is claimed again without counting an attempt.
    let mut released = c.clone();
    released.worker = None;
    released.lease_until_ms = None;
    released.run_after_ms = now + 1_050;
    assert!(store.update_job(released).await.expect("release"));
    let d = store
        .claim_job("d", now + 1_050, 100)
        .await
        .expect("claim")
        .expect("released");
    assert_eq!((d.id.as_str(), d.attempts), (first.id.as_str(), 1));
    assert_eq!(d.last_error, c.last_error, "kept as it was");
    // Finished jobs are never claimed.
    let mut fin = d.clone();
    fin.state = JobState::Dead;
    fin.worker = None;
    fin.lease_until_ms = None;
    assert!(store.update_job(fin).await.expect("finish"));
    let mut b_fin = b.clone();
    b_fin.state = JobState::Canceled;
    assert!(store.update_job(b_fin).await.expect("cancel"));
    assert_eq!(
        store
            .claim_job("e", now + 10_000, 100)
            .await
            .expect("claim"),
        None
    );
}

/// A job's result bytes: written at offsets (a rewrite from an offset replaces the rest) only
/// at the job's current rev, read by range, deleted with the job.
pub async fn job_results_are_written_by_offset_and_go_with_the_job<S: JobStore + ?Sized>(
    store: &S,
) {
    let j = job(1, "ann");
    store.create_job(j.clone()).await.expect("create");
    store
        .write_job_result(&j.id, 0, 0, b"id,ts\n".to_vec())
        .await
        .expect("write")
        .then_some(())
        .expect("at the rev");
    store
        .write_job_result(&j.id, 0, 6, b"d1,1\nd2,2\n".to_vec())
        .await
        .expect("write")
        .then_some(())
        .expect("at the rev");
    // A retried turn writes again from where its stored progress ended.
    store
        .write_job_result(&j.id, 0, 11, b"d2,3\n".to_vec())
        .await
        .expect("rewrite")
        .then_some(())
        .expect("at the rev");
    assert_eq!(
        store.read_job_result(&j.id, 0, 1_000).await.expect("read"),
        b"id,ts\nd1,1\nd2,3\n"
    );
    assert_eq!(
        store.read_job_result(&j.id, 6, 5).await.expect("read"),
        b"d1,1\n"
    );
    assert_eq!(
        store.read_job_result(&j.id, 100, 5).await.expect("read"),
        b""
    );
    assert!(
        !store
            .write_job_result("job_missing", 0, 0, b"x".to_vec())
            .await
            .expect("write"),
        "no job, no write"
    );
    let mut fin = j.clone();
    fin.state = JobState::Succeeded;
    fin.finished_ms = Some(T0 + 5);
    assert!(store.update_job(fin).await.expect("finish"));
    // A worker holding rev 0 lost the job: its bytes are not written.
    assert!(!store
        .write_job_result(&j.id, 0, 0, b"stale".to_vec())
        .await
        .expect("write"));
    assert_eq!(
        store.read_job_result(&j.id, 0, 5).await.expect("read"),
        b"id,ts"
    );
    assert_eq!(store.prune_jobs(T0 + 10, 1_000).await.expect("prune"), 1);
    assert_eq!(
        store.read_job_result(&j.id, 0, 1_000).await.expect("read"),
        b""
    );
    // Deleted only at its rev, its result with it.
    let k = job(2, "ann");
    store.create_job(k.clone()).await.expect("create");
    assert!(store
        .write_job_result(&k.id, 0, 0, b"abc".to_vec())
        .await
        .expect("write"));
    assert!(!store.delete_job(&k.id, 1).await.expect("stale rev"));
    assert!(store.delete_job(&k.id, 0).await.expect("delete"));
    assert!(store.get_job(&k.id).await.expect("get").is_none());
    assert_eq!(
        store.read_job_result(&k.id, 0, 10).await.expect("read"),
        b""
    );
    assert!(!store.delete_job(&k.id, 0).await.expect("gone"));
}
