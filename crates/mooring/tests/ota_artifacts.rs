//! OTA artifacts end to end (issue 17), against the real binary: uploads with the CLI (signed by
//! the server, or offline with `mooring ota keygen` + `--sign-key`), resumed uploads, list /
//! show / delete, downloads with a device-scoped token and `Range`, and every refusal.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;
use support::{Server, WAIT};

/// Deterministic bytes that are not all alike.
fn file_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn verifies(public_key_hex: &str, manifest: &str, signature_hex: &str) -> bool {
    let pk = hex::decode(public_key_hex).expect("hex key");
    let sig = hex::decode(signature_hex).expect("hex signature");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
        .verify(manifest.as_bytes(), &sig)
        .is_ok()
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
}

/// `GET` the download with `token` (and a `Range`): status, headers, body.
async fn download(
    server: &Server,
    id: &str,
    token: Option<&str>,
    range: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = support::http().get(format!(
        "{}/api/v1/ota/artifacts/{id}/download",
        server.url()
    ));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.expect("download");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.expect("body").to_vec())
}

fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

async fn link(server: &Server, id: &str, device: &str, ttl_ms: Option<u64>) -> String {
    let mut body = json!({ "device_id": device });
    if let Some(t) = ttl_ms {
        body["ttl_ms"] = t.into();
    }
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{id}/links"),
            Some(body),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert!(v["url"]
        .as_str()
        .expect("url")
        .ends_with(&format!("/api/v1/ota/artifacts/{id}/download")));
    v["token"].as_str().expect("token").to_owned()
}

async fn put_chunk(server: &Server, id: &str, offset: u64, bytes: &[u8]) -> (u16, Value) {
    let resp = support::http()
        .put(format!(
            "{}/api/v1/ota/artifacts/{id}/content?offset={offset}",
            server.url()
        ))
        .bearer_auth(&server.token)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("put");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn server_signed_upload_resumes_downloads_with_scoped_tokens_and_ranges_and_deletes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let bytes = file_bytes(3 * 1024 * 1024 + 123, 1);
    let file = tmp.path().join("fw-1.4.0.img");
    std::fs::write(&file, &bytes).expect("write");
    let f = file.to_str().expect("utf8");

    // Upload with the CLI: chunked, then signed by the server's key (created at first start).
    let art = server.cli_json(&[
        "ota",
        "upload",
        f,
        "--version",
        "1.4.0",
        "--compatible",
        "rev-b,rev-c",
        "--notes",
        "fixes the drift",
        "--chunk-bytes",
        "1048576",
        "-o",
        "json",
    ]);
    let id = art["id"].as_str().expect("id").to_owned();
    assert_eq!(art["state"], "ready", "{art}");
    assert_eq!(art["size"], bytes.len());
    assert_eq!(art["sha256"], sha256_hex(&bytes));
    assert_eq!(art["compatible"], json!(["rev-b", "rev-c"]));
    assert_eq!(mode_of(&data.join("update.key")), 0o600);
    assert_eq!(mode_of(&data.join("artifacts").join(&id)), 0o600);
    // The update key is public: an installer reads it without a token.
    let resp = support::get(format!("{}/api/v1/ota/update-key", server.url())).await;
    assert_eq!(resp.status().as_u16(), 200);
    let key: Value = resp.json().await.expect("key json");
    assert_eq!(key["server_signs"].as_bool(), Some(true));
    let manifest = art["manifest"].as_str().expect("manifest");
    let public_key = key["public_key"].as_str().expect("key");
    assert!(verifies(
        public_key,
        manifest,
        art["signature"].as_str().expect("sig")
    ));
    let m: Value = serde_json::from_str(manifest).expect("manifest json");
    assert_eq!(
        (m["artifact_id"].as_str(), m["version"].as_str(), &m["size"]),
        (Some(id.as_str()), Some("1.4.0"), &json!(bytes.len()))
    );

    // list / show.
    let list = server.cli_json(&["ota", "list", "-o", "json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let shown = server.cli_json(&["ota", "show", &id, "-o", "json"]);
    assert_eq!(shown["signature"], art["signature"]);
    let table = server.cli(&["ota", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("1.4.0"));

    // Downloads: a token for one device and this artifact; whole, then resumed with Range.
    server.create_device("d1", tmp.path());
    let token = link(&server, &id, "d1", None).await;
    let (status, headers, body) = download(&server, &id, Some(&token), None).await;
    assert_eq!(status, 200);
    assert!(body == bytes, "the whole file");
    assert_eq!(headers["accept-ranges"], "bytes");
    let (status, headers, body) =
        download(&server, &id, Some(&token), Some("bytes=1000000-")).await;
    assert_eq!(status, 206);
    assert_eq!(
        headers["content-range"].to_str().expect("range"),
        format!("bytes 1000000-{}/{}", bytes.len() - 1, bytes.len())
    );
    assert!(body == bytes[1_000_000..], "the rest from the offset");
    let (status, _, body) = download(&server, &id, Some(&token), Some("bytes=10-19")).await;
    assert_eq!((status, body.as_slice()), (206, &bytes[10..20]));
    let past = format!("bytes={}-", bytes.len());
    let (status, headers, body) = download(&server, &id, Some(&token), Some(&past)).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (416, "range_not_satisfiable")
    );
    assert_eq!(
        headers["content-range"].to_str().expect("range"),
        format!("bytes */{}", bytes.len())
    );

    // Refused: no token, garbage, a token edited to name another device, a token for another
    // artifact, an expired token.
    for (token, code) in [
        (None, "invalid_download_token"),
        (Some("garbage".to_owned()), "invalid_download_token"),
        (
            Some(token.replace(".d1.", ".d2.")),
            "invalid_download_token",
        ),
        (Some(server.token.clone()), "invalid_download_token"),
    ] {
        let (status, _, body) = download(&server, &id, token.as_deref(), None).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (401, code),
            "{token:?}"
        );
    }
    let other = file_bytes(1000, 2);
    let other_id = server.ota_upload(&tmp.path().join("fw-1.5.0.img"), &other, "1.5.0");
    let (status, _, body) = download(&server, &other_id, Some(&token), None).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "wrong_artifact")
    );
    let short = link(&server, &id, "d1", Some(1)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, body) = download(&server, &id, Some(&short), None).await;
        if status == 401 {
            assert_eq!(error_code(&body), "download_token_expired");
            break;
        }
        assert!(Instant::now() < deadline, "a 1 ms token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(server.metric("mooring_ota_downloads_refused_total").await >= 6.0);
    assert!(server.metric("mooring_ota_downloads_total").await >= 3.0);
    assert!(server.metric("mooring_ota_download_bytes_total").await >= bytes.len() as f64);
    assert_eq!(
        server.metric("mooring_ota_artifacts_ready_total").await,
        2.0
    );
    // Links are only for devices that exist and artifacts that are ready.
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{id}/links"),
            Some(json!({"device_id": "nobody"})),
        )
        .await;
    assert_eq!(status, 404, "{v}");

    // A tampered upload (the bytes are not the announced hash) is refused and discarded.
    let (status, created) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(json!({"version": "2.0.0", "compatible": ["rev-b"], "sha256": sha256_hex(b"the real one"), "size": 12})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let bad_id = created["id"].as_str().expect("id").to_owned();
    let (status, v) = put_chunk(&server, &bad_id, 0, b"evil payload").await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{bad_id}/complete"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("sha256_mismatch")),
        "{v}"
    );
    let (_, v) = server
        .api("GET", &format!("/api/v1/ota/artifacts/{bad_id}"), None)
        .await;
    assert_eq!(
        (v["state"].as_str(), &v["stored_bytes"]),
        (Some("uploading"), &json!(0))
    );
    // Chunks only where the upload is, never past the size; complete only when whole.
    let (status, v) = put_chunk(&server, &bad_id, 5, b"x").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("offset_mismatch")),
        "{v}"
    );
    let (status, v) = put_chunk(&server, &bad_id, 0, b"thirteen byte").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("chunk_past_size")),
        "{v}"
    );
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{bad_id}/complete"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("upload_incomplete")),
        "{v}"
    );
    // A taken version, a bad hash.
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(json!({"version": "1.4.0", "compatible": ["rev-b"], "sha256": sha256_hex(b"x"), "size": 1})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("artifact_version_exists")),
        "{v}"
    );
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(
                json!({"version": "3.0.0", "compatible": ["rev-b"], "sha256": "nothex", "size": 1}),
            ),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_artifact")),
        "{v}"
    );
    // An upload that is not the file refused (its version is taken with another hash).
    let out = server.cli(&[
        "ota",
        "upload",
        f,
        "--version",
        "2.0.0",
        "--compatible",
        "rev-b",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("delete it first"));

    // A half-done upload of the same file and version resumes where it stopped.
    let third = file_bytes(2 * 1024 * 1024 + 7, 3);
    let third_file = tmp.path().join("fw-2.1.0.img");
    std::fs::write(&third_file, &third).expect("write");
    let (status, created) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(json!({"version": "2.1.0", "compatible": ["rev-c"], "sha256": sha256_hex(&third), "size": third.len()})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let third_id = created["id"].as_str().expect("id").to_owned();
    let (status, v) = put_chunk(&server, &third_id, 0, &third[..1_000_000]).await;
    assert_eq!(
        (status, &v["stored_bytes"]),
        (200, &json!(1_000_000)),
        "{v}"
    );
    let out = server.cli(&[
        "ota",
        "upload",
        third_file.to_str().expect("utf8"),
        "--version",
        "2.1.0",
        "--compatible",
        "rev-c",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("resuming the upload") && stderr.contains("at byte 1000000"),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), third_id);
    let token = link(&server, &third_id, "d1", None).await;
    let (status, _, body) = download(&server, &third_id, Some(&token), None).await;
    assert!(
        status == 200 && body == third,
        "the resumed upload is the file"
    );

    // Delete: the bytes go too; a second delete is not found.
    let out = server.cli(&["ota", "delete", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.join("artifacts").join(&id).exists());
    let (status, _) = server
        .api("GET", &format!("/api/v1/ota/artifacts/{id}"), None)
        .await;
    assert_eq!(status, 404);
    let (status, v) = server
        .api("DELETE", &format!("/api/v1/ota/artifacts/{id}"), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("artifact_not_found"))
    );
    let (status, _, _) = download(&server, &id, Some(&token), None).await;
    assert_eq!(status, 403, "a token for another artifact");
}

#[tokio::test]
async fn an_offline_key_signs_and_unsigned_or_wrongly_signed_uploads_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    // keygen: the private key 0600, the public key on stdout; never overwrites.
    let key_file = tmp.path().join("update.key");
    let out = std::process::Command::new(support::BIN)
        .args(["ota", "keygen", "--out"])
        .arg(&key_file)
        .output()
        .expect("keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(public_key.len(), 64);
    assert_eq!(mode_of(&key_file), 0o600);
    let again = std::process::Command::new(support::BIN)
        .args(["ota", "keygen", "--out"])
        .arg(&key_file)
        .output()
        .expect("keygen");
    assert!(!again.status.success(), "keygen never overwrites");
    let wrong_key = tmp.path().join("wrong.key");
    let out = std::process::Command::new(support::BIN)
        .args(["ota", "keygen", "--out"])
        .arg(&wrong_key)
        .output()
        .expect("keygen");
    assert!(out.status.success());

    let config = tmp.path().join("mooring.toml");
    std::fs::write(
        &config,
        format!("[ota]\nupdate_public_key = \"{public_key}\"\n"),
    )
    .expect("config");
    let server = Server::start_custom(&data, |cmd| {
        cmd.arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--mqtt-dev-addr", "127.0.0.1:0"]);
    });
    assert!(
        !data.join("update.key").exists(),
        "the server holds no private key"
    );
    let (_, key) = server.api("GET", "/api/v1/ota/update-key", None).await;
    assert_eq!(
        (key["public_key"].as_str(), key["server_signs"].as_bool()),
        (Some(public_key.as_str()), Some(false))
    );

    let bytes = file_bytes(300_000, 4);
    let file = tmp.path().join("fw.img");
    std::fs::write(&file, &bytes).expect("write");
    let f = file.to_str().expect("utf8");
    let upload = |key: Option<&Path>| {
        let mut args = vec![
            "ota",
            "upload",
            f,
            "--version",
            "7.0.0",
            "--compatible",
            "rev-b",
        ];
        if let Some(k) = key {
            args.extend(["--sign-key", k.to_str().expect("utf8")]);
        }
        server.cli(&args)
    };
    let out = upload(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature_required"));
    let out = upload(Some(&wrong_key));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad_signature"));
    // The bytes are all there; the right key completes it.
    let out = upload(Some(&key_file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let art = server.cli_json(&["ota", "show", &id, "-o", "json"]);
    assert_eq!(art["state"], "ready");
    assert!(verifies(
        &public_key,
        art["manifest"].as_str().expect("manifest"),
        art["signature"].as_str().expect("signature")
    ));
}

#[tokio::test]
async fn artifact_bounds_refuse_with_a_code_size_count_and_chunk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = support::config_args(
        tmp.path(),
        "[ota]\nartifacts_max = 1\nartifact_size_bytes_max = 16777216\n",
    );
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let create = |version: &str, size: u64| json!({"version": version, "compatible": ["rev-b"], "sha256": sha256_hex(b"x"), "size": size});
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(create("1.0.0", 16_777_217)),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_size")),
        "{v}"
    );
    let (status, v) = server
        .api("POST", "/api/v1/ota/artifacts", Some(create("1.0.0", 0)))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_size")),
        "{v}"
    );
    let (status, first) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(create("1.0.0", 16_777_216)),
        )
        .await;
    assert_eq!(status, 201, "{first}");
    let (status, v) = server
        .api("POST", "/api/v1/ota/artifacts", Some(create("2.0.0", 10)))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("too_many_artifacts")),
        "{v}"
    );
    // A chunk over 8 MiB is refused whole; nothing is stored.
    let id = first["id"].as_str().expect("id");
    let (status, v) = put_chunk(&server, id, 0, &vec![0u8; 8 * 1024 * 1024 + 1]).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("chunk_too_large")),
        "{v}"
    );
    let (_, v) = server
        .api("GET", &format!("/api/v1/ota/artifacts/{id}"), None)
        .await;
    assert_eq!(v["stored_bytes"], 0);
    // Unknown ids and routes of artifacts that do not exist answer not found.
    let (status, v) = put_chunk(&server, "art_ffffffffffffffff", 0, b"x").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("artifact_not_found")),
        "{v}"
    );
}

/// Downloads are bounded per node and per device (`[ota] downloads_max`,
/// `downloads_per_device_max`), so devices that open many and read slowly cannot take the API's
/// connections; a place frees when a download ends.
#[tokio::test]
async fn downloads_are_bounded_per_node_and_per_device() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = support::config_args(
        tmp.path(),
        "[ota]\ndownloads_max = 3\ndownloads_per_device_max = 2\n",
    );
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    // 16 MiB: more than the sockets buffer, so a download nobody reads stays in progress.
    let image: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (status, art) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(json!({"version": "2.0.0", "compatible": ["rev-b"], "sha256": sha256_hex(&image), "size": image.len()})),
        )
        .await;
    assert_eq!(status, 201, "{art}");
    let id = art["id"].as_str().expect("id").to_owned();
    for (n, chunk) in image.chunks(8 * 1024 * 1024).enumerate() {
        let (status, v) = put_chunk(&server, &id, (n * 8 * 1024 * 1024) as u64, chunk).await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{id}/complete"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for d in ["d1", "d2"] {
        let (status, v) = server
            .api("POST", "/api/v1/devices", Some(json!({"id": d})))
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let (t1, t2) = (
        link(&server, &id, "d1", None).await,
        link(&server, &id, "d2", None).await,
    );
    // Each client its own connection; the responses are held, their bodies never read.
    let open = |token: String| {
        let url = format!("{}/api/v1/ota/artifacts/{id}/download", server.url());
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("download")
        }
    };
    let a = open(t1.clone()).await;
    let b = open(t1.clone()).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let third = open(t1.clone()).await;
    assert_eq!(third.status().as_u16(), 429);
    assert_eq!(
        error_code(&third.bytes().await.expect("body")),
        "too_many_downloads"
    );
    let c = open(t2.clone()).await;
    assert_eq!(c.status().as_u16(), 200, "another device still gets one");
    let full = open(t2.clone()).await;
    assert_eq!(full.status().as_u16(), 503, "the node serves 3 at most");
    assert_eq!(
        error_code(&full.bytes().await.expect("body")),
        "too_many_downloads"
    );
    // The API is still answering meanwhile.
    let (status, _) = server.api("GET", "/api/v1/ota/artifacts", None).await;
    assert_eq!(status, 200);
    // A download read to its end gives its place back.
    let whole = b.bytes().await.expect("body");
    assert_eq!(whole.len(), image.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let again = open(t1.clone()).await;
        if again.status().as_u16() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop((a, c));
    // A deleted device's links stop working at once, not when they expire.
    let (status, v) = server.api("DELETE", "/api/v1/devices/d2", None).await;
    assert_eq!(status, 204, "{v}");
    let gone = open(t2.clone()).await;
    assert_eq!(gone.status().as_u16(), 401);
    assert_eq!(
        error_code(&gone.bytes().await.expect("body")),
        "invalid_download_token"
    );
    // Nor do they come back when a new device takes the same id: a token names the
    // registration, not just the id.
    let (status, v) = server
        .api("POST", "/api/v1/devices", Some(json!({"id": "d2"})))
        .await;
    assert_eq!(status, 201, "{v}");
    let reborn = open(t2).await;
    assert_eq!(reborn.status().as_u16(), 401);
    assert_eq!(
        error_code(&reborn.bytes().await.expect("body")),
        "invalid_download_token"
    );
    // The scheme name is case-insensitive; the last N bytes are a range too.
    let tail = support::http()
        .get(format!(
            "{}/api/v1/ota/artifacts/{id}/download",
            server.url()
        ))
        .header("authorization", format!("bearer {t1}"))
        .header("range", "bytes=-100")
        .send()
        .await
        .expect("download");
    assert_eq!(tail.status().as_u16(), 206);
    assert!(tail.bytes().await.expect("body").as_ref() == &image[image.len() - 100..]);
}

/// A download whose client reads the headers and then stops reading ends after
/// `[ota] download_idle_timeout_ms` and gives its place back: with `downloads_max = 1`, the next
/// download is refused while it holds the place and served once it timed out.
#[tokio::test]
async fn a_download_whose_client_stops_reading_ends_and_frees_its_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = support::config_args(
        tmp.path(),
        "[ota]\ndownloads_max = 1\ndownload_idle_timeout_ms = 1000\n",
    );
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    // 16 MiB: more than the sockets buffer, so the stalled client's download cannot finish.
    let image = file_bytes(16 * 1024 * 1024, 5);
    let (status, art) = server
        .api(
            "POST",
            "/api/v1/ota/artifacts",
            Some(json!({"version": "2.0.0", "compatible": ["rev-b"], "sha256": sha256_hex(&image), "size": image.len()})),
        )
        .await;
    assert_eq!(status, 201, "{art}");
    let id = art["id"].as_str().expect("id").to_owned();
    for (n, chunk) in image.chunks(8 * 1024 * 1024).enumerate() {
        let (status, v) = put_chunk(&server, &id, (n * 8 * 1024 * 1024) as u64, chunk).await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{id}/complete"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for d in ["d1", "d2"] {
        let (status, v) = server
            .api("POST", "/api/v1/devices", Some(json!({"id": d})))
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let (t1, t2) = (
        link(&server, &id, "d1", None).await,
        link(&server, &id, "d2", None).await,
    );

    // The stalled client: sends the request, reads the status line and headers, then never
    // reads again (and keeps its connection open to the end of the test).
    let addr = server.url().trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    stalled
        .write_all(
            format!(
                "GET /api/v1/ota/artifacts/{id}/download HTTP/1.1\r\nHost: {addr}\r\n\
                 Authorization: Bearer {t1}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 8192, "headers too long");
        let n = stalled.read(&mut byte).await.expect("read");
        assert_eq!(n, 1, "closed before the headers");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Another device's download: refused while the stalled one holds the only place, served
    // (whole) once it timed out.
    let url = format!("{}/api/v1/ota/artifacts/{id}/download", server.url());
    let deadline = Instant::now() + WAIT;
    let mut refused = 0;
    let served = loop {
        let resp = support::http()
            .get(&url)
            .bearer_auth(&t2)
            .send()
            .await
            .expect("download");
        if resp.status().as_u16() == 200 {
            break resp.bytes().await.expect("body");
        }
        assert_eq!(resp.status().as_u16(), 503);
        assert_eq!(
            error_code(&resp.bytes().await.expect("body")),
            "too_many_downloads"
        );
        refused += 1;
        assert!(Instant::now() < deadline, "the place never came back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(served.as_ref() == image.as_slice());
    assert!(refused >= 1, "the stalled download held the place at first");
    assert_eq!(server.metric("mooring_ota_downloads_idle_total").await, 1.0);
    drop(stalled);
}

/// A client that keeps reading, but slower than `[ota] download_min_rate_bytes_per_s`, loses its
/// download short of `Content-Length` (it would hold a place for hours otherwise) and the
/// metric counts it; a client at full speed on the same server gets the whole file.
#[tokio::test]
async fn a_download_slower_than_the_rate_floor_ends_short() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    // The floor is far above the trickle below but far below loopback speed.
    let cfg = support::config_args(
        tmp.path(),
        "[ota]\ndownload_idle_timeout_ms = 10000\ndownload_min_rate_bytes_per_s = 4194304\n",
    );
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    // 32 MiB: far more than the sockets buffer, so the trickle cannot take it all early.
    let image = file_bytes(32 * 1024 * 1024, 9);
    let id = server.ota_upload(&tmp.path().join("image.bin"), &image, "2.0.0");
    for d in ["d1", "d2"] {
        let (status, v) = server
            .api("POST", "/api/v1/devices", Some(json!({"id": d})))
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let (t1, t2) = (
        link(&server, &id, "d1", None).await,
        link(&server, &id, "d2", None).await,
    );

    // At full speed: whole.
    let whole = support::http()
        .get(format!(
            "{}/api/v1/ota/artifacts/{id}/download",
            server.url()
        ))
        .bearer_auth(&t2)
        .send()
        .await
        .expect("download");
    assert_eq!(whole.status().as_u16(), 200);
    assert!(whole.bytes().await.expect("body").as_ref() == image.as_slice());

    // The trickle: 16 KiB every 50 ms (320 KiB/s), until the server ends the download (what
    // the sockets hold still arrives after that, slowly: the metric says when it ended).
    let addr = server.url().trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(
        format!(
            "GET /api/v1/ota/artifacts/{id}/download HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {t1}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("request");
    let deadline = Instant::now() + WAIT;
    let mut got = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    for round in 0.. {
        assert!(
            Instant::now() < deadline,
            "the slow download was never ended"
        );
        let n = slow.read(&mut buf).await.expect("read");
        assert!(n > 0, "the connection closed before the metric counted it");
        got += n;
        if round % 20 == 19 && server.metric("mooring_ota_downloads_slow_total").await == 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Ended short: the rest of what the sockets hold, and then the connection closes.
    loop {
        let n = slow.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(
        got < image.len(),
        "the trickling client got the whole file ({got} bytes)"
    );
    assert_eq!(server.metric("mooring_ota_downloads_idle_total").await, 0.0);
}

/// An upload left `uploading` longer than `[ota] upload_ttl_ms` is deleted with its bytes by
/// the sweeper; a ready artifact of the same age stays, and the abandoned one takes no chunk.
#[tokio::test]
async fn an_abandoned_upload_expires_with_its_bytes_and_a_ready_artifact_stays() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = support::config_args(
        tmp.path(),
        "[ota]\nupload_ttl_ms = 1000\nsweep_interval_ms = 200\n",
    );
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let create = |version: &'static str, bytes: Vec<u8>| {
        let server = &server;
        async move {
            let (status, art) = server
                .api(
                    "POST",
                    "/api/v1/ota/artifacts",
                    Some(json!({"version": version, "compatible": ["rev-b"], "sha256": sha256_hex(&bytes), "size": bytes.len()})),
                )
                .await;
            assert_eq!(status, 201, "{art}");
            art["id"].as_str().expect("id").to_owned()
        }
    };
    let whole = file_bytes(1000, 1);
    let ready = create("1.0.0", whole.clone()).await;
    let (status, v) = put_chunk(&server, &ready, 0, &whole).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{ready}/complete"),
            Some(json!({})),
        )
        .await;
    assert_eq!((status, &v["state"]), (200, &json!("ready")), "{v}");
    let abandoned = create("2.0.0", file_bytes(1000, 2)).await;
    let (status, v) = put_chunk(&server, &abandoned, 0, &file_bytes(400, 2)).await;
    assert_eq!(status, 200, "{v}");
    let file = data.join("artifacts").join(&abandoned);
    assert!(file.exists(), "the first bytes are stored");

    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = server
            .api("GET", &format!("/api/v1/ota/artifacts/{abandoned}"), None)
            .await;
        if status == 404 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            Instant::now() < deadline,
            "the abandoned upload never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!file.exists(), "its bytes went with it");
    let (status, v) = put_chunk(&server, &abandoned, 400, &file_bytes(600, 2)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("artifact_not_found")),
        "{v}"
    );
    let (status, v) = server
        .api("GET", &format!("/api/v1/ota/artifacts/{ready}"), None)
        .await;
    assert_eq!((status, &v["state"]), (200, &json!("ready")), "{v}");
    assert!(server.log_text().contains("abandoned upload deleted"));
    // Its version is free again.
    create("2.0.0", file_bytes(10, 3)).await;
}

/// A caller limited to a scope deploys only to its devices and sees and cancels only its own
/// deployments; artifacts are fleet-wide, so it cannot upload or delete them.
#[tokio::test]
async fn a_scoped_caller_deploys_and_sees_only_inside_its_scope() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let scoped = support::scoped_token(&server, "acme-ops", "operator", "tag:customer=acme");
    let as_scoped = |method: reqwest::Method, path: String, body: Option<Value>| {
        let (scoped, url) = (scoped.clone(), format!("{}{path}", server.url()));
        async move {
            let mut req = support::http().request(method, url).bearer_auth(scoped);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.expect("http");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for (id, customer) in [("acme-1", "acme"), ("other-1", "other")] {
        let (status, v) = server
            .api(
                "POST",
                "/api/v1/devices",
                Some(json!({"id": id, "tags": {"customer": customer}})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let image = b"firmware".to_vec();
    let create = json!({"version": "3.0.0", "compatible": ["rev-b"], "sha256": sha256_hex(&image), "size": image.len()});
    // Artifacts: the scoped caller may not create one; the admin does.
    let (status, v) = as_scoped(
        reqwest::Method::POST,
        "/api/v1/ota/artifacts".into(),
        Some(create.clone()),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let (status, art) = server
        .api("POST", "/api/v1/ota/artifacts", Some(create))
        .await;
    assert_eq!(status, 201, "{art}");
    let id = art["id"].as_str().expect("id").to_owned();
    let (status, v) = put_chunk(&server, &id, 0, &image).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{id}/complete"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    // The admin deploys to the other customer's device; the scoped caller to both: its own.
    let (status, theirs) = server
        .api(
            "POST",
            "/api/v1/ota/deployments",
            Some(json!({"artifact_id": id, "selector": "id:other-1"})),
        )
        .await;
    assert_eq!(status, 201, "{theirs}");
    let (status, ours) = as_scoped(
        reqwest::Method::POST,
        "/api/v1/ota/deployments".into(),
        Some(json!({"artifact_id": id, "selector": "id:acme-1,other-1"})),
    )
    .await;
    assert_eq!(status, 201, "{ours}");
    assert_eq!(ours["total"], 1, "narrowed to its scope: {ours}");
    let (_, list) = as_scoped(reqwest::Method::GET, "/api/v1/ota/deployments".into(), None).await;
    let ids: Vec<&str> = list["deployments"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, [ours["id"].as_str().expect("id")], "{list}");
    let other = theirs["id"].as_str().expect("id");
    let (status, _) = as_scoped(
        reqwest::Method::GET,
        format!("/api/v1/ota/deployments/{other}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = as_scoped(
        reqwest::Method::POST,
        format!("/api/v1/ota/deployments/{other}/cancel"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 404);
    let (_, still) = server
        .api("GET", &format!("/api/v1/ota/deployments/{other}"), None)
        .await;
    assert_eq!(still["canceled_at"], Value::Null, "untouched: {still}");
    let (status, v) = as_scoped(
        reqwest::Method::DELETE,
        format!("/api/v1/ota/artifacts/{id}"),
        None,
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
}
