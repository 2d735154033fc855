//! The queue of notifications in memory, mirroring the `push` column
//! family: jobs by due time, and for each (user, conversation) the job
//! still open to more messages (its debounce window has not ended).

use std::collections::{BTreeMap, HashMap};

use chatmq_storage::{Batch, PushJob, PushJobRecord, StorageError, Store};

/// (due ms, user, conversation): the job's key, on disk and here.
pub(super) type JobKey = (u64, String, String);

struct Entry {
    record: PushJobRecord,
    /// Taken by the gateway: being sent, closed to more messages.
    taken: bool,
}

#[derive(Default)]
pub(super) struct Queue {
    jobs: BTreeMap<JobKey, Entry>,
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
            queue.jobs.insert(
                (due_ms, user, conv),
                Entry {
                    record,
                    taken: false,
                },
            );
        }
        Ok(queue)
    }

    pub(super) fn len(&self) -> usize {
        self.jobs.len()
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
            if let Some(entry) = self.jobs.get_mut(&key) {
                let r = &mut entry.record;
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
        let mut due = due;
        while self
            .jobs
            .contains_key(&(due, pair.0.clone(), pair.1.clone()))
        {
            due += 1;
        }
        let record = PushJobRecord {
            count: 1,
            seq,
            from: from.to_string(),
            preview,
        };
        batch.put_push_job(due, user, conv, &record);
        self.open.insert(pair.clone(), due);
        self.jobs.insert(
            (due, pair.0, pair.1),
            Entry {
                record,
                taken: false,
            },
        );
        true
    }

    /// Closes and returns every job due at `now`, and the due time of the
    /// next one still waiting.
    pub(super) fn take_due(&mut self, now: u64) -> (Vec<(JobKey, PushJobRecord)>, Option<u64>) {
        let mut due = Vec::new();
        let mut next = None;
        for (key, entry) in self.jobs.iter_mut() {
            if entry.taken {
                continue;
            }
            if key.0 > now {
                next = Some(key.0);
                break;
            }
            entry.taken = true;
            let pair = (key.1.clone(), key.2.clone());
            if self.open.get(&pair) == Some(&key.0) {
                self.open.remove(&pair);
            }
            due.push((key.clone(), entry.record.clone()));
        }
        (due, next)
    }

    /// A taken job is done (sent or given up).
    pub(super) fn finish(&mut self, key: &JobKey) {
        self.jobs.remove(key);
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
}
