//! One timer service for every policy actor, instead of a sleeping tokio
//! task per entity (524 B each, measured by `benches/actor_cost.rs`). An
//! actor arms a deadline and gets a key back; it cancels by key when it
//! re-arms earlier or stops, so a stopped actor is not kept alive by its
//! timer. The deadlines are a plain ordered map ([`TimerQueue`]); the task
//! around it only waits for the next one and casts `Tick`.

use super::messages::PolicyMsg;
use ractor::ActorRef;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// An armed deadline: when, and a number unique to this arming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerKey {
    pub at: Instant,
    id: u64,
}

/// Deadlines in order, each with what to notify. No I/O.
pub struct TimerQueue<T> {
    armed: BTreeMap<TimerKey, T>,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        TimerQueue {
            armed: BTreeMap::new(),
        }
    }
}

impl<T> TimerQueue<T> {
    pub fn arm(&mut self, key: TimerKey, target: T) {
        self.armed.insert(key, target);
    }

    pub fn cancel(&mut self, key: &TimerKey) {
        self.armed.remove(key);
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.armed.keys().next().map(|k| k.at)
    }

    /// Take every deadline at or before `now`, earliest first.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let later = self.armed.split_off(&TimerKey {
            at: now,
            id: u64::MAX,
        });
        std::mem::replace(&mut self.armed, later)
            .into_values()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.armed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }
}

enum Op {
    Arm(TimerKey, ActorRef<PolicyMsg>),
    Cancel(TimerKey),
}

/// Where policy actors arm their ticks; cheap to clone.
#[derive(Clone)]
pub struct Timers {
    tx: mpsc::UnboundedSender<Op>,
    next_id: Arc<AtomicU64>,
}

impl Timers {
    /// Start the service (on the current tokio runtime).
    pub fn spawn() -> Timers {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(rx));
        Timers {
            tx,
            next_id: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Cast `PolicyMsg::Tick` to `actor` at `at` (at once if it has passed).
    pub fn arm(&self, at: Instant, actor: ActorRef<PolicyMsg>) -> TimerKey {
        let key = TimerKey {
            at,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
        };
        if self.tx.send(Op::Arm(key, actor.clone())).is_err() {
            // The service is gone (runtime shutting down): tick alone.
            actor.send_after(at.saturating_duration_since(Instant::now()), || {
                PolicyMsg::Tick
            });
        }
        key
    }

    /// Forget an armed deadline; nothing if it has fired.
    pub fn cancel(&self, key: TimerKey) {
        let _ = self.tx.send(Op::Cancel(key));
    }
}

async fn serve(mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut queue: TimerQueue<ActorRef<PolicyMsg>> = TimerQueue::default();
    loop {
        let op = match queue.next() {
            Some(at) => tokio::select! {
                op = rx.recv() => op,
                () = tokio::time::sleep_until(at) => {
                    for actor in queue.expire(Instant::now()) {
                        // An actor that stopped meanwhile needs no tick.
                        let _ = actor.cast(PolicyMsg::Tick);
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match op {
            Some(Op::Arm(key, actor)) => queue.arm(key, actor),
            Some(Op::Cancel(key)) => queue.cancel(&key),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(at: Instant, id: u64) -> TimerKey {
        TimerKey { at, id }
    }

    #[test]
    fn deadlines_expire_in_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut queue = TimerQueue::default();
        queue.arm(key(t0 + Duration::from_secs(3), 1), "c");
        queue.arm(key(t0 + Duration::from_secs(1), 2), "a");
        queue.arm(key(t0 + Duration::from_secs(1), 3), "b");
        assert_eq!(queue.next(), Some(t0 + Duration::from_secs(1)));
        assert!(queue.expire(t0).is_empty());
        assert_eq!(queue.expire(t0 + Duration::from_secs(1)), vec!["a", "b"]);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.expire(t0 + Duration::from_secs(5)), vec!["c"]);
        assert!(queue.is_empty());
        assert_eq!(queue.next(), None);
    }

    #[test]
    fn a_cancelled_deadline_never_fires() {
        let t0 = Instant::now();
        let mut queue = TimerQueue::default();
        let first = key(t0 + Duration::from_secs(1), 1);
        queue.arm(first, "first");
        queue.arm(key(t0 + Duration::from_secs(2), 2), "second");
        queue.cancel(&first);
        queue.cancel(&key(t0, 99)); // not armed: nothing happens
        assert_eq!(queue.expire(t0 + Duration::from_secs(9)), vec!["second"]);
    }
}
