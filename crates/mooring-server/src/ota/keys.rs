//! The OTA keys: the fleet's Ed25519 update key (server-held in the data dir or sealed in the
//! cluster store, or offline: public half only) and the download-token HMAC key; signing and
//! verifying manifests; hashing files.

use anyhow::Context;
use mooring_store::Store;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::Digest;
use std::path::Path;

use super::{READ_PIECE_BYTES, SHARED_UPDATE_KEY, TOKEN_SECRET_FILE, UPDATE_KEY_FILE};

/// The fleet's update key as this server holds it.
pub enum UpdateKey {
    /// The server signs manifests.
    Server(Box<Ed25519KeyPair>),
    /// The private key is offline; the server verifies uploaded signatures only.
    Offline([u8; 32]),
}

impl UpdateKey {
    pub fn public_key(&self) -> [u8; 32] {
        match self {
            UpdateKey::Server(pair) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(pair.public_key().as_ref());
                out
            }
            UpdateKey::Offline(pk) => *pk,
        }
    }
}

/// Parses 64 hex digits of an Ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| "an Ed25519 public key is 64 hex digits (32 bytes)".to_owned())
}

/// An Ed25519 key pair from 64 hex digits of its seed (the format of `update.key` and of
/// `mooring ota keygen`'s file).
pub fn key_from_seed_hex(text: &str) -> anyhow::Result<Ed25519KeyPair> {
    let seed = hex::decode(text.trim()).context("the key is not hex")?;
    anyhow::ensure!(
        seed.len() == 32,
        "the key must be 64 hex digits (an Ed25519 seed), not {} bytes",
        seed.len()
    );
    Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| anyhow::anyhow!("not an Ed25519 seed"))
}

/// A new key: (seed hex, public key hex).
pub fn generate_key() -> anyhow::Result<(String, String)> {
    let seed: [u8; 32] = rand::random();
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|_| anyhow::anyhow!("generating an Ed25519 key failed"))?;
    Ok((hex::encode(seed), hex::encode(pair.public_key().as_ref())))
}

/// Hex Ed25519 signature over `manifest` (what `--sign-key` and the server do).
pub fn sign_manifest(key: &Ed25519KeyPair, manifest: &[u8]) -> String {
    hex::encode(key.sign(manifest).as_ref())
}

/// Whether `signature_hex` is `public_key`'s signature over `manifest`.
pub fn verify_manifest(public_key: &[u8; 32], manifest: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(manifest, &sig)
        .is_ok()
}

/// Lowercase hex SHA-256 and size of a file (read in pieces).
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; READ_PIECE_BYTES];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Reads a private file of 64 hex digits, refusing one others can read.
fn read_private_hex(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    anyhow::ensure!(
        mode & 0o077 == 0,
        "{} is readable by others (mode {mode:o}); chmod 600 it",
        path.display()
    );
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// Reads `<dir>/<name>` (64 hex digits), creating it with fresh random bytes (0600) first if
/// it does not exist.
pub(crate) fn load_or_create_secret_file(dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    if !path.exists() {
        let seed: [u8; 32] = rand::random();
        crate::pki::write_private(&path, &format!("{}\n", hex::encode(seed)), false)?;
    }
    read_private_hex(&path)
}

/// The keys of OTA: the update key and the download-token key.
pub struct OtaKeys {
    pub update: UpdateKey,
    pub token: ring::hmac::Key,
}

impl OtaKeys {
    /// The embedded server's keys, in the data dir (created at first start).
    pub fn load_or_create_in_dir(config: &crate::ServerConfig) -> anyhow::Result<OtaKeys> {
        let dir = &config.data_dir;
        let update = match &config.ota.update_public_key {
            Some(pk) => UpdateKey::Offline(parse_public_key(pk).map_err(anyhow::Error::msg)?),
            None => {
                let seed = load_or_create_secret_file(dir, UPDATE_KEY_FILE)?;
                UpdateKey::Server(Box::new(
                    key_from_seed_hex(&seed)
                        .with_context(|| format!("{}", dir.join(UPDATE_KEY_FILE).display()))?,
                ))
            }
        };
        let secret = load_or_create_secret_file(dir, TOKEN_SECRET_FILE)?;
        let secret = hex::decode(secret).context("ota.secret is not hex")?;
        Ok(OtaKeys {
            update,
            token: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        })
    }

    /// A cluster node's keys: the update key sealed in the store (one for the cluster, created
    /// by the first node), the token key derived from the cluster key.
    pub async fn load_or_create_shared(
        config: &crate::ServerConfig,
        store: &dyn Store,
        key: &crate::pki::SecretKey,
    ) -> anyhow::Result<OtaKeys> {
        let update = match &config.ota.update_public_key {
            Some(pk) => UpdateKey::Offline(parse_public_key(pk).map_err(anyhow::Error::msg)?),
            None => {
                let label = SHARED_UPDATE_KEY.as_bytes();
                let sealed = match store.get_value(SHARED_UPDATE_KEY).await? {
                    Some(v) => v,
                    None => {
                        let (seed, _) = generate_key()?;
                        let ours = key.seal(seed.as_bytes(), label)?.into_bytes();
                        store.put_value_once(SHARED_UPDATE_KEY, ours).await?
                    }
                };
                let sealed = String::from_utf8(sealed).context("the stored update key")?;
                let seed = key.open(&sealed, label)?;
                UpdateKey::Server(Box::new(key_from_seed_hex(&seed)?))
            }
        };
        Ok(OtaKeys {
            update,
            token: key.ota_token_key(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_signed_with_a_key_verify_only_with_its_public_half() {
        let (seed, public) = generate_key().expect("key");
        let key = key_from_seed_hex(&seed).expect("seed");
        let pk = parse_public_key(&public).expect("public");
        let sig = sign_manifest(&key, b"{\"v\":1}");
        assert!(verify_manifest(&pk, b"{\"v\":1}", &sig));
        assert!(!verify_manifest(&pk, b"{\"v\":2}", &sig), "other bytes");
        let (_, other) = generate_key().expect("key");
        let other = parse_public_key(&other).expect("public");
        assert!(!verify_manifest(&other, b"{\"v\":1}", &sig), "other key");
        assert!(!verify_manifest(&pk, b"{\"v\":1}", "zz"), "not hex");
        assert!(parse_public_key("abcd").is_err());
        assert!(key_from_seed_hex("00").is_err());
    }
}
