//! The rules that turn stored records into a trial's final outcome. The scheduler
//! applies them incrementally and the report recomputes them from the store, so both
//! always agree (and a restarted controller rebuilds exactly the same state).

use crate::campaign::EarlyStop;
use crate::campaign::sizing::wilson_half_width;
use proto::wire::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrialStatus {
    /// The trial's outcome: counted.
    Final { attempt: u32, outcome: Outcome },
    /// Last attempt hit an infrastructure error: run again as `attempt`.
    Retry { attempt: u32 },
    /// Every allowed attempt hit an infrastructure error: excluded from statistics.
    Abandoned,
    /// Records still missing.
    Pending,
}

/// Severity used to summarise a trial's inferences into one outcome.
pub fn severity(o: Outcome) -> u8 {
    match o {
        Outcome::Crash => 9,
        Outcome::Hang => 8,
        Outcome::NonFinite => 7,
        Outcome::SdcCritical => 6,
        Outcome::SdcTolerable => 5,
        Outcome::Improved => 4,
        Outcome::Masked => 3,
        Outcome::Refused => 2,
        Outcome::InfraError => 1,
    }
}

/// `recs` = (attempt, input, outcome) of one trial, any order, no duplicates.
pub fn status(recs: &[(u32, u32, Outcome)], n_inputs: usize, max_attempts: u32) -> TrialStatus {
    if recs.is_empty() {
        return TrialStatus::Pending;
    }
    let mut attempts: Vec<u32> = recs.iter().map(|r| r.0).collect();
    attempts.sort_unstable();
    attempts.dedup();
    let mut last_failed = None;
    for a in attempts {
        let group: Vec<&(u32, u32, Outcome)> = recs.iter().filter(|r| r.0 == a).collect();
        if group.iter().any(|r| r.2 == Outcome::Crash) {
            return TrialStatus::Final {
                attempt: a,
                outcome: Outcome::Crash,
            };
        }
        if group.iter().any(|r| r.2 == Outcome::InfraError) {
            last_failed = Some(a);
            continue;
        }
        let mut inputs: Vec<u32> = group.iter().map(|r| r.1).collect();
        inputs.sort_unstable();
        inputs.dedup();
        if inputs.len() >= n_inputs {
            let outcome = if group.iter().any(|r| r.2 == Outcome::Refused) {
                Outcome::Refused
            } else {
                group
                    .iter()
                    .map(|r| r.2)
                    .max_by_key(|o| severity(*o))
                    .unwrap_or(Outcome::Masked)
            };
            return TrialStatus::Final {
                attempt: a,
                outcome,
            };
        }
        return TrialStatus::Pending;
    }
    match last_failed {
        Some(a) if a + 1 >= max_attempts => TrialStatus::Abandoned,
        Some(a) => TrialStatus::Retry { attempt: a + 1 },
        None => TrialStatus::Pending,
    }
}

/// Whether a final outcome counts in a stratum's n (refusals and abandoned trials do not).
pub fn counts(o: Outcome) -> bool {
    !matches!(o, Outcome::Refused | Outcome::InfraError)
}

/// Early stop over a stratum's trials in list order: `finals[i]` is the i-th trial's
/// final outcome if known. Returns the prefix length at which the stratum stopped.
/// Only the contiguous finished prefix is looked at, so the stop point depends on the
/// list and the outcomes, never on which board finished first.
pub fn early_stop_point(
    finals: impl Iterator<Item = Option<Outcome>>,
    es: &EarlyStop,
) -> Option<u64> {
    let mut n = 0u64;
    let mut k = 0u64;
    for f in finals {
        let o = f?;
        if !counts(o) {
            continue;
        }
        n += 1;
        if o.is_failure() {
            k += 1;
        }
        if n >= es.min_trials
            && (n - es.min_trials).is_multiple_of(es.check_every)
            && wilson_half_width(k, n) <= es.margin
        {
            return Some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn final_needs_every_input() {
        assert_eq!(status(&[(0, 0, Masked)], 2, 3), TrialStatus::Pending);
        assert_eq!(
            status(&[(0, 0, Masked), (0, 1, SdcCritical)], 2, 3),
            TrialStatus::Final {
                attempt: 0,
                outcome: SdcCritical
            }
        );
    }

    #[test]
    fn infra_errors_retry_then_abandon_but_crash_is_final() {
        assert_eq!(
            status(&[(0, 0, InfraError)], 2, 3),
            TrialStatus::Retry { attempt: 1 }
        );
        assert_eq!(
            status(&[(0, 0, InfraError), (1, 0, InfraError)], 2, 3),
            TrialStatus::Retry { attempt: 2 }
        );
        assert_eq!(
            status(
                &[(0, 0, InfraError), (1, 0, InfraError), (2, 1, InfraError)],
                2,
                3
            ),
            TrialStatus::Abandoned
        );
        assert_eq!(
            status(&[(0, 1, Crash)], 2, 3),
            TrialStatus::Final {
                attempt: 0,
                outcome: Crash
            }
        );
        assert_eq!(
            status(&[(0, 0, InfraError), (1, 0, Masked), (1, 1, Hang)], 2, 3),
            TrialStatus::Final {
                attempt: 1,
                outcome: Hang
            }
        );
    }

    #[test]
    fn early_stop_is_prefix_based() {
        let es = EarlyStop {
            margin: 0.05,
            min_trials: 30,
            check_every: 10,
        };
        // All masked: half-width at n=30 is ~0.057, at n=40 ~0.044.
        let v: Vec<Option<Outcome>> = (0..100).map(|_| Some(Masked)).collect();
        assert_eq!(early_stop_point(v.into_iter(), &es), Some(40));
        // A gap in the prefix stops the evaluation there.
        let mut v: Vec<Option<Outcome>> = (0..100).map(|_| Some(Masked)).collect();
        v[35] = None;
        assert_eq!(early_stop_point(v.into_iter(), &es), None);
    }
}
