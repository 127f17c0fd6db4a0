//! The exporter pool: at most N exports send at once, and waiting exports are admitted by
//! priority (1 first, unset last), first come first served within a priority.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

struct Waiter {
    rank: Reverse<(i64, u64)>,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank.cmp(&other.rank)
    }
}

struct GateState {
    available: usize,
    ticket: u64,
    waiters: BinaryHeap<Waiter>,
}

#[derive(Clone)]
pub struct PriorityGate {
    state: Arc<Mutex<GateState>>,
}

/// A slot in the pool; released on drop.
pub struct Permit {
    state: Arc<Mutex<GateState>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        release(&self.state);
    }
}

fn release(state: &Arc<Mutex<GateState>>) {
    let mut s = state.lock().unwrap();
    while let Some(waiter) = s.waiters.pop() {
        if waiter.wake.send(()).is_ok() {
            return;
        }
    }
    s.available += 1;
}

impl PriorityGate {
    pub fn new(slots: usize) -> PriorityGate {
        PriorityGate {
            state: Arc::new(Mutex::new(GateState {
                available: slots,
                ticket: 0,
                waiters: BinaryHeap::new(),
            })),
        }
    }

    pub async fn acquire(&self, priority: Option<i64>) -> Permit {
        let receiver = {
            let mut s = self.state.lock().unwrap();
            if s.available > 0 && s.waiters.is_empty() {
                s.available -= 1;
                return Permit {
                    state: self.state.clone(),
                };
            }
            let (wake, receiver) = oneshot::channel();
            s.ticket += 1;
            let ticket = s.ticket;
            s.waiters.push(Waiter {
                rank: Reverse((priority.unwrap_or(11), ticket)),
                wake,
            });
            receiver
        };
        // A slot handed to us becomes ours even if this future is dropped right after:
        // the guard below gives it back in that case.
        struct Pending {
            state: Arc<Mutex<GateState>>,
            receiver: Option<oneshot::Receiver<()>>,
        }
        impl Drop for Pending {
            fn drop(&mut self) {
                if let Some(mut receiver) = self.receiver.take() {
                    receiver.close();
                    if receiver.try_recv().is_ok() {
                        release(&self.state);
                    }
                }
            }
        }
        let mut pending = Pending {
            state: self.state.clone(),
            receiver: Some(receiver),
        };
        let receiver = pending.receiver.as_mut().expect("set above");
        let _ = receiver.await;
        pending.receiver = None;
        Permit {
            state: self.state.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn higher_priority_waiters_go_first() {
        let gate = PriorityGate::new(1);
        let held = gate.acquire(None).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for priority in [None, Some(5), Some(1)] {
            let gate = gate.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire(priority).await;
                order.lock().unwrap().push(priority);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![Some(1), Some(5), None]);
    }
}
