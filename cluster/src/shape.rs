//! Making sure the layout's streams and buckets exist as the settings
//! shape them: create what is missing, compare what is there, and refuse
//! (one line naming the setting) what differs. chatmq never changes an
//! existing stream: a difference means nodes disagree on their settings,
//! or the names belong to someone else, and a silent change would let one
//! misconfigured node reshape the order of record under the others.

use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind};
use async_nats::jetstream::stream::{Config, DiscardPolicy};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;

use crate::error::{Attempt, ClusterError, Mismatch};
use crate::layout::{Layout, Record, LAYOUT_VERSION, RECORD_KEY};

/// Creates what is missing and checks what exists, in an order that
/// checks the partition count before creating partition streams.
pub(crate) async fn ensure(js: &Context, layout: &Layout) -> Result<(), Attempt> {
    let meta = bucket_expected(&layout.meta_config(), None);
    ensure_object(js, &meta, || create(js, &meta.config)).await?;
    check_record(js, layout).await?;
    for p in 0..layout.partitions() {
        let config = layout.partition_config(p);
        let expected = Expected {
            what: format!("stream {}", config.name),
            config: config.clone(),
            max_age_key: Some("chat.retention_max_age_secs"),
            duplicate_window: true,
        };
        ensure_object(js, &expected, || create(js, &config)).await?;
    }
    let records = layout.records_config();
    let expected = Expected {
        what: format!("stream {}", records.name),
        config: records.clone(),
        max_age_key: None,
        duplicate_window: true,
    };
    ensure_object(js, &expected, || create(js, &records)).await?;
    let retained = layout.retained_config();
    let expected = Expected {
        what: format!("stream {}", retained.name),
        config: retained.clone(),
        max_age_key: None,
        duplicate_window: true,
    };
    ensure_object(js, &expected, || create(js, &retained)).await?;
    let sessions = bucket_expected(&layout.sessions_config(), None);
    ensure_object(js, &sessions, || create(js, &sessions.config)).await?;
    let leases = bucket_expected(&layout.leases_config(), Some("cluster.lease_ttl_ms"));
    ensure_object(js, &leases, || create(js, &leases.config)).await
}

/// Creates a stream (a bucket's too: `create_key_value` first asks for
/// the account info, whose 2.9 form async-nats 0.50 cannot read).
async fn create(js: &Context, config: &Config) -> Result<(), String> {
    js.create_stream(config.clone())
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A stream as the layout wants it, and which setting each of its
/// properties comes from.
struct Expected {
    /// "stream chatmq_chat_3", "KV bucket chatmq_leases".
    what: String,
    config: Config,
    /// The setting behind `max_age`; `None`: chatmq's own choice.
    max_age_key: Option<&'static str>,
    /// Whether the duplicate window is part of the shape (not for
    /// buckets, whose window the server derives from their TTL).
    duplicate_window: bool,
}

/// The stream behind a KV bucket, as async-nats's `create_key_value`
/// makes it (rollups allowed, deletes denied, direct gets, discard new).
fn bucket_expected(kv: &kv::Config, max_age_key: Option<&'static str>) -> Expected {
    Expected {
        what: format!("KV bucket {}", kv.bucket),
        config: Config {
            name: format!("KV_{}", kv.bucket),
            subjects: vec![format!("$KV.{}.>", kv.bucket)],
            max_messages_per_subject: kv.history,
            max_age: kv.max_age,
            storage: kv.storage,
            num_replicas: kv.num_replicas,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            ..Config::default()
        },
        max_age_key,
        duplicate_window: false,
    }
}

/// Checks the object if it exists, creates it if not; another node that
/// created it meanwhile is fine if its shape agrees.
async fn ensure_object<F, Fut>(js: &Context, expected: &Expected, create: F) -> Result<(), Attempt>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    if let Some(found) = existing(js, expected).await? {
        return compare(expected, &found).map_err(Attempt::Final);
    }
    match create().await {
        Ok(()) => Ok(()),
        Err(e) => match existing(js, expected).await? {
            Some(found) => compare(expected, &found).map_err(Attempt::Final),
            None => {
                let key = if e.contains("insufficient resources") {
                    "cluster.replicas"
                } else {
                    "cluster.nats_urls"
                };
                Err(Attempt::retry(
                    key,
                    format!(
                        "creating {} with {} replicas: {e}",
                        expected.what, expected.config.num_replicas
                    ),
                ))
            }
        },
    }
}

/// The configuration of the object's stream, `None` if there is none.
async fn existing(js: &Context, expected: &Expected) -> Result<Option<Config>, Attempt> {
    match js.get_stream(&expected.config.name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_error)
                if js_error.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(Attempt::retry(
                "cluster.nats_urls",
                format!("reading {}: {e}", expected.what),
            )),
        },
    }
}

/// The first property that differs, as the one line to print.
fn compare(expected: &Expected, found: &Config) -> Result<(), ClusterError> {
    let e = &expected.config;
    let mut checks: Vec<(&'static str, Option<&'static str>, String, String)> = vec![
        ("subjects", None, list(&e.subjects), list(&found.subjects)),
        (
            "retention",
            None,
            format!("{:?}", e.retention),
            format!("{:?}", found.retention),
        ),
        (
            "storage",
            None,
            format!("{:?}", e.storage),
            format!("{:?}", found.storage),
        ),
        (
            "replicas",
            Some("cluster.replicas"),
            e.num_replicas.max(1).to_string(),
            found.num_replicas.max(1).to_string(),
        ),
        (
            "max_age",
            expected.max_age_key,
            age(e.max_age),
            age(found.max_age),
        ),
        (
            "max_msgs_per_subject",
            None,
            limit(e.max_messages_per_subject),
            limit(found.max_messages_per_subject),
        ),
        (
            "max_msgs",
            None,
            limit(e.max_messages),
            limit(found.max_messages),
        ),
        (
            "max_bytes",
            None,
            limit(e.max_bytes),
            limit(found.max_bytes),
        ),
        (
            "discard",
            None,
            format!("{:?}", e.discard),
            format!("{:?}", found.discard),
        ),
        (
            "sealed",
            None,
            e.sealed.to_string(),
            found.sealed.to_string(),
        ),
    ];
    if expected.duplicate_window {
        checks.push((
            "duplicate_window",
            None,
            age(e.duplicate_window),
            age(found.duplicate_window),
        ));
    }
    for (property, key, want, have) in checks {
        if want == have {
            continue;
        }
        let (key, hint) = match key {
            Some(key) => (
                key,
                format!(
                    "every node needs the same {key}: set it to match, or change the {} with the nats CLI while no node runs (chatmq never changes one)",
                    expected.what
                ),
            ),
            None => (
                "cluster.name_prefix",
                "chatmq did not create it so: remove it, or choose another cluster.name_prefix"
                    .to_string(),
            ),
        };
        return Err(ClusterError::Shape(Box::new(Mismatch {
            key: key.to_string(),
            what: expected.what.clone(),
            property,
            found: have,
            expected: want,
            hint,
        })));
    }
    Ok(())
}

/// Writes the layout record if there is none, then reads it back (the
/// last of two racing first nodes wins, and the other sees it) and
/// compares.
async fn check_record(js: &Context, layout: &Layout) -> Result<(), Attempt> {
    let bucket = layout.meta_bucket();
    let store = js
        .get_key_value(&bucket)
        .await
        .map_err(|e| Attempt::retry("cluster.nats_urls", format!("opening {bucket}: {e}")))?;
    let mine = layout.record();
    let json = serde_json::to_vec(&mine).map_err(|e| {
        Attempt::retry(
            "cluster.name_prefix",
            format!("encoding the layout record: {e}"),
        )
    })?;
    match store.create(RECORD_KEY, json.into()).await {
        Ok(_) => {}
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Attempt::retry(
                "cluster.nats_urls",
                format!("writing the layout record to {bucket}: {e}"),
            ))
        }
    }
    let value = match store.get(RECORD_KEY).await {
        Ok(Some(value)) => value,
        // Not visible yet on the server that answered, or deleted.
        Ok(None) => {
            return Err(Attempt::retry(
                "cluster.nats_urls",
                format!("the layout record in {bucket} is not readable yet"),
            ))
        }
        Err(e) => {
            return Err(Attempt::retry(
                "cluster.nats_urls",
                format!("reading the layout record from {bucket}: {e}"),
            ))
        }
    };
    let record: Record = serde_json::from_slice(&value).map_err(|e| ClusterError::Record {
        bucket: bucket.clone(),
        reason: e.to_string(),
    })?;
    if record.version != LAYOUT_VERSION {
        return Err(ClusterError::Record {
            bucket,
            reason: format!(
                "layout version {}, this node knows {LAYOUT_VERSION}",
                record.version
            ),
        }
        .into());
    }
    if record.partitions != mine.partitions {
        return Err(ClusterError::Partitions {
            configured: mine.partitions,
            recorded: record.partitions,
            bucket,
        }
        .into());
    }
    Ok(())
}

fn list(items: &[String]) -> String {
    format!("{items:?}")
}

/// A count or size limit; NATS spells "none" 0 or -1.
fn limit(n: i64) -> String {
    if n <= 0 {
        "unlimited".to_string()
    } else {
        n.to_string()
    }
}

/// An age or window as an operator writes it.
fn age(d: Duration) -> String {
    if d.is_zero() {
        "0 (forever)".to_string()
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatmq_config::{Chat, Cluster as ClusterSettings};

    fn layout() -> Layout {
        let settings = ClusterSettings {
            node_id: "n1".into(),
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            partitions: 2,
            lease_ttl_ms: 3000,
            ..ClusterSettings::default()
        };
        Layout::new(&settings, &Chat::default())
    }

    fn partition(layout: &Layout) -> Expected {
        Expected {
            what: "stream chatmq_chat_0".into(),
            config: layout.partition_config(0),
            max_age_key: Some("chat.retention_max_age_secs"),
            duplicate_window: true,
        }
    }

    /// What the server reports for a stream created with `config`: limits
    /// spelled -1.
    fn as_reported(mut config: Config) -> Config {
        for n in [
            &mut config.max_messages,
            &mut config.max_bytes,
            &mut config.max_messages_per_subject,
        ] {
            if *n == 0 {
                *n = -1;
            }
        }
        config
    }

    #[test]
    fn the_same_shape_passes() {
        let l = layout();
        let e = partition(&l);
        compare(&e, &as_reported(e.config.clone())).unwrap();
        let leases = bucket_expected(&l.leases_config(), Some("cluster.lease_ttl_ms"));
        compare(&leases, &as_reported(leases.config.clone())).unwrap();
    }

    #[test]
    fn a_difference_names_the_setting_behind_it() {
        let l = layout();
        let e = partition(&l);
        let mut found = e.config.clone();
        found.num_replicas = 1;
        let message = compare(&e, &found).unwrap_err().to_string();
        assert!(
            message.starts_with(
                "cluster.replicas: NATS stream chatmq_chat_0 exists with replicas 1, but this node needs 3;"
            ),
            "{message}"
        );
        let mut found = e.config.clone();
        found.subjects = vec!["elsewhere.>".into()];
        let message = compare(&e, &found).unwrap_err().to_string();
        assert!(
            message.starts_with("cluster.name_prefix: NATS stream chatmq_chat_0 exists with subjects [\"elsewhere.>\"], but this node needs [\"chatmq.chat.0.>\"];"),
            "{message}"
        );
        let mut found = e.config.clone();
        found.max_age = Duration::from_secs(3600);
        let message = compare(&e, &found).unwrap_err().to_string();
        assert!(
            message.starts_with("chat.retention_max_age_secs: NATS stream chatmq_chat_0 exists with max_age 3600 s, but this node needs 0 (forever);"),
            "{message}"
        );
        let leases = bucket_expected(&l.leases_config(), Some("cluster.lease_ttl_ms"));
        let mut found = leases.config.clone();
        found.max_age = Duration::from_millis(4500);
        let message = compare(&leases, &found).unwrap_err().to_string();
        assert!(
            message.starts_with("cluster.lease_ttl_ms: NATS KV bucket chatmq_leases exists with max_age 4500 ms, but this node needs 3 s;"),
            "{message}"
        );
        assert!(!message.contains('\n'));
    }
}
