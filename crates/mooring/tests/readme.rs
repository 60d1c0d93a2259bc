//! The README's walkthrough, run as written: its `sh` blocks from "From a new device to a stored
//! point" up to "Documentation" (the dashboard's user included), in order, in one directory, against a real server. Only what a
//! test must change is changed: the ports (the server listens on port 0), the binaries' paths
//! (this build's), the agent's state dir (inside the test's directory), `cargo build` lines
//! (already built) and lines with a `<placeholder>`. So the README cannot rot unnoticed.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use support::Server;

/// The README's `sh` blocks of the walkthrough, in order.
fn walkthrough_blocks(readme: &str) -> Vec<String> {
    let start = readme
        .find("## From a new device to a stored point")
        .expect("README has the walkthrough");
    let end = readme[start..]
        .find("## Documentation")
        .map_or(readme.len(), |e| start + e);
    let mut blocks = Vec::new();
    let mut rest = &readme[start..end];
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("\n```").expect("closed code block");
        blocks.push(body[..close].to_owned());
        rest = &body[close + 4..];
    }
    blocks
}

/// A block as this test runs it (see the module docs for what changes).
fn adapt(block: &str, server: &Server) -> String {
    let agent = Path::new(support::BIN).with_file_name("mooring-agent");
    let mut out = String::from(
        "set -euo pipefail\nshopt -s expand_aliases\n\
         if [ -f mooring-data/admin.token ]; then TOKEN=$(cat mooring-data/admin.token); fi\n",
    );
    out.push_str(&format!("alias mooring='{}'\n", support::BIN));
    for line in block.lines() {
        if line.starts_with("cargo build") {
            continue;
        }
        if line.contains("mooring command show <") {
            out.push_str("# (placeholder line skipped)\n");
            continue;
        }
        let line = line
            .replace("./target/release/mooring-agent", &agent.to_string_lossy())
            .replace("./target/release/mooring", support::BIN)
            .replace("http://127.0.0.1:8080", &server.url())
            .replace("8883", &server.mqtt.port().to_string())
            .replace("/tmp/lock-1-state", "./lock-1-state");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn bash(script: &str, dir: &Path, server: &Server) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("MOORING_SERVER", server.url())
        .env_remove("MOORING_TOKEN")
        .env_remove("MOORING_DATA_DIR");
    cmd
}

/// Kills the backgrounded agent block when the test ends, however it ends.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        // The agent is the pipeline's last process; killing the whole group stops it too.
        let _ = Command::new("pkill")
            .args(["-KILL", "-g", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_readme_walkthrough_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let blocks = walkthrough_blocks(&readme);
    assert_eq!(
        blocks.len(),
        4,
        "device + API, agent, commands, dashboard user: {blocks:#?}"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("mooring-data"));

    // 1. Register, publish with mosquitto_pub, read back with curl.
    let out = bash(&adapt(&blocks[0], &server), tmp.path(), &server)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "block 1 failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""value":21.5"#), "{stdout}");
    assert!(stdout.contains(r#""battery.v""#), "{stdout}");

    // 2. The agent, in the background as in its own terminal.
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(tmp.path().join("agent.log")).expect("log");
    let agent = bash(&adapt(&blocks[1], &server), tmp.path(), &server)
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .process_group(0)
        .spawn()
        .expect("agent block");
    let _agent = Background(agent);
    server
        .wait_for("/api/v1/devices/lock-1", |d| d["online"] == true)
        .await;
    // The agent subscribes to its commands right after connecting; the reboot below may arrive
    // before that and is delivered on subscribe, so no wait is needed here.

    // 3. Commands (the reboot must succeed: `set -e` and the CLI's exit status) and the shadow.
    let out = bash(&adapt(&blocks[2], &server), tmp.path(), &server)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let agent_log = std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "block 3 failed:\n{stdout}\n{}\nagent:\n{agent_log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(stdout.contains(r#""led":"on""#), "{stdout}");

    // 4. The dashboard: a person with a password (typed on stdin), who can then sign in, and
    // the page itself at `/`.
    let mut user = bash(&adapt(&blocks[3], &server), tmp.path(), &server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    {
        use std::io::Write;
        let mut stdin = user.stdin.take().expect("stdin");
        stdin
            .write_all(b"a long enough password\n")
            .expect("type the password");
    }
    let out = user.wait_with_output().expect("bash");
    assert!(
        out.status.success(),
        "block 4 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let login = support::http()
        .post(format!("{}/api/v1/auth/login", server.url()))
        .json(
            &serde_json::json!({"email": "you@example.com", "password": "a long enough password"}),
        )
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), 200);
    let page = support::get(format!("{}/", server.url())).await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("page").contains("<html"));
}
