//! `mooring-agent child`: a reference child to try a gateway by hand.
//!
//! Connects to the gateway's socket and says hello as `--id`; sends each JSON object read from
//! stdin (one per line) as `{"telemetry": ...}`; prints every line the gateway sends to stdout;
//! answers each command with `{"result":{"id":..,"status":"succeeded","output":{"echo":
//! <params>}}}` and each shadow delta with `{"reported": <the delta's keys>}`. Returns when the
//! gateway closes the connection.

use super::{Line, LineReader, LINE_BYTES_MAX};
use mooring_proto::DeviceId;
use serde_json::{json, Value};
use std::path::Path;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::UnixStream;

/// Runs the reference child on `socket` as `id`, reading telemetry from `input` and printing
/// the gateway's lines to `output`.
pub async fn run(
    socket: &Path,
    id: &DeviceId,
    input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", socket.display()))?;
    let (rd, mut wr) = stream.into_split();
    send(&mut wr, &json!({ "hello": id.as_str() })).await?;
    let mut from_gw = LineReader::new(rd, usize::MAX / 2);
    let mut stdin = LineReader::new(input, crate::input::LINE_BYTES_MAX);
    let mut stdin_open = true;
    let mut line_no = 0u64;
    loop {
        tokio::select! {
            line = from_gw.next_line() => {
                let Some(Line::Full(line)) = line? else { return Ok(()) };
                output.write_all(&line).await?;
                output.write_all(b"\n").await?;
                output.flush().await?;
                if let Some(answer) = answer(&line) {
                    send(&mut wr, &answer).await?;
                }
            }
            line = stdin.next_line(), if stdin_open => {
                line_no += 1;
                match line? {
                    None => stdin_open = false,
                    Some(Line::TooLong) => {
                        tracing::warn!(line_no, max_bytes = LINE_BYTES_MAX, "input line too long; skipped");
                    }
                    Some(Line::Full(line)) => {
                        if let Some(obj) = crate::input::parse_line(&line, line_no) {
                            send(&mut wr, &json!({ "telemetry": obj })).await?;
                        }
                    }
                }
            }
        }
    }
}

/// What the reference child answers to a line from the gateway.
pub fn answer(line: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(line).ok()?;
    if let Some(cmd) = v.get("command") {
        let id = cmd.get("id")?.as_str()?;
        let params = cmd.get("params").cloned().unwrap_or(Value::Null);
        return Some(
            json!({"result": {"id": id, "status": "succeeded", "output": {"echo": params}}}),
        );
    }
    let delta = v.get("delta")?.get("delta")?;
    delta
        .is_object()
        .then(|| json!({ "reported": delta.clone() }))
}

async fn send(wr: &mut (impl AsyncWrite + Unpin), v: &Value) -> anyhow::Result<()> {
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    wr.write_all(&line).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_echoed_and_deltas_reported() {
        let a = answer(br#"{"command":{"id":"c1","name":"x","params":{"a":1},"expires_at":1}}"#);
        assert_eq!(
            a,
            Some(json!({"result":{"id":"c1","status":"succeeded","output":{"echo":{"a":1}}}}))
        );
        let a = answer(br#"{"delta":{"version":2,"delta":{"mode":"eco"}}}"#);
        assert_eq!(a, Some(json!({"reported":{"mode":"eco"}})));
        assert_eq!(answer(br#"{"error":"x"}"#), None);
        assert_eq!(answer(b"nope"), None);
    }
}
