//! Provisioning (issue 16): claim tokens and enrollment with a device's own key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// `POST /api/v1/claims`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClaim {
    /// How many devices (keys) may enroll with the token; default 1 (single use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Lifetime in milliseconds (default 24 h, at most `[provisioning] claim_ttl_max_ms`,
    /// 365 d by default). Give this or `ttl`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Lifetime as text: a number and a unit, `s`, `m`, `h` or `d` (`24h`, `30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Tags every device enrolled with it gets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The server chooses device ids (`d-` + 12 hex digits); a proposed id is ignored.
    #[serde(default)]
    pub assign_ids: bool,
    /// A name for people (1-128 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A claim as the API shows it (never its token: only a hash of it is stored).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Claim {
    /// `clm_<hex>`.
    pub id: String,
    pub name: Option<String>,
    /// How many devices may enroll with it.
    pub uses_max: u32,
    /// How many have.
    pub uses: u32,
    pub tags: BTreeMap<String, String>,
    pub assign_ids: bool,
    /// `live`, `used` (every use taken), `expired` or `revoked`.
    pub state: String,
    pub expires_at: u64,
    pub created_by: String,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
    /// The devices enrolled with it (`GET /api/v1/claims/{id}` only; at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
}

/// `POST /api/v1/claims`'s answer: the claim and its token, shown only here.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedClaim {
    #[serde(flatten)]
    pub claim: Claim,
    /// The secret (`mct_` + 64 hex digits): the device's MQTT password with username `claim`,
    /// or `claim_token` in `POST /api/v1/provision/enroll`. Shown once.
    pub token: String,
}

/// `GET /api/v1/claims`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClaimList {
    pub claims: Vec<Claim>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `POST /api/v1/provision/enroll` (no API token: the claim token is the credential).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub claim_token: String,
    /// PKCS#10 certificate signing request (PEM) for the device's own key; only its public key
    /// is used.
    pub csr_pem: String,
    /// The id the device proposes (e.g. its serial number); required unless the claim assigns
    /// ids, ignored if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// `POST /api/v1/provision/enroll`'s answer (201 when this request created the device, 200
/// when an earlier one with the same claim and key did: the same certificate again).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollResponse {
    pub device_id: String,
    pub certificate_pem: String,
    /// The fleet CA certificate (PEM): what the server's certificate chains to.
    pub ca_pem: String,
}

/// Parses a duration written as a number and a unit: `s`, `m`, `h` or `d` (`90s`, `24h`,
/// `30d`); milliseconds, or why not.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} needs a unit: s, m, h or d (e.g. 24h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("duration {text:?} must start with a whole number (e.g. 24h)"))?;
    let unit_ms: u64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("duration {text:?}: unit must be s, m, h or d")),
    };
    n.checked_mul(unit_ms)
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_duration_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        for bad in ["", "24", "h", "1.5h", "-1h", "2w", "99999999999999999999d"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
