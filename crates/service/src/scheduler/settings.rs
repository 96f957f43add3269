//! The scheduler's settings: the `[schedule]` table of the service's TOML
//! config. Every field has a default, so an empty table (or none) is valid.

use serde::Deserialize;

/// How automatic backups, expiry, GC and verification are scheduled.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleSettings {
    /// Run the scheduler at all. Off: no automatic backups, no expiry, no
    /// scheduled GC or verify (the `gc` and `verify` commands still work).
    pub enabled: bool,
    /// Seconds between two scheduler checks; an automatic backup starts at
    /// most this late after its planned minute.
    pub tick_secs: u64,
    /// Times a failed automatic backup is tried again inside its window
    /// (0: never). The failure stays on the backup after the last one.
    pub retry_limit: u32,
    /// Seconds to wait before the first retry; doubled for each further one.
    pub retry_backoff_secs: u64,
    /// Hours between scheduled GC runs (0: GC only on demand, `vpsbackup gc`).
    pub gc_interval_hours: u64,
    /// GC leaves store objects younger than this many seconds alone (guards
    /// against clock skew and slow writers; the engine's default is 900).
    pub gc_grace_secs: u64,
    /// Days after which a backup is verified again; every completed backup
    /// is verified within this period (0: no scheduled verification).
    pub verify_interval_days: u64,
    /// Share of wall time the scheduled verification may spend reading the
    /// store, percent (1..=100): after verifying a backup for t seconds it
    /// pauses t * (100 / duty - 1) seconds, and it waits while jobs run.
    pub verify_duty_percent: u8,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        ScheduleSettings {
            enabled: true,
            tick_secs: 30,
            retry_limit: 3,
            retry_backoff_secs: 300,
            gc_interval_hours: 24,
            gc_grace_secs: 900,
            verify_interval_days: 7,
            verify_duty_percent: 25,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Settings;

    #[test]
    fn the_schedule_table_and_the_job_limit_alias_parse() {
        let s: Settings = toml::from_str(
            "max_concurrent_jobs = 3\nread_limit_mb_per_s = 50\n\n[schedule]\nretry_limit = 5\nverify_interval_days = 0\n",
        )
        .unwrap();
        assert_eq!(s.workers, 3);
        assert_eq!(s.read_limit_mb_per_s, Some(50));
        assert_eq!(s.schedule.retry_limit, 5);
        assert_eq!(s.schedule.verify_interval_days, 0);
        assert_eq!(s.schedule.tick_secs, 30, "defaults fill the rest");
        assert!(s.schedule.enabled);
        assert!(toml::from_str::<Settings>("[schedule]\nretries = 5\n").is_err());
    }
}
