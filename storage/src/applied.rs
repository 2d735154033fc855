//! Where a `[cluster]` node's copy stands in each stream of the order of
//! record (issue #12 item 3): the last stream sequence it applied, kept in
//! `meta` under `applied/{stream}` and written in the same batch as the
//! records applied, so a restarted node resumes exactly after it.

use crate::batch::{Batch, Op};
use crate::schema::{seq_bytes, seq_value, CF_META};
use crate::store::Store;
use crate::StorageError;

fn applied_key(stream: &str) -> Vec<u8> {
    let mut key = b"applied/".to_vec();
    key.extend_from_slice(stream.as_bytes());
    key
}

impl Batch {
    /// Records that this node's copy holds `stream` up to `seq`.
    pub fn put_applied(&mut self, stream: &str, seq: u64) {
        self.ops.push(Op::Put {
            cf: CF_META,
            key: applied_key(stream),
            value: seq_bytes(seq),
        });
    }
}

impl Store {
    /// The last sequence of `stream` applied here (0: none).
    pub fn applied(&self, stream: &str) -> Result<u64, StorageError> {
        Ok(self
            .db()
            .get_cf(self.cf_handle(CF_META)?, applied_key(stream))?
            .and_then(|v| seq_value(&v))
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Batch, Store, SyncMode};

    #[tokio::test]
    async fn the_applied_sequence_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store =
                Store::open(dir.path(), SyncMode::Always, Duration::from_millis(5)).expect("open");
            assert_eq!(store.applied("chatmq_chat_0").expect("read"), 0);
            let mut batch = Batch::new();
            batch.put_applied("chatmq_chat_0", 41);
            batch.put_applied("chatmq_chat_1", 7);
            store.write(batch).await.expect("write");
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.close())
                .await
                .expect("closed");
        }
        let store =
            Store::open(dir.path(), SyncMode::Always, Duration::from_millis(5)).expect("reopen");
        assert_eq!(store.applied("chatmq_chat_0").expect("read"), 41);
        assert_eq!(store.applied("chatmq_chat_1").expect("read"), 7);
    }
}
