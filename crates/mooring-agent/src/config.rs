//! [`AgentConfig`]: the plain settings struct the CLI (or the simulator) builds, with defaults and checks; plus the `--config` TOML file ([`AgentFile`]).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Default seconds between host-metric samples.
pub const INTERVAL_SECS_DEFAULT: u64 = 60;
/// Default outbox bound, in messages.
pub const OUTBOX_MAX_DEFAULT: u64 = 100_000;
/// Default MQTT keepalive.
pub const KEEPALIVE_SECS_DEFAULT: u64 = 30;
/// Default timeout of a user command handler.
pub const HANDLER_TIMEOUT_SECS_DEFAULT: u64 = 30;
/// Longest timeout a user command handler may ask for.
pub const HANDLER_TIMEOUT_SECS_MAX: u64 = 3600;
/// Most user command handlers in one config file.
pub const HANDLERS_MAX: usize = 64;
/// Names of the built-in command handlers; a user handler cannot take these.
pub const BUILTIN_HANDLERS: [&str; 7] = [
    "ping",
    "reboot",
    "set_config",
    "diagnostics",
    crate::rotate::ROTATE_COMMAND,
    mooring_proto::ota::UPDATE_COMMAND,
    mooring_proto::ota::CANCEL_COMMAND,
];

/// Where extra telemetry lines come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSource {
    /// The process's standard input (`--input -`).
    Stdin,
    /// A file read once to its end.
    File(PathBuf),
}

impl InputSource {
    /// `-` means stdin, anything else is a path.
    pub fn from_arg(arg: &str) -> Self {
        if arg == "-" {
            Self::Stdin
        } else {
            Self::File(PathBuf::from(arg))
        }
    }
}

/// Everything the agent needs to run. Built by the CLI; the simulator builds it directly.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Server host name or IP address; also the TLS server name checked against the server
    /// certificate.
    pub server_host: String,
    pub server_port: u16,
    /// PEM client certificate (chain); its subject CN is the device id.
    pub cert_path: PathBuf,
    /// The private key of the client certificate: a PEM file or a key in a PKCS#11 token.
    pub key: crate::key::KeyRef,
    /// PEM CA certificate(s): the only roots trusted for the server certificate.
    pub ca_path: PathBuf,
    /// Directory holding the outbox database (created if missing).
    pub state_dir: PathBuf,
    /// Seconds between host-metric samples; 0 disables host metrics.
    pub interval_secs: u64,
    /// Extra telemetry, one JSON object per line.
    pub input: Option<InputSource>,
    /// Exit once the input is at EOF (or there is none) and the outbox is empty.
    pub exit_when_drained: bool,
    /// Most messages kept in the outbox; when full the oldest are dropped.
    pub outbox_max: u64,
    pub keepalive_secs: u64,
    /// Seed for reconnect jitter; `None` seeds from the OS. The simulator sets it so the same
    /// seed gives the same run.
    pub jitter_seed: Option<u64>,
    /// From `--config`: user command handlers by command name.
    pub handlers: BTreeMap<String, ExecHandler>,
    /// From `--config`: the program (argv) the `reboot` command runs; `None` refuses reboots.
    pub reboot_command: Option<Vec<String>>,
    /// From `--config`: the firmware version reported in the shadow (`reported.version`).
    pub firmware_version: Option<String>,
    /// From `--config`: the share of its lifetime after which the certificate is renewed
    /// ([`crate::rotate`]), in (0, 1].
    pub renew_at_lifetime_fraction: f64,
    /// From `--config`: the `[update]` table (OTA); `None` refuses updates.
    pub update: Option<crate::ota::agent::UpdateConfig>,
    /// `--gateway-socket` / `[gateway]`: relay for child devices ([`crate::gateway`]);
    /// `None`: not a gateway.
    pub gateway: Option<crate::gateway::GatewayConfig>,
    /// `--local-listen` / `--local-socket` / `[local]`: the local API ([`crate::local`]);
    /// `None`: no local API.
    pub local: Option<crate::local::LocalConfig>,
}

/// A user command handler: an executable given the params JSON on stdin, answering with the
/// output JSON on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecHandler {
    pub exec: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "handler_timeout_default")]
    pub timeout_secs: u64,
}

fn handler_timeout_default() -> u64 {
    HANDLER_TIMEOUT_SECS_DEFAULT
}

/// The agent config file (`--config FILE`, TOML). Everything is optional:
///
/// ```toml
/// firmware_version = "1.4.2"
/// reboot_command = ["/usr/bin/systemctl", "reboot"]
///
/// [handlers.restart_app]
/// exec = "/usr/local/bin/restart-app"
/// args = ["--graceful"]
/// timeout_secs = 60
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub reboot_command: Option<Vec<String>>,
    #[serde(default)]
    pub handlers: BTreeMap<String, ExecHandler>,
    /// Renew the certificate after this share of its lifetime (default 2/3).
    #[serde(default)]
    pub renew_at_lifetime_fraction: Option<f64>,
    /// Over-the-air updates (docs/agent.md, "Updates").
    #[serde(default)]
    pub update: Option<crate::ota::agent::UpdateConfig>,
    /// Gateway mode (`socket`, `children_max`); `--gateway-socket` overrides the socket.
    #[serde(default)]
    pub gateway: Option<crate::gateway::GatewayConfig>,
    /// The local API (`listen`, `socket`); `--local-listen` / `--local-socket` override.
    #[serde(default)]
    pub local: Option<crate::local::LocalConfig>,
}

impl AgentFile {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::File(m) => ConfigError::File(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: AgentFile = toml::from_str(text).map_err(|e| ConfigError::File(e.to_string()))?;
        file.validate()?;
        Ok(file)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::File(m));
        if self.handlers.len() > HANDLERS_MAX {
            return bad(format!("at most {HANDLERS_MAX} handlers"));
        }
        if let Some(f) = self.renew_at_lifetime_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!(
                    "renew_at_lifetime_fraction must be in (0, 1], not {f}"
                ));
            }
        }
        for (name, h) in &self.handlers {
            if !mooring_proto::command::is_valid_command_name(name) {
                return bad(format!("handler name {name:?} is not a valid command name"));
            }
            if BUILTIN_HANDLERS.contains(&name.as_str()) {
                return bad(format!("handler name {name:?} is built in"));
            }
            if h.exec.as_os_str().is_empty() {
                return bad(format!("handlers.{name}.exec is empty"));
            }
            if h.timeout_secs == 0 || h.timeout_secs > HANDLER_TIMEOUT_SECS_MAX {
                return bad(format!(
                    "handlers.{name}.timeout_secs must be 1..={HANDLER_TIMEOUT_SECS_MAX}"
                ));
            }
        }
        if let Some(u) = &self.update {
            u.validate().map_err(ConfigError::File)?;
        }
        if let Some(g) = &self.gateway {
            g.validate().map_err(ConfigError::File)?;
        }
        if let Some(l) = &self.local {
            l.validate().map_err(ConfigError::File)?;
        }
        if self.reboot_command.as_ref().is_some_and(|c| c.is_empty()) {
            return bad("reboot_command is empty (leave it out to refuse reboots)".into());
        }
        Ok(())
    }

    /// Copies the file's settings into `config`.
    pub fn apply(self, config: &mut AgentConfig) {
        config.firmware_version = self.firmware_version;
        config.reboot_command = self.reboot_command;
        config.handlers = self.handlers;
        config.update = self.update;
        if self.gateway.is_some() {
            config.gateway = self.gateway;
        }
        if self.local.is_some() {
            config.local = self.local;
        }
        if let Some(f) = self.renew_at_lifetime_fraction {
            config.renew_at_lifetime_fraction = f;
        }
    }
}

impl AgentConfig {
    /// A config with every optional setting at its default.
    pub fn new(
        server_host: impl Into<String>,
        server_port: u16,
        cert_path: impl Into<PathBuf>,
        key: impl Into<crate::key::KeyRef>,
        ca_path: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            server_host: server_host.into(),
            server_port,
            cert_path: cert_path.into(),
            key: key.into(),
            ca_path: ca_path.into(),
            state_dir: state_dir.into(),
            interval_secs: INTERVAL_SECS_DEFAULT,
            input: None,
            exit_when_drained: false,
            outbox_max: OUTBOX_MAX_DEFAULT,
            keepalive_secs: KEEPALIVE_SECS_DEFAULT,
            jitter_seed: None,
            handlers: BTreeMap::new(),
            reboot_command: None,
            firmware_version: None,
            renew_at_lifetime_fraction: crate::rotate::RENEW_AT_LIFETIME_FRACTION_DEFAULT,
            update: None,
            gateway: None,
            local: None,
        }
    }

    /// Checks what can be checked without touching the disk or the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server_host.is_empty() {
            return Err(ConfigError::BadServer("empty host".into()));
        }
        if self.server_port == 0 {
            return Err(ConfigError::BadServer("port 0".into()));
        }
        if self.outbox_max == 0 {
            return Err(ConfigError::Invalid("--outbox-max must be at least 1"));
        }
        if self.keepalive_secs < 5 {
            return Err(ConfigError::Invalid("keepalive must be at least 5 seconds"));
        }
        if let Some(g) = &self.gateway {
            g.validate().map_err(ConfigError::File)?;
        }
        if let Some(l) = &self.local {
            l.validate().map_err(ConfigError::File)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--server must be HOST:PORT (e.g. mooring.example.com:8883 or [::1]:8883): {0}")]
    BadServer(String),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("config file: {0}")]
    File(String),
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6 literals) into host and port.
pub fn parse_server(s: &str) -> Result<(String, u16), ConfigError> {
    let bad = |why: &str| ConfigError::BadServer(format!("{s:?}: {why}"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, rest) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = rest.strip_prefix(':').ok_or_else(|| bad("missing :PORT"))?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
        if host.contains(':') {
            return Err(bad("IPv6 addresses must be written [addr]:PORT"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_forms() {
        assert_eq!(
            parse_server("127.0.0.1:8883"),
            Ok(("127.0.0.1".into(), 8883))
        );
        assert_eq!(
            parse_server("mooring.example.com:1"),
            Ok(("mooring.example.com".into(), 1))
        );
        assert_eq!(parse_server("[::1]:8883"), Ok(("::1".into(), 8883)));
        for bad in [
            "", "host", "host:", ":80", "host:0", "host:x", "::1:80", "[::1]80",
        ] {
            assert!(parse_server(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn input_dash_is_stdin() {
        assert_eq!(InputSource::from_arg("-"), InputSource::Stdin);
        assert_eq!(
            InputSource::from_arg("x.jsonl"),
            InputSource::File("x.jsonl".into())
        );
    }

    #[test]
    fn config_file_parses_and_rejects_mistakes() {
        let f = AgentFile::parse(
            r#"
            firmware_version = "1.4.2"
            reboot_command = ["/bin/true"]
            [handlers.restart_app]
            exec = "/usr/local/bin/restart-app"
            args = ["--soft"]
            "#,
        )
        .expect("valid file");
        assert_eq!(f.firmware_version.as_deref(), Some("1.4.2"));
        let h = &f.handlers["restart_app"];
        assert_eq!(h.args, vec!["--soft"]);
        assert_eq!(h.timeout_secs, HANDLER_TIMEOUT_SECS_DEFAULT);
        for bad in [
            "nope = 1",
            "[handlers.ping]\nexec = \"/bin/true\"",
            "[handlers.x]\nexec = \"/bin/true\"\ntimeout_secs = 0",
            "[handlers.x]\nexec = \"/bin/true\"\nextra = 1",
            "[handlers.\"a b\"]\nexec = \"/bin/true\"",
            "reboot_command = []",
            "renew_at_lifetime_fraction = 0",
            "renew_at_lifetime_fraction = 1.5",
            "renew_at_lifetime_fraction = nan",
        ] {
            assert!(AgentFile::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            AgentFile::parse("").expect("empty is fine"),
            AgentFile::default()
        );
    }

    #[test]
    fn the_gateway_table_sets_gateway_mode() {
        let mut c = AgentConfig::new("h", 8883, "c", "k", "ca", "s");
        AgentFile::parse("[gateway]\nsocket = \"/run/mooring/gw.sock\"")
            .expect("valid")
            .apply(&mut c);
        let g = c.gateway.clone().expect("gateway");
        assert_eq!(g.socket, PathBuf::from("/run/mooring/gw.sock"));
        assert_eq!(g.children_max, crate::gateway::CHILDREN_MAX_DEFAULT);
        assert!(c.validate().is_ok());
        let f = AgentFile::parse("[gateway]\nsocket = \"/x\"\nchildren_max = 3").expect("valid");
        assert_eq!(f.gateway.map(|g| g.children_max), Some(3));
        for bad in [
            "[gateway]\nchildren_max = 3",
            "[gateway]\nsocket = \"\"",
            "[gateway]\nsocket = \"/x\"\nchildren_max = 0",
            "[gateway]\nsocket = \"/x\"\nother = 1",
        ] {
            assert!(AgentFile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_renewal_share_defaults_to_two_thirds_and_the_file_sets_it() {
        let mut c = AgentConfig::new("h", 8883, "c", "k", "ca", "s");
        assert_eq!(c.renew_at_lifetime_fraction, 2.0 / 3.0);
        AgentFile::parse("renew_at_lifetime_fraction = 0.5")
            .expect("valid")
            .apply(&mut c);
        assert_eq!(c.renew_at_lifetime_fraction, 0.5);
        AgentFile::parse("").expect("valid").apply(&mut c);
        assert_eq!(c.renew_at_lifetime_fraction, 0.5, "kept when not given");
    }

    #[test]
    fn defaults_validate() {
        let c = AgentConfig::new("h", 8883, "c", "k", "ca", "s");
        assert_eq!(c.interval_secs, 60);
        assert_eq!(c.outbox_max, 100_000);
        assert!(c.validate().is_ok());
        let c = AgentConfig { outbox_max: 0, ..c };
        assert!(c.validate().is_err());
    }
}
