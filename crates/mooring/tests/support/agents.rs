//! Real `mooring-agent`s under a tiny service manager (restarted when they ask to reboot into
//! a new slot), with an agent config for OTA tests.

use super::{Creds, Server};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The exit status that asks the service manager to restart the agent (docs/ota.md).
pub const REBOOT_EXIT: i32 = 75;

/// An agent under a tiny service manager: restarted whenever it exits with [`REBOOT_EXIT`].
pub struct Supervised {
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    restarts: Arc<Mutex<u32>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervised {
    pub fn start(server: &Server, creds: &Creds, state: &Path, config: &Path) -> Supervised {
        let (stop, child, restarts) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(Mutex::new(None::<Child>)),
            Arc::new(Mutex::new(0u32)),
        );
        let make = {
            let mut cmd = super::agent_command(server, creds, state);
            cmd.arg("--config")
                .arg(config)
                .args(["--interval-secs", "0"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Arc::new(Mutex::new(cmd))
        };
        let thread = {
            let (stop, child, restarts) = (stop.clone(), child.clone(), restarts.clone());
            std::thread::spawn(move || loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let spawned = make
                    .lock()
                    .expect("cmd")
                    .spawn()
                    .expect("spawn mooring-agent");
                *child.lock().expect("child") = Some(spawned);
                let status = loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let done = child
                        .lock()
                        .expect("child")
                        .as_mut()
                        .and_then(|c| c.try_wait().expect("try_wait"));
                    if let Some(s) = done {
                        break s;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                if status.code() != Some(REBOOT_EXIT) {
                    return;
                }
                *restarts.lock().expect("restarts") += 1;
            })
        };
        Supervised {
            stop,
            child,
            restarts,
            thread: Some(thread),
        }
    }

    pub fn reboots(&self) -> u32 {
        *self.restarts.lock().expect("restarts")
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut c) = self.child.lock().expect("child").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn agent_config(dir: &Path, name: &str, public_key: &str, health: Option<&str>) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let mut text = format!(
        "firmware_version = \"1.0.0\"\n\n[update]\npublic_key = \"{public_key}\"\nhw_revision = \"rev-b\"\nhealth_deadline_secs = 30\n"
    );
    if let Some(cmd) = health {
        text.push_str(&format!("health_command = [\"{cmd}\"]\n"));
    }
    std::fs::write(&path, text).expect("agent config");
    path
}
