//! The end of an agent's life: the drain. It starts when the listeners have been handed
//! to the next agent ([`crate::handover`]) or on the first `SIGTERM` (then the listeners
//! close: new connections are refused, fail closed, until an agent serves again). While
//! draining, the agent accepts nothing, sends `GOAWAY` on its HBONE connections (as server,
//! so peers open new ones, which reach the next agent; as client, once their last stream
//! ends), keeps relaying what it holds and keeps re-checking it against policy updates,
//! and is not ready.
//!
//! It ends when nothing is left to relay, but only after a `SIGTERM`: an agent that exited
//! on its own would be restarted by the kubelet and take the listeners back. A second
//! `SIGTERM`, or the deadline (`--drain-timeout` after the first), ends it at once; the
//! connections still open are then reset by the kernel as the process exits (the data
//! path's sockets carry `SO_LINGER` 0, see `proxy::socket`), never left hanging.

use std::time::Duration;

use tokio::{sync::watch, time::Instant};

use crate::proxy::limits::Descriptors;

/// How often the drain looks whether connections are left.
const POLL: Duration = Duration::from_millis(100);

/// Starts the drain; [`DrainWatch`]es see it.
pub struct DrainTrigger(watch::Sender<bool>);

/// Tells the data path and readiness whether the agent drains. Cloning shares it.
#[derive(Clone, Debug)]
pub struct DrainWatch(watch::Receiver<bool>);

pub fn channel() -> (DrainTrigger, DrainWatch) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), DrainWatch(rx))
}

impl DrainTrigger {
    pub fn start(&self) {
        self.0.send_replace(true);
    }
}

impl DrainWatch {
    /// Resolves once the drain has started; never if the agent goes without one.
    pub async fn started(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

/// Where the agent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Handed over without a `SIGTERM` yet: drains with no deadline, stays.
    HandedOver,
    /// After a `SIGTERM`: exits once drained, or at the deadline.
    Terminating {
        deadline: Instant,
    },
}

/// What the agent does on a `SIGTERM` or `SIGINT`.
#[derive(Debug, PartialEq, Eq)]
pub enum OnSignal {
    /// Start draining (close the listeners if they were not handed over).
    StartDrain,
    /// Already draining: the deadline runs from now.
    SetDeadline,
    /// The second signal: end now, resetting what is left.
    EndNow,
}

impl Phase {
    /// The next phase after a signal at `now`, and what to do.
    pub fn on_signal(self, now: Instant, timeout: Duration) -> (Self, OnSignal) {
        let terminating = Self::Terminating {
            deadline: now + timeout,
        };
        match self {
            Self::Serving => (terminating, OnSignal::StartDrain),
            Self::HandedOver => (terminating, OnSignal::SetDeadline),
            Self::Terminating { .. } => (self, OnSignal::EndNow),
        }
    }

    pub fn is_draining(self) -> bool {
        self != Self::Serving
    }

    pub fn deadline(self) -> Option<Instant> {
        match self {
            Self::Terminating { deadline } => Some(deadline),
            Self::Serving | Self::HandedOver => None,
        }
    }
}

/// Resolves once the data path holds no descriptor: no connection accepted or opened is
/// left. Only meaningful once the pods are handed over (each enrolled pod holds some).
pub async fn drained(descriptors: &Descriptors) {
    while descriptors.held() > 0 {
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(600);

    #[test]
    fn the_first_signal_drains_and_the_second_ends() {
        let now = Instant::now();
        let (phase, action) = Phase::Serving.on_signal(now, TIMEOUT);
        assert_eq!(action, OnSignal::StartDrain);
        assert_eq!(phase.deadline(), Some(now + TIMEOUT));
        let later = now + Duration::from_secs(5);
        let (phase, action) = phase.on_signal(later, TIMEOUT);
        assert_eq!(action, OnSignal::EndNow);
        assert_eq!(phase.deadline(), Some(now + TIMEOUT), "unchanged");
    }

    #[test]
    fn a_handed_over_agent_drains_without_deadline_until_signalled() {
        assert!(Phase::HandedOver.is_draining());
        assert_eq!(Phase::HandedOver.deadline(), None);
        let now = Instant::now();
        let (phase, action) = Phase::HandedOver.on_signal(now, TIMEOUT);
        assert_eq!(action, OnSignal::SetDeadline);
        assert_eq!(phase.deadline(), Some(now + TIMEOUT));
    }

    #[tokio::test(start_paused = true)]
    async fn drained_waits_for_the_last_descriptor() {
        let descriptors = Descriptors::new(1000, 0, 0);
        let held = descriptors.acquire().unwrap();
        let wait = tokio::spawn({
            let descriptors = descriptors.clone();
            async move { drained(&descriptors).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!wait.is_finished(), "drained with a connection open");
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect("drained once the last one closed")
            .unwrap();
    }

    #[tokio::test]
    async fn the_watch_sees_the_drain_start() {
        let (trigger, watch) = channel();
        assert!(!watch.is_draining());
        let started = tokio::spawn({
            let watch = watch.clone();
            async move { watch.started().await }
        });
        trigger.start();
        started.await.unwrap();
        assert!(watch.is_draining());
    }
}
