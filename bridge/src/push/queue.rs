//! The queue of notifications in memory, mirroring the `push` column
//! family: jobs waiting, by due time; jobs taken by the gateway and being
//! sent; and for each (user, conversation) the job still open to more
//! messages (its debounce window has not ended). Taken jobs are kept apart
//! so that taking what is due reads only what is due, however many
//! deliveries are in flight or retrying.

use std::collections::{BTreeMap, HashMap, HashSet};

use chatmq_storage::{Batch, PushJob, PushJobRecord, StorageError, Store};

/// (due ms, user, conversation): the job's key, on disk and here.
pub(super) type JobKey = (u64, String, String);

#[derive(Default)]
pub(super) struct Queue {
    /// Not yet due, or due and not yet taken.
    waiting: BTreeMap<JobKey, PushJobRecord>,
    /// Taken by the gateway: being sent, closed to more messages, on disk
    /// until finished.
    taken: HashSet<JobKey>,
    /// The open job of each (user, conversation), by due time.
    open: HashMap<(String, String), u64>,
}

impl Queue {
    pub(super) fn load(store: &Store) -> Result<Queue, StorageError> {
        let mut queue = Queue::default();
        for PushJob {
            due_ms,
            user,
            conv,
            record,
        } in store.push_jobs()?
        {
            queue.open.insert((user.clone(), conv.clone()), due_ms);
            queue.waiting.insert((due_ms, user, conv), record);
        }
        Ok(queue)
    }

    pub(super) fn len(&self) -> usize {
        self.waiting.len() + self.taken.len()
    }

    /// Folds a message into the open job of (user, conv), or opens one due
    /// at `due`; the job's new state goes into `batch`. Returns whether a
    /// job was opened.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add(
        &mut self,
        batch: &mut Batch,
        due: u64,
        user: &str,
        conv: &str,
        seq: u64,
        from: &str,
        preview: String,
    ) -> bool {
        let pair = (user.to_string(), conv.to_string());
        if let Some(due) = self.open.get(&pair).copied() {
            let key = (due, pair.0.clone(), pair.1.clone());
            if let Some(r) = self.waiting.get_mut(&key) {
                r.count = r.count.saturating_add(1);
                if seq >= r.seq {
                    r.seq = seq;
                    r.from = from.to_string();
                    r.preview = preview;
                }
                batch.put_push_job(due, user, conv, r);
                return false;
            }
        }
        // A job of this pair being sent may hold the same key: stay clear.
        let mut key = (due, pair.0.clone(), pair.1.clone());
        while self.waiting.contains_key(&key) || self.taken.contains(&key) {
            let Some(later) = key.0.checked_add(1) else {
                break;
            };
            key.0 = later;
        }
        let due = key.0;
        let record = PushJobRecord {
            count: 1,
            seq,
            from: from.to_string(),
            preview,
        };
        batch.put_push_job(due, user, conv, &record);
        self.open.insert(pair, due);
        self.waiting.insert(key, record);
        true
    }

    /// Closes and returns every job due at `now`, and the due time of the
    /// next one still waiting.
    pub(super) fn take_due(&mut self, now: u64) -> (Vec<(JobKey, PushJobRecord)>, Option<u64>) {
        let mut due = Vec::new();
        while self
            .waiting
            .first_key_value()
            .is_some_and(|(k, _)| k.0 <= now)
        {
            let Some((key, record)) = self.waiting.pop_first() else {
                break;
            };
            let pair = (key.1.clone(), key.2.clone());
            if self.open.get(&pair) == Some(&key.0) {
                self.open.remove(&pair);
            }
            self.taken.insert(key.clone());
            due.push((key, record));
        }
        let next = self.waiting.first_key_value().map(|(k, _)| k.0);
        (due, next)
    }

    /// A taken job is done (sent or given up).
    pub(super) fn finish(&mut self, key: &JobKey) {
        self.taken.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_in_one_window_fold_into_one_job_and_a_later_one_opens_another() {
        let mut q = Queue::default();
        let mut b = Batch::new();
        assert!(q.add(&mut b, 100, "bob", "room", 1, "al", "one".into()));
        assert!(!q.add(&mut b, 150, "bob", "room", 2, "cy", "two".into()));
        assert!(q.add(&mut b, 150, "ann", "room", 2, "cy", "two".into()));
        assert_eq!(b.len(), 3);
        assert_eq!(q.len(), 2);

        let (due, next) = q.take_due(99);
        assert!(due.is_empty());
        assert_eq!(next, Some(100));
        let (due, next) = q.take_due(100);
        assert_eq!(due.len(), 1);
        let ((at, user, _), record) = &due[0];
        assert_eq!((*at, user.as_str()), (100, "bob"));
        assert_eq!((record.count, record.seq), (2, 2));
        assert_eq!(
            (record.from.as_str(), record.preview.as_str()),
            ("cy", "two")
        );
        assert_eq!(next, Some(150));

        // Bob's job is being sent: a new message opens a new window.
        assert!(q.add(&mut b, 100, "bob", "room", 3, "al", "three".into()));
        assert_eq!(q.len(), 3, "the taken job counts until it is finished");
        q.finish(&due[0].0);
        let (due, _) = q.take_due(1000);
        let keys: Vec<(u64, &str)> = due.iter().map(|(k, _)| (k.0, k.1.as_str())).collect();
        assert_eq!(keys, [(101, "bob"), (150, "ann")], "clear of the taken key");
    }

    #[test]
    fn jobs_in_flight_leave_the_waiting_map_so_taking_reads_only_what_is_due() {
        let mut q = Queue::default();
        let mut b = Batch::new();
        for i in 0..1000 {
            q.add(&mut b, 10, &format!("u{i}"), "room", 1, "al", "x".into());
        }
        let (sending, next) = q.take_due(10);
        assert_eq!((sending.len(), next), (1000, None));
        assert!(q.waiting.is_empty(), "being sent is not waiting");
        assert_eq!(q.len(), 1000, "but counts until finished");

        assert!(q.add(&mut b, 20, "u0", "room", 2, "al", "y".into()));
        let (due, next) = q.take_due(15);
        assert!(due.is_empty());
        assert_eq!(next, Some(20));
        for (key, _) in &sending {
            q.finish(key);
        }
        assert_eq!(q.len(), 1);
        assert_eq!(q.take_due(20).0.len(), 1);
    }
}
