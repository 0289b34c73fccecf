//! `--restart`: what the background runner of a `-d` container does when the container's first
//! process exits (docker's policies). The runner keeps the policy; there is no daemon, so
//! `unless-stopped` behaves as `always` (nothing restarts containers after the host reboots).
//!
//! A restart runs the same spec again in the same container: the same name, id, log and (with
//! `--isolation container`) writable layer; a microVM boots again. `mvm stop` and `mvm rm -f`
//! mark the record stopped by the user first, so the runner never restarts what they end.
//! Between runs the runner waits docker's back-off: 100 ms, doubling each time up to a minute,
//! from 100 ms again after a run that lasted 10 seconds or more.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{bad_input, Error};

/// The first wait before a restart.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A run at least this long starts the back-off over.
const RESET_AFTER: Duration = Duration::from_secs(10);

/// When the runner runs the container again after it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RestartPolicy {
    /// Never (the default).
    #[default]
    No,
    /// After a non-zero exit code, at most `max_retries` times (None: no limit).
    OnFailure {
        /// The most restarts (`on-failure:N`; N > 0).
        max_retries: Option<u32>,
    },
    /// After every exit, until stopped.
    Always,
    /// As `always` (mvm has no daemon whose restart could tell them apart).
    UnlessStopped,
}

impl RestartPolicy {
    /// Whether a container that exited with `code`, after `restarts` restarts so far, runs
    /// again; never once the user stopped it.
    pub fn restarts(self, code: i32, restarts: u32, stopped_by_user: bool) -> bool {
        if stopped_by_user {
            return false;
        }
        match self {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure { max_retries } => {
                code != 0 && max_retries.is_none_or(|max| restarts < max)
            }
            RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
        }
    }

    /// Whether the policy ever restarts.
    pub fn any(self) -> bool {
        self != RestartPolicy::No
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::No => f.write_str("no"),
            RestartPolicy::OnFailure { max_retries: None } => f.write_str("on-failure"),
            RestartPolicy::OnFailure {
                max_retries: Some(n),
            } => write!(f, "on-failure:{n}"),
            RestartPolicy::Always => f.write_str("always"),
            RestartPolicy::UnlessStopped => f.write_str("unless-stopped"),
        }
    }
}

impl FromStr for RestartPolicy {
    type Err = Error;

    /// `no`, `on-failure`, `on-failure:N`, `always`, `unless-stopped` (`on-failure:0` is
    /// docker's "no limit").
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| bad_input(format!("invalid --restart {s:?}: {why}"));
        let (name, count) = match s.split_once(':') {
            Some((name, count)) => (name, Some(count)),
            None => (s, None),
        };
        let policy = match name {
            "no" => RestartPolicy::No,
            "on-failure" => RestartPolicy::OnFailure { max_retries: None },
            "always" => RestartPolicy::Always,
            "unless-stopped" => RestartPolicy::UnlessStopped,
            _ => return Err(bad("use no, on-failure[:N], always or unless-stopped")),
        };
        match (policy, count) {
            (_, None) => Ok(policy),
            (RestartPolicy::OnFailure { .. }, Some(n)) => {
                let n: u32 = n
                    .parse()
                    .map_err(|_| bad("the retry count is a whole number"))?;
                Ok(RestartPolicy::OnFailure {
                    max_retries: (n > 0).then_some(n),
                })
            }
            (_, Some(_)) => Err(bad("only on-failure takes a retry count")),
        }
    }
}

impl TryFrom<String> for RestartPolicy {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<RestartPolicy> for String {
    fn from(p: RestartPolicy) -> String {
        p.to_string()
    }
}

/// docker's wait between restarts.
#[derive(Debug, Default)]
pub struct Backoff {
    last: Option<Duration>,
}

impl Backoff {
    /// The wait before the next run, after a run that lasted `ran`.
    pub fn next(&mut self, ran: Duration) -> Duration {
        let delay = match self.last {
            Some(last) if ran < RESET_AFTER => (last * 2).min(MAX_DELAY),
            _ => FIRST_DELAY,
        };
        self.last = Some(delay);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_as_docker_writes_them_and_print_back() {
        for (text, policy) in [
            ("no", RestartPolicy::No),
            ("on-failure", RestartPolicy::OnFailure { max_retries: None }),
            (
                "on-failure:2",
                RestartPolicy::OnFailure {
                    max_retries: Some(2),
                },
            ),
            ("always", RestartPolicy::Always),
            ("unless-stopped", RestartPolicy::UnlessStopped),
        ] {
            assert_eq!(text.parse::<RestartPolicy>().unwrap(), policy);
            assert_eq!(policy.to_string(), text);
            let json = serde_json::to_string(&policy).unwrap();
            assert_eq!(
                serde_json::from_str::<RestartPolicy>(&json).unwrap(),
                policy
            );
        }
        assert_eq!(
            "on-failure:0".parse::<RestartPolicy>().unwrap(),
            RestartPolicy::OnFailure { max_retries: None }
        );
        for bad in ["sometimes", "always:3", "on-failure:-1", "on-failure:x", ""] {
            let err = bad.parse::<RestartPolicy>().unwrap_err().to_string();
            assert!(err.contains("--restart"), "{bad}: {err}");
        }
    }

    #[test]
    fn each_policy_restarts_what_docker_restarts() {
        let two = RestartPolicy::OnFailure {
            max_retries: Some(2),
        };
        assert!(!RestartPolicy::No.restarts(1, 0, false));
        assert!(two.restarts(3, 0, false) && two.restarts(3, 1, false));
        assert!(!two.restarts(3, 2, false), "at most two restarts");
        assert!(!two.restarts(0, 0, false), "success is not a failure");
        assert!(RestartPolicy::OnFailure { max_retries: None }.restarts(1, 1000, false));
        for p in [RestartPolicy::Always, RestartPolicy::UnlessStopped] {
            assert!(p.restarts(0, 5, false) && p.restarts(137, 5, false));
            assert!(!p.restarts(143, 0, true), "the user stopped it");
        }
    }

    #[test]
    fn the_wait_doubles_to_a_minute_and_starts_over_after_a_long_run() {
        let mut b = Backoff::default();
        let short = Duration::from_secs(1);
        let waits: Vec<_> = (0..5).map(|_| b.next(short).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600]);
        for _ in 0..20 {
            b.next(short);
        }
        assert_eq!(b.next(short), MAX_DELAY);
        assert_eq!(b.next(Duration::from_secs(30)), FIRST_DELAY);
    }
}
