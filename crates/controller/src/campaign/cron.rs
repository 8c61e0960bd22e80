//! Five-field cron expressions (minute hour day-of-month month day-of-week, UTC) for
//! recurring soak campaigns. Small on purpose: `*`, numbers, ranges, lists and steps.

#[derive(Debug, Clone, PartialEq)]
pub struct Cron {
    fields: [Vec<bool>; 5],
}

const RANGES: [(u32, u32, &str); 5] = [
    (0, 59, "minute"),
    (0, 23, "hour"),
    (1, 31, "day of month"),
    (1, 12, "month"),
    (0, 6, "day of week"),
];

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let parts: Vec<&str> = expr.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(format!(
                "expected 5 fields (minute hour day month weekday), got {}",
                parts.len()
            ));
        }
        let mut fields: [Vec<bool>; 5] = Default::default();
        for (i, part) in parts.iter().enumerate() {
            let (lo, hi, what) = RANGES[i];
            let mut set = vec![false; hi as usize + 1];
            for item in part.split(',') {
                let (range, step) = match item.split_once('/') {
                    Some((r, s)) => (
                        r,
                        s.parse::<u32>()
                            .ok()
                            .filter(|s| *s > 0)
                            .ok_or(format!("{what}: bad step in {item:?}"))?,
                    ),
                    None => (item, 1),
                };
                let (a, b) = if range == "*" {
                    (lo, hi)
                } else if let Some((a, b)) = range.split_once('-') {
                    (num(a, what)?, num(b, what)?)
                } else {
                    let a = num(range, what)?;
                    (a, if step > 1 { hi } else { a })
                };
                if a < lo || b > hi || a > b {
                    return Err(format!("{what}: {item:?} is outside {lo}-{hi}"));
                }
                let mut v = a;
                while v <= b {
                    set[v as usize] = true;
                    v += step;
                }
            }
            fields[i] = set;
        }
        Ok(Cron { fields })
    }

    /// First matching minute strictly after `unix_s`, searched up to ~4 years ahead.
    pub fn next_after(&self, unix_s: u64) -> Option<u64> {
        let mut t = (unix_s / 60 + 1) * 60;
        for _ in 0..(4 * 366 * 24 * 60) {
            let (mi, h, d, mo, wd) = civil(t);
            if self.fields[0][mi]
                && self.fields[1][h]
                && self.fields[2][d]
                && self.fields[3][mo]
                && self.fields[4][wd]
            {
                return Some(t);
            }
            t += 60;
        }
        None
    }
}

fn num(s: &str, what: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .map_err(|_| format!("{what}: {s:?} is not a number"))
}

/// (minute, hour, day, month, weekday) of a unix time, via Howard Hinnant's
/// civil_from_days.
fn civil(t: u64) -> (usize, usize, usize, usize, usize) {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let wd = ((days + 4).rem_euclid(7)) as usize; // 1970-01-01 was a Thursday
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as usize;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as usize;
    ((secs / 60 % 60) as usize, (secs / 3600) as usize, d, m, wd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_run() {
        // 2026-12-05 11:24:10 UTC is 1796469850 (python: datetime(2026,12,5,11,24,10,tzinfo=utc).timestamp()).
        let c = Cron::parse("0 3 * * *").unwrap();
        // Next 03:00 is 2026-12-06 03:00:00 = 1796526000.
        assert_eq!(c.next_after(1_796_469_850), Some(1_796_526_000));
        let every15 = Cron::parse("*/15 * * * *").unwrap();
        assert_eq!(every15.next_after(1_796_469_850), Some(1_796_470_200));
    }

    #[test]
    fn bad_expressions() {
        assert!(Cron::parse("* * *").is_err());
        assert!(Cron::parse("61 * * * *").is_err());
        assert!(Cron::parse("*/0 * * * *").is_err());
        assert!(Cron::parse("a * * * *").is_err());
    }
}

/// Recurring campaigns: which stored campaigns are due to run again at `now_s`.
/// A campaign repeats only if it is the newest of its name (so a restart never submits
/// twice), it finished, and its schedule's next time after it finished has passed.
pub fn due(rows: &[crate::store::CampaignRow], now_s: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for r in rows {
        let Some(expr) = &r.plan.schedule else {
            continue;
        };
        let newest = rows.iter().filter(|o| o.name == r.name).map(|o| o.id).max() == Some(r.id);
        let Some(fin) = r.finished_ms else { continue };
        if !newest || !matches!(r.state.as_str(), "done" | "timed_out") {
            continue;
        }
        if let Ok(c) = Cron::parse(expr)
            && c.next_after(fin / 1000).is_some_and(|t| t <= now_s)
        {
            out.push(r.id);
        }
    }
    out
}

#[cfg(test)]
mod due_tests {
    use super::*;
    use crate::store::CampaignRow;

    fn row(id: u64, name: &str, state: &str, fin: Option<u64>, sched: Option<&str>) -> CampaignRow {
        CampaignRow {
            id,
            name: name.into(),
            hash: String::new(),
            state: state.into(),
            total: 1,
            created_ms: 0,
            started_ms: None,
            finished_ms: fin,
            plan: crate::campaign::Plan {
                name: name.into(),
                seed: 1,
                priority: 50,
                selector: Default::default(),
                models: vec![],
                inputs: vec![0],
                outcomes: Default::default(),
                early_stop: None,
                schedule: sched.map(String::from),
                time_limit_s: None,
            },
        }
    }

    #[test]
    fn only_the_newest_finished_run_of_a_series_repeats() {
        // Finished 2026-12-05 11:24:10; "0 3 * * *" is next due 2026-12-06 03:00.
        let fin = 1_796_469_850_000;
        let rows = vec![
            row(1, "soak", "done", Some(fin), Some("0 3 * * *")),
            row(2, "once", "done", Some(fin), None),
            row(3, "other", "cancelled", Some(fin), Some("0 3 * * *")),
        ];
        assert!(due(&rows, 1_796_525_999).is_empty());
        assert_eq!(due(&rows, 1_796_526_000), vec![1]);
        let mut rows2 = rows.clone();
        rows2.push(row(4, "soak", "running", None, Some("0 3 * * *")));
        assert!(due(&rows2, 1_796_526_000).is_empty());
    }
}
