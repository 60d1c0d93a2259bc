//! Golden tests: the exact bytes of every payload version ever shipped. Devices in the field
//! run old firmware for years; if one of these fails, the change broke them. Add a new case for
//! a new version; never edit an old one.

use mooring_proto::command::{self, CommandRequest, CommandResult, ResultStatus};
use mooring_proto::shadow::{self, ShadowDelta, ShadowError};
use mooring_proto::telemetry::{MetricValue, Telemetry, TelemetryError};
use mooring_proto::{DeviceId, Topic};
use serde_json::{json, Map, Value};

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid id")
}

#[test]
fn topics_v1() {
    assert_eq!(
        Topic::telemetry(&id("lock-01")),
        "devices/lock-01/telemetry"
    );
    assert_eq!(
        Topic::parse("devices/lock-01/telemetry"),
        Some(Topic::Telemetry(id("lock-01")))
    );
    assert_eq!(
        mooring_proto::topic::device_subtree_filter(&id("lock-01")),
        "devices/lock-01/#"
    );
}

#[test]
fn telemetry_v1_minimal_c_device_payload() {
    // What the docs/protocol.md C example produces with snprintf.
    let t = Telemetry::parse(b"{\"seq\":17,\"temp\":21.5,\"door\":1}").expect("valid");
    assert_eq!(t.seq, Some(17));
    assert_eq!(t.ts_ms, None);
    assert_eq!(
        t.points,
        vec![
            ("temp".to_owned(), MetricValue::Number(21.5)),
            ("door".to_owned(), MetricValue::Number(1.0)),
        ]
    );
}

#[test]
fn telemetry_v1_full_payload() {
    let payload = br#"{"seq":18446744073709551615,"ts":1767225600000,"bat":{"v":3.71,"charging":false},"rssi":-71,"fw":"1.4.0","tags":[1,2],"nothing":null}"#;
    let t = Telemetry::parse(payload).expect("valid");
    assert_eq!(t.seq, Some(u64::MAX));
    assert_eq!(t.ts_ms, Some(1_767_225_600_000));
    assert_eq!(
        t.points,
        vec![
            ("bat.v".to_owned(), MetricValue::Number(3.71)),
            ("bat.charging".to_owned(), MetricValue::Bool(false)),
            ("rssi".to_owned(), MetricValue::Number(-71.0)),
        ]
    );
}

#[test]
fn telemetry_v1_encoding_is_stable() {
    let t = Telemetry {
        seq: Some(5),
        ts_ms: Some(1_767_225_600_000),
        points: vec![
            ("load.1m".to_owned(), MetricValue::Number(0.25)),
            ("online".to_owned(), MetricValue::Bool(true)),
        ],
    };
    assert_eq!(
        String::from_utf8(t.to_bytes()).expect("utf8"),
        r#"{"seq":5,"ts":1767225600000,"load.1m":0.25,"online":true}"#
    );
}

#[test]
fn telemetry_v1_rejections() {
    assert!(matches!(
        Telemetry::parse(b"21.5"),
        Err(TelemetryError::NotObject)
    ));
    assert!(matches!(
        Telemetry::parse(b"{\"seq\":1.5}"),
        Err(TelemetryError::BadSeq)
    ));
    assert!(matches!(
        Telemetry::parse(b"{\"temp\":"),
        Err(TelemetryError::NotJson(_))
    ));
}

#[test]
fn command_and_shadow_topics_v1() {
    let d = id("lock-01");
    let cases = [
        (
            Topic::command(&d, "c0123abcd"),
            "devices/lock-01/commands/c0123abcd",
        ),
        (Topic::commands_filter(&d), "devices/lock-01/commands/+"),
        (
            Topic::command_ack(&d, "c0123abcd"),
            "devices/lock-01/commands/c0123abcd/ack",
        ),
        (
            Topic::command_result(&d, "c0123abcd"),
            "devices/lock-01/commands/c0123abcd/result",
        ),
        (
            Topic::shadow_reported(&d),
            "devices/lock-01/shadow/reported",
        ),
        (Topic::shadow_delta(&d), "devices/lock-01/shadow/delta"),
    ];
    for (built, pinned) in cases {
        assert_eq!(built, pinned);
    }
    let cmd = || "c0123abcd".to_owned();
    assert_eq!(
        Topic::parse("devices/lock-01/commands/c0123abcd"),
        Some(Topic::Command(d.clone(), cmd()))
    );
    assert_eq!(
        Topic::parse("devices/lock-01/commands/c0123abcd/ack"),
        Some(Topic::CommandAck(d.clone(), cmd()))
    );
    assert_eq!(
        Topic::parse("devices/lock-01/commands/c0123abcd/result"),
        Some(Topic::CommandResult(d.clone(), cmd()))
    );
    assert_eq!(
        Topic::parse("devices/lock-01/shadow/reported"),
        Some(Topic::ShadowReported(d.clone()))
    );
    assert_eq!(
        Topic::parse("devices/lock-01/shadow/delta"),
        Some(Topic::ShadowDelta(d))
    );
}

#[test]
fn command_v1_request_encoding_is_stable() {
    let req = CommandRequest {
        id: "c0123abcd".into(),
        name: "set_config".into(),
        params: json!({"interval_secs": 30, "mode": "eco"}),
        expires_at: 1_767_229_200_000,
    };
    let pinned = r#"{"id":"c0123abcd","name":"set_config","params":{"interval_secs":30,"mode":"eco"},"expires_at":1767229200000}"#;
    assert_eq!(String::from_utf8(req.to_bytes()).expect("utf8"), pinned);
    assert_eq!(
        CommandRequest::parse(pinned.as_bytes()).expect("valid"),
        req
    );

    // A command without parameters is sent with `"params":null`.
    let bare = CommandRequest {
        id: "c1".into(),
        name: "reboot".into(),
        params: Value::Null,
        expires_at: 1,
    };
    let pinned = r#"{"id":"c1","name":"reboot","params":null,"expires_at":1}"#;
    assert_eq!(String::from_utf8(bare.to_bytes()).expect("utf8"), pinned);
    assert_eq!(
        CommandRequest::parse(pinned.as_bytes()).expect("valid"),
        bare
    );
}

#[test]
fn command_v1_request_parsing() {
    // `params` may be missing; fields a later server adds are ignored.
    let req =
        CommandRequest::parse(br#"{"id":"c1","name":"reboot","expires_at":5,"priority":"high"}"#)
            .expect("valid");
    assert_eq!(req.params, Value::Null);
    assert_eq!(req.expires_at, 5);
    for bad in [
        &br#"{"id":"a/b","name":"reboot","expires_at":5}"#[..],
        br#"{"id":"c1","name":"-x","expires_at":5}"#,
        br#"{"id":"c1","name":"reboot"}"#,
        br#"{"id":"c1","name":"reboot","expires_at":-1}"#,
        b"[]",
    ] {
        assert!(
            matches!(
                CommandRequest::parse(bad),
                Err(command::CommandPayloadError::Invalid(_))
            ),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn command_v1_ack_payload() {
    assert_eq!(command::ack_payload(), b"{}");
}

#[test]
fn command_v1_result_encoding_is_stable() {
    let ok = CommandResult {
        status: ResultStatus::Succeeded,
        output: json!({"applied": true, "took_ms": 12}),
        local: None,
    };
    let pinned = r#"{"status":"succeeded","output":{"applied":true,"took_ms":12}}"#;
    assert_eq!(String::from_utf8(ok.to_bytes()).expect("utf8"), pinned);
    assert_eq!(CommandResult::parse(pinned.as_bytes()).expect("valid"), ok);

    let failed = CommandResult {
        status: ResultStatus::Failed,
        output: json!({"reason": "expired"}),
        local: None,
    };
    let pinned = r#"{"status":"failed","output":{"reason":"expired"}}"#;
    assert_eq!(String::from_utf8(failed.to_bytes()).expect("utf8"), pinned);
    assert_eq!(
        CommandResult::parse(pinned.as_bytes()).expect("valid"),
        failed
    );
}

#[test]
fn command_v1_local_result_encoding_is_stable() {
    let r = CommandResult {
        status: ResultStatus::Succeeded,
        output: json!({"opened": true}),
        local: Some(mooring_proto::local::LocalExecution {
            name: "unlock".into(),
            params: json!({"door": 1}),
            requested_at: 1_700_000_000_000,
            finished_at: 1_700_000_000_250,
        }),
    };
    let pinned = r#"{"status":"succeeded","output":{"opened":true},"local":{"name":"unlock","params":{"door":1},"requested_at":1700000000000,"finished_at":1700000000250}}"#;
    assert_eq!(String::from_utf8(r.to_bytes()).expect("utf8"), pinned);
    assert_eq!(CommandResult::parse(pinned.as_bytes()).expect("valid"), r);
}

#[test]
fn local_key_v1_encoding_is_stable() {
    use mooring_proto::local::{self, LocalKey};
    let d = mooring_proto::DeviceId::parse("lock-7").expect("id");
    assert_eq!(
        local::key_request_topic(&d),
        "devices/lock-7/local/key/request"
    );
    assert_eq!(local::key_topic(&d), "devices/lock-7/local/key");
    assert_eq!(local::key_request_payload(), br#"{"v":1}"#);
    let k = LocalKey {
        v: 1,
        key: "0f".repeat(32),
        cert_sha256: "ab".repeat(32),
    };
    let pinned = format!(
        r#"{{"v":1,"key":"{}","cert_sha256":"{}"}}"#,
        "0f".repeat(32),
        "ab".repeat(32)
    );
    assert_eq!(String::from_utf8(k.to_bytes()).expect("utf8"), pinned);
    assert_eq!(LocalKey::parse(pinned.as_bytes()), Some(k));
}

#[test]
fn command_v1_result_parsing() {
    // What a minimal C device sends: no output.
    let r = CommandResult::parse(br#"{"status":"succeeded"}"#).expect("valid");
    assert_eq!(r.status, ResultStatus::Succeeded);
    assert_eq!(r.output, Value::Null);
    // Output is any JSON.
    let r =
        CommandResult::parse(br#"{"status":"failed","output":"unknown command"}"#).expect("valid");
    assert_eq!(r.output, json!("unknown command"));
    assert!(CommandResult::parse(br#"{"status":"maybe"}"#).is_err());
    assert!(CommandResult::parse(br#"{"output":1}"#).is_err());
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn shadow_v1_delta_encoding_is_stable() {
    // The server computes the delta from desired and reported, then publishes it retained.
    let desired = object(json!({"fw": "1.4.0", "led": {"on": true, "hz": 2}, "mode": "eco"}));
    let reported = object(json!({"fw": "1.4.0", "led": {"on": false, "hz": 2}}));
    let delta = ShadowDelta {
        version: 7,
        delta: Value::Object(shadow::delta(&desired, &reported)),
    };
    let pinned = r#"{"version":7,"delta":{"led":{"on":true},"mode":"eco"}}"#;
    assert_eq!(String::from_utf8(delta.to_bytes()).expect("utf8"), pinned);
    assert_eq!(ShadowDelta::parse(pinned.as_bytes()).expect("valid"), delta);
    // docs/protocol.md's example.
    assert_eq!(
        ShadowDelta::parse(br#"{"version": 7, "delta": {"led": "on"}}"#).expect("valid"),
        ShadowDelta {
            version: 7,
            delta: json!({"led": "on"}),
        }
    );
    assert!(ShadowDelta::parse(br#"{"delta":{}}"#).is_err());
}

#[test]
fn shadow_v1_reported_parsing() {
    // A merge patch: objects merge, other values replace, null deletes.
    let pinned = br#"{"fw":"1.4.1","led":{"on":true},"battery":null}"#;
    let patch = shadow::parse_update(pinned).expect("valid");
    assert_eq!(
        Value::Object(patch.clone()),
        json!({"fw": "1.4.1", "led": {"on": true}, "battery": null})
    );
    let mut state = object(json!({"fw": "1.4.0", "led": {"on": false, "hz": 2}, "battery": 80}));
    shadow::merge(&mut state, &patch);
    assert_eq!(
        Value::Object(state),
        json!({"fw": "1.4.1", "led": {"on": true, "hz": 2}})
    );
    // The agent encodes its patch as a compact JSON object.
    assert_eq!(Value::Object(patch).to_string().as_bytes(), pinned);
    assert!(matches!(
        shadow::parse_update(b"[1]"),
        Err(ShadowError::Invalid(_))
    ));
    assert!(matches!(
        shadow::parse_update(b"{\"a\":"),
        Err(ShadowError::Invalid(_))
    ));
}

#[test]
fn provision_v1_topics() {
    use mooring_proto::provision as p;
    assert_eq!(p::CLAIM_USERNAME, "claim");
    assert_eq!(p::request_topic("sn-0042"), "provision/sn-0042/request");
    assert_eq!(p::accepted_topic("sn-0042"), "provision/sn-0042/accepted");
    assert_eq!(p::rejected_topic("sn-0042"), "provision/sn-0042/rejected");
    assert_eq!(p::subtree_filter("sn-0042"), "provision/sn-0042/#");
    assert_eq!(
        p::renew_request_topic(&id("lock-01")),
        "devices/lock-01/cert/request"
    );
    assert_eq!(
        Topic::parse("devices/lock-01/cert/request"),
        Some(Topic::CertRequest(id("lock-01")))
    );
    assert_eq!(
        Topic::CertRequest(id("lock-01")).to_string(),
        "devices/lock-01/cert/request"
    );
    assert_eq!(
        p::renew_accepted_topic(&id("lock-01")),
        "devices/lock-01/cert/accepted"
    );
    assert_eq!(
        p::renew_rejected_topic(&id("lock-01")),
        "devices/lock-01/cert/rejected"
    );
}

#[test]
fn provision_v1_encoding_is_stable() {
    use mooring_proto::provision::{EnrollAccepted, EnrollRejected, EnrollRequest, RenewRequest};
    let req = EnrollRequest::new("CSR".into(), Some("sn-1".into()));
    let pinned = r#"{"v":1,"csr_pem":"CSR","device_id":"sn-1"}"#;
    assert_eq!(String::from_utf8(req.to_bytes()).expect("utf8"), pinned);
    assert_eq!(EnrollRequest::parse(pinned.as_bytes()).expect("valid"), req);
    // What a minimal device sends under a claim that assigns ids.
    let r = EnrollRequest::parse(br#"{"v":1,"csr_pem":"CSR"}"#).expect("valid");
    assert_eq!(r.device_id, None);

    let renew = RenewRequest::new("CSR".into());
    assert_eq!(renew.to_bytes(), br#"{"v":1,"csr_pem":"CSR"}"#);

    let ok = EnrollAccepted {
        v: 1,
        device_id: "sn-1".into(),
        certificate_pem: "CERT".into(),
        ca_pem: "CA".into(),
    };
    let pinned = r#"{"v":1,"device_id":"sn-1","certificate_pem":"CERT","ca_pem":"CA"}"#;
    assert_eq!(String::from_utf8(ok.to_bytes()).expect("utf8"), pinned);
    assert_eq!(EnrollAccepted::parse(pinned.as_bytes()).expect("valid"), ok);

    let no = EnrollRejected::new("claim_used", "claim already used");
    let pinned = r#"{"v":1,"code":"claim_used","message":"claim already used"}"#;
    assert_eq!(String::from_utf8(no.to_bytes()).expect("utf8"), pinned);
    assert_eq!(EnrollRejected::parse(pinned.as_bytes()).expect("valid"), no);
}

#[test]
fn ota_v1_topics() {
    use mooring_proto::ota;
    let d = id("lock-1");
    assert_eq!(ota::status_topic(&d), "devices/lock-1/ota/status");
    assert_eq!(
        ota::link_request_topic(&d),
        "devices/lock-1/ota/link/request"
    );
    assert_eq!(
        ota::link_accepted_topic(&d),
        "devices/lock-1/ota/link/accepted"
    );
    assert_eq!(
        ota::link_rejected_topic(&d),
        "devices/lock-1/ota/link/rejected"
    );
    assert_eq!(ota::link_filter(&d), "devices/lock-1/ota/link/#");
    assert_eq!(
        Topic::parse("devices/lock-1/ota/status"),
        Some(Topic::OtaStatus(d.clone()))
    );
    assert_eq!(
        Topic::parse("devices/lock-1/ota/link/request"),
        Some(Topic::OtaLinkRequest(d.clone()))
    );
    assert_eq!(ota::UPDATE_COMMAND, "mooring.update");
    assert_eq!(ota::CANCEL_COMMAND, "mooring.update.cancel");
}

#[test]
fn ota_v1_encoding_is_stable() {
    use mooring_proto::ota::{
        Link, Manifest, SignedManifest, StatusReport, UpdateParams, UpdateState,
    };
    let m = Manifest {
        v: 1,
        artifact_id: "art_00112233445566778899aabb".into(),
        version: "1.4.0".into(),
        sha256: "ab".repeat(32),
        size: 1048576,
        compatible: vec!["rev-b".into(), "rev-c".into()],
        created_at: 1796000000000,
    };
    let pinned = format!(
        r#"{{"v":1,"artifact_id":"art_00112233445566778899aabb","version":"1.4.0","sha256":"{}","size":1048576,"compatible":["rev-b","rev-c"],"created_at":1796000000000}}"#,
        "ab".repeat(32)
    );
    assert_eq!(String::from_utf8(m.to_bytes()).expect("utf8"), pinned);
    assert_eq!(Manifest::parse(pinned.as_bytes()).expect("valid"), m);

    let params = UpdateParams {
        v: 1,
        deployment_id: "dep_1".into(),
        signed: SignedManifest {
            manifest: "M".into(),
            signature: "S".into(),
        },
        link: Link {
            url: "https://h:8080/api/v1/ota/artifacts/art_1/download".into(),
            token: "T".into(),
            expires_at: 7,
        },
        allow_downgrade: false,
    };
    let pinned = r#"{"v":1,"deployment_id":"dep_1","manifest":"M","signature":"S","link":{"url":"https://h:8080/api/v1/ota/artifacts/art_1/download","token":"T","expires_at":7},"allow_downgrade":false}"#;
    assert_eq!(serde_json::to_string(&params).expect("json"), pinned);
    assert_eq!(
        serde_json::from_str::<UpdateParams>(pinned).expect("valid"),
        params
    );

    let r = StatusReport {
        v: 1,
        deployment_id: "dep_1".into(),
        artifact_id: "art_00112233445566778899aabb".into(),
        version: "1.4.0".into(),
        state: UpdateState::RolledBack,
        progress_pct: None,
        reason: Some("health_check_failed: check exited 1".into()),
        running_version: Some("1.3.0".into()),
        at: 5,
        seq: 9,
    };
    let pinned = r#"{"v":1,"deployment_id":"dep_1","artifact_id":"art_00112233445566778899aabb","version":"1.4.0","state":"rolled_back","reason":"health_check_failed: check exited 1","running_version":"1.3.0","at":5,"seq":9}"#;
    assert_eq!(String::from_utf8(r.to_bytes()).expect("utf8"), pinned);
    assert_eq!(StatusReport::parse(pinned.as_bytes()).expect("valid"), r);
}

#[test]
fn gateway_v1_child_presence() {
    use mooring_proto::gateway::{presence_topic, ChildPresence};
    assert_eq!(presence_topic(&id("lock-01")), "devices/lock-01/presence");
    assert_eq!(
        ChildPresence::new(false).to_json(),
        r#"{"v":1,"online":false}"#
    );
    assert_eq!(
        ChildPresence::parse(br#"{"online":true,"v":1}"#),
        Ok(ChildPresence::new(true))
    );
}
