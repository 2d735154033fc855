//! Who may use a client id (DESIGN §4: a client id belongs to the user who
//! first used it; anyone else presenting it is refused). It holds for every
//! identity:
//!
//! - A user's claim is stored (`client` column family) when the user first
//!   connects with the id, and outlives its sessions: no other user and no
//!   anonymous client may use the id.
//! - An anonymous client owns an id while a session of that id created
//!   anonymously exists (the session record says "no owner"): it may resume
//!   it, no user may take it over. Once that session is gone the id is
//!   free; nothing is stored, since nobody could prove to be the same
//!   anonymous client later.
//!
//! The check and the claim are atomic: [`Ownership::lock`] serialises
//! everything that decides about one client id (attach and the sweep), and
//! the attach that passes puts its session into the broker's map before the
//! lock is released, so a racing CONNECT of another identity finds it.
//!
//! Claims lapse so that the column family does not grow forever: a claim
//! whose id has had no session for `mqtt.client_owner_ttl_secs` is removed
//! by [`sweep`]. While a session of the id exists the claim is never
//! removed, and its last-used time is refreshed (at most once per
//! `stamp_every`), so the time counts from the end of the last session.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatmq_storage::{Batch, ClientOwner};
use tokio::sync::{watch, Mutex, MutexGuard};

use crate::broker::Broker;
use crate::clock::now_ms;

/// Independent locks, so CONNECTs of different client ids rarely wait for
/// each other's storage read.
const STRIPES: usize = 64;
/// Claims read per step of a sweep.
const PAGE: usize = 1024;
/// Write batches queued for the storage writer above which the sweep waits:
/// it must neither slow the writer down nor find its queue full.
const BUSY_WRITER: usize = 1024;

/// May `who` (`None`: anonymous) use a client id whose stored claim is
/// `stored` and whose current session, if any, belongs to `session`
/// (`Some(None)`: a session created anonymously)?
pub fn admits(
    stored: Option<&ClientOwner>,
    session: Option<Option<&str>>,
    who: Option<&str>,
) -> bool {
    stored.is_none_or(|c| Some(c.user.as_str()) == who) && session.is_none_or(|owner| owner == who)
}

/// The claim locks and the lapse policy of one broker.
pub struct Ownership {
    stripes: Vec<Mutex<()>>,
    hasher: RandomState,
    /// A claim unused this long (no session of its id) is removed.
    ttl_ms: u64,
    /// A claim in use is re-stamped once its time is this old.
    stamp_every_ms: u64,
    /// Claims removed by the sweep (for `/metrics`).
    pub removed: AtomicU64,
}

impl Ownership {
    pub fn new(ttl_secs: u64) -> Ownership {
        let ttl_ms = ttl_secs.saturating_mul(1000).max(1000);
        Ownership {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            ttl_ms,
            stamp_every_ms: (ttl_ms / 4).min(24 * 3600 * 1000),
            removed: AtomicU64::new(0),
        }
    }

    /// Held while deciding who owns `client_id`, until the attach that
    /// passed has its session in the broker's map. An async lock: the
    /// stored claim is read under it, off the async workers.
    pub async fn lock(&self, client_id: &str) -> MutexGuard<'_, ()> {
        let i = (self.hasher.hash_one(client_id) % STRIPES as u64) as usize;
        self.stripes[i].lock().await
    }

    /// The write that claims `client_id` for `who`, or refreshes a claim
    /// grown old; nothing for an anonymous client or a fresh claim.
    pub fn stamp(
        &self,
        client_id: &str,
        stored: Option<&ClientOwner>,
        who: Option<&str>,
        now: u64,
        batch: &mut Batch,
    ) {
        let Some(user) = who else { return };
        let fresh = stored
            .and_then(|c| c.last_used_ms)
            .is_some_and(|t| now.saturating_sub(t) < self.stamp_every_ms);
        if !fresh {
            batch.put_client_owner(client_id, user, now);
        }
    }

    /// How often the sweep runs: often enough that a claim lapses close to
    /// its time, at most hourly.
    fn sweep_every(&self) -> Duration {
        Duration::from_millis((self.ttl_ms / 4).clamp(250, 3600 * 1000))
    }

    /// What the sweep does with one claim: remove it (no session for its
    /// time), stamp it (in use, or from before times were kept), or nothing.
    fn judge(&self, claim: &ClientOwner, has_session: bool, now: u64) -> Verdict {
        match claim.last_used_ms {
            None => Verdict::Stamp,
            Some(t) if has_session && now.saturating_sub(t) >= self.stamp_every_ms => {
                Verdict::Stamp
            }
            Some(t) if !has_session && now.saturating_sub(t) > self.ttl_ms => Verdict::Remove,
            Some(_) => Verdict::Keep,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    Stamp,
    Remove,
}

/// Removes lapsed claims and refreshes those in use, forever.
pub async fn sweep(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let every = broker.owners.sweep_every();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(every) => sweep_once(&broker).await,
        }
    }
}

async fn sweep_once(broker: &Arc<Broker>) {
    let mut after: Option<String> = None;
    loop {
        while broker.store.queue_depth() > BUSY_WRITER {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let store = broker.store.clone();
        let from = after.clone();
        let page = match tokio::task::spawn_blocking(move || {
            store.client_owners_after(from.as_deref(), PAGE)
        })
        .await
        {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read client owners; the sweep stops until its next run");
                return;
            }
            Err(_) => return,
        };
        let full = page.len() == PAGE;
        after = page.last().map(|(id, _)| id.clone());
        let now = now_ms();
        for (client_id, claim) in &page {
            // Under the claim lock, and queued in order before releasing it:
            // an attach of this id after us reads and writes after our write.
            let _claim = broker.owners.lock(client_id).await;
            let has_session = broker.session(client_id).is_some();
            let mut batch = Batch::new();
            match broker.owners.judge(claim, has_session, now) {
                Verdict::Keep => continue,
                Verdict::Stamp => batch.put_client_owner(client_id, &claim.user, now),
                Verdict::Remove => {
                    batch.delete_client_owner(client_id);
                    broker.owners.removed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(broker.store.submit_now(batch));
        }
        if !full {
            return;
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(user: &str, last_used_ms: Option<u64>) -> ClientOwner {
        ClientOwner {
            user: user.into(),
            last_used_ms,
        }
    }

    #[test]
    fn a_client_id_admits_only_its_owner() {
        let alice = claim("alice", Some(1));
        assert!(admits(None, None, Some("alice")), "a fresh id");
        assert!(admits(None, None, None), "a fresh id, anonymously");
        assert!(admits(Some(&alice), None, Some("alice")));
        assert!(!admits(Some(&alice), None, Some("bob")));
        assert!(
            !admits(Some(&alice), None, None),
            "a user's id, anonymously"
        );
        assert!(!admits(Some(&alice), Some(Some("alice")), None));
        assert!(
            admits(None, Some(None), None),
            "an anonymous session resumed"
        );
        assert!(
            !admits(None, Some(None), Some("alice")),
            "an anonymous session is not a user's to take"
        );
        assert!(!admits(None, Some(Some("alice")), Some("bob")));
    }

    #[test]
    fn claims_lapse_only_without_a_session() {
        let o = Ownership::new(100);
        let old = claim("alice", Some(0));
        assert_eq!(o.judge(&old, false, 100_001), Verdict::Remove);
        assert_eq!(o.judge(&old, false, 100_000), Verdict::Keep);
        assert_eq!(o.judge(&old, true, 1_000_000), Verdict::Stamp);
        let fresh = claim("alice", Some(1_000_000));
        assert_eq!(o.judge(&fresh, true, 1_000_001), Verdict::Keep);
        assert_eq!(o.judge(&claim("alice", None), false, 5), Verdict::Stamp);
    }

    #[test]
    fn a_claim_is_written_when_new_or_stale() {
        let o = Ownership::new(100);
        let mut b = Batch::new();
        o.stamp("c", None, None, 10, &mut b);
        assert!(b.is_empty(), "anonymous clients store nothing");
        o.stamp("c", None, Some("alice"), 10, &mut b);
        assert_eq!(b.len(), 1);
        let mut b = Batch::new();
        o.stamp(
            "c",
            Some(&claim("alice", Some(10))),
            Some("alice"),
            20,
            &mut b,
        );
        assert!(b.is_empty(), "fresh");
        o.stamp(
            "c",
            Some(&claim("alice", Some(10))),
            Some("alice"),
            30_000,
            &mut b,
        );
        assert_eq!(b.len(), 1, "stale");
    }
}
