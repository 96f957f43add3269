//! Where the service gets the time. Every timestamp it writes comes from a
//! [`Clock`], so the scheduler's tests can run weeks of simulated time.

use std::sync::Mutex;
use time::OffsetDateTime;

/// A source of "now" (UTC).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// The system clock, truncated to whole seconds (the API's precision).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        now.replace_nanosecond(0).unwrap_or(now)
    }
}

/// A clock that only moves when told to (tests and simulations).
#[derive(Debug)]
pub struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        ManualClock(Mutex::new(start))
    }
    pub fn set(&self, t: OffsetDateTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
    pub fn advance(&self, by: time::Duration) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *g += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A clock read from a file holding unix seconds: lets tests drive real
/// `serve` processes (several replicas at once) through simulated days
/// (`serve` uses it when `VPSBACKUP_TEST_CLOCK_FILE` is set). A missing or
/// unreadable file reads as the system clock.
#[derive(Debug, Clone)]
pub struct FileClock(std::path::PathBuf);

impl FileClock {
    pub fn new(path: impl Into<std::path::PathBuf>) -> FileClock {
        FileClock(path.into())
    }
}

impl Clock for FileClock {
    fn now(&self) -> OffsetDateTime {
        std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .unwrap_or_else(|| SystemClock.now())
    }
}

/// RFC 3339, UTC, second precision, with `Z`: `2025-01-16T03:00:00Z`.
///
/// Written digit by digit: a page of 50 backups formats 150 times, and
/// `format!` was a visible share of a listing's cost.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return format!(
            "{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
    }
    let mut out = *b"0000-00-00T00:00:00Z";
    let year = year as u32;
    let two = |buf: &mut [u8; 20], at: usize, v: u8| {
        buf[at] = b'0' + v / 10;
        buf[at + 1] = b'0' + v % 10;
    };
    two(&mut out, 0, (year / 100) as u8);
    two(&mut out, 2, (year % 100) as u8);
    two(&mut out, 5, u8::from(t.month()));
    two(&mut out, 8, t.day());
    two(&mut out, 11, t.hour());
    two(&mut out, 14, t.minute());
    two(&mut out, 17, t.second());
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_seed() {
        let t = OffsetDateTime::from_unix_timestamp(1_737_000_000).unwrap();
        assert_eq!(rfc3339(t), "2025-01-16T04:00:00Z");
        let t = OffsetDateTime::from_unix_timestamp(951_782_405).unwrap();
        assert_eq!(rfc3339(t), "2000-02-29T00:00:05Z");
        let t = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(rfc3339(t), "1970-01-01T00:00:00Z");
    }
}
