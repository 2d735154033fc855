//! The database handle: open, submit batches, and the reads used at
//! start-up and on resume.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, DB};
use tokio::sync::{mpsc, oneshot};

use crate::batch::Batch;
use crate::latency::{CommitLatency, LatencySnapshot};
use crate::record::{MessageRecord, OutboxEntry, SessionRecord};
use crate::schema::{
    seq_value, split_client, ALL_CFS, CF_BODY, CF_CURSOR, CF_INBOUND, CF_META, CF_OUTBOX,
    CF_RETAINED, CF_SESSION, META_EPOCH, META_SCHEMA, SCHEMA_VERSION,
};
use crate::writer::{self, Commit, Job};
use crate::{Cached, StorageError, SyncMode};

/// Read ahead by the start-up scans, which read a column family end to end.
const SCAN_READAHEAD: usize = 2 << 20;

/// A persistent session as it was left on disk.
#[derive(Debug, Clone)]
pub struct StoredSession {
    pub client_id: String,
    pub record: SessionRecord,
    /// Messages owed, in the order they were queued.
    pub outbox: Vec<(u64, OutboxEntry)>,
    /// Incoming QoS 2 packet ids still awaiting PUBREL.
    pub inbound: Vec<u16>,
    /// The last seq the session acknowledged, per conversation.
    pub cursors: Vec<(String, u64)>,
}

/// The open database. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
    epoch: String,
    latency: Arc<CommitLatency>,
}

impl Store {
    /// Opens (or creates) the database in `dir` and starts its writer.
    pub fn open(
        dir: &Path,
        sync: SyncMode,
        sync_interval: Duration,
    ) -> Result<Store, StorageError> {
        let options = crate::options::database();
        let cache = crate::options::block_cache();
        let cfs = ALL_CFS.iter().map(|name| {
            ColumnFamilyDescriptor::new(*name, crate::options::column_family(name, &cache))
        });
        let db =
            DB::open_cf_descriptors(&options, dir, cfs).map_err(|source| StorageError::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        let db = Arc::new(db);
        let epoch = ensure_epoch(&db)?;
        last_body_id(&db)?.map(crate::batch::body_ids_above);

        let (tx, rx) = mpsc::channel(writer::QUEUE);
        let dirty = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let latency = Arc::new(CommitLatency::default());
        let mut threads = Vec::new();
        {
            let db = db.clone();
            let dirty = dirty.clone();
            let latency = latency.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("chatmq-writer".into())
                    .spawn(move || writer::run(db, rx, sync, dirty, latency))
                    .map_err(|e| StorageError::Corrupt {
                        cf: "writer",
                        what: format!("cannot start the writer thread: {e}"),
                    })?,
            );
        }
        if sync == SyncMode::Interval {
            let db = db.clone();
            let stop = stop.clone();
            let period = sync_interval.max(Duration::from_millis(1));
            threads.push(
                std::thread::Builder::new()
                    .name("chatmq-syncer".into())
                    .spawn(move || writer::run_syncer(db, period, dirty, stop))
                    .map_err(|e| StorageError::Corrupt {
                        cf: "writer",
                        what: format!("cannot start the syncer thread: {e}"),
                    })?,
            );
        }
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                jobs: Mutex::new(Some(tx)),
                threads: Mutex::new(threads),
                stop,
                epoch,
                latency,
            }),
        })
    }

    /// The durations of the group commits so far (for metrics).
    pub fn commit_latency(&self) -> LatencySnapshot {
        self.inner.latency.snapshot()
    }

    /// Batches submitted and not yet taken by the writer (for metrics).
    pub fn queue_depth(&self) -> usize {
        self.sender()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .unwrap_or(0)
    }

    /// Identifies this database for its whole life: a wiped store gets a
    /// new epoch, so clients can tell it from a quiet one.
    pub fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    fn sender(&self) -> Option<mpsc::Sender<Job>> {
        self.inner.jobs.lock().ok().and_then(|g| g.clone())
    }

    /// Queues `batch` for the writer (waiting only if its queue is full) and
    /// returns the commit to await for durability.
    pub async fn submit(&self, batch: Batch) -> Commit {
        if batch.is_empty() {
            return Commit::ready();
        }
        let (reply, rx) = oneshot::channel();
        match self.sender() {
            Some(tx) if tx.send(Job::Write(batch, reply)).await.is_ok() => Commit::pending(rx),
            // The writer is gone: the commit reports it.
            _ => Commit::pending(rx),
        }
    }

    /// Like [`Store::submit`], from code that cannot wait: the batch is
    /// queued at once, in order with earlier submissions; only if the
    /// writer's queue is full does it go through a task (and may then land
    /// after batches submitted later).
    pub fn submit_now(&self, batch: Batch) -> Commit {
        if batch.is_empty() {
            return Commit::ready();
        }
        let (reply, rx) = oneshot::channel();
        if let Some(tx) = self.sender() {
            match tx.try_send(Job::Write(batch, reply)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    tokio::spawn(async move {
                        let _ = tx.send(job).await;
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        Commit::pending(rx)
    }

    /// Submits and waits for durability.
    pub async fn write(&self, batch: Batch) -> Result<(), StorageError> {
        self.submit(batch).await.await
    }

    /// Syncs the WAL, whatever the sync mode: everything submitted before
    /// is durable when this returns.
    pub async fn flush(&self) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        let Some(tx) = self.sender() else {
            return Err(StorageError::WriterGone);
        };
        tx.send(Job::Flush(reply))
            .await
            .map_err(|_| StorageError::WriterGone)?;
        Commit::pending(rx).await
    }

    /// Writes every memtable out to table files. Blocks: for the blocking
    /// pool. What is read afterwards comes from those files (the on-disk
    /// read paths, in tests; a copy of the directory without a WAL replay).
    pub fn flush_memtables(&self) -> Result<(), StorageError> {
        for name in crate::schema::ALL_CFS {
            self.db().flush_cf(self.cf_handle(name)?)?;
        }
        Ok(())
    }

    /// Stops the writer after it has written and synced everything queued.
    /// Blocks: call it from `spawn_blocking` or outside the runtime.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        self.inner.stop.store(true, Ordering::Release);
        let threads = match self.inner.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => Vec::new(),
        };
        for t in threads {
            let _ = t.join();
        }
    }

    /// Calls `f` with each entry of `cf` whose key starts with `prefix`, in
    /// key order, until it returns false. A scan: blocking.
    pub(crate) fn scan_prefix(
        &self,
        cf: &'static str,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let handle = self.cf_handle(cf)?;
        for item in self
            .db()
            .iterator_cf(handle, IteratorMode::From(prefix, Direction::Forward))
        {
            let (key, value) = item?;
            if !key.starts_with(prefix) || !f(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    /// The value of `key` in `cf` from memory alone (memtables, the block
    /// cache and the tables' bloom filters), never a file read: safe on an
    /// async worker. `Uncached` when only the disk could tell.
    pub(crate) fn get_in_memory(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Cached<Option<Vec<u8>>>, StorageError> {
        let mut options = rocksdb::ReadOptions::default();
        options.set_read_tier(rocksdb::ReadTier::BlockCache);
        match self.db().get_cf_opt(self.cf_handle(cf)?, key, &options) {
            Ok(v) => Ok(Cached::Known(v)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(Cached::Uncached),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn db(&self) -> &DB {
        &self.inner.db
    }

    pub(crate) fn cf_handle(
        &self,
        name: &'static str,
    ) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.cf(name)
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.inner.db.cf_handle(name).ok_or(StorageError::Corrupt {
            cf: name,
            what: "column family is missing".into(),
        })
    }

    /// Every persistent session with what it is owed and its chat cursors.
    /// Used once at start-up: one ordered pass over each of `session`,
    /// `offline`, `inbound` and `cursor` (not a prefix scan per session),
    /// the last three merged by client id. Entries of a client id with no
    /// session record are skipped.
    pub fn load_sessions(&self) -> Result<Vec<StoredSession>, StorageError> {
        let mut sessions = Vec::new();
        let mut it = self.full_scan(CF_SESSION)?;
        while let Some((key, value)) = it.item() {
            let client_id = String::from_utf8(key.to_vec()).map_err(|_| StorageError::Corrupt {
                cf: CF_SESSION,
                what: "client id is not UTF-8".into(),
            })?;
            sessions.push(StoredSession {
                client_id,
                record: SessionRecord::decode(value)?,
                outbox: Vec::new(),
                inbound: Vec::new(),
                cursors: Vec::new(),
            });
            it.next();
        }
        it.status()?;
        drop(it);
        // `session` is keyed by the bare client id, the others by its
        // `client_prefix`, which sorts by length first: walk the sessions
        // in that order.
        let mut order: Vec<usize> = (0..sessions.len()).collect();
        order.sort_unstable_by(|&a, &b| {
            let (a, b) = (
                sessions[a].client_id.as_bytes(),
                sessions[b].client_id.as_bytes(),
            );
            (a.len(), a).cmp(&(b.len(), b))
        });
        let mut bodies = self.load_bodies()?;
        self.merge_by_client(CF_OUTBOX, &mut sessions, &order, |s, rest, value| {
            let n = seq_value(rest).ok_or(StorageError::Corrupt {
                cf: CF_OUTBOX,
                what: "bad key".into(),
            })?;
            let mut entry = OutboxEntry::decode(value)?;
            if let (Some(id), Some(own)) = (entry.body, entry.message.as_mut()) {
                let Some((body, used)) = bodies.get_mut(&id) else {
                    // Its body went with the last reference released: the
                    // entry was acknowledged, and its deletion overtaken by
                    // the write that stored it (a subscriber that acked
                    // before the publisher's batch was written).
                    return Ok(());
                };
                *used = true;
                let (qos, retain) = (own.qos, own.retain);
                *own = MessageRecord {
                    qos,
                    retain,
                    ..body.clone()
                };
            }
            s.outbox.push((n, entry));
            Ok(())
        })?;
        // Bodies no entry refers to (entries deleted after them): gone.
        let unused: Vec<u64> = bodies
            .iter()
            .filter(|(_, (_, used))| !used)
            .map(|(id, _)| *id)
            .collect();
        if !unused.is_empty() {
            let cf = self.cf_handle(CF_BODY)?;
            let mut wb = rocksdb::WriteBatch::default();
            for id in unused {
                wb.delete_cf(cf, id.to_be_bytes());
            }
            self.db().write(wb)?;
        }
        self.merge_by_client(CF_INBOUND, &mut sessions, &order, |s, rest, _| {
            if let Ok(pkid) = rest.try_into() {
                s.inbound.push(u16::from_be_bytes(pkid));
            }
            Ok(())
        })?;
        self.merge_by_client(CF_CURSOR, &mut sessions, &order, |s, conv, value| {
            if let (Ok(conv), Some(seq)) = (std::str::from_utf8(conv), seq_value(value)) {
                s.cursors.push((conv.to_string(), seq));
            }
            Ok(())
        })?;
        Ok(sessions)
    }

    /// Every stored body, by id, none referred to yet.
    fn load_bodies(
        &self,
    ) -> Result<std::collections::HashMap<u64, (MessageRecord, bool)>, StorageError> {
        let mut bodies = std::collections::HashMap::new();
        let mut it = self.full_scan(CF_BODY)?;
        while let Some((key, value)) = it.item() {
            let id = seq_value(key).ok_or(StorageError::Corrupt {
                cf: CF_BODY,
                what: "bad key".into(),
            })?;
            bodies.insert(id, (MessageRecord::decode(value)?, false));
            it.next();
        }
        it.status()?;
        Ok(bodies)
    }

    /// Walks `cf` (keyed by [`client_prefix`] and then the rest) once,
    /// beside `sessions` taken in `order` (the same key order), and calls
    /// `f` with the session, the rest of the key and the value of each
    /// entry that belongs to one of them.
    fn merge_by_client(
        &self,
        cf: &'static str,
        sessions: &mut [StoredSession],
        order: &[usize],
        mut f: impl FnMut(&mut StoredSession, &[u8], &[u8]) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut it = self.full_scan(cf)?;
        let mut next = order.iter().peekable();
        while let Some((key, value)) = it.item() {
            if let Some((id, rest)) = split_client(key) {
                // Sessions before this entry's client id own no more entries.
                while next.peek().is_some_and(|&&i| {
                    let s = sessions[i].client_id.as_bytes();
                    (s.len(), s) < (id.len(), id)
                }) {
                    next.next();
                }
                let Some(&&i) = next.peek() else {
                    break;
                };
                if sessions[i].client_id.as_bytes() == id {
                    f(&mut sessions[i], rest, value)?;
                }
            }
            it.next();
        }
        Ok(it.status()?)
    }

    /// An iterator over all of `cf`, at its first entry, for a one-off
    /// pass at start-up: read ahead, and kept out of the block cache.
    fn full_scan(&self, cf: &'static str) -> Result<rocksdb::DBRawIterator<'_>, StorageError> {
        let mut options = rocksdb::ReadOptions::default();
        options.fill_cache(false);
        options.set_readahead_size(SCAN_READAHEAD);
        let mut it = self.inner.db.raw_iterator_cf_opt(self.cf(cf)?, options);
        it.seek_to_first();
        Ok(it)
    }

    /// Every retained message. Used once at start-up.
    pub fn load_retained(&self) -> Result<Vec<MessageRecord>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_RETAINED)?, IteratorMode::Start)
        {
            let (_, value) = item?;
            out.push(MessageRecord::decode(&value)?);
        }
        Ok(out)
    }
}

/// The highest body id stored, if any (new ids go above it).
fn last_body_id(db: &DB) -> Result<Option<u64>, StorageError> {
    let cf = db.cf_handle(CF_BODY).ok_or(StorageError::Corrupt {
        cf: CF_BODY,
        what: "column family is missing".into(),
    })?;
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_last();
    let last = it.key().and_then(seq_value);
    it.status()?;
    Ok(last)
}

fn ensure_epoch(db: &DB) -> Result<String, StorageError> {
    let cf = db.cf_handle(CF_META).ok_or(StorageError::Corrupt {
        cf: CF_META,
        what: "column family is missing".into(),
    })?;
    if let Some(v) = db.get_cf(cf, META_EPOCH)? {
        return String::from_utf8(v).map_err(|_| StorageError::Corrupt {
            cf: CF_META,
            what: "epoch is not UTF-8".into(),
        });
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let epoch = format!("{:x}{:x}", nanos, std::process::id());
    let mut wb = rocksdb::WriteBatch::default();
    wb.put_cf(cf, META_EPOCH, epoch.as_bytes());
    wb.put_cf(cf, META_SCHEMA, SCHEMA_VERSION.to_be_bytes());
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(wb, &opts)?;
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{MessageRecord, OutboxState, SubscriptionRecord};

    fn open(dir: &Path, sync: SyncMode) -> Store {
        match Store::open(dir, sync, Duration::from_millis(5)) {
            Ok(s) => s,
            Err(e) => panic!("open: {e}"),
        }
    }

    fn entry(payload: &str) -> OutboxEntry {
        OutboxEntry {
            state: OutboxState::Publish,
            subscription_ids: vec![],
            message: Some(MessageRecord {
                topic: "t".into(),
                payload: payload.as_bytes().to_vec(),
                qos: 1,
                ..Default::default()
            }),
            body: None,
        }
    }

    #[tokio::test]
    async fn a_session_and_its_outbox_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let epoch;
        {
            let store = open(dir.path(), SyncMode::Always);
            epoch = store.epoch().to_string();
            let mut b = Batch::new();
            b.put_session(
                "c1",
                &SessionRecord {
                    owner: Some("alice".into()),
                    protocol: 4,
                    expiry_secs: 60,
                    disconnected_at_ms: 0,
                    subscriptions: vec![SubscriptionRecord {
                        filter: "a/#".into(),
                        qos: 1,
                        ..Default::default()
                    }],
                },
            );
            b.put_outbox("c1", 1, &entry("one"));
            b.put_outbox("c1", 300, &entry("two"));
            b.put_outbox("c10", 1, &entry("other client"));
            b.put_inbound("c1", 7);
            b.put_client_owner("c1", "alice", 1);
            store.write(b).await.unwrap();
            let mut b = Batch::new();
            b.delete_outbox("c1", 1);
            store.write(b).await.unwrap();
            store.close();
        }
        let store = open(dir.path(), SyncMode::Always);
        assert_eq!(store.epoch(), epoch);
        let sessions = store.load_sessions().unwrap();
        assert_eq!(sessions.len(), 1);
        let s = &sessions[0];
        assert_eq!(s.client_id, "c1");
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(s.outbox[0].0, 300);
        assert_eq!(s.inbound, vec![7]);
        assert_eq!(
            store.client_owner("c1").unwrap().map(|o| o.user).as_deref(),
            Some("alice")
        );
        assert_eq!(store.client_owner("c2").unwrap(), None);

        let mut b = Batch::new();
        b.delete_session("c1");
        store.write(b).await.unwrap();
        assert!(store.load_sessions().unwrap().is_empty());
        store.close();
    }

    /// Issue #11 item 2: a message owed to several persistent sessions is
    /// stored once. Each session's entry keeps its own QoS and RETAIN and
    /// refers to the body; the body goes with the last entry released; an
    /// entry whose body is gone (its deletion overtaken) is not loaded, and
    /// a body no entry refers to is deleted at load.
    #[tokio::test]
    async fn a_message_owed_to_many_sessions_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), SyncMode::Never);
        let payload = vec![7u8; 10_000];
        let message = std::sync::Arc::new(payload.clone());
        let record = || MessageRecord {
            topic: "news".into(),
            payload: payload.clone(),
            qos: 2,
            ..Default::default()
        };
        let ids = ["s1", "s2", "s3"];
        let mut b = Batch::new();
        let mut bodies = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            b.put_session(id, &SessionRecord::default());
            let body = b.share_body(&message, record);
            let own = MessageRecord {
                qos: 1 + (i as u8 % 2),
                retain: i == 0,
                ..Default::default()
            };
            b.put_outbox(
                id,
                1,
                &OutboxEntry {
                    state: OutboxState::Publish,
                    subscription_ids: vec![],
                    message: Some(own),
                    body: Some(body.id()),
                },
            );
            bodies.push(body);
        }
        assert!(bodies.iter().all(|b| b.id() == bodies[0].id()), "one body");
        let written: usize = b
            .ops
            .iter()
            .map(|op| match op {
                crate::batch::Op::Put { value, .. } => value.len(),
                _ => 0,
            })
            .sum();
        assert!(
            written < 11_000,
            "the payload is written once: {written} bytes"
        );
        store.write(b).await.unwrap();

        let loaded = store.load_sessions().unwrap();
        assert_eq!(loaded.len(), 3);
        for (i, s) in loaded.iter().enumerate() {
            let (n, e) = &s.outbox[0];
            let m = e.message.as_ref().unwrap();
            assert_eq!((*n, m.topic.as_str(), m.payload.len()), (1, "news", 10_000));
            assert_eq!(
                (m.qos, m.retain),
                (1 + (i as u8 % 2), i == 0),
                "{}",
                s.client_id
            );
        }

        // Two sessions acknowledge: the body stays for the third.
        let mut b = Batch::new();
        for (id, body) in ids.iter().zip(&bodies).take(2) {
            b.delete_outbox(id, 1);
            b.release_body(Some(body));
        }
        store.write(b).await.unwrap();
        assert_eq!(store.load_bodies().unwrap().len(), 1);
        // The third does: the body goes with it.
        let mut b = Batch::new();
        b.delete_outbox("s3", 1);
        b.release_body(Some(&bodies[2]));
        store.write(b).await.unwrap();
        assert!(store.load_bodies().unwrap().is_empty());

        // An entry left behind without its body is not loaded; a body
        // nothing refers to is removed; new ids go above the ones stored.
        let mut b = Batch::new();
        b.put_outbox(
            "s1",
            2,
            &OutboxEntry {
                state: OutboxState::Publish,
                subscription_ids: vec![],
                message: Some(MessageRecord::default()),
                body: Some(bodies[0].id()),
            },
        );
        let orphan = b.share_body(&std::sync::Arc::new(()), record);
        store.write(b).await.unwrap();
        let loaded = store.load_sessions().unwrap();
        assert!(loaded.iter().all(|s| s.outbox.is_empty()), "{loaded:?}");
        assert!(
            store.load_bodies().unwrap().is_empty(),
            "orphan body removed"
        );
        assert!(orphan.id() > bodies[0].id());
        store.close();
    }

    /// What `load_sessions` returned when it scanned each session's
    /// prefix in every column family, one session after another.
    fn load_sessions_one_by_one(store: &Store) -> Vec<StoredSession> {
        let mut sessions = Vec::new();
        let db = store.db();
        for item in db.iterator_cf(store.cf(CF_SESSION).unwrap(), IteratorMode::Start) {
            let (key, value) = item.unwrap();
            let client_id = String::from_utf8(key.to_vec()).unwrap();
            let prefix = crate::schema::client_prefix(&client_id);
            let mut s = StoredSession {
                record: SessionRecord::decode(&value).unwrap(),
                client_id,
                outbox: Vec::new(),
                inbound: Vec::new(),
                cursors: Vec::new(),
            };
            let scan = |cf, f: &mut dyn FnMut(&[u8], &[u8])| {
                store
                    .scan_prefix(cf, &prefix, |k, v| {
                        f(&k[prefix.len()..], v);
                        true
                    })
                    .unwrap()
            };
            scan(CF_OUTBOX, &mut |k, v| {
                s.outbox
                    .push((seq_value(k).unwrap(), OutboxEntry::decode(v).unwrap()))
            });
            scan(CF_INBOUND, &mut |k, _| {
                s.inbound.push(u16::from_be_bytes(k.try_into().unwrap()))
            });
            scan(CF_CURSOR, &mut |k, v| {
                let conv = String::from_utf8(k.to_vec()).unwrap();
                s.cursors.push((conv, seq_value(v).unwrap()))
            });
            sessions.push(s);
        }
        sessions
    }

    fn summary(sessions: &[StoredSession]) -> Vec<String> {
        sessions.iter().map(|s| format!("{s:?}")).collect()
    }

    // Client ids that are prefixes of each other ("a", "ab", "abc"), one
    // that sorts first by bytes but last by length ("aaaa" < "ab"),
    // sessions with nothing owed, and entries of ids with no session.
    #[tokio::test]
    async fn sessions_load_with_their_outboxes_inbound_and_cursors_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), SyncMode::Never);
        let ids = ["a", "ab", "abc", "aaaa", "b", "empty", "z"];
        let mut b = Batch::new();
        for (i, id) in ids.iter().enumerate() {
            let record = SessionRecord {
                owner: Some(format!("user-{id}")),
                protocol: 5,
                expiry_secs: 60 + i as u32,
                disconnected_at_ms: if i % 2 == 0 { 0 } else { 1000 + i as u64 },
                subscriptions: vec![SubscriptionRecord {
                    filter: format!("{id}/#"),
                    qos: 1,
                    ..Default::default()
                }],
            };
            b.put_session(id, &record);
        }
        // Interleaved: entries go in round by round over the ids.
        for n in [1u64, 2, 256, 70_000] {
            for id in ["a", "ab", "abc", "aaaa", "z"] {
                b.put_outbox(id, n, &entry(&format!("{id} {n}")));
            }
        }
        for (id, pkid) in [("ab", 3u16), ("a", 1), ("a", 0x0100), ("aaaa", 9)] {
            b.put_inbound(id, pkid);
        }
        for (id, conv, seq) in [
            ("a", "room", 4u64),
            ("abc", "room", 5),
            ("a", "lobby", 6),
            ("ab", "room", 7),
            ("b", "x", 8),
            ("z", "room", 9),
        ] {
            b.put_cursor(id, conv, seq);
        }
        // No session: "ghost", "", "ac" (between "ab" and "abc" by length).
        for id in ["ghost", "", "ac"] {
            b.put_outbox(id, 1, &entry("nobody's"));
            b.put_inbound(id, 1);
            b.put_cursor(id, "room", 1);
        }
        store.write(b).await.unwrap();
        let mut b = Batch::new();
        b.delete_outbox("ab", 2);
        store.write(b).await.unwrap();

        let loaded = store.load_sessions().unwrap();
        assert_eq!(summary(&loaded), summary(&load_sessions_one_by_one(&store)));
        let find = |id: &str| loaded.iter().find(|s| s.client_id == id).unwrap();
        assert_eq!(loaded.len(), ids.len());
        let ns = |id| find(id).outbox.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(ns("ab"), [1, 256, 70_000]);
        assert_eq!(ns("aaaa"), [1, 2, 256, 70_000]);
        assert!(ns("empty").is_empty() && ns("b").is_empty());
        assert_eq!(find("a").inbound, [1, 0x0100]);
        let cursors = &find("a").cursors;
        assert_eq!(
            cursors,
            &[("lobby".to_string(), 6), ("room".to_string(), 4)]
        );
        assert!(find("empty").cursors.is_empty());
        store.close();
    }

    /// The options RocksDB runs with, as it recorded them in the newest
    /// OPTIONS file of the database: section name -> its lines.
    fn options_in_force(dir: &Path) -> std::collections::HashMap<String, Vec<String>> {
        let newest = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("OPTIONS-"))
            .max_by_key(|n| n["OPTIONS-".len()..].parse::<u64>().unwrap_or(0))
            .expect("RocksDB writes an OPTIONS file");
        let text = std::fs::read_to_string(dir.join(newest)).unwrap();
        let mut sections = std::collections::HashMap::new();
        let mut current = String::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                current = line.to_string();
            } else if !line.is_empty() && !line.starts_with('#') {
                sections
                    .entry(current.clone())
                    .or_insert_with(Vec::new)
                    .push(line.to_string());
            }
        }
        sections
    }

    #[tokio::test]
    async fn every_column_family_is_compressed_and_point_lookups_have_bloom_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), SyncMode::Always);
        let sections = options_in_force(dir.path());
        let has = |section: &str, line: &str| {
            sections
                .get(section)
                .is_some_and(|lines| lines.iter().any(|l| l == line))
        };
        let db = "[DBOptions]";
        let budget = crate::options::WRITE_BUFFER_BUDGET;
        assert!(has(db, &format!("db_write_buffer_size={budget}")));
        let wal = crate::options::MAX_TOTAL_WAL;
        assert!(has(db, &format!("max_total_wal_size={wal}")));
        for cf in ALL_CFS {
            let options = format!("[CFOptions \"{cf}\"]");
            assert!(has(&options, "compression=kLZ4Compression"), "{cf}");
            let table = format!("[TableOptions/BlockBasedTable \"{cf}\"]");
            let bloom = sections[&table]
                .iter()
                .any(|l| l.starts_with("filter_policy=bloomfilter"));
            let point = crate::schema::POINT_LOOKUP_CFS.contains(&cf);
            assert_eq!(bloom, point, "{cf}: a bloom filter only for point lookups");
        }
        // And the tables written really are LZ4: flushed, then asked.
        let mut b = Batch::new();
        b.put_client_owner("c1", "alice", 1);
        store.write(b).await.unwrap();
        let cf = store.cf(crate::schema::CF_CLIENT).unwrap();
        store.db().flush_cf(cf).unwrap();
        let tables = store
            .db()
            .property_value_cf(cf, rocksdb::properties::SSTABLES)
            .unwrap()
            .unwrap_or_default();
        assert!(!tables.is_empty());
        let ratio = store
            .db()
            .property_value_cf(cf, rocksdb::properties::AGGREGATED_TABLE_PROPERTIES)
            .unwrap()
            .unwrap_or_default();
        assert!(ratio.contains("filter block size"), "{ratio}");
        store.close();
    }

    #[tokio::test]
    async fn concurrent_writers_are_grouped_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [SyncMode::Always, SyncMode::Interval, SyncMode::Never] {
            let path = dir.path().join(format!("{mode:?}"));
            let store = open(&path, mode);
            let mut commits = Vec::new();
            for i in 0..200u64 {
                let mut b = Batch::new();
                let mut m = entry("x");
                if let Some(msg) = m.message.as_mut() {
                    msg.topic = format!("t/{i}");
                }
                b.put_retained(m.message.as_ref().unwrap());
                commits.push(store.submit(b).await);
            }
            for c in commits {
                c.await.unwrap();
            }
            store.flush().await.unwrap();
            assert_eq!(store.load_retained().unwrap().len(), 200, "{mode:?}");
            let latency = store.commit_latency();
            assert!(
                (1..=200).contains(&latency.count),
                "one sample per group commit: {latency:?}"
            );
            assert_eq!(store.queue_depth(), 0);
            store.close();
        }
    }
}
