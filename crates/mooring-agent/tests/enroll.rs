//! Enrollment, device side: the real `enroll` pipeline against the real broker over in-memory
//! streams on a paused clock. The test plays the provisioning server (checks the claim at
//! CONNECT, answers requests with certificates signed by a test CA, or refuses them).

mod support;

use mooring_agent::enroll::{self, EnrollConfig, EnrollError, Enrolled};
use mooring_agent::Connector;
use mooring_broker::test_support::AllowAll;
use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnectRefusal, ConnectRequest, Hooks, Message,
    PublishVerdict,
};
use mooring_proto::policy::Principal;
use mooring_proto::provision::{self, EnrollAccepted, EnrollRejected, EnrollRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{within, MemConnector};

const TOKEN: &str = "claim-token-0123456789";

/// How the fake server answers the n-th request (0-based).
#[derive(Debug, Clone)]
enum Answer {
    Accept,
    Reject(&'static str),
    /// No answer at all (lost).
    Drop,
}

/// Checks the claim at CONNECT (username `claim`, the token, no client certificate) and
/// records every accepted publish.
struct Provisioner {
    inner: AllowAll,
    connects: AtomicUsize,
}

#[async_trait::async_trait]
impl Hooks for Provisioner {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        assert!(req.info.cert_identity.is_none());
        if req.username != Some(provision::CLAIM_USERNAME) || req.password != Some(TOKEN.as_bytes())
        {
            return Err(ConnectRefusal::BadUsernameOrPassword);
        }
        self.inner.authenticate(req).await
    }
    fn may_publish(&self, p: &Principal, t: &str) -> bool {
        self.inner.may_publish(p, t)
    }
    fn may_subscribe(&self, p: &Principal, f: &str) -> bool {
        self.inner.may_subscribe(p, f)
    }
    async fn on_publish(&self, p: &Principal, t: &str, m: &Message) -> PublishVerdict {
        self.inner.on_publish(p, t, m).await
    }
    fn on_connected(&self, _: &str, _: &Principal) {}
    fn on_disconnected(&self, _: &str, _: &Principal) {}
}

/// The fake provisioning server: a broker, a CA, and a task answering requests by `answers`
/// (the last one repeats).
struct Server {
    hooks: Arc<Provisioner>,
    connector: Arc<MemConnector>,
    ca_pem: String,
    /// Every request received, in order.
    requests: Arc<Mutex<Vec<EnrollRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn start(answers: Vec<Answer>) -> Server {
        let hooks = Arc::new(Provisioner {
            inner: AllowAll::new().recording(),
            connects: AtomicUsize::new(0),
        });
        let broker = Broker::new(BrokerConfig::default(), hooks.clone());
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fleet test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let ca_pem = ca.pem();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (broker, hooks, requests, ca_pem) = (
                broker.clone(),
                hooks.clone(),
                requests.clone(),
                ca_pem.clone(),
            );
            async move {
                let mut seen = 0;
                loop {
                    let changed = hooks.inner.changed();
                    let published = hooks.inner.published();
                    for m in published.iter().skip(seen) {
                        seen += 1;
                        let Some(cid) = provision::parse_request_topic(&m.topic) else {
                            continue;
                        };
                        let req = EnrollRequest::parse(&m.payload).expect("valid request");
                        let n = {
                            let mut r = requests.lock().expect("lock");
                            r.push(req.clone());
                            r.len() - 1
                        };
                        let answer = answers.get(n).or(answers.last()).expect("answers");
                        let (topic, payload) = match answer {
                            Answer::Drop => continue,
                            Answer::Reject(code) => (
                                provision::rejected_topic(cid),
                                EnrollRejected::new(*code, format!("test says {code}")).to_bytes(),
                            ),
                            Answer::Accept => {
                                let id =
                                    req.device_id.clone().unwrap_or_else(|| "d-assigned".into());
                                let csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
                                    .expect("csr");
                                let mut params =
                                    CertificateParams::new(Vec::<String>::new()).expect("params");
                                params
                                    .distinguished_name
                                    .push(DnType::CommonName, id.as_str());
                                let cert = CertificateSigningRequestParams {
                                    params,
                                    public_key: csr.public_key,
                                }
                                .signed_by(&ca)
                                .expect("sign");
                                let a = EnrollAccepted {
                                    v: provision::SCHEMA_VERSION,
                                    device_id: id,
                                    certificate_pem: cert.pem(),
                                    ca_pem: ca_pem.clone(),
                                };
                                (provision::accepted_topic(cid), a.to_bytes())
                            }
                        };
                        broker.publish(Message::new(&topic, payload, 1, false));
                    }
                    changed.await;
                }
            }
        });
        Server {
            connector: MemConnector::new(broker),
            hooks,
            ca_pem,
            requests,
            task,
        }
    }

    fn requests(&self) -> Vec<EnrollRequest> {
        self.requests.lock().expect("lock").clone()
    }

    fn connects(&self) -> usize {
        self.hooks.connects.load(Ordering::SeqCst)
    }

    fn connector(&self) -> impl FnOnce() -> anyhow::Result<Arc<dyn Connector>> {
        let c: Arc<dyn Connector> = self.connector.clone();
        move || Ok(c)
    }
}

fn config(dir: &Path, id: Option<&str>, token: &str) -> EnrollConfig {
    let ca = dir.join("operator-ca.pem");
    if !ca.exists() {
        std::fs::write(&ca, "unused in memory").expect("ca");
    }
    EnrollConfig {
        ca_path: ca,
        claim_token: token.into(),
        state_dir: dir.join("state"),
        device_id: id.map(|i| mooring_proto::DeviceId::parse(i).expect("id")),
        key: None,
    }
}

async fn run(server: &Server, cfg: &EnrollConfig) -> Result<Enrolled, EnrollError> {
    within("enroll", enroll::enroll(cfg, server.connector(), 7)).await
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join("state").join(name)).expect(name)
}

/// The certificate's public key is the key's.
fn cert_is_for_key(cert_pem: &str, key_pem: &str) -> bool {
    use rcgen::PublicKeyData as _;
    let key = KeyPair::from_pem(key_pem).expect("key");
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("pem");
    let cert = pem.parse_x509().expect("x509");
    cert.public_key().raw == key.subject_public_key_info()
}

#[tokio::test(start_paused = true)]
async fn enrolls_with_its_own_key_and_never_asks_again_once_enrolled() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(vec![Answer::Accept]);
    let cfg = config(tmp.path(), Some("sn-0042"), TOKEN);
    let got = run(&server, &cfg).await.expect("enrolled");
    assert!(got.fresh);
    assert_eq!(got.cert_path, tmp.path().join("state/device.crt"));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].device_id.as_deref(), Some("sn-0042"));
    let cert = read(tmp.path(), "device.crt");
    assert!(cert_is_for_key(&cert, &read(tmp.path(), "device.key")));
    assert_eq!(read(tmp.path(), "ca.crt"), server.ca_pem);
    // The stored identity is what the normal run loads.
    let identity = mooring_agent::transport::load_identity(&got.cert_path, &got.key, &got.ca_path)
        .expect("usable identity");
    assert_eq!(identity.device_id.as_str(), "sn-0042");

    // Again, even with a token that would now be refused: nothing is contacted.
    let connects = server.connects();
    let again = run(&server, &config(tmp.path(), Some("sn-0042"), "revoked"))
        .await
        .expect("already enrolled");
    assert!(!again.fresh);
    assert_eq!(server.connects(), connects);
    assert_eq!(read(tmp.path(), "device.crt"), cert);
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_is_asked_for_again_with_the_same_request() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(vec![Answer::Drop, Answer::Accept]);
    let cfg = config(tmp.path(), Some("sn-1"), TOKEN);
    run(&server, &cfg).await.expect("enrolled");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "asked again after the reply timeout");
    assert_eq!(reqs[0], reqs[1], "the same persisted request");
}

#[tokio::test(start_paused = true)]
async fn killed_after_the_request_reached_the_server_it_resumes_with_the_same_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    // The first answer never comes: the agent is killed while it waits.
    let server = Server::start(vec![Answer::Drop, Answer::Accept]);
    let cfg = config(tmp.path(), Some("sn-2"), TOKEN);
    let task = tokio::spawn({
        let cfg = cfg.clone();
        let c = server.connector();
        async move { enroll::enroll(&cfg, c, 1).await }
    });
    within("the first request", async {
        while server.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    task.abort();
    let _ = task.await;
    let key = read(tmp.path(), "device.key");
    assert!(!tmp.path().join("state/device.crt").exists());

    run(&server, &cfg)
        .await
        .expect("enrolled on the second run");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0], reqs[1], "the same CSR after the restart");
    assert_eq!(read(tmp.path(), "device.key"), key, "the key was kept");
    assert!(cert_is_for_key(&read(tmp.path(), "device.crt"), &key));
}

#[tokio::test(start_paused = true)]
async fn a_rejection_is_final_and_stores_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(vec![Answer::Reject("claim_used")]);
    let err = run(&server, &config(tmp.path(), Some("sn-3"), TOKEN))
        .await
        .expect_err("refused");
    match &err {
        EnrollError::Rejected { code, message } => {
            assert_eq!(code, "claim_used");
            assert_eq!(message, "test says claim_used");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("claim_used"), "{err}");
    assert_eq!(server.requests().len(), 1, "not asked again");
    assert!(!tmp.path().join("state/device.crt").exists());
}

#[tokio::test(start_paused = true)]
async fn a_transient_rejection_is_retried_after_a_backoff() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(vec![Answer::Reject("rate_limited"), Answer::Accept]);
    run(&server, &config(tmp.path(), Some("sn-4"), TOKEN))
        .await
        .expect("enrolled after the retry");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_token_refused_at_connect_is_final() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(vec![Answer::Accept]);
    let err = run(&server, &config(tmp.path(), Some("sn-5"), "wrong"))
        .await
        .expect_err("refused");
    assert!(matches!(err, EnrollError::Refused(_)), "{err:?}");
    assert_eq!(server.connects(), 1, "not retried");
    assert!(server.requests().is_empty());
}

#[tokio::test(start_paused = true)]
async fn link_cuts_while_waiting_are_survived() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(vec![Answer::Drop, Answer::Drop, Answer::Accept]);
    let cfg = config(tmp.path(), Some("sn-6"), TOKEN);
    let task = tokio::spawn({
        let cfg = cfg.clone();
        let c = server.connector();
        async move { enroll::enroll(&cfg, c, 3).await }
    });
    for n in 1..=2 {
        within("a request", async {
            while server.requests().len() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        server.connector.cut();
    }
    let got = within("enrolled", task)
        .await
        .expect("task")
        .expect("enrolled");
    assert!(got.fresh);
    assert!(server.connects() >= 3, "reconnected after each cut");
    assert!(server.requests().windows(2).all(|w| w[0] == w[1]));
}
