//! The client's configuration: where the cluster is and how long to keep trying.
//!
//! Invariants checked by [`ClientConfig::validate`] (and therefore by `Client::connect`): at least
//! one endpoint, every endpoint a well-formed `host:port`, non-zero timeouts, and
//! `backoff_initial <= backoff_max`. They are checked once, up front, so that the retry loop can
//! rely on them instead of failing halfway through a call with a configuration problem.

use std::time::Duration;

use crate::endpoint::EndpointAddr;
use crate::error::ClientError;
use crate::read_mode::ReadMode;

/// How a [`crate::Client`] finds the cluster and how long it keeps retrying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Seed endpoints, each `host:port` (an `http://` prefix is accepted). More are learned from
    /// the servers' leader hints.
    pub endpoints: Vec<String>,
    /// Limit for one attempt against one endpoint; a slow node is abandoned after it.
    pub attempt_timeout: Duration,
    /// Limit for a whole call, all retries included.
    pub deadline: Duration,
    /// Backoff before the first retry that has no leader hint to follow.
    pub backoff_initial: Duration,
    /// Ceiling of the exponential backoff.
    pub backoff_max: Duration,
    /// The read mode of handles that do not choose one ([`crate::Client::with_read_mode`]);
    /// `KeyspaceDefault` (the default) leaves it to each keyspace.
    pub read_mode: ReadMode,
}

impl ClientConfig {
    /// Default limit for one attempt.
    pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default limit for one call, retries included.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
    /// Default first backoff.
    pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(20);
    /// Default backoff ceiling.
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(500);

    /// A configuration with the given seed endpoints and the default timeouts.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            attempt_timeout: Self::DEFAULT_ATTEMPT_TIMEOUT,
            deadline: Self::DEFAULT_DEADLINE,
            backoff_initial: Self::DEFAULT_BACKOFF_INITIAL,
            backoff_max: Self::DEFAULT_BACKOFF_MAX,
            read_mode: ReadMode::KeyspaceDefault,
        }
    }

    /// Checks the invariants listed in the module documentation and returns the parsed seed
    /// endpoints, duplicates removed (keeping the first occurrence, so the caller's order is the
    /// order in which endpoints are tried).
    pub(crate) fn validate(&self) -> Result<Vec<EndpointAddr>, ClientError> {
        if self.endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        for (name, value) in [
            ("attempt_timeout", self.attempt_timeout),
            ("deadline", self.deadline),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
        ] {
            if value.is_zero() {
                return Err(ClientError::Config(format!("{name} must be greater than zero")));
            }
        }
        if self.backoff_initial > self.backoff_max {
            return Err(ClientError::Config(format!(
                "backoff_initial ({:?}) exceeds backoff_max ({:?})",
                self.backoff_initial, self.backoff_max
            )));
        }
        let mut parsed: Vec<EndpointAddr> = Vec::with_capacity(self.endpoints.len());
        for raw in &self.endpoints {
            let addr = EndpointAddr::parse(raw)?;
            if !parsed.contains(&addr) {
                parsed.push(addr);
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let cfg = ClientConfig::new(["127.0.0.1:7379"]);
        assert_eq!(cfg.attempt_timeout, Duration::from_secs(2));
        assert_eq!(cfg.deadline, Duration::from_secs(10));
        assert_eq!(cfg.backoff_initial, Duration::from_millis(20));
        assert_eq!(cfg.backoff_max, Duration::from_millis(500));
    }

    #[test]
    fn validate_dedups_and_keeps_order() {
        let cfg = ClientConfig::new(["b:2", "a:1", "http://b:2", "a:1"]);
        let eps = cfg.validate().expect("valid config");
        let names: Vec<_> = eps.iter().map(|e| e.as_str().to_owned()).collect();
        assert_eq!(names, ["b:2", "a:1"]);
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let empty = ClientConfig::new(Vec::<String>::new());
        assert!(matches!(empty.validate(), Err(ClientError::Config(_))));

        let mut zero = ClientConfig::new(["a:1"]);
        zero.deadline = Duration::ZERO;
        assert!(matches!(zero.validate(), Err(ClientError::Config(m)) if m.contains("deadline")));

        let mut inverted = ClientConfig::new(["a:1"]);
        inverted.backoff_initial = Duration::from_secs(1);
        inverted.backoff_max = Duration::from_millis(1);
        assert!(matches!(inverted.validate(), Err(ClientError::Config(m)) if m.contains("backoff")));

        let bad = ClientConfig::new(["a:1", "nope"]);
        assert!(matches!(bad.validate(), Err(ClientError::Config(m)) if m.contains("nope")));
    }
}
