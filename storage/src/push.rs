//! The push data (DESIGN §5): the devices users registered, the
//! conversations they muted, and the durable queue of notifications due.
//!
//! `device` has `device_token` (platform, token) → user as its index, so
//! that a token registered by a second user moves to it instead of
//! notifying both. `push` keys sort by due time, so the queue is read in
//! the order it falls due. The layout is `schema.rs`'s; the push gateway
//! decides what to write.

use crate::batch::{Batch, Op};
use crate::record::PushJobRecord;
use crate::schema::{
    client_prefix, device_key, job_key, pair, split_device_key, split_job_key, split_pair,
    CF_DEVICE, CF_DEVICE_TOKEN, CF_MUTE, CF_PUSH, CF_USER_CONV,
};
use crate::store::Store;
use crate::StorageError;

/// A device a user registered: where its notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `apns`, `fcm` or `webhook` (the gateway checks the name).
    pub platform: String,
    pub token: String,
    /// The app the token belongs to, if the client said.
    pub app_id: Option<String>,
}

/// A queued notification: its key fields and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushJob {
    pub due_ms: u64,
    pub user: String,
    pub conv: String,
    pub record: PushJobRecord,
}

impl Batch {
    /// Registers `device` for `user` (the caller removes an earlier owner's).
    pub fn put_device(&mut self, user: &str, device: &Device) {
        self.ops.push(Op::Put {
            cf: CF_DEVICE,
            key: device_key(user, &device.platform, &device.token),
            value: device.app_id.clone().unwrap_or_default().into_bytes(),
        });
        self.ops.push(Op::Put {
            cf: CF_DEVICE_TOKEN,
            key: pair(&device.platform, &device.token),
            value: user.as_bytes().to_vec(),
        });
    }

    pub fn delete_device(&mut self, user: &str, platform: &str, token: &str) {
        self.ops.push(Op::Delete {
            cf: CF_DEVICE,
            key: device_key(user, platform, token),
        });
        self.ops.push(Op::Delete {
            cf: CF_DEVICE_TOKEN,
            key: pair(platform, token),
        });
    }

    pub fn put_mute(&mut self, user: &str, conv: &str, muted: bool) {
        let key = pair(user, conv);
        self.ops.push(match muted {
            true => Op::Put {
                cf: CF_MUTE,
                key,
                value: Vec::new(),
            },
            false => Op::Delete { cf: CF_MUTE, key },
        });
    }

    pub fn put_push_job(&mut self, due_ms: u64, user: &str, conv: &str, job: &PushJobRecord) {
        self.ops.push(Op::Put {
            cf: CF_PUSH,
            key: job_key(due_ms, user, conv),
            value: job.encode(),
        });
    }

    pub fn delete_push_job(&mut self, due_ms: u64, user: &str, conv: &str) {
        self.ops.push(Op::Delete {
            cf: CF_PUSH,
            key: job_key(due_ms, user, conv),
        });
    }
}

fn utf8(cf: &'static str, b: &[u8]) -> Result<String, StorageError> {
    String::from_utf8(b.to_vec()).map_err(|_| StorageError::Corrupt {
        cf,
        what: "key is not UTF-8".into(),
    })
}

impl Store {
    /// Every registered device, by user. Used once at start-up.
    pub fn all_devices(&self) -> Result<Vec<(String, Device)>, StorageError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.scan_prefix(CF_DEVICE, &[], |k, v| {
            match decode_device(k, v) {
                Ok(d) => out.push(d),
                Err(e) => bad = Some(e),
            }
            bad.is_none()
        })?;
        bad.map_or(Ok(out), Err)
    }

    /// The devices of `user`.
    pub fn devices(&self, user: &str) -> Result<Vec<Device>, StorageError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.scan_prefix(CF_DEVICE, &client_prefix(user), |k, v| {
            match decode_device(k, v) {
                Ok((_, d)) => out.push(d),
                Err(e) => bad = Some(e),
            }
            bad.is_none()
        })?;
        bad.map_or(Ok(out), Err)
    }

    /// The user a (platform, token) is registered to, if any.
    pub fn device_owner(
        &self,
        platform: &str,
        token: &str,
    ) -> Result<Option<String>, StorageError> {
        let value = self
            .db()
            .get_cf(self.cf_handle(CF_DEVICE_TOKEN)?, pair(platform, token))?;
        value.map(|v| utf8(CF_DEVICE_TOKEN, &v)).transpose()
    }

    /// Every (user, conversation) muted. Used once at start-up.
    pub fn all_mutes(&self) -> Result<Vec<(String, String)>, StorageError> {
        let mut out = Vec::new();
        self.scan_prefix(CF_MUTE, &[], |k, _| {
            if let Some(p) = split_pair(k) {
                out.push(p);
            }
            true
        })?;
        Ok(out)
    }

    /// Every queued notification, earliest due first. Used once at start-up.
    pub fn push_jobs(&self) -> Result<Vec<PushJob>, StorageError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.scan_prefix(CF_PUSH, &[], |k, v| {
            match (split_job_key(k), PushJobRecord::decode(v)) {
                (Some((due_ms, user, conv)), Ok(record)) => out.push(PushJob {
                    due_ms,
                    user,
                    conv,
                    record,
                }),
                (_, Err(e)) => bad = Some(e),
                (None, _) => {
                    bad = Some(StorageError::Corrupt {
                        cf: CF_PUSH,
                        what: "bad key".into(),
                    })
                }
            }
            bad.is_none()
        })?;
        bad.map_or(Ok(out), Err)
    }

    /// The messages `user` has not read, over all its conversations (head
    /// seq minus read seq): the badge a notification carries.
    pub fn unread_total(&self, user: &str) -> Result<u64, StorageError> {
        let mut convs = Vec::new();
        self.scan_prefix(CF_USER_CONV, &client_prefix(user), |k, _| {
            if let Some((_, conv)) = split_pair(k) {
                convs.push(conv);
            }
            true
        })?;
        let mut total = 0u64;
        for conv in convs {
            let head = self.conversation(&conv)?.map_or(0, |c| c.head);
            let read = self.read_seq(user, &conv)?;
            total = total.saturating_add(head.saturating_sub(read));
        }
        Ok(total)
    }
}

fn decode_device(key: &[u8], value: &[u8]) -> Result<(String, Device), StorageError> {
    let corrupt = || StorageError::Corrupt {
        cf: CF_DEVICE,
        what: "bad key".into(),
    };
    let (user, platform, token) = split_device_key(key).ok_or_else(corrupt)?;
    let app_id = utf8(CF_DEVICE, value)?;
    Ok((
        user,
        Device {
            platform,
            token,
            app_id: (!app_id.is_empty()).then_some(app_id),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ConversationRecord;
    use crate::{Role, SyncMode};
    use std::time::Duration;

    fn device(platform: &str, token: &str) -> Device {
        Device {
            platform: platform.into(),
            token: token.into(),
            app_id: None,
        }
    }

    #[tokio::test]
    async fn devices_mutes_jobs_and_unread_counts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Never, Duration::from_millis(5)).unwrap();
        let mut b = Batch::new();
        b.put_device("bob", &device("fcm", "t1"));
        b.put_device(
            "bob",
            &Device {
                app_id: Some("com.x".into()),
                ..device("apns", "t2")
            },
        );
        b.put_device("bo", &device("webhook", "t3"));
        b.put_mute("bob", "room", true);
        b.put_push_job(
            20,
            "bob",
            "room",
            &PushJobRecord {
                count: 2,
                seq: 7,
                from: "al".into(),
                preview: "hi".into(),
            },
        );
        b.put_push_job(10, "ann", "dm:ann:bob", &PushJobRecord::default());
        b.put_member("room", "bob", Role::Member);
        b.put_conversation(
            "room",
            &ConversationRecord {
                title: String::new(),
                created_ms: 0,
                head: 9,
                first: 1,
            },
        );
        b.put_read("bob", "room", 4);
        store.write(b).await.unwrap();

        let bob = store.devices("bob").unwrap();
        assert_eq!(bob.len(), 2);
        assert!(bob.contains(&device("fcm", "t1")));
        let apns = bob.iter().find(|d| d.platform == "apns").unwrap();
        assert_eq!(apns.app_id.as_deref(), Some("com.x"));
        assert_eq!(store.all_devices().unwrap().len(), 3);
        assert_eq!(
            store.device_owner("fcm", "t1").unwrap().as_deref(),
            Some("bob")
        );
        assert_eq!(store.device_owner("apns", "t1").unwrap(), None);
        assert_eq!(
            store.all_mutes().unwrap(),
            [("bob".to_string(), "room".to_string())]
        );
        let jobs = store.push_jobs().unwrap();
        assert_eq!(jobs.iter().map(|j| j.due_ms).collect::<Vec<_>>(), [10, 20]);
        assert_eq!(jobs[1].record.count, 2);
        assert_eq!(
            (jobs[1].user.as_str(), jobs[1].conv.as_str()),
            ("bob", "room")
        );
        assert_eq!(store.unread_total("bob").unwrap(), 5);

        let mut b = Batch::new();
        b.delete_device("bob", "fcm", "t1");
        b.put_mute("bob", "room", false);
        b.delete_push_job(20, "bob", "room");
        store.write(b).await.unwrap();
        assert_eq!(store.devices("bob").unwrap().len(), 1);
        assert_eq!(store.device_owner("fcm", "t1").unwrap(), None);
        assert!(store.all_mutes().unwrap().is_empty());
        assert_eq!(store.push_jobs().unwrap().len(), 1);
        store.close();
    }
}
