//! [`UnixTransport`]: children connect to a Unix socket and speak the line protocol of
//! [`crate::gateway`].

use super::{
    parse_child_line, parse_hello, ChildEvent, ChildTransport, Line, LineReader, ToChild,
    CHILD_QUEUE_MAX, HELLO_TIMEOUT_MS, LINE_BYTES_MAX, WRITE_TIMEOUT_MS,
};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Permissions of the socket file: the agent's user and group.
pub const SOCKET_MODE: u32 = 0o660;
/// Connections still to say hello, on top of `children_max` (a replacing connection is one).
pub const PENDING_CONNECTIONS_MAX: usize = 16;
/// Pause after a failed `accept` (out of file descriptors, say) before the next.
pub const ACCEPT_RETRY_MS: u64 = 100;

/// The socket children connect to. The file is removed when the transport is dropped.
/// Binds a Unix socket at `path` (replacing a stale socket file there; any other kind of file
/// is an error) and makes it `rw-rw----`: the gateway's socket and the local API's.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            tracing::info!(path = %path.display(), "removing a stale socket");
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    Ok(listener)
}

#[derive(Debug)]
pub struct UnixTransport {
    listener: UnixListener,
    path: PathBuf,
    connections_max: usize,
}

impl UnixTransport {
    /// Binds `path` (replacing a stale socket file there; any other kind of file is an error)
    /// and makes it `rw-rw----`. At most `children_max` children, plus a few connections still
    /// to say hello, are served at once; more are answered `{"error":...}` and closed.
    pub fn bind(path: &Path, children_max: usize) -> std::io::Result<Self> {
        let listener = bind_socket(path)?;
        tracing::info!(path = %path.display(), children_max, "gateway socket listening");
        Ok(Self {
            listener,
            path: path.to_owned(),
            connections_max: children_max.saturating_add(PENDING_CONNECTIONS_MAX),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixTransport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[async_trait::async_trait]
impl ChildTransport for UnixTransport {
    async fn serve(self: Box<Self>, events: mpsc::Sender<ChildEvent>) {
        let permits = Arc::new(Semaphore::new(self.connections_max));
        // Every connection task belongs to this set: aborted when serving stops.
        let mut tasks = JoinSet::new();
        let mut conn = 0u64;
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        conn += 1;
                        match permits.clone().try_acquire_owned() {
                            Ok(permit) => {
                                tasks.spawn(connection(stream, conn, events.clone(), permit));
                            }
                            Err(_) => {
                                tracing::warn!("too many gateway connections; one refused");
                                tasks.spawn(refuse(stream, "too many connections"));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway socket accept failed");
                        tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                () = events.closed() => return,
            }
        }
    }
}

async fn refuse(mut stream: UnixStream, why: &str) {
    let line = ToChild::Error(why.to_owned()).to_line();
    let _ = tokio::time::timeout(
        Duration::from_millis(WRITE_TIMEOUT_MS),
        stream.write_all(&line),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// One child's connection: hello, then its lines to the relay and the relay's lines to it,
/// until either side closes (the relay closes it by dropping the sender it was given).
async fn connection(
    stream: UnixStream,
    conn: u64,
    events: mpsc::Sender<ChildEvent>,
    _permit: OwnedSemaphorePermit,
) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = LineReader::new(rd, LINE_BYTES_MAX);
    let hello =
        tokio::time::timeout(Duration::from_millis(HELLO_TIMEOUT_MS), lines.next_line()).await;
    let refused = match hello {
        Ok(Ok(Some(Line::Full(line)))) => match parse_hello(&line) {
            Ok(child) => Ok(child),
            Err(why) => Err(why),
        },
        Ok(Ok(Some(Line::TooLong))) => Err("hello line too long".to_owned()),
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => Err("no hello in time".to_owned()),
    };
    let child = match refused {
        Ok(child) => child,
        Err(why) => {
            tracing::warn!(conn, error = %why, "gateway connection refused");
            let line = ToChild::Error(why).to_line();
            let _ =
                tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), wr.write_all(&line))
                    .await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<ToChild>(CHILD_QUEUE_MAX);
    // The reader answers bad lines through a weak sender: the relay's sender alone keeps the
    // connection open.
    let errors = tx.downgrade();
    let connected = ChildEvent::Connected {
        child: child.clone(),
        conn,
        tx,
    };
    if events.send(connected).await.is_err() {
        return;
    }
    tracing::info!(%child, conn, "child connected");
    let writer = async move {
        while let Some(msg) = rx.recv().await {
            let line = msg.to_line();
            match tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), wr.write_all(&line))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "writing to a child failed");
                    break;
                }
                Err(_) => {
                    tracing::warn!("a child does not read; disconnecting it");
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        let mut line_no = 1u64;
        loop {
            line_no += 1;
            let why = match lines.next_line().await {
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "reading from a child failed");
                    return;
                }
                Ok(Some(Line::TooLong)) => {
                    format!("line {line_no} longer than {LINE_BYTES_MAX} bytes; skipped")
                }
                Ok(Some(Line::Full(line))) => match parse_child_line(&line) {
                    Ok(None) => continue,
                    Ok(Some(msg)) => {
                        let ev = ChildEvent::Message {
                            child: child.clone(),
                            conn,
                            msg,
                        };
                        if events.send(ev).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(why) => format!("line {line_no} skipped: {why}"),
                },
            };
            tracing::warn!(%child, error = %why, "bad line from a child");
            if let Some(tx) = errors.upgrade() {
                let _ = tx.try_send(ToChild::Error(why));
            }
        }
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
    tracing::info!(%child, conn, "child disconnected");
    let _ = events.send(ChildEvent::Disconnected { child, conn }).await;
}
