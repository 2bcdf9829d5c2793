//! Request collapsing, the VM-local half: which misses a stream of this VM is
//! filling, and which paused streams wait for them. (The other half, a fill lock
//! per URI in shared data, lets waiters on other workers find the fill: see
//! `Table::lead_or_follow`.)

use std::collections::{HashMap, HashSet};

use gateway_common::request::RequestHeaders;

/// A paused stream waiting for another request to fill its entry.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub context_id: u32,
    pub request: RequestHeaders,
    pub head: bool,
    /// The `Cache-Status` forward reason of its miss.
    pub forward: &'static str,
    /// After this (ms), it stops waiting and goes to the origin itself.
    pub deadline_ms: u64,
}

#[derive(Debug, Default)]
pub struct Waiting {
    waiters: HashMap<String, Vec<Waiter>>,
    led_here: HashSet<String>,
}

impl Waiting {
    pub fn is_led_here(&self, key: &str) -> bool {
        self.led_here.contains(key)
    }

    pub fn lead(&mut self, key: &str) {
        self.led_here.insert(key.to_string());
    }

    pub fn follow(&mut self, key: &str, waiter: Waiter) {
        self.waiters.entry(key.to_string()).or_default().push(waiter);
    }

    /// The fill this VM led ended; its waiters stay until the root's tick.
    pub fn release_lead(&mut self, key: &str) {
        self.led_here.remove(key);
    }

    /// A waiting stream went away (its client gave up).
    pub fn forget(&mut self, context_id: u32) {
        for waiters in self.waiters.values_mut() {
            waiters.retain(|waiter| waiter.context_id != context_id);
        }
        self.waiters.retain(|_, waiters| !waiters.is_empty());
    }

    /// Keys waited for whose fill this VM does not lead (any more): the tick
    /// checks their fill lock.
    pub fn not_led_here(&self) -> Vec<String> {
        self.waiters.keys().filter(|key| !self.led_here.contains(*key)).cloned().collect()
    }

    /// Takes the waiters whose deadline passed.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<(String, Waiter)> {
        let mut expired = Vec::new();
        for (key, waiters) in &mut self.waiters {
            let (late, waiting): (Vec<Waiter>, Vec<Waiter>) =
                waiters.drain(..).partition(|waiter| waiter.deadline_ms <= now_ms);
            *waiters = waiting;
            expired.extend(late.into_iter().map(|waiter| (key.clone(), waiter)));
        }
        self.waiters.retain(|_, waiters| !waiters.is_empty());
        expired
    }

    pub fn take(&mut self, key: &str) -> Vec<Waiter> {
        self.waiters.remove(key).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(context_id: u32, deadline_ms: u64) -> Waiter {
        Waiter {
            context_id,
            request: gateway_common::testing::request_text(&[(":path", "/")]),
            head: false,
            forward: "fwd=uri-miss",
            deadline_ms,
        }
    }

    #[test]
    fn waiters_are_released_by_their_fill_their_deadline_or_their_departure() {
        let mut waiting = Waiting::default();
        waiting.lead("a");
        waiting.follow("a", waiter(2, 100));
        waiting.follow("a", waiter(3, 50));
        waiting.follow("b", waiter(4, 100));
        assert_eq!(waiting.not_led_here(), vec!["b".to_string()]);
        let expired = waiting.take_expired(60);
        assert_eq!(expired.iter().map(|(key, w)| (key.as_str(), w.context_id)).collect::<Vec<_>>(), [("a", 3)]);
        waiting.forget(4);
        assert!(waiting.not_led_here().is_empty());
        waiting.release_lead("a");
        assert_eq!(waiting.not_led_here(), vec!["a".to_string()], "its waiters wait for the tick");
        let released: Vec<u32> = waiting.take("a").iter().map(|w| w.context_id).collect();
        assert_eq!(released, [2]);
        assert!(waiting.is_empty() && !waiting.is_led_here("a"));
    }
}
