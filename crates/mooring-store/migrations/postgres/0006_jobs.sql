-- Background jobs (issue 15): bulk actions on a selection of devices, with progress.
-- Ids sort by creation time (the server makes them so); `rev` is the compare-and-set counter.
CREATE TABLE jobs (
    id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    action TEXT NOT NULL,
    selector TEXT NOT NULL,
    params TEXT NOT NULL,
    scope TEXT,
    state TEXT NOT NULL,
    total BIGINT,
    done BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    errors TEXT NOT NULL,
    cursor TEXT COLLATE "C",
    command_id TEXT,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT,
    finished_ms BIGINT,
    rev BIGINT NOT NULL
);

-- The runner's work list and the per-creator bound read only unfinished jobs.
CREATE INDEX jobs_unfinished ON jobs (created_by) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_by_finished ON jobs (finished_ms) WHERE finished_ms IS NOT NULL;
