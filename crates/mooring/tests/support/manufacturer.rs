//! A device manufacturer played by `openssl`: its own CA, and device keys with certificates it
//! signs (CN = device id), for the just-in-time registration tests.

use super::Creds;
use std::path::{Path, PathBuf};

/// openssl config: the CA's and the devices' extensions, and `openssl ca` settings.
pub const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_ca_nosign]
basicConstraints = critical,CA:TRUE
keyUsage = critical,digitalSignature
[v3_dev]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
[ca]
default_ca = c
[c]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = p
copy_extensions = none
[p]
commonName = supplied
";

pub fn openssl(dir: &Path, args: &[&str]) {
    super::openssl(args, dir);
}

/// A manufacturer: its CA (`<dir>/ca.crt`, `ca.key`) and the devices it makes.
pub struct Manufacturer {
    pub dir: PathBuf,
}

impl Manufacturer {
    pub fn new(root: &Path, name: &str) -> Manufacturer {
        let dir = root.join(format!("mfr-{name}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("openssl.cnf"), OPENSSL_CNF).expect("cnf");
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ca.key",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-config",
                "openssl.cnf",
                "-extensions",
                "v3_ca",
                "-key",
                "ca.key",
                "-subj",
                &format!("/O={name}/CN={name} Manufacturing CA"),
                "-days",
                "30",
                "-out",
                "ca.crt",
            ],
        );
        Manufacturer { dir }
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_cert()).expect("ca.crt")
    }

    /// A device key and a certificate for it (CN = `cn`) signed by this CA, in a credentials
    /// directory that trusts the server's fleet CA (`fleet_ca`).
    pub fn make_device(&self, cn: &str, fleet_ca: &Path) -> Creds {
        let dir = self.dir.join(format!("dev-{}", hex_name(cn)));
        std::fs::create_dir_all(&dir).expect("dir");
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "device.key",
            ],
        );
        let cnf = self.dir.join("openssl.cnf");
        let cnf = cnf.to_str().expect("utf8");
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-config",
                cnf,
                "-key",
                "device.key",
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                "device.csr",
            ],
        );
        let ca_crt = self.ca_cert();
        let ca_key = self.dir.join("ca.key");
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "device.csr",
                "-CA",
                ca_crt.to_str().expect("utf8"),
                "-CAkey",
                ca_key.to_str().expect("utf8"),
                "-set_serial",
                &format!("0x{}", hex_name(cn)),
                "-days",
                "10",
                "-extfile",
                cnf,
                "-extensions",
                "v3_dev",
                "-out",
                "device.crt",
            ],
        );
        std::fs::copy(fleet_ca, dir.join("ca.crt")).expect("fleet ca");
        Creds { dir }
    }
}

/// A file-name-safe, serial-safe form of a CN.
pub fn hex_name(cn: &str) -> String {
    cn.bytes().take(16).map(|b| format!("{b:02x}")).collect()
}
