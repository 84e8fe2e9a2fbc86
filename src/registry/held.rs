//! What a mirror's answers told of the blobs it holds. A pull-through cache that does not hold
//! a blob answers a range request with the whole blob, copied from the origin while it stores
//! its own copy; asked again before that copy is stored, it copies from the origin once more.
//! So a mirror found not to hold a blob is left alone for it for a while, longer each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Digest;

/// First pause before a mirror that did not hold a blob is asked for it again; it doubles each
/// time it still does not, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// What one mirror's answers said of one blob.
#[derive(Debug, Default)]
pub(super) enum Verdict {
    /// Nothing asked yet.
    #[default]
    Unknown,
    /// It answered a range with the range.
    Holds,
    /// It answered with the whole blob `times` in a row; not asked again before `until`.
    NotYet { until: Instant, times: u32 },
}

impl Verdict {
    pub(super) fn holds(&self) -> bool {
        matches!(self, Verdict::Holds)
    }

    /// Whether to leave the mirror alone for this blob for now.
    pub(super) fn wait(&self) -> bool {
        matches!(self, Verdict::NotYet { until, .. } if Instant::now() < *until)
    }

    /// It did not hold the blob (again).
    pub(super) fn not_yet(&mut self) {
        let times = match self {
            Verdict::NotYet { times, .. } => *times + 1,
            _ => 1,
        };
        let pause = FIRST_PAUSE
            .saturating_mul(1 << (times - 1).min(8))
            .min(MAX_PAUSE);
        *self = Verdict::NotYet {
            until: Instant::now() + pause,
            times,
        };
    }
}

/// Verdicts by blob, each behind an async lock: one request at a time finds out.
#[derive(Debug, Default)]
pub(super) struct Holding(Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<Verdict>>>>);

impl Holding {
    pub(super) fn cell(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<Verdict>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*digest)
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_and_end() {
        let mut v = Verdict::default();
        assert!(!v.wait() && !v.holds());
        v.not_yet();
        assert!(v.wait());
        v.not_yet();
        let Verdict::NotYet { until, times } = v else {
            panic!()
        };
        assert_eq!(times, 2);
        assert!(until > Instant::now() + Duration::from_millis(1500));
        let mut old = Verdict::NotYet {
            until: Instant::now() - Duration::from_secs(1),
            times: 1,
        };
        assert!(!old.wait(), "asked again once the pause is over");
        old = Verdict::Holds;
        assert!(old.holds());
    }
}
