//! When a server's automatic backup runs: pure functions of the time, the
//! server's window and its latest automatic backup, so they are unit tested
//! and shared by the scheduler and `vpsbackup status`.
//!
//! Each day D has one slot per server, keyed by D's 00:00 UTC (stored as
//! `scheduled_for`, unique per server). The planned start is the window
//! start plus a stable per-server offset (a hash of the server id) spread
//! over the first half of the window, so a thousand servers do not all
//! start at 03:00 and the second half is left for retries.

use time::{Duration, OffsetDateTime, Time};
use vpsbackup_catalog::{AutoBackupServer, AutoBackupSlot, BackupId, WorkStatus};

use super::settings::ScheduleSettings;

const DAY: Duration = Duration::days(1);

/// 00:00 UTC of the day `t` falls in.
pub fn day_of(t: OffsetDateTime) -> OffsetDateTime {
    t.to_offset(time::UtcOffset::UTC)
        .replace_time(Time::MIDNIGHT)
}

/// SplitMix64's finaliser: consecutive server ids land far apart.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seconds after the window start at which this server's backup starts:
/// stable across restarts and releases, within the first half of the window.
pub fn spread_offset(server_id: i64, window_minutes: u32) -> Duration {
    let span = (u64::from(window_minutes.max(1)) * 60 / 2).max(1);
    Duration::seconds((mix(server_id as u64) % span) as i64)
}

/// The planned start of `server`'s automatic backup for day `day`.
pub fn planned_start(server: &AutoBackupServer, day: OffsetDateTime) -> OffsetDateTime {
    day + Duration::minutes(i64::from(server.window_start_minute))
        + spread_offset(server.server_id.0, server.window_minutes)
}

/// The end of day `day`'s window.
pub fn window_end(server: &AutoBackupServer, day: OffsetDateTime) -> OffsetDateTime {
    day + Duration::minutes(
        i64::from(server.window_start_minute) + i64::from(server.window_minutes),
    )
}

/// The latest day whose planned start is at or before `now`.
pub fn latest_due_day(server: &AutoBackupServer, now: OffsetDateTime) -> OffsetDateTime {
    // A window late in the day can plan past midnight: step back until due.
    let mut day = day_of(now);
    while planned_start(server, day) > now {
        day -= DAY;
    }
    day
}

/// What the scheduler should do for one server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do (disabled, done, running, or retries used up).
    Idle,
    /// Create the automatic backup of the slot `day`. After downtime this is
    /// the latest missed slot only: one catch-up, not one per missed day.
    Create { day: OffsetDateTime },
    /// Queue another attempt of this failed automatic backup.
    Retry { backup: BackupId, attempt: u32 },
}

/// Wait before retry number `retry` (1-based): the backoff doubled each time.
pub fn backoff(settings: &ScheduleSettings, retry: u32) -> Duration {
    let base = settings.retry_backoff_secs.min(86_400) as i64;
    Duration::seconds(base.saturating_mul(1 << (retry.saturating_sub(1)).min(16)))
}

/// Retries start inside the slot's window; a catch-up run created after the
/// window (the service was down) gets a window's length of its own.
fn retry_deadline(
    server: &AutoBackupServer,
    slot: &AutoBackupSlot,
    day: OffsetDateTime,
) -> OffsetDateTime {
    let end = window_end(server, day);
    if slot.created_at > end {
        slot.created_at + Duration::minutes(i64::from(server.window_minutes))
    } else {
        end
    }
}

/// Decides for one server.
pub fn decide(
    server: &AutoBackupServer,
    now: OffsetDateTime,
    settings: &ScheduleSettings,
) -> Decision {
    if !server.auto_backup_enabled {
        return Decision::Idle;
    }
    let day = latest_due_day(server, now);
    // A slot is taken once: a deleted automatic backup is not made again.
    if server.last_slot.is_none_or(|last| last < day) {
        return Decision::Create { day };
    }
    let Some(slot) = &server.latest else {
        return Decision::Idle;
    };
    if slot.scheduled_for != day || slot.status != WorkStatus::Failed {
        return Decision::Idle;
    }
    // attempts counts the first run: retries done = attempts - 1.
    let retries_done = slot.attempts.saturating_sub(1);
    if retries_done >= settings.retry_limit {
        return Decision::Idle;
    }
    let ended = slot.completed_at.unwrap_or(slot.created_at);
    let next = ended + backoff(settings, retries_done + 1);
    if now >= next && now <= retry_deadline(server, slot, day) {
        Decision::Retry {
            backup: slot.backup_id,
            attempt: slot.attempts + 1,
        }
    } else {
        Decision::Idle
    }
}

/// When the server's next automatic backup is planned to start, for
/// `vpsbackup status`: `None` when automatic backups are off. A slot that is
/// due but not yet created answers `now`.
pub fn next_backup(
    server: &AutoBackupServer,
    now: OffsetDateTime,
    settings: &ScheduleSettings,
) -> Option<OffsetDateTime> {
    if !server.auto_backup_enabled || !settings.enabled {
        return None;
    }
    match decide(server, now, settings) {
        Decision::Create { .. } => Some(now),
        Decision::Retry { .. } => Some(now),
        Decision::Idle => {
            let day = latest_due_day(server, now);
            if let Some(slot) = &server.latest {
                if slot.scheduled_for == day && slot.status == WorkStatus::Failed {
                    let retries_done = slot.attempts.saturating_sub(1);
                    let ended = slot.completed_at.unwrap_or(slot.created_at);
                    let next = ended + backoff(settings, retries_done + 1);
                    if retries_done < settings.retry_limit
                        && next <= retry_deadline(server, slot, day)
                    {
                        return Some(next);
                    }
                }
            }
            Some(planned_start(server, day + DAY))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use vpsbackup_catalog::ServerId;

    fn server(id: i64) -> AutoBackupServer {
        AutoBackupServer {
            server_id: ServerId(id),
            server_name: format!("s{id}"),
            auto_backup_enabled: true,
            window_start_minute: 180,
            window_minutes: 120,
            retention_days: 7,
            latest: None,
            last_slot: None,
        }
    }

    #[test]
    fn offsets_are_stable_spread_and_in_the_first_half() {
        let offsets: Vec<i64> = (1..=1000)
            .map(|id| spread_offset(id, 120).whole_seconds())
            .collect();
        assert!(offsets.iter().all(|o| (0..3600).contains(o)));
        assert_eq!(spread_offset(42, 120), spread_offset(42, 120));
        // Spread: every ten-minute bucket of the first hour gets some servers.
        let mut buckets = [0u32; 6];
        for o in &offsets {
            buckets[(*o / 600) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| b > 100), "{buckets:?}");
    }

    #[test]
    fn creates_once_per_day_and_catches_up_only_the_latest_slot() {
        let s = server(7);
        let settings = ScheduleSettings::default();
        let day = datetime!(2025-01-16 00:00 UTC);
        let planned = planned_start(&s, day);
        assert!(planned >= day + Duration::hours(3) && planned < day + Duration::hours(4));
        // Before the planned minute: yesterday's slot is due (no backup yet).
        assert_eq!(
            decide(&s, planned - Duration::seconds(1), &settings),
            Decision::Create { day: day - DAY }
        );
        assert_eq!(decide(&s, planned, &settings), Decision::Create { day });
        // Ten days of downtime: one catch-up, for the latest slot.
        let mut s2 = s.clone();
        s2.latest = Some(AutoBackupSlot {
            backup_id: BackupId(1),
            scheduled_for: day - Duration::days(10),
            status: WorkStatus::Completed,
            created_at: day - Duration::days(10),
            completed_at: None,
            attempts: 1,
        });
        s2.last_slot = Some(day - Duration::days(10));
        assert_eq!(
            decide(&s2, day + Duration::hours(12), &settings),
            Decision::Create { day }
        );
        s2.latest.as_mut().unwrap().scheduled_for = day;
        s2.last_slot = Some(day);
        assert_eq!(
            decide(&s2, day + Duration::hours(12), &settings),
            Decision::Idle
        );
        // Today's backup deleted by the customer: not taken again today.
        s2.latest = None;
        assert_eq!(
            decide(&s2, day + Duration::hours(12), &settings),
            Decision::Idle
        );
        assert_eq!(
            decide(&s2, day + Duration::hours(29), &settings),
            Decision::Create { day: day + DAY }
        );
        s2.auto_backup_enabled = false;
        assert_eq!(
            decide(&s2, day + Duration::days(3), &settings),
            Decision::Idle
        );
    }

    #[test]
    fn retries_back_off_and_stop_at_the_limit_and_the_window() {
        let mut s = server(9);
        let settings = ScheduleSettings::default();
        let day = datetime!(2025-01-16 00:00 UTC);
        let start = planned_start(&s, day);
        s.latest = Some(AutoBackupSlot {
            backup_id: BackupId(5),
            scheduled_for: day,
            status: WorkStatus::Failed,
            created_at: start,
            completed_at: Some(start + Duration::seconds(10)),
            attempts: 1,
        });
        s.last_slot = Some(day);
        let failed_at = start + Duration::seconds(10);
        assert_eq!(
            decide(&s, failed_at + Duration::seconds(299), &settings),
            Decision::Idle
        );
        assert_eq!(
            decide(&s, failed_at + Duration::seconds(300), &settings),
            Decision::Retry {
                backup: BackupId(5),
                attempt: 2
            }
        );
        s.latest.as_mut().unwrap().attempts = 2;
        assert_eq!(
            decide(&s, failed_at + Duration::seconds(599), &settings),
            Decision::Idle
        );
        assert!(matches!(
            decide(&s, failed_at + Duration::seconds(600), &settings),
            Decision::Retry { .. }
        ));
        s.latest.as_mut().unwrap().attempts = 4;
        assert_eq!(
            decide(&s, failed_at + Duration::hours(1), &settings),
            Decision::Idle
        );
        // Past the window: no more retries even when some are left.
        s.latest.as_mut().unwrap().attempts = 2;
        assert_eq!(
            decide(&s, window_end(&s, day) + Duration::seconds(1), &settings),
            Decision::Idle
        );
    }

    #[test]
    fn a_window_late_in_the_day_plans_past_midnight() {
        let mut s = server(3);
        s.window_start_minute = 23 * 60 + 30;
        s.window_minutes = 120;
        let day = datetime!(2025-01-16 00:00 UTC);
        let now = day + Duration::minutes(10);
        let due = latest_due_day(&s, now);
        assert!(planned_start(&s, due) <= now);
        assert!(planned_start(&s, due + DAY) > now);
    }
}
