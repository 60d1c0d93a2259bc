//! The cluster suite's target: `mooring serve` nodes sharing one PostgreSQL database and one NATS prefix (database created and dropped, cluster key, node configs and processes, devices provisioned through the API), and the load-generator worker processes that connect devices to them.
//!
//! A [`Cluster`] owns a database of its own (`CREATE DATABASE` through the admin URL, dropped
//! by [`Cluster::finish`] or, failing that, on drop), a random NATS prefix, a 0600 cluster key
//! and one data dir, config and log per node (`n1`, `n2`, … under its dir). The first node to
//! start creates the cluster's admin token in its data dir; it is copied into every other
//! node's data dir before that node starts, as an operator would. With a kept `--work-dir` the
//! database, the key and the device credentials are kept too, so a rerun skips provisioning.
//!
//! [`Workers`] are processes of this same binary (`cluster-worker`, see [`crate::worker`]),
//! each connecting a range of the devices, so no process needs more descriptors than one
//! holds: the parent writes each its [`WorkerSpec`] and reads their [`WorkerReport`]s.

use crate::client::{Cred, Endpoint};
use crate::target::{self, Proc, SpawnOpts};
use crate::worker::{WorkerReport, WorkerSpec};
use anyhow::{anyhow, bail, Context};
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

/// Longest one administrative PostgreSQL statement (connect included) may take.
const PG_ADMIN_TIMEOUT: Duration = Duration::from_secs(60);
/// PostgreSQL connections kept free of the nodes' pools (the admin connection, psql, others).
pub const PG_CONNECTIONS_RESERVE: i64 = 10;
/// Largest pool a node gets (the server's default).
pub const POOL_SIZE_MAX: usize = 16;
/// How often a worker reports (and the parent polls the reports).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a worker may take to load its credentials and say it is ready.
const WORKER_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `sql` on the admin database at `url` (one connection, bounded by [`PG_ADMIN_TIMEOUT`]).
pub async fn pg_execute(url: &str, sql: &str) -> anyhow::Result<()> {
    tokio::time::timeout(PG_ADMIN_TIMEOUT, async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .with_context(|| {
                format!("PostgreSQL is unreachable at {url} (--postgres-url): the cluster suite needs it")
            })?;
        let driver = tokio::spawn(connection);
        let r = client.batch_execute(sql).await.with_context(|| sql.to_owned());
        drop(client);
        let _ = driver.await;
        r
    })
    .await
    .map_err(|_| anyhow!("{sql}: no answer within {PG_ADMIN_TIMEOUT:?}"))?
}

/// The first column of the first row of `sql` as an integer.
pub async fn pg_query_i64(url: &str, sql: &str) -> anyhow::Result<i64> {
    tokio::time::timeout(PG_ADMIN_TIMEOUT, async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("PostgreSQL is unreachable at {url} (--postgres-url)"))?;
        let driver = tokio::spawn(connection);
        let row = client
            .query_one(sql, &[])
            .await
            .with_context(|| sql.to_owned());
        drop(client);
        let _ = driver.await;
        let row = row?;
        // SHOW answers text, count(*) a bigint.
        match row.try_get::<_, i64>(0) {
            Ok(v) => Ok(v),
            Err(_) => row
                .try_get::<_, String>(0)?
                .trim()
                .parse()
                .with_context(|| format!("{sql}: not an integer")),
        }
    })
    .await
    .map_err(|_| anyhow!("{sql}: no answer within {PG_ADMIN_TIMEOUT:?}"))?
}

/// The pool size each of `nodes` nodes gets: the PostgreSQL connections not in use (less
/// [`PG_CONNECTIONS_RESERVE`]) shared out, at most [`POOL_SIZE_MAX`]. Fails if that is 0.
pub async fn pool_size_for(admin_url: &str, nodes: usize) -> anyhow::Result<usize> {
    let max = pg_query_i64(admin_url, "SHOW max_connections").await?;
    let used = pg_query_i64(admin_url, "SELECT count(*) FROM pg_stat_activity").await?;
    let free = max - used - PG_CONNECTIONS_RESERVE;
    let per_node = usize::try_from(free).unwrap_or(0) / nodes.max(1);
    anyhow::ensure!(
        per_node >= 1,
        "PostgreSQL has max_connections = {max} with {used} in use: no room for {nodes} node pools"
    );
    Ok(per_node.min(POOL_SIZE_MAX))
}

/// `url` with its database (the last path segment) replaced by `db`.
pub fn database_url(admin_url: &str, db: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(j) => &base[..authority + j],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A TOML basic string for `s` (paths and URLs of our own making; control characters refused).
fn toml_str(s: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        !s.chars().any(char::is_control),
        "control character in config value {s:?}"
    );
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// What a [`Cluster`] is made of.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// The `mooring` binary.
    pub bin: PathBuf,
    /// Node data dirs, configs, logs, the key file and the credential cache live here.
    pub dir: PathBuf,
    /// A PostgreSQL URL whose user may create databases (its database is only connected to).
    pub postgres_url: String,
    pub nats_url: String,
    /// `ulimit -n` of every node.
    pub fd_limit: u64,
    /// Keep the database (and reuse it next time) instead of dropping it at the end.
    pub keep: bool,
}

/// One running node.
pub struct Node {
    pub name: String,
    proc: Proc,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub api: mooring_api::Client,
}

impl Node {
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.proc.rss_kib()
    }

    /// (WARN, ERROR) lines in its log so far.
    pub fn log_counts(&self) -> (u64, u64) {
        self.proc.log_counts()
    }

    /// A metric from its `/metrics` (`name` may carry labels, e.g. `x{lease="…"}`); 0 if absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.api.metrics().await?;
        Ok(target::parse_metric(&text, name).unwrap_or(0.0))
    }

    /// Fails if the process exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let what = format!("node {}", self.name);
        self.proc.check_alive(&what)
    }
}

/// A cluster of `mooring serve` processes on one database and one NATS prefix.
pub struct Cluster {
    opts: ClusterOpts,
    db: String,
    /// Whether this run created the database (else reused from a kept work dir).
    pub db_created: bool,
    prefix: String,
    key_file: PathBuf,
    creds_file: PathBuf,
    ca_file: PathBuf,
    /// Index i is node `n{i+1}`; `None` while not running.
    nodes: Vec<Option<Node>>,
    creds: Vec<Cred>,
    ca_pem: Option<String>,
    token: Option<String>,
    /// `[store] pool_size` of the nodes started next.
    pool_size: usize,
    finished: bool,
}

impl Cluster {
    /// Creates (or, with `keep`, reuses) the database, the key file and the credential cache
    /// under `opts.dir`. No node runs yet.
    pub async fn create(opts: ClusterOpts) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        let db_file = opts.dir.join("database");
        let key_file = opts.dir.join("cluster.key");
        let creds_file = opts.dir.join("devices.jsonl");
        let ca_file = opts.dir.join("ca.crt");
        let kept = match std::fs::read_to_string(&db_file) {
            Ok(name) if opts.keep && key_file.exists() => {
                let name = name.trim().to_owned();
                let exists = pg_query_i64(
                    &opts.postgres_url,
                    &format!(
                        "SELECT count(*) FROM pg_database WHERE datname = '{}'",
                        name.replace('\'', "")
                    ),
                )
                .await?;
                (exists == 1 && is_db_name(&name)).then_some(name)
            }
            _ => None,
        };
        let (db, db_created) = match kept {
            Some(name) => (name, false),
            None => {
                // A fresh database: nothing cached from an earlier one is valid.
                for f in [&db_file, &key_file, &creds_file, &ca_file] {
                    let _ = std::fs::remove_file(f);
                }
                for entry in std::fs::read_dir(&opts.dir)?.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with('n') && name[1..].parse::<usize>().is_ok() {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let name = format!("mooring_bench_{}_{nanos}", std::process::id());
                pg_execute(&opts.postgres_url, &format!("CREATE DATABASE \"{name}\"")).await?;
                std::fs::write(&db_file, &name)?;
                let key: [u8; 32] = rand::random();
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                write_private(&key_file, &hex)?;
                (name, true)
            }
        };
        // Node logs are per run (each start of a node appends to its log).
        for entry in std::fs::read_dir(&opts.dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".log") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let creds = if db_created {
            Vec::new()
        } else {
            target::load_creds(&creds_file)?
        };
        let ca_pem = std::fs::read_to_string(&ca_file).ok();
        let prefix = format!("bench-{:016x}", rand::random::<u64>());
        Ok(Cluster {
            opts,
            db,
            db_created,
            prefix,
            key_file,
            creds_file,
            ca_file,
            nodes: Vec::new(),
            creds,
            ca_pem,
            token: None,
            pool_size: POOL_SIZE_MAX,
            finished: false,
        })
    }

    /// Node data dirs, configs and logs, the key file and the credential cache.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    pub fn database(&self) -> &str {
        &self.db
    }

    pub fn set_pool_size(&mut self, n: usize) {
        self.pool_size = n.max(1);
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// Where node `i`'s full log is (`n{i+1}.log` in the cluster dir).
    pub fn log_file(&self, i: usize) -> PathBuf {
        self.opts.dir.join(format!("n{}.log", i + 1))
    }

    /// The running nodes, in order.
    pub fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten()
    }

    pub fn node(&self, i: usize) -> anyhow::Result<&Node> {
        self.nodes
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("node n{} is not running", i + 1))
    }

    /// Node `i`'s MQTT/TLS endpoint (needs the CA: provision a device first).
    pub fn endpoint(&self, i: usize) -> anyhow::Result<Endpoint> {
        let ca = self
            .ca_pem
            .as_deref()
            .context("the fleet CA is not known yet (no device provisioned)")?;
        Endpoint::new(self.node(i)?.mqtt, ca)
    }

    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn creds_file(&self) -> &Path {
        &self.creds_file
    }

    /// The first `n` device credentials.
    pub fn creds(&self, n: usize) -> anyhow::Result<&[Cred]> {
        self.creds
            .get(..n)
            .ok_or_else(|| anyhow!("only {} devices provisioned", self.creds.len()))
    }

    /// Starts node `i` (`n{i+1}`) on ports 0 and waits until it listens.
    pub async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes.len() <= i {
            self.nodes.resize_with(i + 1, || None);
        }
        anyhow::ensure!(self.nodes[i].is_none(), "node n{} already running", i + 1);
        let name = format!("n{}", i + 1);
        let data_dir = self.opts.dir.join(&name);
        std::fs::create_dir_all(&data_dir)?;
        let token_file = data_dir.join("admin.token");
        if let Some(token) = &self.token {
            if !token_file.exists() {
                write_private(&token_file, token)?;
            }
        }
        let config = format!(
            "# Generated by mooring-bench (cluster suite).\n\
             node_id = {}\n\
             [store]\nurl = {}\npool_size = {}\n\
             [bus]\nurl = {}\nprefix = {}\n\
             [cluster]\nsecret_key_file = {}\n",
            toml_str(&name)?,
            toml_str(&database_url(&self.opts.postgres_url, &self.db))?,
            self.pool_size,
            toml_str(&self.opts.nats_url)?,
            toml_str(&self.prefix)?,
            toml_str(&self.key_file.display().to_string())?,
        );
        let config_file = self.opts.dir.join(format!("{name}.toml"));
        std::fs::write(&config_file, config)
            .with_context(|| format!("writing {}", config_file.display()))?;
        let args: Vec<OsString> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.clone().into(),
            "--mqtt-addr".into(),
            "127.0.0.1:0".into(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--config".into(),
            config_file.into(),
        ];
        // One log per node and run: every start of the node appends to it.
        let log_file = self.log_file(i);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .with_context(|| format!("opening {}", log_file.display()))?;
        writeln!(log, "--- {name} started by mooring-bench")?;
        drop(log);
        let spawn = SpawnOpts {
            log_file: Some(log_file),
            piped_stdio: false,
        };
        let (proc, mqtt, http) =
            target::spawn_mooring(&self.opts.bin, &args, self.opts.fd_limit, spawn)
                .await
                .with_context(|| format!("starting node {name}"))?;
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_owned();
        self.token.get_or_insert(token.clone());
        let api = mooring_api::Client::builder(&format!("http://{http}"), &token)
            .timeout(target::HTTP_TIMEOUT)
            .build()?;
        self.nodes[i] = Some(Node {
            name,
            proc,
            mqtt,
            http,
            api,
        });
        Ok(())
    }

    /// Starts nodes `0..n` that are not running (in order: the first creates the admin token).
    pub async fn start_first(&mut self, n: usize) -> anyhow::Result<()> {
        for i in 0..n {
            if self.nodes.get(i).is_none_or(Option::is_none) {
                self.start(i).await?;
            }
        }
        Ok(())
    }

    /// `kill -9` every node (bounded).
    pub async fn kill_all(&mut self) {
        for slot in self.nodes.iter_mut() {
            if let Some(node) = slot.take() {
                node.proc.kill().await;
            }
        }
    }

    /// Fails if any running node exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for node in self.nodes.iter_mut().flatten() {
            node.check_alive()?;
        }
        Ok(())
    }

    /// Makes sure devices `bench-000000` … up to `n` exist, creating the missing ones through
    /// node 0's API (which must run); returns how long that took and how many it created.
    pub async fn ensure_devices(&mut self, n: usize) -> anyhow::Result<(Duration, usize)> {
        let have = self.creds.len();
        if have >= n && self.ca_pem.is_some() {
            return Ok((Duration::ZERO, 0));
        }
        let started = Instant::now();
        let api = self.node(0)?.api.clone();
        // At least one device is created, so the fleet CA is learnt even from a full cache.
        let ids: Vec<String> = (have..n.max(have + 1)).map(target::device_id).collect();
        let created = ids.len();
        let (new, ca) = target::create_devices(&api, ids).await?;
        let ca = ca.context("the API named no fleet CA")?;
        std::fs::write(&self.ca_file, &ca)?;
        self.ca_pem = Some(ca);
        target::append_creds(&self.creds_file, &new)?;
        self.creds.extend(new);
        Ok((started.elapsed(), created))
    }

    /// Sum over the running nodes of [`Node::metric`].
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let mut sum = 0.0;
        for node in self.running() {
            sum += node.metric(name).await?;
        }
        Ok(sum)
    }

    /// Sum of the running nodes' RSS in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let mut sum = 0;
        for node in self.running() {
            sum += node.rss_kib()?;
        }
        Ok(sum)
    }

    /// Kills every node and drops the database (unless kept). Errors are reported, not returned.
    pub async fn finish(mut self) {
        self.kill_all().await;
        self.finished = true;
        if !self.opts.keep {
            let sql = drop_sql(&self.db);
            if let Err(e) = pg_execute(&self.opts.postgres_url, &sql).await {
                eprintln!("cluster: could not drop database {}: {e:#}", self.db);
            }
        } else {
            eprintln!(
                "cluster: kept database {} and the device keys in {} for the next run \
                 (drop it with: DROP DATABASE \"{}\" WITH (FORCE))",
                self.db,
                self.opts.dir.display(),
                self.db
            );
        }
    }
}

impl Drop for Cluster {
    /// The path taken on an error or a panic: kill the nodes, drop the database (best effort,
    /// on a thread of its own: drop may run inside a runtime).
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.nodes.clear();
        if self.opts.keep {
            return;
        }
        let (url, sql) = (self.opts.postgres_url.clone(), drop_sql(&self.db));
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(pg_execute(&url, &sql));
            }
        })
        .join();
    }
}

fn drop_sql(db: &str) -> String {
    format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")
}

/// Names this suite creates: `mooring_bench_<digits>_<digits>`.
fn is_db_name(name: &str) -> bool {
    name.strip_prefix("mooring_bench_")
        .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit() || c == '_'))
}

/// Writes `text` to a new file readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// How to run this binary's `cluster-worker`: `mooring bench cluster-worker` when `bin` is the
/// `mooring` CLI, else `<bin> cluster-worker` (`mooring-bench`).
pub fn worker_command(bin: &Path) -> Vec<OsString> {
    let stem = bin.file_stem().map(|s| s.to_string_lossy().into_owned());
    if stem.as_deref() == Some("mooring") {
        vec!["bench".into(), "cluster-worker".into()]
    } else {
        vec!["cluster-worker".into()]
    }
}

/// One worker process: its stdin (the spec, then `go`; closing it stops the worker) and its
/// latest report.
struct Worker {
    proc: Proc,
    stdin: Option<tokio::process::ChildStdin>,
    latest: Arc<Mutex<WorkerReport>>,
    reader: JoinHandle<()>,
    count: usize,
}

/// The load generator's processes, each connecting a range of the devices.
pub struct Workers {
    workers: Vec<Worker>,
    /// When `go` was sent (Unix ms, comparable with [`WorkerReport::all_up_unix_ms`]).
    pub started_unix_ms: Option<u64>,
}

impl Workers {
    /// Spawns one worker per spec (`bin` with [`worker_command`]), writes each its spec and
    /// waits, at most [`WORKER_READY_TIMEOUT`], until every one has loaded its credentials.
    pub async fn spawn(
        bin: &Path,
        specs: Vec<WorkerSpec>,
        fd_limit: u64,
        log_dir: &Path,
    ) -> anyhow::Result<Workers> {
        let mut workers = Vec::with_capacity(specs.len());
        for (k, spec) in specs.into_iter().enumerate() {
            let log_file = log_dir.join(format!("worker-{k}.log"));
            let _ = std::fs::write(&log_file, "");
            let opts = SpawnOpts {
                log_file: Some(log_file),
                piped_stdio: true,
            };
            let mut proc = Proc::spawn_with(bin, &worker_command(bin), &[], fd_limit, opts)?;
            let mut stdin = proc.take_stdin().context("worker stdin")?;
            let stdout = proc.take_stdout().context("worker stdout")?;
            let mut line = serde_json::to_vec(&spec)?;
            line.push(b'\n');
            stdin
                .write_all(&line)
                .await
                .context("writing a worker's spec")?;
            stdin.flush().await?;
            let latest = Arc::new(Mutex::new(WorkerReport::default()));
            let latest2 = latest.clone();
            let reader = tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(r) = serde_json::from_str::<WorkerReport>(&line) {
                        if let Ok(mut l) = latest2.lock() {
                            *l = r;
                        }
                    }
                }
            });
            workers.push(Worker {
                proc,
                stdin: Some(stdin),
                latest,
                reader,
                count: spec.count,
            });
        }
        let mut w = Workers {
            workers,
            started_unix_ms: None,
        };
        w.wait(WORKER_READY_TIMEOUT, |r| r.iter().all(|r| r.ready))
            .await
            .context("waiting for the workers to load their credentials")?;
        Ok(w)
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Every worker starts connecting.
    pub async fn go(&mut self) -> anyhow::Result<()> {
        self.started_unix_ms = Some(crate::worker::unix_ms());
        for w in &mut self.workers {
            let stdin = w.stdin.as_mut().context("worker already stopped")?;
            stdin
                .write_all(b"go\n")
                .await
                .context("telling a worker to go")?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// The latest report of each worker.
    pub fn reports(&self) -> Vec<WorkerReport> {
        self.workers
            .iter()
            .map(|w| w.latest.lock().map(|r| r.clone()).unwrap_or_default())
            .collect()
    }

    /// All workers' reports added up.
    pub fn total(&self) -> WorkerReport {
        WorkerReport::sum(&self.reports())
    }

    /// Devices all workers were given.
    pub fn devices(&self) -> usize {
        self.workers.iter().map(|w| w.count).sum()
    }

    /// Fails if a worker exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (k, w) in self.workers.iter_mut().enumerate() {
            w.proc.check_alive(&format!("load-generator worker {k}"))?;
        }
        Ok(())
    }

    /// Polls the reports until `done` holds; fails if a worker exits or `timeout` passes.
    pub async fn wait(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[WorkerReport]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.reports()) {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!("not within {timeout:?}: {:?}", self.total());
            }
            tokio::time::sleep(REPORT_INTERVAL / 5).await;
        }
    }

    /// Sum of the workers' RSS in KiB (0 for one that is gone).
    pub fn rss_kib(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.proc.rss_kib().unwrap_or(0))
            .sum()
    }

    /// The workers' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.proc.pid).collect()
    }

    /// Closes every worker's stdin (they disconnect their devices and exit) and waits at most
    /// `timeout` for each, killing any that is still there. Returns the final reports.
    pub async fn stop(mut self, timeout: Duration) -> Vec<WorkerReport> {
        for w in &mut self.workers {
            w.stdin = None;
        }
        let mut reports = Vec::new();
        for w in self.workers.drain(..) {
            let _ = w.proc.wait_or_kill(timeout).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), w.reader).await;
            reports.push(w.latest.lock().map(|r| r.clone()).unwrap_or_default());
        }
        reports
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &self.workers {
            w.reader.abort();
        }
        // Each Proc is killed by its own drop.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_only_the_database() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/test", "b1"),
            "postgres://postgres@127.0.0.1:5432/b1"
        );
        assert_eq!(
            database_url("postgres://u@h/test?sslmode=disable", "b1"),
            "postgres://u@h/b1?sslmode=disable"
        );
        assert_eq!(database_url("postgres://u@h", "b1"), "postgres://u@h/b1");
    }

    #[test]
    fn toml_strings_are_escaped_and_control_characters_refused() -> anyhow::Result<()> {
        assert_eq!(toml_str(r#"a"b\c"#)?, r#""a\"b\\c""#);
        assert!(toml_str("a\nb").is_err());
        Ok(())
    }

    #[test]
    fn the_mooring_cli_runs_workers_through_bench() {
        assert_eq!(
            worker_command(Path::new("/x/target/release/mooring")),
            vec![OsString::from("bench"), "cluster-worker".into()]
        );
        assert_eq!(
            worker_command(Path::new("/x/mooring-bench")),
            vec![OsString::from("cluster-worker")]
        );
        assert!(is_db_name("mooring_bench_12_345"));
        assert!(!is_db_name("test"));
        assert!(!is_db_name("mooring_bench_1\"; DROP"));
    }
}
