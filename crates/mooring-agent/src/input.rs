//! Line reader for `--input`: one JSON object per line, bounded line length, bad lines logged and skipped.

use mooring_proto::telemetry::PAYLOAD_SIZE_BYTES_MAX;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// Longest input line accepted, in bytes (longer lines are skipped): a payload can be no larger.
pub const LINE_BYTES_MAX: usize = PAYLOAD_SIZE_BYTES_MAX;

/// Parses one input line. Blank lines give `None` silently; lines that are not a JSON object
/// give `None` and a warning.
pub fn parse_line(line: &[u8], line_no: u64) -> Option<Map<String, Value>> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(map)) => Some(map),
        Ok(_) => {
            tracing::warn!(line_no, "input line is JSON but not an object; skipped");
            None
        }
        Err(e) => {
            tracing::warn!(line_no, error = %e, "input line is not JSON; skipped");
            None
        }
    }
}

/// Reads `reader` to EOF, sending each JSON-object line to `out` (waiting when `out` is
/// full). Returns at EOF, on a read error (logged), or when `out` is closed.
pub async fn read_lines<R: AsyncRead + Unpin>(reader: R, out: mpsc::Sender<Map<String, Value>>) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    let mut too_long = false;
    let mut line_no = 0u64;
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                tracing::error!(error = %e, "reading input failed; treating as end of input");
                return;
            }
        };
        if buf.is_empty() {
            // EOF: a last line without a trailing newline still counts.
            if !line.is_empty() && !too_long {
                if let Some(obj) = parse_line(&line, line_no + 1) {
                    let _ = out.send(obj).await;
                }
            }
            return;
        }
        let (chunk, complete) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        if !too_long {
            if line.len() + chunk.len() <= LINE_BYTES_MAX {
                line.extend_from_slice(chunk);
            } else {
                too_long = true;
                line.clear();
            }
        }
        let consumed = chunk.len() + usize::from(complete);
        reader.consume(consumed);
        if complete {
            line_no += 1;
            if too_long {
                tracing::warn!(
                    line_no,
                    max_bytes = LINE_BYTES_MAX,
                    "input line too long; skipped"
                );
            } else if let Some(obj) = parse_line(&line, line_no) {
                if out.send(obj).await.is_err() {
                    return;
                }
            }
            line.clear();
            too_long = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn collect(input: Vec<u8>) -> Vec<Value> {
        let (tx, mut rx) = mpsc::channel(1000);
        read_lines(input.as_slice(), tx).await;
        let mut got = Vec::new();
        while let Some(m) = rx.recv().await {
            got.push(Value::Object(m));
        }
        got
    }

    #[tokio::test]
    async fn objects_pass_and_everything_else_is_skipped() {
        let input = b"{\"a\":1}\n\nnot json\n[1,2]\n42\r\n  {\"b\":{\"c\":true}}  \r\n{\"last\":2}"
            .to_vec();
        assert_eq!(
            collect(input).await,
            vec![json!({"a":1}), json!({"b":{"c":true}}), json!({"last":2})]
        );
    }

    #[tokio::test]
    async fn overlong_line_is_skipped_and_reading_goes_on() {
        let mut input = b"{\"a\":1}\n{\"big\":\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', LINE_BYTES_MAX + 10));
        input.extend_from_slice(b"\"}\n{\"b\":2}\n");
        assert_eq!(collect(input).await, vec![json!({"a":1}), json!({"b":2})]);
    }

    #[test]
    fn parse_line_rules() {
        assert!(parse_line(b"  ", 1).is_none());
        assert!(parse_line(b"\"s\"", 1).is_none());
        assert_eq!(
            parse_line(b"{\"x\":1.5}", 1).map(Value::Object),
            Some(json!({"x":1.5}))
        );
    }
}
