//! The shutdown signal shared by every listener and background task.
//!
//! `mooring serve` creates one [`Shutdown`] and hands clones to every service. On SIGINT or
//! SIGTERM the token is cancelled: listeners stop accepting, connections finish their
//! current exchange, and background tasks flush what they hold. Tasks spawned through
//! [`Shutdown::spawn`] are tracked so that the process waits for them before exiting.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// The underlying token, for APIs that take one.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Spawns a task that the shutdown waits for.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(future)
    }

    /// Waits up to `grace` for every tracked task to finish after shutdown began.
    /// Returns `false` when the grace period ran out first.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tracked_tasks() {
        let shutdown = Shutdown::new();
        let observer = shutdown.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        shutdown.spawn(async move {
            observer.triggered().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(()).unwrap();
        });
        shutdown.trigger();
        assert!(shutdown.drain(Duration::from_secs(5)).await);
        rx.await.unwrap();
    }
}
