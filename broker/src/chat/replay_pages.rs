//! Replay pages: the pages of conversation logs read recently by catch-up,
//! shared by every session replaying the same conversation, so that a
//! thousand sessions coming back to one group cost one storage read per
//! page and one copy of each message (an `Arc<Message>`), not a thousand.
//!
//! A page holds the seqs `[start, start + PAGE)` of one conversation,
//! aligned (`start = k * PAGE + 1`), so sessions at different cursors
//! share it. What it holds is always a prefix of that range as the log had
//! it when read: `upto` is the last seq known read. The log is append-only,
//! so the prefix never changes; a page the head has not passed yet is
//! extended by a later read, never served as complete. Reads of one page
//! wait for each other (its async lock), so concurrent readers of a page
//! that is missing cause one storage read.
//!
//! Bounded by pages and bytes ([`MAX_PAGES`], [`MAX_BYTES`]), least
//! recently used first out. It never calls RocksDB on an async worker
//! (reads go to the blocking pool), and never serves a seq that retention
//! trimmed before the request ([`ReplayPages::trimmed`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use chatmq_storage::{StorageError, Store};
use rumqttc::v5::mqttbytes::QoS;

use crate::blocking;
use crate::message::Message;

/// Seqs per page: one storage read of a catch-up.
pub const PAGE: u64 = 256;
/// Most pages kept (262,144 messages at most).
pub const MAX_PAGES: usize = 1024;
/// Most bytes of topics and bodies kept, counted as a session counts what
/// it holds, plus [`ENTRY_OVERHEAD`] per message.
pub const MAX_BYTES: usize = 64 << 20;
/// What one message costs beyond its topic and body (the `Message`, its
/// `Arc`, the entry).
const ENTRY_OVERHEAD: usize = 160;

/// What a read of a page gives a catch-up.
pub struct Served {
    /// The page's messages from the requested seq on, in seq order.
    pub entries: Vec<(u64, Arc<Message>)>,
    /// The seq to read next: the page's end when it is complete, else one
    /// past the last seq read.
    pub next: u64,
    /// Whether the log has passed the page's end (a later seq exists):
    /// nothing more can appear in it.
    pub complete: bool,
    /// Whether this call read storage.
    pub read: bool,
    /// Whether it served a page read before, for this session or another,
    /// without reading storage.
    pub shared: bool,
}

/// One page of one conversation's log, as far as it was read.
struct Page {
    entries: Vec<(u64, Arc<Message>)>,
    /// Every seq of the page up to this one was read (`start - 1`: none).
    upto: u64,
}

struct Slot {
    start: u64,
    /// `None` until first read; locked for the read, so that readers of a
    /// page being read wait for it.
    page: tokio::sync::Mutex<Option<Arc<Page>>>,
    /// Seqs below this were trimmed by retention: never served.
    floor: AtomicU64,
}

impl Slot {
    fn end(&self) -> u64 {
        self.start.saturating_add(PAGE)
    }
}

struct Entry {
    slot: Arc<Slot>,
    /// Its place in [`Index::lru`].
    used: u64,
    bytes: usize,
}

#[derive(Default)]
struct Index {
    /// Pages by conversation and start seq.
    convs: HashMap<Arc<str>, BTreeMap<u64, Entry>>,
    /// (conversation, start) by last use, oldest first.
    lru: BTreeMap<u64, (Arc<str>, u64)>,
    tick: u64,
    pages: usize,
    bytes: usize,
}

/// The shared replay pages (see the module docs).
pub struct ReplayPages {
    index: Mutex<Index>,
    max_pages: usize,
    max_bytes: usize,
}

impl Default for ReplayPages {
    fn default() -> Self {
        ReplayPages::new(MAX_PAGES, MAX_BYTES)
    }
}

/// The first seq of the page holding `seq`.
fn page_start(seq: u64) -> u64 {
    (seq.max(1) - 1) / PAGE * PAGE + 1
}

impl ReplayPages {
    pub fn new(max_pages: usize, max_bytes: usize) -> ReplayPages {
        ReplayPages {
            index: Mutex::new(Index::default()),
            max_pages,
            max_bytes,
        }
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The messages of `conv` from seq `from` to the end of its page.
    /// `known` is a seq the caller knows committed (the conversation's
    /// durable head; `u64::MAX` when unknown): a page read before the log
    /// reached it is read again from where it stopped, so a catch-up's last
    /// pass sees every message that was committed before it. Otherwise
    /// the page is served as read, for this session or another.
    pub async fn read(
        &self,
        store: &Store,
        conv: &Arc<str>,
        from: u64,
        known: u64,
    ) -> Result<Served, StorageError> {
        let slot = self.slot(conv, page_start(from));
        let mut page = slot.page.lock().await;
        let last = slot.end() - 1;
        let have = page.as_ref().map_or(slot.start - 1, |p| p.upto);
        let read = have < known.min(last);
        if read {
            let more = read_on(store, conv, have + 1, slot.end()).await?;
            let mut entries = page.as_ref().map_or_else(Vec::new, |p| p.entries.clone());
            let mut upto = have;
            for (seq, msg) in more {
                if seq > last {
                    upto = last; // the log went past the end: complete
                    break;
                }
                upto = seq;
                entries.push((seq, msg));
            }
            let bytes = entries.iter().map(|(_, m)| cost(m)).sum();
            *page = Some(Arc::new(Page { entries, upto }));
            self.account(conv, &slot, bytes);
        }
        let floor = slot.floor.load(Ordering::Acquire).max(from);
        let (entries, upto) = match page.as_ref() {
            Some(p) => (
                p.entries
                    .iter()
                    .filter(|(seq, _)| *seq >= floor)
                    .cloned()
                    .collect(),
                p.upto,
            ),
            None => (Vec::new(), have),
        };
        let complete = upto >= last;
        Ok(Served {
            entries,
            next: if complete { slot.end() } else { upto + 1 }.max(from),
            complete,
            read,
            shared: !read && page.is_some(),
        })
    }

    /// Retention dropped the seqs of `conv` below `first` (the trim is
    /// committed): pages wholly below go, and no page serves them again,
    /// also not one being read now.
    pub fn trimmed(&self, conv: &str, first: u64) {
        let mut index = self.index();
        let Some(pages) = index.convs.get_mut(conv) else {
            return;
        };
        for e in pages.values() {
            e.slot.floor.fetch_max(first, Ordering::AcqRel);
        }
        let below: Vec<u64> = pages
            .values()
            .filter(|e| e.slot.end() <= first)
            .map(|e| e.slot.start)
            .collect();
        let conv: Arc<str> = conv.into();
        for start in below {
            index.remove(&conv, start);
        }
    }

    /// Messages `seqs` of `conv` were rewritten (edited, deleted; the
    /// write is committed): the pages holding them go, so the next
    /// catch-up reads their latest version. A session reading one now
    /// keeps its copy (the change record follows it in seq order).
    pub fn rewritten(&self, conv: &str, seqs: &[u64]) {
        let mut index = self.index();
        let conv: Arc<str> = conv.into();
        for seq in seqs {
            index.remove(&conv, page_start(*seq));
        }
    }

    /// The slot of page `start` of `conv`, made the most recently used.
    fn slot(&self, conv: &Arc<str>, start: u64) -> Arc<Slot> {
        let mut index = self.index();
        index.tick += 1;
        let tick = index.tick;
        let pages = index.convs.entry(conv.clone()).or_default();
        let (slot, old) = match pages.get_mut(&start) {
            Some(e) => (e.slot.clone(), Some(std::mem::replace(&mut e.used, tick))),
            None => {
                let slot = Arc::new(Slot {
                    start,
                    page: tokio::sync::Mutex::new(None),
                    floor: AtomicU64::new(0),
                });
                pages.insert(
                    start,
                    Entry {
                        slot: slot.clone(),
                        used: tick,
                        bytes: 0,
                    },
                );
                (slot, None)
            }
        };
        match old {
            Some(old) => {
                index.lru.remove(&old);
            }
            None => index.pages += 1,
        }
        index.lru.insert(tick, (conv.clone(), start));
        self.evict(&mut index);
        slot
    }

    /// Records that `slot` of `conv` now holds `bytes`, if it is still the
    /// one cached (it may have been evicted while read), and evicts the
    /// least recently used pages above the bounds.
    fn account(&self, conv: &Arc<str>, slot: &Arc<Slot>, bytes: usize) {
        let mut index = self.index();
        let Some(e) = index
            .convs
            .get_mut(conv)
            .and_then(|pages| pages.get_mut(&slot.start))
            .filter(|e| Arc::ptr_eq(&e.slot, slot))
        else {
            return;
        };
        let before = std::mem::replace(&mut e.bytes, bytes);
        index.bytes = index.bytes.saturating_sub(before).saturating_add(bytes);
        self.evict(&mut index);
    }

    fn evict(&self, index: &mut Index) {
        while index.pages > self.max_pages || index.bytes > self.max_bytes {
            let Some((_, (conv, start))) = index.lru.pop_first() else {
                return;
            };
            index.remove(&conv, start);
        }
    }

    /// Pages and bytes held now.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let index = self.index();
        (index.pages, index.bytes)
    }
}

impl Index {
    /// Forgets page `start` of `conv`. A session reading it keeps its copy;
    /// the next reader reads storage again.
    fn remove(&mut self, conv: &Arc<str>, start: u64) {
        let Some(pages) = self.convs.get_mut(conv) else {
            return;
        };
        if let Some(e) = pages.remove(&start) {
            self.lru.remove(&e.used);
            self.pages -= 1;
            self.bytes = self.bytes.saturating_sub(e.bytes);
        }
        if pages.is_empty() {
            self.convs.remove(conv);
        }
    }
}

/// What a cached message counts against [`MAX_BYTES`].
fn cost(m: &Message) -> usize {
    m.topic.len() + m.payload.len() + ENTRY_OVERHEAD
}

/// The messages of `conv` in `from..end` and the first one after, if any
/// (it tells that the page is complete), built on the blocking pool.
async fn read_on(
    store: &Store,
    conv: &Arc<str>,
    from: u64,
    end: u64,
) -> Result<Vec<(u64, Arc<Message>)>, StorageError> {
    let conv = conv.clone();
    let limit = usize::try_from(end.saturating_sub(from))
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    blocking::read(store, move |s| {
        let topic = format!("chat/{conv}");
        let page = s.messages(&conv, from, u64::MAX, limit, false)?;
        Ok(page
            .into_iter()
            .map(|(seq, body)| {
                let msg =
                    Message::from_server(topic.clone(), Bytes::from(body), QoS::AtLeastOnce, false);
                // Kept for every session replaying it: one encoding for all.
                msg.mark_shared();
                (seq, Arc::new(msg))
            })
            .collect())
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chatmq_storage::{Batch, SyncMode};

    use super::*;

    fn open(dir: &std::path::Path) -> Store {
        Store::open(dir, SyncMode::Never, Duration::from_millis(5)).unwrap()
    }

    /// Writes messages `seqs` of `conv`, each body saying its seq.
    async fn write(store: &Store, conv: &str, seqs: impl IntoIterator<Item = u64>) {
        let mut batch = Batch::new();
        for seq in seqs {
            batch.put_message(conv, seq, format!("{{\"seq\":{seq}}}").as_bytes());
        }
        store.submit(batch).await.await.unwrap();
    }

    fn seqs(served: &Served) -> Vec<u64> {
        served.entries.iter().map(|(s, _)| *s).collect()
    }

    #[tokio::test]
    async fn sessions_reading_one_page_share_one_read_and_one_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        write(&store, "room", 1..=300).await;
        let pages = Arc::new(ReplayPages::default());
        let conv: Arc<str> = "room".into();
        // Many sessions ask at once: one reads, the others wait for it.
        let readers: Vec<_> = (0..50)
            .map(|_| {
                let (pages, store, conv) = (pages.clone(), store.clone(), conv.clone());
                tokio::spawn(async move { pages.read(&store, &conv, 1, 300).await.unwrap() })
            })
            .collect();
        let mut served = Vec::new();
        for r in readers {
            served.push(r.await.unwrap());
        }
        assert_eq!(
            served.iter().filter(|s| s.read).count(),
            1,
            "one storage read"
        );
        assert_eq!(served.iter().filter(|s| s.shared).count(), 49);
        for s in &served {
            assert_eq!(seqs(s), (1..=256).collect::<Vec<_>>());
            assert!(s.complete, "seq 257 exists: the page is complete");
            assert_eq!(s.next, 257);
            assert!(
                Arc::ptr_eq(&s.entries[9].1, &served[0].entries[9].1),
                "one copy"
            );
        }
        // A session further on shares the same aligned page.
        let later = pages.read(&store, &conv, 200, 300).await.unwrap();
        assert!(later.shared && !later.read);
        assert_eq!(seqs(&later), (200..=256).collect::<Vec<_>>());
        assert_eq!(&*later.entries[0].1.payload, br#"{"seq":200}"#);
        assert_eq!(later.entries[0].1.topic, "chat/room");
    }

    #[tokio::test]
    async fn a_short_page_is_not_served_as_complete_and_grows() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        write(&store, "room", 1..=10).await;
        let pages = ReplayPages::default();
        let conv: Arc<str> = "room".into();
        let first = pages.read(&store, &conv, 1, 10).await.unwrap();
        assert_eq!(seqs(&first), (1..=10).collect::<Vec<_>>());
        assert!(!first.complete, "the log has not passed the page's end");
        assert_eq!(first.next, 11);
        // Known to reach no further: the page read is shared.
        let again = pages.read(&store, &conv, 1, 10).await.unwrap();
        assert!(again.shared && !again.complete);
        // Appends race the replay: a reader that knows of seq 12 gets the
        // page extended from where it stopped, not the short copy.
        write(&store, "room", 11..=12).await;
        let grown = pages.read(&store, &conv, 11, 12).await.unwrap();
        assert!(grown.read);
        assert_eq!(seqs(&grown), [11, 12]);
        let all = pages.read(&store, &conv, 1, 12).await.unwrap();
        assert!(all.shared);
        assert_eq!(seqs(&all), (1..=12).collect::<Vec<_>>());
        // Not knowing the head, a reader always looks again.
        let unknown = pages.read(&store, &conv, 13, u64::MAX).await.unwrap();
        assert!(unknown.read && unknown.entries.is_empty() && !unknown.complete);
        // Once the log passes the end, the page is complete for good.
        write(&store, "room", 13..=257).await;
        let full = pages.read(&store, &conv, 13, u64::MAX).await.unwrap();
        assert!(full.read && full.complete);
        assert_eq!(full.next, 257);
        let after = pages.read(&store, &conv, 1, u64::MAX).await.unwrap();
        assert!(after.shared && after.complete);
        assert_eq!(seqs(&after), (1..=256).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn trimmed_seqs_are_never_served_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        write(&store, "room", 1..=600).await;
        let pages = ReplayPages::default();
        let conv: Arc<str> = "room".into();
        for from in [1, 257] {
            pages.read(&store, &conv, from, 600).await.unwrap();
        }
        assert_eq!(pages.held().0, 2);
        // Retention drops 1..=299 and then tells the pages.
        let mut batch = Batch::new();
        batch.delete_messages("room", 1, 300);
        store.submit(batch).await.await.unwrap();
        pages.trimmed("room", 300);
        assert_eq!(pages.held().0, 1, "the page wholly below went");
        let rest = pages.read(&store, &conv, 257, 600).await.unwrap();
        assert!(rest.shared, "the page is still shared...");
        assert_eq!(
            seqs(&rest),
            (300..=512).collect::<Vec<_>>(),
            "...from first on"
        );
        let gone = pages.read(&store, &conv, 1, 600).await.unwrap();
        assert!(gone.read && gone.entries.is_empty() && gone.complete);
    }

    #[tokio::test]
    async fn pages_are_bounded_by_count_and_bytes_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for conv in ["a", "b", "c"] {
            write(&store, conv, 1..=300).await;
        }
        let pages = ReplayPages::new(2, usize::MAX);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        pages.read(&store, &a, 1, 300).await.unwrap();
        pages.read(&store, &b, 1, 300).await.unwrap();
        assert!(pages.read(&store, &a, 1, 300).await.unwrap().shared);
        pages.read(&store, &c, 1, 300).await.unwrap();
        assert_eq!(pages.held().0, 2);
        assert!(
            pages.read(&store, &a, 1, 300).await.unwrap().shared,
            "a was used last"
        );
        assert!(
            pages.read(&store, &b, 1, 300).await.unwrap().read,
            "b went first"
        );

        // By bytes: one full page is 256 messages of about 190 bytes.
        let one_page = 256 * (b"chat/a".len() + br#"{"seq":100}"#.len() + ENTRY_OVERHEAD);
        let pages = ReplayPages::new(100, one_page + one_page / 2);
        pages.read(&store, &a, 1, 300).await.unwrap();
        pages.read(&store, &b, 1, 300).await.unwrap();
        let (held, bytes) = pages.held();
        assert_eq!(held, 1, "two pages do not fit");
        assert!(bytes <= one_page + one_page / 2, "{bytes}");
        assert!(pages.read(&store, &b, 1, 300).await.unwrap().shared);
        assert!(pages.read(&store, &a, 1, 300).await.unwrap().read);
    }
}
