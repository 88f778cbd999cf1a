//! Calendar periods (UTC) that caps and budgets reset with.

/// A calendar period (UTC) a cap or budget resets with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Minute,
    Day,
    /// Monday to Sunday.
    Week,
    Month,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The period of this name (as the policy file and the store spell it).
    pub fn parse(name: &str) -> Option<Self> {
        [Period::Minute, Period::Day, Period::Week, Period::Month]
            .into_iter()
            .find(|p| p.name() == name)
    }

    /// When the period that holds `now` began (Unix seconds).
    pub fn start(self, now: i64) -> i64 {
        let days = now.div_euclid(86_400);
        match self {
            Period::Minute => now.div_euclid(60) * 60,
            Period::Day => days * 86_400,
            Period::Week => ((days + 3).div_euclid(7) * 7 - 3) * 86_400,
            Period::Month => {
                let (y, m) = year_month(days);
                first_day(y, m) * 86_400
            }
        }
    }

    /// The period that holds `now` (Unix seconds): its number, and the seconds until it
    /// ends.
    pub fn at(self, now: i64) -> (i64, u64) {
        let days = now.div_euclid(86_400);
        let (index, end) = match self {
            Period::Minute => (now.div_euclid(60), (now.div_euclid(60) + 1) * 60),
            Period::Day => (days, (days + 1) * 86_400),
            // 1970-01-01 was a Thursday: day 4 of the week that began on Monday -3.
            Period::Week => {
                let week = (days + 3).div_euclid(7);
                (week, (week * 7 - 3 + 7) * 86_400)
            }
            Period::Month => {
                let (y, m) = year_month(days);
                let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (y * 12 + m - 1, first_day(next.0, next.1) * 86_400)
            }
        };
        (index, (end - now).max(1) as u64)
    }
}

/// The year and month (1-12) of a day counted from 1970-01-01 (the civil calendar).
fn year_month(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m)
}

/// The day number of the first of month `m` of year `y`.
fn first_day(y: i64, m: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
