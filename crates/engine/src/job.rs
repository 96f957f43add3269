//! Progress and cancellation shared between a caller and a running job, and
//! the read bandwidth limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Progress and cancellation of one job. All methods take `&self`.
#[derive(Debug, Default)]
pub struct JobControl {
    cancelled: AtomicBool,
    done: AtomicU64,
    total: AtomicU64,
    finished: AtomicBool,
}

impl JobControl {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// (bytes done, bytes total); total is 0 until the job has sized its disks.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// 0..=100, and 100 only once the job returned Ok.
    pub fn percent(&self) -> u8 {
        if self.finished.load(Ordering::Relaxed) {
            return 100;
        }
        let (done, total) = self.progress();
        if total == 0 {
            return 0;
        }
        ((done as u128 * 100 / total as u128) as u8).min(99)
    }

    pub(crate) fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// A backup reading its disks again starts its count afresh.
    pub(crate) fn restart(&self) {
        self.done.store(0, Ordering::Relaxed);
    }

    pub(crate) fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_finished(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    pub(crate) fn check(&self) -> Result<(), crate::EngineError> {
        if self.is_cancelled() {
            Err(crate::EngineError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A token bucket on bytes read: sleeps the reader so the average stays at
/// `rate` bytes/s, with one second of burst.
#[derive(Debug)]
pub(crate) struct ReadLimiter {
    rate: u64,
    start: Instant,
    consumed: u64,
}

impl ReadLimiter {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            start: Instant::now(),
            consumed: 0,
        }
    }

    /// Accounts for `bytes` about to be read and sleeps until they are allowed.
    /// Sleeps in slices so cancellation stays responsive.
    pub(crate) fn take(&mut self, bytes: u64, job: &JobControl) {
        self.consumed += bytes;
        // One second of burst: the budget at time t is rate * (t + 1).
        let allowed_at =
            Duration::from_secs_f64((self.consumed as f64 / self.rate as f64 - 1.0).max(0.0));
        loop {
            let elapsed = self.start.elapsed();
            if elapsed >= allowed_at || job.is_cancelled() {
                return;
            }
            std::thread::sleep((allowed_at - elapsed).min(Duration::from_millis(100)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_reaches_100_only_when_finished() {
        let job = JobControl::new();
        assert_eq!(job.percent(), 0);
        job.set_total(1000);
        job.add_done(500);
        assert_eq!(job.percent(), 50);
        job.add_done(500);
        assert_eq!(job.progress(), (1000, 1000));
        assert_eq!(job.percent(), 99);
        job.set_finished();
        assert_eq!(job.percent(), 100);
    }

    #[test]
    fn cancel_is_seen_by_check() {
        let job = JobControl::new();
        assert!(job.check().is_ok());
        job.cancel();
        assert!(job.is_cancelled());
        assert!(matches!(job.check(), Err(crate::EngineError::Cancelled)));
    }

    #[test]
    fn read_limiter_paces_after_one_second_of_burst() {
        let job = JobControl::new();
        let mut l = ReadLimiter::new(10_000_000);
        let t = Instant::now();
        l.take(10_000_000, &job); // the burst: no wait
        assert!(t.elapsed() < Duration::from_millis(100));
        l.take(3_000_000, &job); // 0.3 s of budget beyond the burst
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(280), "{e:?}");
        assert!(e < Duration::from_millis(1000), "{e:?}");
        // A cancelled job is not kept sleeping.
        job.cancel();
        let t = Instant::now();
        l.take(100_000_000, &job);
        assert!(t.elapsed() < Duration::from_millis(200));
    }
}
