//! Who owns a client id: the `client` column family, client id → the user
//! who first used it and when the claim was last seen in use.
//!
//! The value is `0x01`, the last-used time (unix ms, big-endian u64), then
//! the user id. Records written before the time was kept are the bare user
//! id (a user id never starts with byte 0x01); they read with no time, and
//! the broker stamps them on its next sweep. This module knows the layout
//! only; the broker decides who may claim what and when a claim lapses.

use rocksdb::{Direction, IteratorMode};

use crate::batch::{Batch, Op};
use crate::schema::CF_CLIENT;
use crate::store::Store;
use crate::{Cached, StorageError};

const STAMPED: u8 = 0x01;

/// The claim a user holds on a client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOwner {
    pub user: String,
    /// When the claim was last seen in use (unix ms); `None` for a record
    /// from before times were kept.
    pub last_used_ms: Option<u64>,
}

impl ClientOwner {
    fn encode(user: &str, last_used_ms: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + user.len());
        v.push(STAMPED);
        v.extend_from_slice(&last_used_ms.to_be_bytes());
        v.extend_from_slice(user.as_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<ClientOwner, StorageError> {
        let corrupt = || StorageError::Corrupt {
            cf: CF_CLIENT,
            what: "the owner is not UTF-8".into(),
        };
        match v.split_first() {
            Some((&STAMPED, rest)) if rest.len() >= 8 => {
                let (time, user) = rest.split_at(8);
                let mut ms = [0u8; 8];
                ms.copy_from_slice(time);
                Ok(ClientOwner {
                    user: String::from_utf8(user.to_vec()).map_err(|_| corrupt())?,
                    last_used_ms: Some(u64::from_be_bytes(ms)),
                })
            }
            _ => Ok(ClientOwner {
                user: String::from_utf8(v.to_vec()).map_err(|_| corrupt())?,
                last_used_ms: None,
            }),
        }
    }
}

impl Batch {
    /// Binds a client id to `user`, seen in use at `now_ms`.
    pub fn put_client_owner(&mut self, client_id: &str, user: &str, now_ms: u64) {
        self.ops.push(Op::Put {
            cf: CF_CLIENT,
            key: client_id.as_bytes().to_vec(),
            value: ClientOwner::encode(user, now_ms),
        });
    }

    /// Frees a client id whose claim has lapsed.
    pub fn delete_client_owner(&mut self, client_id: &str) {
        self.ops.push(Op::Delete {
            cf: CF_CLIENT,
            key: client_id.as_bytes().to_vec(),
        });
    }
}

impl Store {
    /// The claim on a client id, if a user has one.
    pub fn client_owner(&self, client_id: &str) -> Result<Option<ClientOwner>, StorageError> {
        let cf = self.cf_handle(CF_CLIENT)?;
        match self.db().get_cf(cf, client_id.as_bytes())? {
            Some(v) => ClientOwner::decode(&v).map(Some),
            None => Ok(None),
        }
    }

    /// The claim on a client id as far as memory can tell, without a disk
    /// read: `Known` when the memtables and the block cache held what the
    /// lookup needed (a new id is usually ruled out by the bloom filter
    /// alone), `Uncached` when it would have to read a file; then ask
    /// [`Store::client_owner`] off the async runtime. Cheap enough for
    /// an async worker: a CONNECT needs no blocking-pool hop for it.
    pub fn client_owner_in_memory(
        &self,
        client_id: &str,
    ) -> Result<Cached<Option<ClientOwner>>, StorageError> {
        Ok(match self.get_in_memory(CF_CLIENT, client_id.as_bytes())? {
            Cached::Known(Some(v)) => Cached::Known(Some(ClientOwner::decode(&v)?)),
            Cached::Known(None) => Cached::Known(None),
            Cached::Uncached => Cached::Uncached,
        })
    }

    /// Up to `limit` claims in client-id order, starting after `after`
    /// (from the first when `None`): one page of a sweep. A blocking scan:
    /// call it off the async runtime.
    pub fn client_owners_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ClientOwner)>, StorageError> {
        let cf = self.cf_handle(CF_CLIENT)?;
        let mode = match after {
            Some(id) => IteratorMode::From(id.as_bytes(), Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut page = Vec::new();
        for item in self.db().iterator_cf(cf, mode) {
            let (key, value) = item?;
            if after.is_some_and(|a| a.as_bytes() == &*key) {
                continue;
            }
            let Ok(client_id) = String::from_utf8(key.to_vec()) else {
                continue; // never written by chatmq: not ours to judge
            };
            page.push((client_id, ClientOwner::decode(&value)?));
            if page.len() >= limit {
                break;
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamped_and_legacy_records_decode() {
        let v = ClientOwner::encode("alice", 42);
        assert_eq!(
            ClientOwner::decode(&v).unwrap(),
            ClientOwner {
                user: "alice".into(),
                last_used_ms: Some(42)
            }
        );
        assert_eq!(
            ClientOwner::decode(b"bob").unwrap(),
            ClientOwner {
                user: "bob".into(),
                last_used_ms: None
            }
        );
    }

    #[tokio::test]
    async fn claims_are_paged_in_client_id_order_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::SyncMode::Never, Duration::from_millis(5))
            .expect("open");
        let mut b = Batch::new();
        for id in ["c1", "c2", "c3"] {
            b.put_client_owner(id, "alice", 7);
        }
        store.write(b).await.unwrap();
        let first = store.client_owners_after(None, 2).unwrap();
        let ids: Vec<&str> = first.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2"]);
        let rest = store.client_owners_after(Some("c2"), 2).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].0, "c3");
        assert_eq!(rest[0].1.last_used_ms, Some(7));

        let mut b = Batch::new();
        b.delete_client_owner("c2");
        store.write(b).await.unwrap();
        assert_eq!(store.client_owner("c2").unwrap(), None);
        assert_eq!(store.client_owner("c1").unwrap().unwrap().user, "alice");
        store.close();
    }

    #[tokio::test]
    async fn a_claim_is_read_from_memory_or_the_caller_is_told_to_read_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::SyncMode::Never, Duration::from_millis(5))
            .expect("open");
        let mut b = Batch::new();
        b.put_client_owner("c1", "alice", 7);
        store.write(b).await.unwrap();
        let in_memory = |id| match store.client_owner_in_memory(id).unwrap() {
            Cached::Known(owner) => Some(owner),
            Cached::Uncached => None,
        };
        assert_eq!(in_memory("c1").unwrap().unwrap().user, "alice", "memtable");
        assert_eq!(in_memory("c9"), Some(None), "a new id");

        // In a table file whose blocks are not cached: the disk is needed.
        let cf = store.cf_handle(CF_CLIENT).unwrap();
        store.db().flush_cf(cf).unwrap();
        assert_eq!(in_memory("c1"), None);
        // One read from disk fills the cache; the next needs none.
        assert_eq!(store.client_owner("c1").unwrap().unwrap().user, "alice");
        assert_eq!(in_memory("c1").unwrap().unwrap().user, "alice");
        store.close();
    }
}
