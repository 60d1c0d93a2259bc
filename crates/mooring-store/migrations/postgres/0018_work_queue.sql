-- The work queue (issue 18): jobs are claimed one turn at a time by any worker (every node and
-- `mooring worker`) under a lease it renews with each progress write; a lease left to expire
-- (a crashed worker) is taken over and counted in `attempts`; a turn that fails is retried
-- after `run_after_ms` (backoff). `result`: a finished job's result (JSON), its bytes in
-- job_result_chunks.
ALTER TABLE jobs ADD COLUMN worker TEXT;
ALTER TABLE jobs ADD COLUMN lease_until_ms BIGINT;
ALTER TABLE jobs ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN run_after_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN last_error TEXT;
ALTER TABLE jobs ADD COLUMN result TEXT;

-- What a worker claims next: the unfinished job waiting longest for its turn.
CREATE INDEX jobs_runnable ON jobs (run_after_ms, id) WHERE state IN ('queued', 'running');

-- A job's result bytes (a report), in chunks keyed by offset; they go with the job.
CREATE TABLE job_result_chunks (
    job_id       TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    offset_bytes BIGINT NOT NULL,
    data         BYTEA  NOT NULL,
    PRIMARY KEY (job_id, offset_bytes)
);
