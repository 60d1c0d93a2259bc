//! Gateway mode: the Unix socket transport on its own, then the real agent against the real
//! broker (over in-memory streams) relaying for children on a real Unix socket in a tempdir.
//! Real time (not paused): the children's side is real I/O.

mod support;

use mooring_agent::gateway::unix::UnixTransport;
use mooring_agent::gateway::{
    child, ChildEvent, ChildMsg, ChildTransport as _, GatewayConfig, ToChild, LINE_BYTES_MAX,
};
use mooring_agent::{AgentConfig, Handlers, MemStore};
use mooring_proto::command::CommandRequest;
use mooring_proto::Topic;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;
use support::{device, Agent, World};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A raw child: its lines in, the gateway's lines out.
struct Raw {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn connect(path: &Path) -> Self {
        let s = within("the socket", async {
            loop {
                match UnixStream::connect(path).await {
                    Ok(s) => return s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        let (rd, wr) = s.into_split();
        Self {
            lines: BufReader::new(rd).lines(),
            wr,
        }
    }

    async fn send(&mut self, line: &[u8]) {
        self.wr.write_all(line).await.expect("write");
        self.wr.write_all(b"\n").await.expect("write");
    }

    /// The next line as JSON; `None` at EOF.
    async fn recv(&mut self) -> Option<Value> {
        let line = within("a line from the gateway", self.lines.next_line())
            .await
            .ok()??;
        Some(serde_json::from_str(&line).expect("gateway lines are JSON"))
    }
}

#[tokio::test]
async fn the_unix_transport_speaks_the_line_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.sock");
    // A stale socket file (a crashed gateway's) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());
    let t = UnixTransport::bind(&path, 4).expect("bind");
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    let (tx, mut events) = mpsc::channel(16);
    let serving = tokio::spawn(Box::new(t).serve(tx));

    // A bad hello is answered and the connection closed.
    let mut bad = Raw::connect(&path).await;
    bad.send(br#"{"hello":"not/an/id"}"#).await;
    assert!(bad.recv().await.expect("error line")["error"].is_string());
    assert_eq!(bad.recv().await, None);

    let mut c = Raw::connect(&path).await;
    c.send(br#"{"hello":"lock-7"}"#).await;
    let ChildEvent::Connected { child, conn, tx } =
        within("the hello", events.recv()).await.expect("event")
    else {
        panic!("connected expected")
    };
    assert_eq!(child, device("lock-7"));
    // Bad lines are answered and skipped; the connection goes on.
    c.send(b"not json").await;
    let mut long = br#"{"telemetry":{"x":""#.to_vec();
    long.extend(std::iter::repeat_n(b'x', LINE_BYTES_MAX));
    long.extend_from_slice(br#""}}"#);
    c.send(&long).await;
    c.send(br#"{"telemetry":{"temp":21.5}}"#).await;
    assert!(c.recv().await.expect("error")["error"]
        .as_str()
        .is_some_and(|e| e.contains("line 2")));
    assert!(c.recv().await.expect("error")["error"]
        .as_str()
        .is_some_and(|e| e.contains("longer than")));
    let ChildEvent::Message { msg, conn: c2, .. } =
        within("telemetry", events.recv()).await.expect("event")
    else {
        panic!("message expected")
    };
    assert_eq!(c2, conn);
    assert_eq!(
        msg,
        ChildMsg::Telemetry(serde_json::from_str(r#"{"temp":21.5}"#).expect("map"))
    );
    // The gateway's lines reach the child.
    let cmd = json!({"id":"c1","name":"open","params":{},"expires_at":1});
    tx.try_send(ToChild::Command(cmd.clone())).expect("queued");
    assert_eq!(c.recv().await, Some(json!({ "command": cmd })));
    // Dropping the sender closes the connection, and the transport says so.
    drop(tx);
    assert_eq!(c.recv().await, None);
    assert!(matches!(
        within("the end", events.recv()).await,
        Some(ChildEvent::Disconnected { conn: c3, .. }) if c3 == conn
    ));
    serving.abort();
    let _ = serving.await;
    assert!(!path.exists(), "the socket file goes with the transport");
}

#[test]
fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.sock");
    std::fs::write(&path, b"keep me").expect("file");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    assert!(UnixTransport::bind(&path, 4).is_err());
    assert_eq!(std::fs::read(&path).expect("file"), b"keep me");
}

fn gateway_config(socket: &Path, children_max: usize) -> AgentConfig {
    AgentConfig {
        gateway: Some(GatewayConfig {
            socket: socket.to_owned(),
            children_max,
        }),
        ..support::config(0)
    }
}

fn command(child: &str, id: &str, params: Value) -> (String, Vec<u8>) {
    let req = CommandRequest {
        id: id.into(),
        name: "open".into(),
        params,
        expires_at: u64::MAX,
    };
    (Topic::command(&device(child), id), req.to_bytes())
}

#[tokio::test]
async fn the_agent_relays_for_a_child_under_its_own_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("gw.sock");
    let world = World::new();
    let store = MemStore::new(100, 1).expect("store");
    let agent = Agent::start(
        world.deps(&device("gw-1"), &store, Handlers::new()),
        gateway_config(&socket, 8),
    );
    within("the socket", async {
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // The reference child, fed from a pipe, printing to a pipe.
    let (mut stdin, child_in) = tokio::io::duplex(4096);
    let (child_out, stdout) = tokio::io::duplex(64 * 1024);
    let mut printed = BufReader::new(stdout).lines();
    let child_task = tokio::spawn({
        let socket = socket.clone();
        async move { child::run(&socket, &device("lock-7"), child_in, child_out).await }
    });
    let presence = "devices/lock-7/presence";
    within(
        "presence online",
        world.wait_for("presence", |w| {
            w.on(presence) == vec![json!({"v":1,"online":true})]
        }),
    )
    .await;

    stdin
        .write_all(b"{\"temp\":20}\n{\"temp\":21,\"seq\":5}\n")
        .await
        .expect("stdin");
    let telemetry = "devices/lock-7/telemetry";
    within(
        "telemetry",
        world.wait_for("telemetry", |w| w.on(telemetry).len() == 2),
    )
    .await;
    let t = world.on(telemetry);
    assert_eq!(t[0]["temp"], json!(20));
    assert!(t[0]["seq"].is_u64() && t[0]["ts"].is_u64(), "{t:?}");
    assert_eq!(t[1]["seq"], json!(5), "the child's own seq is kept");

    // A command for the child reaches it, is acknowledged for it, and its result comes back.
    let (topic, payload) = command("lock-7", "c1", json!({"n":1}));
    world.publish(&topic, &payload, false);
    let result = "devices/lock-7/commands/c1/result";
    within(
        "the result",
        world.wait_for("result", |w| !w.on(result).is_empty()),
    )
    .await;
    assert_eq!(
        world.on(result)[0],
        json!({"status":"succeeded","output":{"echo":{"n":1}}})
    );
    assert_eq!(world.on("devices/lock-7/commands/c1/ack").len(), 1);
    let line = within("the printed command", printed.next_line())
        .await
        .expect("stdout")
        .expect("a line");
    let printed_cmd: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(printed_cmd["command"]["id"], json!("c1"));

    // The uplink drops: on the new connection the child is announced and subscribed again.
    world.connector.cut();
    within(
        "presence again",
        world.wait_for("presence again", |w| w.on(presence).len() == 2),
    )
    .await;
    let (topic, payload) = command("lock-7", "c2", json!({"n":2}));
    world.publish(&topic, &payload, false);
    within(
        "the second result",
        world.wait_for("result", |w| {
            !w.on("devices/lock-7/commands/c2/result").is_empty()
        }),
    )
    .await;

    // A second connection as lock-7 replaces the first.
    let mut again = Raw::connect(&socket).await;
    again.send(br#"{"hello":"lock-7"}"#).await;
    let ended = within("the replaced child to end", child_task)
        .await
        .expect("child task");
    assert!(ended.is_ok(), "{ended:?}");
    let mut saw_replaced = false;
    while let Ok(Some(line)) = within("stdout", printed.next_line()).await {
        saw_replaced |= line.contains("replaced");
    }
    assert!(saw_replaced);
    // No offline in between: the child never left.
    assert!(world
        .on(presence)
        .iter()
        .all(|p| p == &json!({"v":1,"online":true})));

    // It leaves: offline.
    drop(again);
    within(
        "presence offline",
        world.wait_for("offline", |w| {
            w.on(presence).last() == Some(&json!({"v":1,"online":false}))
        }),
    )
    .await;
    agent.stop().await.expect("clean stop");
}

#[tokio::test]
async fn children_beyond_the_bound_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("gw.sock");
    let world = World::new();
    let store = MemStore::new(100, 1).expect("store");
    let agent = Agent::start(
        world.deps(&device("gw-1"), &store, Handlers::new()),
        gateway_config(&socket, 1),
    );
    let mut a = Raw::connect(&socket).await;
    a.send(br#"{"hello":"a-1"}"#).await;
    within(
        "a-1 online",
        world.wait_for("a-1", |w| !w.on("devices/a-1/presence").is_empty()),
    )
    .await;
    let mut b = Raw::connect(&socket).await;
    b.send(br#"{"hello":"b-1"}"#).await;
    let refused = b.recv().await.expect("an error line");
    assert!(refused["error"]
        .as_str()
        .is_some_and(|e| e.contains("too many")));
    assert_eq!(b.recv().await, None);
    assert!(world.on("devices/b-1/presence").is_empty());
    // a-1 is unaffected.
    a.send(br#"{"telemetry":{"x":1}}"#).await;
    within(
        "a-1 telemetry",
        world.wait_for("a-1 telemetry", |w| {
            !w.on("devices/a-1/telemetry").is_empty()
        }),
    )
    .await;
    agent.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_childs_telemetry_waits_in_the_outbox_while_the_uplink_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("gw.sock");
    let world = World::new();
    let store = MemStore::new(100, 1).expect("store");
    let agent = Agent::start(
        world.deps(&device("gw-1"), &store, Handlers::new()),
        gateway_config(&socket, 8),
    );
    let mut c = Raw::connect(&socket).await;
    c.send(br#"{"hello":"meter-3"}"#).await;
    within(
        "meter-3 online",
        world.wait_for("online", |w| !w.on("devices/meter-3/presence").is_empty()),
    )
    .await;
    world.connector.set_online(false);
    world.connector.cut();
    for n in 0..3 {
        c.send(format!(r#"{{"telemetry":{{"kwh":{n}}}}}"#).as_bytes())
            .await;
    }
    // Nothing can go out; give the relay time to queue them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(world.on("devices/meter-3/telemetry").is_empty());
    world.connector.set_online(true);
    within(
        "the queued telemetry",
        world.wait_for("telemetry", |w| {
            w.on("devices/meter-3/telemetry").len() == 3
        }),
    )
    .await;
    let seqs: Vec<u64> = world
        .on("devices/meter-3/telemetry")
        .iter()
        .map(|t| t["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    agent.stop().await.expect("clean stop");
}
