//! The sequential specification of one key: a register that is absent or holds a value.
//!
//! - `read` returns the current value (`None` if absent) and changes nothing;
//! - `write(v)` sets the value to `v`;
//! - `cas(expected, new)` compares the current value with `expected` (`None` = "expect
//!   absent"); if they are equal it sets `new`, otherwise it changes nothing.
//!
//! Convention shared with the workload that records histories: a CAS the store answered with
//! "comparison failed" is recorded as `fail`, because it definitely had no effect; so every CAS
//! the checkers see either succeeded (`ok`) or has an unknown outcome. [`Register::step`]
//! therefore only accepts a CAS at a point where its comparison succeeds: an unknown CAS whose
//! comparison would fail is indistinguishable from one that never ran, and leaving it out of the
//! linearization already covers that case.
//!
//! The register is generic over the value type so the checker can run it on small interned ids
//! instead of strings, with the very same semantics as the reference used to generate tests.

/// An operation's input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RegisterOp<V> {
    Read,
    Write(V),
    Cas { expected: Option<V>, new: V },
}

/// What the register answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Response<V> {
    Read(Option<V>),
    Written,
    CasApplied,
    CasFailed,
}

/// One key's state. Starts absent, as every key of a fresh store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Register<V> {
    value: Option<V>,
}

impl<V> Default for Register<V> {
    fn default() -> Self {
        Register { value: None }
    }
}

impl<V: Clone + Eq> Register<V> {
    pub fn new(value: Option<V>) -> Self {
        Register { value }
    }

    pub fn value(&self) -> Option<&V> {
        self.value.as_ref()
    }

    /// Runs `op` as the real register does and returns its answer.
    pub fn apply(&mut self, op: &RegisterOp<V>) -> Response<V> {
        match op {
            RegisterOp::Read => Response::Read(self.value.clone()),
            RegisterOp::Write(v) => {
                self.value = Some(v.clone());
                Response::Written
            }
            RegisterOp::Cas { expected, new } => {
                if self.value == *expected {
                    self.value = Some(new.clone());
                    Response::CasApplied
                } else {
                    Response::CasFailed
                }
            }
        }
    }

    /// Whether `op`, observed to answer `observed` (`None`: outcome unknown, any answer), can
    /// take effect at this point of a linearization; if so, the state after it.
    ///
    /// A CAS is only accepted where it applies: see the module documentation.
    pub fn step(&self, op: &RegisterOp<V>, observed: Option<&Response<V>>) -> Option<Self> {
        let mut next = self.clone();
        let response = next.apply(op);
        if response == Response::CasFailed {
            return None;
        }
        match observed {
            Some(observed) if *observed != response => None,
            _ => Some(next),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_follows_the_specification() {
        let mut r = Register::<&str>::default();
        assert_eq!(r.apply(&RegisterOp::Read), Response::Read(None));
        assert_eq!(
            r.apply(&RegisterOp::Cas {
                expected: Some("a"),
                new: "b"
            }),
            Response::CasFailed
        );
        assert_eq!(r.value(), None);
        assert_eq!(
            r.apply(&RegisterOp::Cas {
                expected: None,
                new: "a"
            }),
            Response::CasApplied
        );
        assert_eq!(r.apply(&RegisterOp::Read), Response::Read(Some("a")));
        assert_eq!(
            r.apply(&RegisterOp::Cas {
                expected: None,
                new: "c"
            }),
            Response::CasFailed
        );
        assert_eq!(r.apply(&RegisterOp::Write("b")), Response::Written);
        assert_eq!(
            r.apply(&RegisterOp::Cas {
                expected: Some("b"),
                new: "c"
            }),
            Response::CasApplied
        );
        assert_eq!(r.value(), Some(&"c"));
    }

    #[test]
    fn step_checks_the_observed_answer_and_rejects_failed_cas() {
        let r = Register::new(Some("a"));
        assert_eq!(
            r.step(&RegisterOp::Read, Some(&Response::Read(Some("a")))),
            Some(r.clone())
        );
        assert_eq!(r.step(&RegisterOp::Read, Some(&Response::Read(None))), None);
        assert_eq!(r.step(&RegisterOp::Write("b"), None), Some(Register::new(Some("b"))));
        let cas = RegisterOp::Cas {
            expected: Some("a"),
            new: "b",
        };
        assert_eq!(
            r.step(&cas, Some(&Response::CasApplied)),
            Some(Register::new(Some("b")))
        );
        assert_eq!(r.step(&cas, None), Some(Register::new(Some("b"))));
        let stale_cas = RegisterOp::Cas {
            expected: None,
            new: "b",
        };
        assert_eq!(r.step(&stale_cas, None), None);
        assert_eq!(r.step(&stale_cas, Some(&Response::CasApplied)), None);
    }
}
