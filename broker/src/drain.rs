//! Draining a node before it goes away (scale-in, maintenance; issue #12
//! item 8): `chatmq drain` or `POST /v1/admin/drain`.
//!
//! A drain, in order: `/readyz` answers 503 `draining` (a load balancer
//! stops sending clients), the MQTT listeners close (a client that still
//! arrives is refused by the kernel and tries the next address), and every
//! connection leaves at a random moment within `drain.spread_secs`, so
//! the nodes that take its clients are not hit by all of them at once:
//! an MQTT 5 client gets DISCONNECT 0x9C "use another server" with the
//! Server Reference of `drain.server_reference` when one is set, an MQTT
//! 3.1.1 client (which has no way to be told) is closed and reconnects.
//! Neither fires its will: moving a client is not a failure. Sessions
//! stay stored, so a client that comes back to this node after a restart,
//! or (with `[cluster]`) to another node, resumes. Once no connection is
//! left, or `drain.timeout_secs` after the spread, the node shuts down as
//! on SIGTERM and the process exits 0.
//!
//! The connections learn of it through the same watch that tells them of
//! a shutdown ([`Phase`]), so an idle connection carries nothing more.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Where a node's connections stand; each connection watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Clients are moved away ([`Drain::leave_at`] says when each goes).
    Draining,
    /// The node stops: every connection ends now (DISCONNECT 0x8B).
    Stopping,
}

/// How a drain moves the clients away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Told to MQTT 5 clients as their DISCONNECT's Server Reference.
    pub server_reference: Option<String>,
    /// Connections leave at random moments within this.
    pub spread: Duration,
    /// The longest the node waits after the spread for the last ones.
    pub timeout: Duration,
}

impl Plan {
    /// The plan of `[drain]`.
    pub fn from_settings(settings: &chatmq_config::Drain) -> Plan {
        Plan {
            server_reference: settings.server_reference.clone(),
            spread: Duration::from_secs(settings.spread_secs),
            timeout: Duration::from_secs(settings.timeout_secs),
        }
    }
}

/// The node's phase and, once draining, the plan in force.
pub struct Drain {
    phase: watch::Sender<Phase>,
    plan: Mutex<Option<(Plan, Instant)>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            phase: watch::Sender::new(Phase::Serving),
            plan: Mutex::new(None),
        }
    }
}

impl Drain {
    /// A receiver of the phase, for one connection or listener.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Starts draining with `plan`. `false` when the node is already
    /// draining or stopping: the drain in progress keeps its plan.
    pub fn start(&self, plan: Plan) -> bool {
        let mut started = false;
        self.phase.send_if_modified(|phase| {
            if *phase != Phase::Serving {
                return false;
            }
            *lock(&self.plan) = Some((plan.clone(), Instant::now()));
            *phase = Phase::Draining;
            started = true;
            true
        });
        started
    }

    /// Every connection ends now (the node stops).
    pub fn stop(&self) {
        self.phase.send_replace(Phase::Stopping);
    }

    /// The plan in force, and when the drain began (`None`: not draining).
    pub fn plan(&self) -> Option<(Plan, Instant)> {
        lock(&self.plan).clone()
    }

    /// When a connection that learns of the drain now should leave: a
    /// random moment in what is left of the spread (now, once it is over).
    pub fn leave_at(&self) -> Instant {
        let now = Instant::now();
        match self.plan() {
            Some((plan, started)) => {
                let left = (started + plan.spread).saturating_duration_since(now);
                now + left.mul_f64(fastrand::f64())
            }
            None => now,
        }
    }

    /// What MQTT 5 clients are told to use instead.
    pub fn server_reference(&self) -> Option<String> {
        self.plan().and_then(|(plan, _)| plan.server_reference)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(spread: u64) -> Plan {
        Plan {
            server_reference: Some("elsewhere:1883".into()),
            spread: Duration::from_secs(spread),
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_drain_starts_once_and_spreads_the_leaving() {
        let drain = Drain::default();
        let mut watch = drain.subscribe();
        assert!(
            drain.leave_at() <= Instant::now(),
            "not draining: leave now"
        );
        assert!(drain.start(plan(10)));
        assert!(watch.has_changed().unwrap_or(false));
        assert_eq!(*watch.borrow_and_update(), Phase::Draining);
        assert!(
            !drain.start(plan(0)),
            "the drain in progress keeps its plan"
        );
        assert_eq!(
            drain.plan().map(|(p, _)| p.spread),
            Some(Duration::from_secs(10))
        );
        let now = Instant::now();
        let moments: Vec<Duration> = (0..200)
            .map(|_| drain.leave_at().saturating_duration_since(now))
            .collect();
        assert!(moments.iter().all(|m| *m <= Duration::from_secs(10)));
        assert!(
            moments.iter().any(|m| *m > Duration::from_secs(5))
                && moments.iter().any(|m| *m < Duration::from_secs(5)),
            "spread over the window: {moments:?}"
        );
        assert_eq!(drain.server_reference().as_deref(), Some("elsewhere:1883"));
        drain.stop();
        assert_eq!(*watch.borrow_and_update(), Phase::Stopping);
        assert!(!drain.start(plan(1)), "a stopping node does not drain");
    }
}
