//! Request limits and input validation, checked before anything is proposed.
//!
//! Validation happens at the edge so that a bad request changes nothing: it is refused with
//! `INVALID_ARGUMENT` naming the field, before it can reach the log (where it would be replicated,
//! applied on every node and kept in snapshots forever).
//!
//! | limit | value | why |
//! | --- | --- | --- |
//! | key | 1 to 4 096 bytes | keys are copied into every index level; long keys hurt everyone |
//! | value | up to 1 MiB | one Raft entry per write; larger values stall replication of all others |
//! | scan page | up to 10 000 pairs | bounds a response's memory; `more` says to continue |

use basalt_proto::v1::{InvalidArgument, WriteSession};
use basalt_proto::{status_with_detail, ErrorKind};
use tonic::Status;

pub const MAX_KEY_BYTES: usize = 4096;
pub const MAX_VALUE_BYTES: usize = 1 << 20;
pub const MAX_SCAN_LIMIT: u32 = 10_000;

pub fn invalid(field: &str, reason: impl Into<String>) -> Status {
    let reason = reason.into();
    status_with_detail(
        format!("invalid {field}: {reason}"),
        ErrorKind::InvalidArgument(InvalidArgument {
            field: field.to_string(),
            reason,
        }),
    )
}

pub fn check_key(field: &str, key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(
            field,
            format!("{} bytes is over the {MAX_KEY_BYTES}-byte limit", key.len()),
        ));
    }
    Ok(())
}

pub fn check_value(field: &str, value: &[u8]) -> Result<(), Status> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(invalid(
            field,
            format!("{} bytes is over the {MAX_VALUE_BYTES}-byte limit", value.len()),
        ));
    }
    Ok(())
}

/// Checks a scan range; an empty `end` means unbounded. Returns the page size to use.
pub fn check_scan(start: &[u8], end: &[u8], limit: u32) -> Result<usize, Status> {
    if start.len() > MAX_KEY_BYTES {
        return Err(invalid("start", format!("over the {MAX_KEY_BYTES}-byte key limit")));
    }
    if end.len() > MAX_KEY_BYTES {
        return Err(invalid("end", format!("over the {MAX_KEY_BYTES}-byte key limit")));
    }
    if !end.is_empty() && end < start {
        return Err(invalid("end", "must not be below start"));
    }
    Ok(match limit {
        0 => MAX_SCAN_LIMIT,
        n => n.min(MAX_SCAN_LIMIT),
    } as usize)
}

pub fn check_session(s: Option<&WriteSession>) -> Result<Option<basalt_storage::Session>, Status> {
    let Some(s) = s else { return Ok(None) };
    if s.client_id == 0 {
        return Err(invalid("session.client_id", "must not be 0"));
    }
    if s.sequence == 0 {
        return Err(invalid("session.sequence", "sequences start at 1"));
    }
    if s.acked_through >= s.sequence {
        return Err(invalid(
            "session.acked_through",
            "must be below the write's own sequence",
        ));
    }
    Ok(Some(basalt_storage::Session {
        client_id: s.client_id,
        sequence: s.sequence,
        acked_through: s.acked_through,
    }))
}

/// A member address is `host:port`: an IP address (IPv6 in brackets) or a DNS name, and a port
/// from 1 to 65535. Names are not resolved here: the member being added may well run on a
/// machine that this node will only reach once it is up, and peers resolve the name when they
/// connect.
pub fn check_member_address(field: &str, addr: &str) -> Result<(), Status> {
    let bad = |why: &str| invalid(field, format!("{addr:?} is not HOST:PORT: {why}"));
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port must be a number from 1 to 65535")),
    }
    let labels_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !labels_ok {
        return Err(bad("the host is neither an IP address nor a DNS name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn member_addresses_may_be_ips_or_names() {
        for good in ["127.0.0.1:7401", "[::1]:7401", "n1:7379", "db-3.example.com:7379"] {
            assert!(check_member_address("address", good).is_ok(), "{good}");
        }
        for bad in [
            "", "n1", "n1:0", "n1:99999", ":7379", "a b:1", "-x:1", "x..y:1", "::1:7401",
        ] {
            assert!(check_member_address("address", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_must_be_non_empty_and_bounded() {
        assert_eq!(check_key("key", b"").unwrap_err().code(), Code::InvalidArgument);
        assert!(check_key("key", &vec![b'k'; MAX_KEY_BYTES]).is_ok());
        assert!(check_key("key", &vec![b'k'; MAX_KEY_BYTES + 1]).is_err());
    }

    #[test]
    fn values_are_bounded_but_may_be_empty() {
        assert!(check_value("value", b"").is_ok());
        assert!(check_value("value", &vec![0; MAX_VALUE_BYTES]).is_ok());
        assert!(check_value("value", &vec![0; MAX_VALUE_BYTES + 1]).is_err());
    }

    #[test]
    fn scan_end_below_start_is_refused_and_limit_capped() {
        assert!(check_scan(b"b", b"a", 10).is_err());
        assert_eq!(check_scan(b"a", b"", 0).unwrap(), MAX_SCAN_LIMIT as usize);
        assert_eq!(check_scan(b"a", b"b", 5).unwrap(), 5);
        assert_eq!(check_scan(b"a", b"a", 99_999).unwrap(), MAX_SCAN_LIMIT as usize);
    }

    #[test]
    fn sessions_are_checked() {
        let s = |c, q, a| WriteSession {
            client_id: c,
            sequence: q,
            acked_through: a,
        };
        assert!(check_session(Some(&s(0, 1, 0))).is_err());
        assert!(check_session(Some(&s(1, 0, 0))).is_err());
        assert!(check_session(Some(&s(1, 3, 3))).is_err());
        assert_eq!(check_session(Some(&s(7, 3, 2))).unwrap().unwrap().sequence, 3);
        assert!(check_session(None).unwrap().is_none());
    }
}
