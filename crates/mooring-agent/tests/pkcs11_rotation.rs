//! A token key (SoftHSM2; Debian `softhsm2`, CI installs it): a missing PIN is named; a start
//! finishes a rotation's key swap a kill interrupted half-way through the token's objects, and
//! leaves a renewal that was not confirmed yet alone.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use mooring_agent::key::{KeyRef, Pkcs11Uri, TokenKey};
use mooring_agent::rotate::{self, CertFiles};
use rcgen::PublicKeyData as _;
use std::path::Path;
use std::process::Command;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234";

/// A private SoftHSM2 token dir with a token `label`; SOFTHSM2_CONF points at it for this
/// process (SoftHSM2 reads it once; this is the only test here). Fails without softhsm2.
fn softhsm(dir: &Path, label: &str) {
    assert!(
        Path::new(MODULE).exists(),
        "{MODULE} is missing: install softhsm2 (`apt-get install softhsm2`) to run this test"
    );
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("conf");
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", PIN, "--so-pin", "5678"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap_or_else(|e| panic!("softhsm2-util: {e}: install softhsm2"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::env::set_var("SOFTHSM2_CONF", &conf);
}

/// Does in the token what a kill after the first object class leaves: the old private key
/// destroyed, the new one relabelled; the public keys not yet.
fn half_promote(token: &str) {
    let ctx = Pkcs11::new(MODULE).expect("module");
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .expect("token");
    let session = ctx.open_rw_session(slot).expect("session");
    match session.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    let find = |label: &[u8]| {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.to_vec()),
            ])
            .expect("find")
    };
    for h in find(b"device") {
        session.destroy_object(h).expect("destroy");
    }
    for h in find(b"device.next") {
        session
            .update_attributes(h, &[Attribute::Label(b"device".to_vec())])
            .expect("relabel");
    }
}

#[test]
fn a_token_key_swap_killed_half_way_is_finished_at_the_next_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    softhsm(tmp.path(), "rot");
    let uri = Pkcs11Uri::parse(&format!(
        "pkcs11:token=rot;object=device?module-path={MODULE}&pin-value={PIN}"
    ))
    .expect("uri");
    // Without a PIN: said so, not "no key".
    std::env::remove_var(mooring_agent::key::PIN_ENV);
    let no_pin = Pkcs11Uri::parse(&format!(
        "pkcs11:token=rot;object=device?module-path={MODULE}"
    ))
    .expect("uri");
    let err = TokenKey::open(&no_pin, true).expect_err("no PIN");
    assert!(format!("{err:#}").contains("needs its user PIN"), "{err:#}");
    let next_uri = uri.with_object(&format!("device{}", rotate::NEXT_LABEL_SUFFIX));
    let (old, made) = TokenKey::open(&uri, true).expect("old key");
    assert!(made);
    let (next, made) = TokenKey::open(&next_uri, true).expect("next key");
    assert!(made);
    let next_point = next.der_bytes().to_vec();
    assert_ne!(old.der_bytes(), &next_point[..]);
    drop((old, next));

    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let files = CertFiles {
        cert_path: tmp.path().join("device.crt"),
        key: KeyRef::Pkcs11(uri.clone()),
        ca_path: tmp.path().join("ca.crt"),
        state_dir: state.clone(),
    };
    std::fs::write(&files.cert_path, "old").expect("cert");
    std::fs::write(state.join(rotate::NEXT_CERT_FILE), "new").expect("next cert");

    // A renewal not confirmed yet: left alone (it is tried first, not swapped in blind).
    rotate::recover(&files).expect("recover");
    assert_eq!(std::fs::read(&files.cert_path).expect("cert"), b"old");
    assert!(TokenKey::open(&next_uri, false).is_ok());

    // Killed in the middle of the swap: the marker is there, the token half done.
    std::fs::write(state.join(rotate::PROMOTING_FILE), "").expect("marker");
    half_promote("rot");
    rotate::recover(&files).expect("recover");
    let (key, _) = TokenKey::open(&uri, false).expect("the key under its label");
    assert_eq!(key.der_bytes(), &next_point[..], "the new key is in place");
    drop(key);
    let err = TokenKey::open(&next_uri, false).expect_err("no next key left");
    assert!(format!("{err:#}").contains("no EC private key"), "{err:#}");
    assert_eq!(std::fs::read(&files.cert_path).expect("cert"), b"new");
    assert!(!state.join(rotate::NEXT_CERT_FILE).exists());
    assert!(!state.join(rotate::PROMOTING_FILE).exists());
    // Nothing more to do.
    rotate::recover(&files).expect("again");
    assert!(TokenKey::open(&uri, false).is_ok());
}
