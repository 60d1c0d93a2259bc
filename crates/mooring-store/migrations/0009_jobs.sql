-- Background jobs (issue 15): bulk actions on a selection of devices, with progress.
-- Ids sort by creation time (the server makes them so); `rev` is the compare-and-set counter.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    action TEXT NOT NULL,
    selector TEXT NOT NULL,
    params TEXT NOT NULL,
    scope TEXT,
    state TEXT NOT NULL,
    total INTEGER,
    done INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    errors TEXT NOT NULL,
    cursor TEXT,
    command_id TEXT,
    created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    rev INTEGER NOT NULL
) WITHOUT ROWID;

-- The runner's work list and the per-creator bound read only unfinished jobs.
CREATE INDEX jobs_unfinished ON jobs (created_by) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_by_finished ON jobs (finished_ms) WHERE finished_ms IS NOT NULL;
