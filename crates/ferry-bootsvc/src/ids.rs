//! The identifiers nodes are known by: xnames (SMD's component IDs) and MAC
//! addresses. Both are normalised on the way in, so that every lookup can
//! compare strings: xnames lowercase without leading zeros (as SMD does),
//! MACs lowercase with colons (so `AA:BB:…` and `aa:bb:…` are one node).

use std::fmt::Write as _;

/// Why an identifier was refused. The message names what was wrong; the
/// caller adds the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not an xname of a kind the service knows.
    #[error("'{0}' is not a valid xname (e.g. x1000c0s0b0n0)")]
    Xname(String),
    /// Not six hexadecimal octets.
    #[error("'{0}' is not a valid MAC address (e.g. 02:00:00:00:00:01)")]
    Mac(String),
}

/// A normalised xname and the HMS component type it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xname {
    /// Lowercase, no leading zeros: `x1000c0s0b0n0`.
    pub id: String,
    /// HMS type: `Node`, `NodeBMC`, `ComputeModule`, `Chassis`, `Cabinet`, …
    pub kind: &'static str,
}

/// The xname shapes accepted, as letter sequences after the cabinet's `x`,
/// and the HMS type each names.
const SHAPES: &[(&str, &str)] = &[
    ("x", "Cabinet"),
    ("xc", "Chassis"),
    ("xcs", "ComputeModule"),
    ("xcsb", "NodeBMC"),
    ("xcsbn", "Node"),
    ("xcsbnp", "Processor"),
    ("xcse", "NodeEnclosure"),
    ("xcr", "RouterModule"),
    ("xcrb", "RouterBMC"),
    ("xcb", "ChassisBMC"),
    ("xm", "CabinetPDUController"),
];

/// Parses and normalises an xname.
///
/// # Errors
/// [`IdError::Xname`] for anything but `x<N>` followed by the known
/// letter/number pairs.
pub fn parse_xname(text: &str) -> Result<Xname, IdError> {
    let bad = || IdError::Xname(text.to_string());
    let lower = text.trim().to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut letters = String::new();
    let mut id = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let letter = bytes[i];
        if !letter.is_ascii_lowercase() {
            return Err(bad());
        }
        i += 1;
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i || i - start > 6 {
            return Err(bad());
        }
        let number: u32 = lower[start..i].parse().map_err(|_| bad())?;
        letters.push(letter as char);
        let _ = write!(id, "{}{number}", letter as char);
    }
    SHAPES
        .iter()
        .find(|(shape, _)| *shape == letters)
        .map(|(_, kind)| Xname { id, kind })
        .ok_or_else(bad)
}

/// Parses a MAC address written with colons, dashes or nothing between its
/// octets, in either case, into `aa:bb:cc:dd:ee:ff`.
///
/// # Errors
/// [`IdError::Mac`] unless it is six hexadecimal octets.
pub fn parse_mac(text: &str) -> Result<String, IdError> {
    let bad = || IdError::Mac(text.to_string());
    let t = text.trim();
    let hex: String = if t.len() == 12 {
        t.to_string()
    } else if t.len() == 17 {
        let sep = t.as_bytes()[2];
        if sep != b':' && sep != b'-' {
            return Err(bad());
        }
        let parts: Vec<&str> = t.split(sep as char).collect();
        if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
            return Err(bad());
        }
        parts.concat()
    } else {
        return Err(bad());
    };
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let hex = hex.to_ascii_lowercase();
    let octets: Vec<&str> = (0..6).map(|i| &hex[i * 2..i * 2 + 2]).collect();
    Ok(octets.join(":"))
}

/// SMD's EthernetInterface ID for a normalised MAC: lowercase, no colons.
pub fn interface_id(mac: &str) -> String {
    mac.replace([':', '-'], "").to_ascii_lowercase()
}

/// Seconds since the epoch as RFC 3339 UTC (`2026-12-03T23:40:00Z`), the
/// form SMD gives `LastUpdate`, without a date crate for one format.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Now, in seconds since the epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xnames_normalise_and_have_types() {
        let x = parse_xname("X1000C0S0B0N0").unwrap();
        assert_eq!(x.id, "x1000c0s0b0n0");
        assert_eq!(x.kind, "Node");
        assert_eq!(parse_xname("x0001c0s26b0").unwrap().id, "x1c0s26b0");
        assert_eq!(parse_xname("x3000c0s26b0").unwrap().kind, "NodeBMC");
        for bad in [
            "",
            "node1",
            "x",
            "x1000c",
            "x1000c0s0b0n0q1",
            "x1000-c0",
            "c0x1",
        ] {
            assert!(parse_xname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_normalise() {
        assert_eq!(parse_mac("AA:BB:CC:00:11:22").unwrap(), "aa:bb:cc:00:11:22");
        assert_eq!(parse_mac("aa-bb-cc-00-11-22").unwrap(), "aa:bb:cc:00:11:22");
        assert_eq!(parse_mac("aabbcc001122").unwrap(), "aa:bb:cc:00:11:22");
        for bad in [
            "",
            "aa:bb:cc:00:11",
            "zz:bb:cc:00:11:22",
            "aa:bb:cc:00:11:22:33",
            "aa:bb-cc:00:11:22",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(interface_id("aa:bb:cc:00:11:22"), "aabbcc001122");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
