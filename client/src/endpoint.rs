//! Endpoint addresses: parsing `host:port` strings into a canonical form.
//!
//! Invariant: an [`EndpointAddr`] always holds a canonical `host:port` string (no scheme, no
//! path, a non-zero port, IPv6 hosts in brackets) together with the tonic endpoint built from it,
//! so a value that exists can always be dialled. Canonical strings are what the router compares to
//! decide whether a leader hint names an endpoint it already has a channel for; `127.0.0.1:7379`
//! and `http://127.0.0.1:7379/` must therefore become the same value, or the client would open a
//! second channel to the same node for every hint.
//!
//! Only plain-text HTTP/2 is spoken for now: an `https://` endpoint is rejected rather than
//! silently downgraded.

use std::fmt;

use tonic::transport::Endpoint;

use crate::error::ClientError;

/// A validated, canonical `host:port` endpoint.
#[derive(Clone)]
pub struct EndpointAddr {
    canonical: String,
    endpoint: Endpoint,
}

impl EndpointAddr {
    /// Parses `host:port`, `[v6]:port` or `http://host:port[/]`.
    pub fn parse(raw: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::Config(format!("invalid endpoint {raw:?}: {reason}"));
        let trimmed = raw.trim();
        let lower = trimmed.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(bad("TLS endpoints are not supported; use host:port"));
        }
        let rest = if lower.starts_with("http://") {
            &trimmed["http://".len()..]
        } else {
            trimmed
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(bad("empty"));
        }
        if rest
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'))
        {
            return Err(bad("expected host:port"));
        }
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("missing port (expected host:port)"))?;
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.contains(':') && !bracketed {
            return Err(bad("IPv6 hosts must be written in brackets, e.g. [::1]:7379"));
        }
        if bracketed && host.len() == 2 {
            return Err(bad("missing host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("port must be a number between 1 and 65535"))?;
        if port == 0 {
            return Err(bad("port must be a number between 1 and 65535"));
        }
        let canonical = format!("{}:{port}", host.to_ascii_lowercase());
        let endpoint = Endpoint::from_shared(format!("http://{canonical}"))
            .map_err(|e| bad(&format!("not a valid URI authority ({e})")))?;
        Ok(Self { canonical, endpoint })
    }

    /// The canonical `host:port`.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    /// The tonic endpoint for this address, without any timeouts configured.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl PartialEq for EndpointAddr {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for EndpointAddr {}

impl fmt::Debug for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EndpointAddr").field(&self.canonical).finish()
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// Splits a comma-separated endpoint list (the form `--endpoints` and `BASALT_ENDPOINTS` take)
/// and validates each entry, so a typo is reported before any connection is attempted.
pub fn parse_endpoint_list(list: &str) -> Result<Vec<String>, ClientError> {
    let mut out = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(ClientError::Config(format!("empty entry in endpoint list {list:?}")));
        }
        out.push(EndpointAddr::parse(part)?.as_str().to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(raw: &str) -> String {
        EndpointAddr::parse(raw)
            .unwrap_or_else(|e| panic!("{raw:?} should parse: {e}"))
            .as_str()
            .to_owned()
    }

    #[test]
    fn accepts_and_canonicalises() {
        assert_eq!(canon("127.0.0.1:7379"), "127.0.0.1:7379");
        assert_eq!(canon("  node-1.example:80 "), "node-1.example:80");
        assert_eq!(canon("HTTP://Node-1:7379/"), "node-1:7379");
        assert_eq!(canon("[::1]:7379"), "[::1]:7379");
        assert_eq!(canon("localhost:65535"), "localhost:65535");
    }

    #[test]
    fn rejects_malformed_endpoints() {
        for raw in [
            "",
            "   ",
            "127.0.0.1",
            ":7379",
            "host:",
            "host:0",
            "host:65536",
            "host:port",
            "::1:7379",
            "[]:7379",
            "host:7379/path",
            "user@host:7379",
            "https://host:7379",
            "ho st:7379",
        ] {
            match EndpointAddr::parse(raw) {
                Err(ClientError::Config(msg)) => {
                    assert!(msg.contains("invalid endpoint"), "{raw:?}: {msg}")
                }
                other => panic!("{raw:?} should be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn equality_is_on_the_canonical_form() {
        let a = EndpointAddr::parse("http://a:1").expect("valid");
        let b = EndpointAddr::parse("A:1").expect("valid");
        assert_eq!(a, b);
        assert_ne!(a, EndpointAddr::parse("a:2").expect("valid"));
    }

    #[test]
    fn endpoint_lists() {
        assert_eq!(
            parse_endpoint_list("a:1, b:2 ,c:3").expect("valid list"),
            ["a:1", "b:2", "c:3"]
        );
        assert!(matches!(
            parse_endpoint_list("a:1,,b:2"),
            Err(ClientError::Config(m)) if m.contains("empty entry")
        ));
        assert!(parse_endpoint_list("a:1,b").is_err());
    }
}
