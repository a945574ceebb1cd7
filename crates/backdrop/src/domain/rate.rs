//! [`Rate`]: a count of requests per period (`10/s`, `600/m`), the unit of `--rate`.

use std::time::Duration;

/// A request rate: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed per period.
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// Parses `10/s`, `600/m`, `3600/h` or a bare number (per second).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (n, unit) = s.split_once('/').unwrap_or((s, "s"));
        let count: u32 = n.trim().parse().map_err(|_| format!("{s:?} is not a rate like 10/s or 600/m"))?;
        if count == 0 {
            return Err("the rate must be at least 1".into());
        }
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => return Err(format!("unknown rate unit {other:?} (use s, m or h)")),
        };
        Ok(Self { count, period })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}
