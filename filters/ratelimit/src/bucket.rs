//! The bucket algorithm: GCRA (the generic cell rate algorithm), an exact token
//! bucket kept as a single number, the theoretical arrival time (TAT).
//!
//! With `interval = period / requests` (the time one token takes to refill) and a
//! capacity of `burst` tokens, a request at `now` is allowed when
//! `max(tat, now) + interval - now <= burst * interval`, and then stores that sum
//! as the new TAT. A TAT at or before `now` means a full bucket, so an idle entry
//! carries no information and its slot can be reused without changing anyone's
//! limit.

/// A compiled limit: `requests` per `period_nanos`, up to `burst` at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Stable identity (`<rule name>/<limit name>`), part of every bucket key.
    pub id: String,
    /// Name shown in the RateLimit headers.
    pub name: String,
    pub requests: u64,
    pub period_seconds: u64,
    pub burst: u64,
    /// Nanoseconds one token takes to refill.
    pub interval_nanos: u64,
}

impl Limit {
    pub fn new(id: String, name: String, requests: u64, period_seconds: u64, burst: u64) -> Self {
        let period_nanos = u128::from(period_seconds) * 1_000_000_000;
        let interval = (period_nanos / u128::from(requests.max(1))).max(1);
        Self { id, name, requests, period_seconds, burst, interval_nanos: u64::try_from(interval).unwrap_or(u64::MAX) }
    }

    fn capacity_nanos(&self) -> u64 {
        self.burst.saturating_mul(self.interval_nanos)
    }

    /// Tries to take one token from a bucket whose TAT is `tat` (0 for a new
    /// bucket). Returns the verdict and, when allowed, the TAT to store.
    pub fn take(&self, tat: u64, now: u64) -> Verdict {
        self.take_cost(tat, now, 1)
    }

    /// Takes `cost` tokens at once (a request that costs more than one): allowed
    /// only if all of them are there.
    pub fn take_cost(&self, tat: u64, now: u64, cost: u64) -> Verdict {
        let new_tat = tat.max(now).saturating_add(self.interval_nanos.saturating_mul(cost));
        let ahead = new_tat - now;
        if ahead <= self.capacity_nanos() {
            let room = self.capacity_nanos() - ahead;
            Verdict {
                allowed: true,
                new_tat,
                remaining: room / self.interval_nanos,
                // The next token lands when `room` reaches the next whole interval.
                next_quota_seconds: ceil_seconds(self.interval_nanos - room % self.interval_nanos),
                retry_after_seconds: 0,
            }
        } else {
            // Enough tokens are back when `ahead` shrinks to the capacity.
            let wait = ceil_seconds(ahead - self.capacity_nanos()).max(1);
            Verdict { allowed: false, new_tat: tat, remaining: 0, next_quota_seconds: wait, retry_after_seconds: wait }
        }
    }

    /// The TAT after giving back one token taken earlier.
    pub fn give_back(&self, tat: u64, now: u64) -> u64 {
        self.give_back_cost(tat, now, 1)
    }

    /// The TAT after giving back `cost` tokens taken earlier.
    pub fn give_back_cost(&self, tat: u64, now: u64, cost: u64) -> u64 {
        tat.saturating_sub(self.interval_nanos.saturating_mul(cost)).max(now.min(tat))
    }

    /// The TAT after charging `cost` tokens after the fact (a cost known only
    /// from the response): never refused, it may leave the bucket in debt, which
    /// later requests wait out. Bounded at one period beyond a full bucket's
    /// wait, so a huge claimed cost cannot lock a client out for longer.
    pub fn charge(&self, tat: u64, now: u64, cost: u64) -> u64 {
        let limit =
            now.saturating_add(self.capacity_nanos()).saturating_add(self.period_seconds.saturating_mul(1_000_000_000));
        tat.max(now).saturating_add(self.interval_nanos.saturating_mul(cost)).min(limit.max(tat))
    }
}

/// The outcome of one `take`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub new_tat: u64,
    /// Tokens left after this request.
    pub remaining: u64,
    /// Seconds until the next token is back (RateLimit `t` per draft-11:
    /// "until additional quota is made available"); equals Retry-After on a denial.
    pub next_quota_seconds: u64,
    /// Seconds until one request would be allowed (Retry-After); 0 when allowed.
    pub retry_after_seconds: u64,
}

fn ceil_seconds(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn burst_then_refill() {
        let limit = Limit::new("r/l".into(), "l".into(), 10, 1, 20);
        let now = 1_000 * SECOND;
        let mut tat = 0;
        for expected_remaining in (0..20).rev() {
            let verdict = limit.take(tat, now);
            assert!(verdict.allowed);
            assert_eq!(verdict.remaining, expected_remaining);
            tat = verdict.new_tat;
        }
        let denied = limit.take(tat, now);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_seconds, 1, "a token refills in 100 ms, rounded up");
        assert_eq!(denied.next_quota_seconds, 1, "t never points before Retry-After (draft-11)");
        // 100 ms later exactly one token is back.
        assert!(limit.take(tat, now + SECOND / 10).allowed);
        let after = limit.take(tat, now + SECOND / 10).new_tat;
        assert!(!limit.take(after, now + SECOND / 10).allowed);
    }

    #[test]
    fn t_is_the_time_until_the_next_token() {
        // 100 per hour: a token every 36 s.
        let limit = Limit::new("r/l".into(), "l".into(), 100, 3600, 100);
        let now = 1_000 * SECOND;
        let first = limit.take(0, now);
        assert_eq!((first.remaining, first.next_quota_seconds), (99, 36));
        let later = limit.take(first.new_tat, now + 10 * SECOND);
        assert_eq!((later.remaining, later.next_quota_seconds), (98, 26), "the first token is back 26 s later");
    }

    #[test]
    fn allowed_count_over_time_is_exact() {
        // 5 per second, burst 5, over 10 simulated seconds of constant demand.
        let limit = Limit::new("r/l".into(), "l".into(), 5, 1, 5);
        let mut tat = 0;
        let mut allowed = 0;
        let start = 50 * SECOND;
        for step in 0..10_000u64 {
            let verdict = limit.take(tat, start + step * SECOND / 1000);
            if verdict.allowed {
                allowed += 1;
                tat = verdict.new_tat;
            }
        }
        // Burst of 5 plus 5/s refill over 10 s (the last token lands exactly at 10 s).
        assert!((54..=55).contains(&allowed), "{allowed}");
    }

    #[test]
    fn give_back_restores_a_token() {
        let limit = Limit::new("r/l".into(), "l".into(), 1, 60, 1);
        let now = 100 * SECOND;
        let taken = limit.take(0, now);
        assert!(!limit.take(taken.new_tat, now).allowed);
        let restored = limit.give_back(taken.new_tat, now);
        assert!(limit.take(restored, now).allowed);
    }
}
