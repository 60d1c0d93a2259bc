//! OTA deployments end to end (issue 17), against the real binary with devices speaking MQTT
//! over mutual TLS: `mooring ota deploy` sends one `mooring.update` per matching device (signed
//! manifest + a working download link), status reports move the device's state (older `seq`
//! ignored), link refresh, `mooring ota status` counts, the device's history, cancel, and an
//! artifact in use cannot be deleted.

mod support;

use serde_json::{json, Value};
use support::{MqttDevice, Server};

fn report(dep: &str, art: &str, state: &str, seq: u64, extra: Value) -> String {
    let mut r = json!({
        "v": 1, "deployment_id": dep, "artifact_id": art, "version": "1.4.0",
        "state": state, "at": 1, "seq": seq,
    });
    if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            r.insert(k.clone(), v.clone());
        }
    }
    r.to_string()
}

/// `mooring ota deploy --artifact <art> --to <selector> -o json`: the deployment.
fn deploy(server: &Server, art: &str, to: &str) -> Value {
    server.cli_json(&["ota", "deploy", "--artifact", art, "--to", to, "-o", "json"])
}

/// The next answer on `devices/<id>/ota/link/#` (the device's own requests, which its filter
/// covers too, are skipped).
async fn link_answer(dev: &mut MqttDevice) -> (String, Value) {
    loop {
        let (topic, v) = dev.next_json().await;
        if !topic.ends_with("/request") {
            return (topic, v);
        }
    }
}

#[tokio::test]
async fn a_deployment_updates_each_device_tracks_reports_refreshes_links_and_cancels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let creds1 = server.create_device("d1", tmp.path());
    let creds2 = server.create_device("d2", tmp.path());
    server.create_device("d3", tmp.path());
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw.img"), &bytes, "1.4.0");

    let mut d1 = MqttDevice::connect(&server, &creds1, "d1").await;
    d1.subscribe("devices/d1/commands/+").await;
    d1.subscribe("devices/d1/ota/link/#").await;
    let dep = deploy(&server, &art, "id:d1,d2");
    let dep_id = dep["id"].as_str().expect("id").to_owned();
    assert_eq!(
        (dep["total"].as_u64(), &dep["counts"]),
        (Some(2), &json!({"pending": 2}))
    );

    // The device gets the update: the signed manifest and a link that downloads the file.
    let (topic, cmd) = d1.next_json().await;
    assert!(topic.starts_with("devices/d1/commands/"), "{topic}");
    assert_eq!(cmd["name"], "mooring.update");
    let p = &cmd["params"];
    assert_eq!(
        (p["deployment_id"].as_str(), p["allow_downgrade"].as_bool()),
        (Some(dep_id.as_str()), Some(false))
    );
    let (_, key) = server.api("GET", "/api/v1/ota/update-key", None).await;
    let pk = hex::decode(key["public_key"].as_str().expect("key")).expect("hex");
    let manifest = p["manifest"].as_str().expect("manifest");
    let sig = hex::decode(p["signature"].as_str().expect("signature")).expect("hex");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
        .verify(manifest.as_bytes(), &sig)
        .expect("the manifest verifies with the update key");
    let got = support::http()
        .get(p["link"]["url"].as_str().expect("url"))
        .bearer_auth(p["link"]["token"].as_str().expect("token"))
        .send()
        .await
        .expect("download");
    assert_eq!(got.status().as_u16(), 200);
    assert!(got.bytes().await.expect("body").as_ref() == bytes.as_slice());

    // A link refresh answers a new link; one for an update the device was never sent is
    // refused with a code.
    d1.publish(
        "devices/d1/ota/link/request",
        &json!({"v": 1, "deployment_id": dep_id, "artifact_id": art}).to_string(),
    )
    .await;
    let (topic, link) = link_answer(&mut d1).await;
    assert_eq!(topic, "devices/d1/ota/link/accepted");
    let got = support::http()
        .get(link["url"].as_str().expect("url"))
        .bearer_auth(link["token"].as_str().expect("token"))
        .header("range", "bytes=100000-")
        .send()
        .await
        .expect("download");
    assert_eq!(got.status().as_u16(), 206);
    assert!(got.bytes().await.expect("body").as_ref() == &bytes[100_000..]);
    d1.publish(
        "devices/d1/ota/link/request",
        &json!({"v": 1, "deployment_id": "dep_nope", "artifact_id": art}).to_string(),
    )
    .await;
    let (topic, refused) = link_answer(&mut d1).await;
    assert_eq!(
        (topic.as_str(), refused["code"].as_str()),
        ("devices/d1/ota/link/rejected", Some("update_not_found"))
    );

    // Reports move the state; an older one (lower seq) is ignored.
    d1.publish(
        "devices/d1/ota/status",
        &report(
            &dep_id,
            &art,
            "downloading",
            1,
            json!({"progress_pct": 50, "running_version": "1.3.0"}),
        ),
    )
    .await;
    d1.publish(
        "devices/d1/ota/status",
        &report(
            &dep_id,
            &art,
            "committed",
            5,
            json!({"running_version": "1.4.0"}),
        ),
    )
    .await;
    d1.publish(
        "devices/d1/ota/status",
        &report(&dep_id, &art, "installing", 3, json!({})),
    )
    .await;
    let status = server
        .wait_for(&format!("/api/v1/ota/deployments/{dep_id}"), |v| {
            v["counts"]["committed"] == 1
        })
        .await;
    assert_eq!(status["counts"], json!({"committed": 1, "pending": 1}));
    assert_eq!(
        server.metric("mooring_ota_status_reports_total").await,
        2.0,
        "the older report is not stored"
    );
    // Committed is final: a later report (crafted or replayed) changes nothing. Reports that
    // describe no update the server sent this device are refused and counted.
    d1.publish(
        "devices/d1/ota/status",
        &report(&dep_id, &art, "rolled_back", 9, json!({"reason": "x"})),
    )
    .await;
    d1.publish(
        "devices/d1/ota/status",
        &report(&dep_id, "art_00000000", "downloading", 10, json!({})),
    )
    .await;
    d1.publish(
        "devices/d1/ota/status",
        &report("dep_nope", &art, "downloading", 1, json!({})),
    )
    .await;
    assert_eq!(
        server
            .metric("mooring_ota_status_reports_refused_total")
            .await,
        2.0
    );
    assert_eq!(server.metric("mooring_ota_status_reports_total").await, 2.0);
    let text =
        String::from_utf8_lossy(&server.cli(&["ota", "status", &dep_id]).stdout).into_owned();
    assert!(
        text.contains("committed") && text.contains("pending"),
        "{text}"
    );
    let (_, history) = server.api("GET", "/api/v1/devices/d1/ota", None).await;
    let u = &history["updates"][0];
    assert_eq!(
        (
            u["state"].as_str(),
            u["running_version"].as_str(),
            u["deployment_id"].as_str()
        ),
        (Some("committed"), Some("1.4.0"), Some(dep_id.as_str()))
    );
    // Once the update is over on the device, no new link.
    d1.publish(
        "devices/d1/ota/link/request",
        &json!({"v": 1, "deployment_id": dep_id, "artifact_id": art}).to_string(),
    )
    .await;
    let (topic, over) = link_answer(&mut d1).await;
    assert_eq!(
        (topic.as_str(), over["code"].as_str()),
        ("devices/d1/ota/link/rejected", Some("update_over"))
    );

    // The artifact is in use; cancel withdraws d2's undelivered update.
    let (status, v) = server
        .api("DELETE", &format!("/api/v1/ota/artifacts/{art}"), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("artifact_in_use")),
        "{v}"
    );
    let canceled = server.cli_json(&["ota", "cancel", &dep_id, "-o", "json"]);
    // `status --watch` ends at once on a canceled deployment, with the counts on stderr.
    let watched = server.cli(&["ota", "status", &dep_id, "--watch"]);
    assert!(String::from_utf8_lossy(&watched.stderr).contains("committed 1, failed 1 (of 2)"));
    assert!(canceled["canceled_at"].is_u64(), "{canceled}");
    assert_eq!(canceled["counts"], json!({"committed": 1, "failed": 1}));
    let (_, history) = server.api("GET", "/api/v1/devices/d2/ota", None).await;
    assert!(history["updates"][0]["reason"]
        .as_str()
        .expect("reason")
        .starts_with("canceled"));
    let (_, cmds) = server.api("GET", "/api/v1/devices/d2/commands", None).await;
    assert_eq!(cmds["commands"][0]["state"], "canceled", "{cmds}");
    // d2 committing to a version it does not run is refused (its canceled
    // update stays as it was).
    let mut d2 = MqttDevice::connect(&server, &creds2, "d2").await;
    d2.publish(
        "devices/d2/ota/status",
        &report(
            &dep_id,
            &art,
            "committed",
            1,
            json!({"running_version": "1.3.0"}),
        ),
    )
    .await;
    assert_eq!(
        server
            .metric("mooring_ota_status_reports_refused_total")
            .await,
        3.0
    );
    let (_, history) = server.api("GET", "/api/v1/devices/d2/ota", None).await;
    assert_eq!(history["updates"][0]["state"], "failed", "{history}");
    // Nothing matches: refused with a code.
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/ota/deployments",
            Some(json!({"artifact_id": art, "selector": "id:nobody"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("no_matching_devices")),
        "{v}"
    );
}

/// Uploads a small artifact with the CLI; its id.
fn upload(server: &Server, dir: &std::path::Path, version: &str) -> String {
    server.ota_upload(
        &dir.join(format!("fw-{version}.img")),
        &[7u8; 4096],
        version,
    )
}

#[tokio::test]
async fn a_crash_while_sending_a_deployment_is_resumed_at_restart_one_command_per_device() {
    const DEVICES: usize = 300;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = std::sync::Arc::new(Server::start(&data));
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("m{i:04}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(DEVICES / 10) {
        let (chunk, server) = (chunk.to_vec(), server.clone());
        tasks.spawn(async move {
            for id in chunk {
                let (status, body) = server
                    .api(
                        "POST",
                        "/api/v1/devices",
                        Some(json!({"id": id, "tags": {"site": "m"}})),
                    )
                    .await;
                assert_eq!(status, 201, "{body}");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("create devices");
    }
    let art = upload(&server, tmp.path(), "2.0.0");
    let (status, dep) = server
        .api(
            "POST",
            "/api/v1/ota/deployments",
            Some(json!({"artifact_id": art, "selector": "tag:site=m"})),
        )
        .await;
    assert_eq!(status, 201, "{dep}");
    let dep_id = dep["id"].as_str().expect("id").to_owned();
    // Killed while the updates go out (kill -9: no shutdown): once the first one went.
    server
        .wait_for(&format!("/api/v1/devices/{}/ota", ids[0]), |v| {
            v["updates"][0]["command_id"].is_string()
        })
        .await;
    let Ok(server) = std::sync::Arc::try_unwrap(server) else {
        panic!("server still shared");
    };
    server.kill9();

    let server = Server::start(&data);
    // Every device ends up with its update's command, and exactly one.
    for id in &ids {
        let history = server
            .wait_for(&format!("/api/v1/devices/{id}/ota"), |v| {
                v["updates"][0]["command_id"].is_string()
            })
            .await;
        assert_eq!(history["updates"][0]["deployment_id"], dep_id.as_str());
        let (_, cmds) = server
            .api("GET", &format!("/api/v1/devices/{id}/commands"), None)
            .await;
        let updates: Vec<&Value> = cmds["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .filter(|c| c["name"] == "mooring.update")
            .collect();
        assert_eq!(updates.len(), 1, "{id}: {cmds}");
        assert_eq!(updates[0]["id"], history["updates"][0]["command_id"]);
    }
    let log = server.log_text();
    eprintln!(
        "resumed after the restart: {}",
        log.lines()
            .find(|l| l.contains("resumed sending updates"))
            .unwrap_or("nothing (all were sent before the kill)")
    );
}

#[tokio::test]
async fn command_reads_show_an_update_without_its_download_token_which_only_the_device_gets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let creds = server.create_device("d1", tmp.path());
    let art = upload(&server, tmp.path(), "3.0.0");
    let out = server.cli(&["token", "create", "watcher", "--role", "viewer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let viewer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut d1 = MqttDevice::connect(&server, &creds, "d1").await;
    d1.subscribe("devices/d1/commands/+").await;
    server.cli_json(&[
        "ota",
        "deploy",
        "--artifact",
        &art,
        "--to",
        "id:d1",
        "-o",
        "json",
    ]);
    // The device gets the real token, which downloads.
    let (_, cmd) = d1.next_json().await;
    assert_eq!(cmd["name"], "mooring.update");
    let real = cmd["params"]["link"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_ne!(real, "redacted");
    let url = cmd["params"]["link"]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let got = support::http()
        .get(&url)
        .bearer_auth(&real)
        .send()
        .await
        .expect("download");
    assert_eq!(got.status().as_u16(), 200);

    // A viewer reading the device's commands (a list, one, the any-command view) sees the
    // update with its token redacted, and the rest of the link as it is.
    let list = support::call(
        &server,
        "GET",
        "/api/v1/devices/d1/commands",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(list.status, 200, "{}", list.body);
    let shown = &list.body["commands"][0];
    assert_eq!(shown["name"], "mooring.update");
    assert_eq!(shown["params"]["link"]["token"], "redacted", "{shown}");
    assert_eq!(shown["params"]["link"]["url"], url.as_str());
    assert!(shown["params"]["link"]["expires_at"].is_u64());
    assert_eq!(shown["params"]["manifest"], cmd["params"]["manifest"]);
    let id = shown["id"].as_str().expect("id").to_owned();
    for path in [
        format!("/api/v1/devices/d1/commands/{id}"),
        format!("/api/v1/commands/{id}"),
    ] {
        let one = support::call(&server, "GET", &path, Some(&viewer), None, &[], None).await;
        assert_eq!(one.status, 200, "{path}: {}", one.body);
        assert_eq!(one.body["params"]["link"]["token"], "redacted", "{path}");
        assert!(!one.body.to_string().contains(&real), "{path}");
    }
    // "redacted" downloads nothing.
    let refused = support::http()
        .get(&url)
        .bearer_auth("redacted")
        .send()
        .await
        .expect("download");
    assert_eq!(refused.status().as_u16(), 401);
    // The CLI shows what the API shows.
    let out = server.cli(&["command", "list", "d1", "-o", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("redacted") && !text.contains(&real),
        "{text}"
    );
}

#[tokio::test]
async fn deployments_are_bounded_and_deleted_only_once_over_which_frees_the_artifact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = support::config_args(tmp.path(), "[ota]\ndeployments_max = 2\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let creds = server.create_device("d1", tmp.path());
    let art = upload(&server, tmp.path(), "1.4.0");
    let deploy = || {
        server.api(
            "POST",
            "/api/v1/ota/deployments",
            Some(json!({"artifact_id": art, "selector": "id:d1"})),
        )
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, v) = deploy().await;
        assert_eq!(status, 201, "{v}");
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    // The list pages newest first (same millisecond: by id) with a cursor; the CLI lists all.
    let (status, all) = server.api("GET", "/api/v1/ota/deployments", None).await;
    assert_eq!(status, 200, "{all}");
    let order: Vec<String> = all["deployments"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sorted, expected);
    let mut cursor = String::new();
    for want in order.iter().map(Some).chain([None]) {
        let query = match cursor.as_str() {
            "" => "limit=1".to_owned(),
            c => format!("limit=1&cursor={c}"),
        };
        let (status, page) = server
            .api("GET", &format!("/api/v1/ota/deployments?{query}"), None)
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["deployments"][0]["id"].as_str(),
            want.map(String::as_str)
        );
        cursor = page["next_cursor"].as_str().unwrap_or_default().to_owned();
    }
    for bad in ["limit=0", "limit=101", "cursor=nope", "cursor=1.dep_zz"] {
        let (status, v) = server
            .api("GET", &format!("/api/v1/ota/deployments?{bad}"), None)
            .await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
    let listed = server.cli_json(&["ota", "deployments", "-o", "json"]);
    let listed: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(listed, order);
    // A third is refused, through the API and the CLI.
    let (status, v) = deploy().await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("too_many_deployments")),
        "{v}"
    );
    let out = server.cli(&["ota", "deploy", "--artifact", &art, "--to", "id:d1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too_many_deployments")
            || String::from_utf8_lossy(&out.stderr).contains("deployments_max"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A deployment still going is not deleted; canceled, it is (and gone).
    let (status, v) = server
        .api(
            "DELETE",
            &format!("/api/v1/ota/deployments/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("deployment_active")),
        "{v}"
    );
    let out = server.cli(&["ota", "delete", &ids[0]]);
    assert!(!out.status.success(), "refused by the CLI too");
    server.cli_json(&["ota", "cancel", &ids[0], "-o", "json"]);
    let (status, v) = server
        .api(
            "DELETE",
            &format!("/api/v1/ota/deployments/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(status, 204, "{v}");
    let (status, v) = server
        .api("GET", &format!("/api/v1/ota/deployments/{}", ids[0]), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("deployment_not_found"))
    );
    let (status, v) = server
        .api(
            "DELETE",
            &format!("/api/v1/ota/deployments/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("deployment_not_found"))
    );
    // A place is free again.
    let (status, v) = deploy().await;
    assert_eq!(status, 201, "{v}");
    let third = v["id"].as_str().expect("id").to_owned();

    // Once every device's update is final (the device reports it committed), the CLI deletes
    // it by its dep_ id.
    let mut d1 = MqttDevice::connect(&server, &creds, "d1").await;
    d1.publish(
        "devices/d1/ota/status",
        &report(
            &ids[1],
            &art,
            "committed",
            1,
            json!({"running_version": "1.4.0"}),
        ),
    )
    .await;
    server
        .wait_for(&format!("/api/v1/ota/deployments/{}", ids[1]), |v| {
            v["counts"]["committed"] == 1
        })
        .await;
    let out = server.cli(&["ota", "delete", &ids[1]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("deployment"));
    let (_, history) = server.api("GET", "/api/v1/devices/d1/ota", None).await;
    assert!(
        history["updates"]
            .as_array()
            .expect("updates")
            .iter()
            .all(|u| u["deployment_id"] == third.as_str()),
        "the deleted deployments' updates went with them: {history}"
    );

    // The artifact is in use while the last deployment names it, free once it is deleted.
    let out = server.cli(&["ota", "delete", &art]);
    assert!(!out.status.success());
    server.cli_json(&["ota", "cancel", &third, "-o", "json"]);
    let out = server.cli(&["ota", "delete", &third]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["ota", "delete", &art]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = server
        .api("GET", &format!("/api/v1/ota/artifacts/{art}"), None)
        .await;
    assert_eq!(status, 404);
}

/// `mooring.*` command names are the server's own: a client cannot send `mooring.update` (or
/// `mooring.cert.rotate`) by name through the generic command API, the fleet command API or
/// the CLI, which would push an update with no deployment behind it (any URL, downgrade
/// allowed). Updates go through deployments only.
#[tokio::test]
async fn the_servers_own_command_names_cannot_be_sent_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    server.create_device("d1", tmp.path());
    let forged = json!({
        "name": "mooring.update",
        "params": {"v": 1, "deployment_id": "dep_x", "allow_downgrade": true,
                   "link": {"url": "http://evil.example/x", "token": "t", "expires_at": 1}},
    });
    let (status, e) = server
        .api("POST", "/api/v1/devices/d1/commands", Some(forged))
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("reserved_command_name")),
        "{e}"
    );
    for name in ["mooring.update.cancel", "mooring.cert.rotate"] {
        let (status, e) = server
            .api(
                "POST",
                "/api/v1/commands",
                Some(json!({"selector": "id:d1", "name": name})),
            )
            .await;
        assert_eq!(
            (status, e["error"]["code"].as_str()),
            (400, Some("reserved_command_name")),
            "{name}: {e}"
        );
    }
    let out = server.cli(&["command", "send", "--to", "id:d1", "mooring.update"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reserved_command_name"), "{err}");
    // Nothing was created.
    let (_, list) = server.api("GET", "/api/v1/devices/d1/commands", None).await;
    assert_eq!(list["commands"].as_array().map(Vec::len), Some(0), "{list}");
    // Other names with a dot still work.
    let (status, _) = server
        .api(
            "POST",
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "app.reboot"})),
        )
        .await;
    assert_eq!(status, 202);
}

/// An update command that ends without success before the device reported anything ends its
/// update (`failed`, with why): a device that answers the command with a failure (an agent
/// without the updater) and one that acknowledges and never answers within
/// `[ota] update_answer_timeout_ms`. What the device reports afterwards still wins.
#[tokio::test]
async fn an_update_command_that_fails_or_goes_unanswered_fails_its_update() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start_configured(tmp.path(), "[ota]\nupdate_answer_timeout_ms = 1000\n");
    let creds1 = server.create_device("d1", tmp.path());
    let creds2 = server.create_device("d2", tmp.path());
    let art = upload(&server, tmp.path(), "1.4.0");
    let mut d1 = MqttDevice::connect(&server, &creds1, "d1").await;
    d1.subscribe("devices/d1/commands/+").await;
    let mut d2 = MqttDevice::connect(&server, &creds2, "d2").await;
    d2.subscribe("devices/d2/commands/+").await;
    let dep_id = deploy(&server, &art, "id:d1,d2")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let (topic, _) = d1.next_json().await;
    let cmd1 = topic.rsplit('/').next().expect("id").to_owned();
    d1.publish(&format!("devices/d1/commands/{cmd1}/ack"), "{}")
        .await;
    d1.publish(
        &format!("devices/d1/commands/{cmd1}/result"),
        r#"{"status":"failed","output":{"reason":"unknown command mooring.update"}}"#,
    )
    .await;
    let (topic, _) = d2.next_json().await;
    let cmd2 = topic.rsplit('/').next().expect("id").to_owned();
    d2.publish(&format!("devices/d2/commands/{cmd2}/ack"), "{}")
        .await;

    let status = server
        .wait_for(&format!("/api/v1/ota/deployments/{dep_id}"), |v| {
            v["counts"]["failed"] == 2
        })
        .await;
    assert_eq!(status["counts"], json!({"failed": 2}), "{status}");
    let reason = |h: &Value| h["updates"][0]["reason"].as_str().map(str::to_owned);
    let (_, h1) = server.api("GET", "/api/v1/devices/d1/ota", None).await;
    assert_eq!(
        reason(&h1).as_deref(),
        Some("command_failed: unknown command mooring.update")
    );
    let (_, h2) = server.api("GET", "/api/v1/devices/d2/ota", None).await;
    assert_eq!(reason(&h2).as_deref(), Some("command_failed: timeout"));

    // d2's agent was only slow: its own report replaces the server's conclusion.
    d2.publish(
        "devices/d2/ota/status",
        &report(
            &dep_id,
            &art,
            "committed",
            1,
            json!({"running_version": "1.4.0"}),
        ),
    )
    .await;
    let (_, h2) = server.api("GET", "/api/v1/devices/d2/ota", None).await;
    assert_eq!(h2["updates"][0]["state"], "committed", "{h2}");
}

/// A device that sends OTA status reports or link requests in a loop is held to
/// `[ota] reports_per_minute_max` (each costs the server store work): past it, a link request
/// is answered `rate_limited` and a report is not read and not acknowledged (MQTT 5: PUBACK
/// 0x97, so the device sends it again later); both counted.
#[tokio::test]
async fn a_device_flooding_ota_reports_and_link_requests_is_limited_per_minute() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start_configured(tmp.path(), "[ota]\nreports_per_minute_max = 60\n");
    let creds = server.create_device("d1", tmp.path());
    let mut d1 = MqttDevice::connect(&server, &creds, "d1").await;
    d1.subscribe("devices/d1/ota/link/#").await;
    let ask = json!({"v": 1, "deployment_id": "dep_nope", "artifact_id": "art_00000000"});
    for _ in 0..60 {
        d1.publish("devices/d1/ota/link/request", &ask.to_string())
            .await;
        let (_, answer) = link_answer(&mut d1).await;
        assert_eq!(answer["code"], "update_not_found", "{answer}");
    }
    d1.publish("devices/d1/ota/link/request", &ask.to_string())
        .await;
    let (topic, answer) = link_answer(&mut d1).await;
    assert_eq!(
        (topic.as_str(), answer["code"].as_str()),
        ("devices/d1/ota/link/rejected", Some("rate_limited")),
        "{answer}"
    );
    // A report: PUBACK 0x97 (quota exceeded), as mosquitto_pub over MQTT 5 shows.
    drop(d1);
    let mut args = creds.mosquitto_args(server.mqtt);
    let payload = report("dep_nope", "art_00000000", "downloading", 1, json!({}));
    args.extend(support::s(&[
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-i",
        "d1",
        "-t",
        "devices/d1/ota/status",
        "-m",
        &payload,
    ]));
    let out = support::mosquitto_pub(&args);
    let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(said.contains("quota exceeded"), "{said}");
    assert_eq!(
        server
            .metric("mooring_ota_reports_rate_limited_total")
            .await,
        2.0
    );
    assert_eq!(
        server
            .metric("mooring_ota_status_reports_refused_total")
            .await,
        0.0,
        "a limited report is not even read"
    );
}
