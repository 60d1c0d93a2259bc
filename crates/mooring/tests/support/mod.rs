//! Test harness: runs the real `mooring` binary on port 0 in a temp data dir, and drives it
//! with real clients (the `mooring` CLI, mosquitto_pub/sub, HTTP).
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod agents;
pub mod manufacturer;

pub const BIN: &str = env!("CARGO_BIN_EXE_mooring");

/// Longest a test waits for an expected condition before failing (never a sleep-for-readiness).
pub const WAIT: Duration = Duration::from_secs(20);

/// An HTTP client (installs the ring crypto provider reqwest's rustls needs).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// `GET url` without a token.
pub async fn get(url: String) -> reqwest::Response {
    http().get(url).send().await.expect("http")
}

/// The environment every test server starts with (callers may override it afterwards).
fn serve_env(cmd: &mut Command) {
    cmd.env("RUST_LOG", "info")
        .env_remove("MOORING_TOKEN")
        .env_remove("MOORING_DATA_DIR")
        .env_remove("MOORING_WEB_DIR");
}

pub struct Server {
    pub data_dir: PathBuf,
    pub mqtt: SocketAddr,
    pub mqtt_dev: SocketAddr,
    pub http: SocketAddr,
    pub token: String,
    child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

fn parse_addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let rest = rest
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    rest.split_whitespace().next()?.parse().ok()
}

impl Server {
    /// `mooring ota upload` of `bytes` (written to `file`) as `version`, built for `rev-b`: the
    /// artifact id it prints.
    pub fn ota_upload(&self, file: &Path, bytes: &[u8], version: &str) -> String {
        std::fs::write(file, bytes).expect("write the image");
        let out = self.cli(&[
            "ota",
            "upload",
            file.to_str().expect("utf8"),
            "--version",
            version,
            "--compatible",
            "rev-b",
        ]);
        assert!(
            out.status.success(),
            "ota upload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn start(data_dir: &Path) -> Server {
        Self::start_with(data_dir, "127.0.0.1:0", "127.0.0.1:0", &[])
    }

    /// A server on ports 0 with its data in `dir/data` and the config file `toml` (written to
    /// `dir/mooring.toml`).
    pub fn start_configured(dir: &Path, toml: &str) -> Server {
        let args = config_args(dir, toml);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_with(&dir.join("data"), "127.0.0.1:0", "127.0.0.1:0", &args)
    }

    pub fn start_with(data_dir: &Path, mqtt: &str, http: &str, extra: &[&str]) -> Server {
        Self::start_custom(data_dir, |cmd| {
            cmd.arg("--data-dir")
                .arg(data_dir)
                .args(["--mqtt-addr", mqtt, "--http-addr", http])
                .args(["--mqtt-dev-addr", "127.0.0.1:0"])
                .args(extra);
        })
    }

    /// Runs `mooring serve` with arguments and environment set by `configure`; `data_dir` is
    /// where the server is expected to write `admin.token`. The dev listener must be enabled.
    pub fn start_custom(data_dir: &Path, configure: impl FnOnce(&mut Command)) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        serve_env(&mut cmd);
        configure(&mut cmd);
        Self::spawn(data_dir, cmd)
    }

    /// Like [`Server::start_with`] (port 0 everywhere), but `mooring serve` runs from `sh -c`
    /// after the shell commands `setup` (e.g. `umask 022`, `ulimit -n 64`), in the same process.
    pub fn start_after_shell(data_dir: &Path, setup: &str, extra: &[&str]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{setup} && exec \"$@\""))
            .args(["sh", BIN, "serve", "--data-dir"])
            .arg(data_dir)
            .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--mqtt-dev-addr", "127.0.0.1:0"])
            .args(extra);
        serve_env(&mut cmd);
        Self::spawn(data_dir, cmd)
    }

    fn spawn(data_dir: &Path, mut cmd: Command) -> Server {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn mooring serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().expect("log").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let (mut m, mut d, mut h) = (None, None, None);
        let deadline = Instant::now() + WAIT;
        while !(m.is_some() && d.is_some() && h.is_some() && Instant::now() < deadline) {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => l,
                Err(_) => panic!(
                    "server did not report its listeners; log: {:#?}",
                    log.lock().expect("log")
                ),
            };
            if let Some(a) = parse_addr_after(&line, "MQTT/TLS listening on ") {
                m = Some(a);
            }
            if let Some(a) = parse_addr_after(&line, "for local experiments only) listening on ") {
                d = Some(a);
            }
            if let Some(a) = parse_addr_after(&line, "HTTP API listening on ") {
                h = Some(a);
            }
            if m.is_some() && d.is_some() && h.is_some() {
                break;
            }
        }
        // A cluster node that did not create the cluster's admin token has none (empty).
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        Server {
            data_dir: data_dir.to_owned(),
            mqtt: m.expect("mqtt addr"),
            mqtt_dev: d.expect("dev addr"),
            http: h.expect("http addr"),
            token,
            child,
            log,
        }
    }

    /// The `/metrics` text (Prometheus exposition).
    pub async fn metrics_text(&self) -> String {
        get(format!("{}/metrics", self.url()))
            .await
            .text()
            .await
            .expect("metrics body")
    }

    /// The server's process id (to send it signals or read its memory use).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// One sample from `/metrics` (`name` with its labels, e.g. `x_total{reason="y"}`); a
    /// series the server does not export fails the test (so `== 0` never passes vacuously).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (n, v) = l.rsplit_once(' ')?;
                (n == name).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("/metrics has no series {name}"))
    }

    /// Waits (bounded by [`WAIT`]) until a `/metrics` sample satisfies `pred`; returns it.
    pub async fn wait_metric(&self, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(name).await;
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "metric {name} stayed at {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded by [`WAIT`]) until the server's log has a line containing `text`.
    pub fn wait_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log_text().contains(text) {
            assert!(Instant::now() < deadline, "log line {text:?} not seen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's resident memory in KiB (from /proc), for reporting.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Runs `mooring args... -o json`-style commands that must succeed; their JSON output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "mooring {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    /// Runs the `mooring` CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .args(["--server", &self.url(), "--data-dir"])
            .arg(&self.data_dir)
            .env_remove("MOORING_TOKEN")
            .output()
            .expect("run mooring cli")
    }

    /// Creates a device with the CLI; returns its credentials directory.
    pub fn create_device(&self, id: &str, root: &Path) -> Creds {
        let dir = root.join(id);
        let out = self.cli(&["device", "create", id, "--out", dir.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "device create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Creds { dir }
    }

    /// `mooring user create <email> --role <role> --password-stdin`, fed `password`.
    pub fn create_user(&self, email: &str, role: &str, password: &str) {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(["user", "create", email, "--role", role, "--password-stdin"])
            .args(["--server", &self.url(), "--data-dir"])
            .arg(&self.data_dir)
            .env_remove("MOORING_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mooring user create");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{password}\n").as_bytes())
            .expect("write password");
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "user create {email}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let client = http();
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = client
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("http");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, json)
    }

    /// Polls the API until `pred` holds (bounded by [`WAIT`]).
    pub async fn wait_for(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, v) = self.api("GET", path, None).await;
            if status == 200 && pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "condition on {path} never held; last: {status} {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mooring-agent` (built beside `mooring` by `cargo test --workspace`) as device `creds`
/// against `server`, its state in `state_dir`; callers add the rest of the arguments.
pub fn agent_command(server: &Server, creds: &Creds, state_dir: &Path) -> Command {
    agent_command_at(&server.mqtt.to_string(), creds, state_dir)
}

/// [`agent_command`] for the server at `mqtt_addr` (one that is down now, or not yet started).
pub fn agent_command_at(mqtt_addr: &str, creds: &Creds, state_dir: &Path) -> Command {
    let bin = Path::new(BIN).with_file_name("mooring-agent");
    assert!(
        bin.exists(),
        "{} not built; run `cargo test --workspace` (or `cargo build -p mooring-agent`)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.args(["--server", mqtt_addr])
        .arg("--cert")
        .arg(creds.cert())
        .arg("--key")
        .arg(creds.key())
        .arg("--ca")
        .arg(creds.ca())
        .arg("--state-dir")
        .arg(state_dir);
    cmd
}

pub struct Creds {
    pub dir: PathBuf,
}

impl Creds {
    pub fn cert(&self) -> PathBuf {
        self.dir.join("device.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("device.key")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// TLS arguments for mosquitto_pub / mosquitto_sub.
    pub fn mosquitto_args(&self, addr: SocketAddr) -> Vec<String> {
        vec![
            "-h".into(),
            addr.ip().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "--cafile".into(),
            self.ca().display().to_string(),
            "--cert".into(),
            self.cert().display().to_string(),
            "--key".into(),
            self.key().display().to_string(),
        ]
    }
}

/// Runs mosquitto_pub with `args` and returns its output.
pub fn mosquitto_pub(args: &[String]) -> Output {
    Command::new("mosquitto_pub")
        .args(args)
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
}

/// Starts mosquitto_sub with `args`; stdout lines are the received messages.
pub fn mosquitto_sub(args: &[String]) -> Child {
    Command::new("mosquitto_sub")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)")
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A running mosquitto_sub started with `-d`, so we can see SUBACK before publishing.
pub struct Sub {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Sub {
    /// Starts mosquitto_sub with `args` (plus `-d`) and waits for its SUBACK.
    pub fn start(args: &[String]) -> Sub {
        let mut sub = Sub::spawn(args);
        sub.wait_line(|l| l.contains("received SUBACK"));
        sub
    }

    /// Starts mosquitto_sub with `args` (plus `-d`) without waiting for anything: a resumed
    /// session's messages may arrive before the SUBACK, and `next_message` must see them.
    pub fn spawn(args: &[String]) -> Sub {
        // stdbuf: mosquitto_sub block-buffers a piped stdout; we need each line as it happens.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-d"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sub { child, lines: rx }
    }

    /// Waits for a line matching `pred` (bounded by [`WAIT`]); returns it.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("mosquitto_sub: expected line not seen ({e})"),
            }
        }
    }

    /// The next message payload line (debug lines start with "Client ").
    pub fn next_message(&mut self) -> String {
        self.wait_line(|l| {
            !l.starts_with("Client ")
                && !l.starts_with("Subscribed (")
                && !l.starts_with("Received ")
        })
    }

    /// Waits for the process to exit (bounded); returns its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "mosquitto_sub did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether mosquitto_sub is still running (its connection not closed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device's MQTT 5 subscription (`-v`: each message line is `topic payload`), client id = id.
pub fn device_sub(server: &Server, creds: &Creds, id: &str, filter: &str) -> Sub {
    let mut args = creds.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V", "mqttv5", "-q", "1", "-v", "-i", id, "-t", filter,
    ]));
    Sub::start(&args)
}

/// Publishes one QoS 1 message as the device; panics if mosquitto_pub fails.
pub fn device_pub(server: &Server, creds: &Creds, id: &str, topic: &str, payload: &str) {
    let mut args = creds.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V", "mqttv5", "-q", "1", "-i", id, "-t", topic, "-m", payload,
    ]));
    let out = mosquitto_pub(&args);
    assert!(
        out.status.success(),
        "mosquitto_pub {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sub {
    /// The next `topic payload` line, split; payload parsed as JSON (Null if empty or not JSON).
    pub fn next_json(&mut self) -> (String, Value) {
        let line = self.next_message();
        let (topic, payload) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        (
            topic.to_owned(),
            serde_json::from_str(payload).unwrap_or(Value::Null),
        )
    }
}

/// Starts `mooring serve` with the config `toml` in a fresh directory, expecting it to refuse
/// to start: asserts it exited non-zero and returns its stderr.
pub fn serve_refused(toml: &str) -> String {
    let tmp = tempfile::tempdir().expect("tmp");
    let args = config_args(tmp.path(), toml);
    let out = Command::new(BIN)
        .arg("serve")
        .args(&args)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .output()
        .expect("run mooring serve");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    stderr
}

/// Writes a TOML config file into `dir` and returns `--config <path>` arguments.
pub fn config_args(dir: &Path, toml: &str) -> Vec<String> {
    let path = dir.join("mooring.toml");
    std::fs::write(&path, toml).expect("write config");
    vec!["--config".into(), path.display().to_string()]
}

/// What the device's MQTT event loop saw.
#[derive(Debug)]
enum Ev {
    ConnAck,
    SubAck,
    PubAck,
    Publish(String, Vec<u8>),
    Closed(String),
}

/// A device speaking MQTT 3.1.1 over mutual TLS with one connection that both subscribes and
/// publishes (a second connection with the same client id would take the session over).
pub struct MqttDevice {
    pub id: String,
    client: rumqttc::AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<Ev>,
    pending: std::collections::VecDeque<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttDevice {
    /// Connects with the device's certificate; returns after CONNACK.
    pub async fn connect(server: &Server, creds: &Creds, id: &str) -> MqttDevice {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let read = |p: PathBuf| std::fs::read(&p).expect("credential file");
        let mut opts =
            rumqttc::MqttOptions::new(id, server.mqtt.ip().to_string(), server.mqtt.port());
        opts.set_clean_session(true);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca: read(creds.ca()),
                alpn: None,
                client_auth: Some((read(creds.cert()), read(creds.key()))),
            },
        ));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            use rumqttc::{Event, Packet};
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ev::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(_))) => Ev::SubAck,
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Ev::Publish(p.topic.clone(), p.payload.to_vec())
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut d = MqttDevice {
            id: id.to_owned(),
            client,
            events,
            pending: Default::default(),
            task,
        };
        let _ = d.wait(|e| matches!(e, Ev::ConnAck)).await;
        d
    }

    async fn wait(&mut self, pred: impl Fn(&Ev) -> bool) -> Ev {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("device: expected MQTT event not seen in time")
                .expect("device event loop ended");
            if pred(&ev) {
                return ev;
            }
            match ev {
                Ev::Publish(t, p) => self.pending.push_back((t, p)),
                Ev::Closed(e) => panic!("device {} connection closed: {e}", self.id),
                _ => {}
            }
        }
    }

    /// Subscribes (QoS 1); returns after SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let _ = self.wait(|e| matches!(e, Ev::SubAck)).await;
    }

    /// Publishes at QoS 1; returns after PUBACK (the server has stored its effect).
    pub async fn publish(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .expect("publish");
        let _ = self.wait(|e| matches!(e, Ev::PubAck)).await;
    }

    /// Publishes at QoS 1 without waiting for the PUBACK (the server may close instead).
    #[allow(dead_code)]
    pub async fn publish_no_wait(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .expect("publish");
    }

    /// Waits until the server closes the connection.
    #[allow(dead_code)]
    pub async fn closed(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("device: the connection was not closed in time")
            {
                Some(Ev::Closed(_)) | None => return,
                Some(_) => {}
            }
        }
    }

    /// The next received message: topic and raw payload.
    pub async fn next_raw(&mut self) -> (String, Vec<u8>) {
        if let Some(m) = self.pending.pop_front() {
            return m;
        }
        match self.wait(|e| matches!(e, Ev::Publish(..))).await {
            Ev::Publish(t, p) => (t, p),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The next received message with its payload as JSON (Null if empty or not JSON).
    pub async fn next_json(&mut self) -> (String, Value) {
        let (t, p) = self.next_raw().await;
        (t, serde_json::from_slice(&p).unwrap_or(Value::Null))
    }
}

impl Drop for MqttDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A service token of role `service`.
pub fn service_token(server: &Server, name: &str) -> String {
    let out = server.cli(&["token", "create", name, "--role", "service"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// mosquitto_sub/pub arguments for a service over TLS (no client certificate, token as password).
pub fn service_args(server: &Server, ca: &Creds, token: &str, client_id: &str) -> Vec<String> {
    s(&[
        "-h",
        "127.0.0.1",
        "-p",
        &server.mqtt.port().to_string(),
        "--cafile",
        ca.ca().to_str().expect("utf8"),
        "-u",
        "svc",
        "-P",
        token,
        "-i",
        client_id,
    ])
}

/// mosquitto_pub/sub arguments for the anonymous dev listener.
pub fn dev_args(server: &Server) -> Vec<String> {
    s(&["-h", "127.0.0.1", "-p", &server.mqtt_dev.port().to_string()])
}

/// One message of a live event stream (`GET /api/v1/events`).
#[derive(Debug, Clone)]
pub struct Msg {
    pub event: String,
    pub id: String,
    pub data: Value,
}

/// A minimal SSE reader: keep-alives and id-only messages update `last_id` and are skipped.
pub struct Sse {
    resp: reqwest::Response,
    buf: Vec<u8>,
    last_id: Option<String>,
}

impl Sse {
    pub async fn open(server: &Server, selector: Option<&str>, last_id: Option<&str>) -> Sse {
        Self::open_as(server, &server.token, selector, last_id).await
    }

    /// [`Sse::open`] with another token (a scoped one, say).
    pub async fn open_as(
        server: &Server,
        token: &str,
        selector: Option<&str>,
        last_id: Option<&str>,
    ) -> Sse {
        let resp = Self::request_as(server, token, selector, last_id).await;
        assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Sse {
            resp,
            buf: Vec::new(),
            last_id: last_id.map(str::to_owned),
        }
    }

    pub async fn request(
        server: &Server,
        selector: Option<&str>,
        last_id: Option<&str>,
    ) -> reqwest::Response {
        Self::request_as(server, &server.token, selector, last_id).await
    }

    pub async fn request_as(
        server: &Server,
        token: &str,
        selector: Option<&str>,
        last_id: Option<&str>,
    ) -> reqwest::Response {
        let mut req = http()
            .get(format!("{}/api/v1/events", server.url()))
            .bearer_auth(token);
        if let Some(s) = selector {
            req = req.query(&[("selector", s)]);
        }
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        req.send().await.expect("events request")
    }

    /// The next message with data (bounded by [`WAIT`]).
    pub async fn next(&mut self) -> Msg {
        tokio::time::timeout(WAIT, self.next_inner())
            .await
            .expect("no event in time")
            .expect("the stream ended")
    }

    /// `None` when the server ended the stream.
    async fn next_inner(&mut self) -> Option<Msg> {
        let (mut event, mut id, mut data) = (String::new(), None::<String>, String::new());
        loop {
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).to_string();
                if line.is_empty() {
                    if let Some(i) = id.take() {
                        self.last_id = Some(i);
                    }
                    if !data.is_empty() {
                        return Some(Msg {
                            event: std::mem::take(&mut event),
                            id: self.last_id.clone().unwrap_or_default(),
                            data: serde_json::from_str(&data).expect("event data is JSON"),
                        });
                    }
                    event.clear();
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((&line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = value.to_owned(),
                    "data" => data.push_str(value),
                    "id" => id = Some(value.to_owned()),
                    _ => {}
                }
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c),
                _ => return None,
            }
        }
    }

    /// Reads until the server ends the stream (bounded by [`WAIT`]).
    pub async fn wait_end(&mut self) {
        tokio::time::timeout(WAIT, async { while self.next_inner().await.is_some() {} })
            .await
            .expect("the stream did not end in time");
    }

    /// Reads until `pred` holds; returns every message read, the matching one last.
    pub async fn until(&mut self, pred: impl Fn(&Msg) -> bool) -> Vec<Msg> {
        let mut seen = Vec::new();
        loop {
            let m = self.next().await;
            let done = pred(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
}

/// A response's status, JSON body and `Set-Cookie` values.
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub cookies: Vec<String>,
    pub headers: reqwest::header::HeaderMap,
}

/// One HTTP call with optional bearer token, cookie header and extra headers.
pub async fn call(
    server: &Server,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    cookie: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Resp {
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
    let mut req = http().request(method, format!("{}{path}", server.url()));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let cookies = headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    // An event stream never ends: its headers are the answer.
    let streaming = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = if streaming {
        String::new()
    } else {
        resp.text().await.expect("body")
    };
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        body,
        cookies,
        headers,
    }
}

/// The `name=value` pairs of a login's cookies, for a `Cookie` header.
pub fn cookie_header(cookies: &[String]) -> String {
    cookies
        .iter()
        .filter_map(|c| c.split(';').next())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs `openssl args...` in `dir`; its stdout. Fails the test with openssl's stderr if it fails.
pub fn openssl(args: &[&str], dir: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether device `id` can connect with `creds` (MQTT 5) and publish one QoS 1 telemetry
/// message.
pub fn device_can_publish(server: &Server, creds: &Creds, id: &str) -> bool {
    let mut args = creds.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-i",
        id,
        "-q",
        "1",
        "-t",
        &format!("devices/{id}/telemetry"),
        "-m",
        r#"{"temp":21.5}"#,
    ]));
    mosquitto_pub(&args).status.success()
}

/// Runs an agent command to its end with `lines` on its stdin (then closed): its exit status
/// and stderr. Panics after 60 s. A line the agent no longer reads (it exited: a refusal) is
/// not an error here.
#[allow(dead_code)]
pub fn run_agent_to_end(mut cmd: Command, lines: &[&str]) -> (std::process::ExitStatus, String) {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mooring-agent");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for l in lines {
            let _ = writeln!(stdin, "{l}");
        }
    } // closed: the agent exits once everything is acknowledged
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let out = child.wait_with_output().expect("output");
            return (status, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "agent did not finish; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new API token (`mooring token create NAME --role ROLE --scope SCOPE`): its secret.
#[allow(dead_code)]
pub fn scoped_token(server: &Server, name: &str, role: &str, scope: &str) -> String {
    let out = server.cli(&["token", "create", name, "--role", role, "--scope", scope]);
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Publishes `n` telemetry messages as `id` over its own MQTT/TLS connection, message `i` at
/// `t0_ms + i * 1000` with three points: `temp` = i, `hum` = 50 + i, `on` = (i is even).
/// Returns once every one is acknowledged (stored).
#[allow(dead_code)]
pub async fn publish_series(server: &Server, creds: &Creds, id: &str, t0_ms: u64, n: u64) {
    let mut dev = MqttDevice::connect(server, creds, id).await;
    for i in 0..n {
        let payload = serde_json::json!({
            "ts": t0_ms + i * 1000, "temp": i, "hum": 50 + i, "on": i % 2 == 0,
        });
        dev.publish(&format!("devices/{id}/telemetry"), &payload.to_string())
            .await;
    }
}
