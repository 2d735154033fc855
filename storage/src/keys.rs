//! Column families and key layout. Keys are big-endian so that a prefix scan
//! returns a session's entries in order.

pub const CF_META: &str = "meta";
pub const CF_SESSION: &str = "session";
pub const CF_OUTBOX: &str = "offline";
pub const CF_INBOUND: &str = "inbound";
pub const CF_RETAINED: &str = "retained";
pub const CF_CLIENT: &str = "client";

pub const ALL_CFS: [&str; 6] = [
    CF_META,
    CF_SESSION,
    CF_OUTBOX,
    CF_INBOUND,
    CF_RETAINED,
    CF_CLIENT,
];

pub const META_EPOCH: &[u8] = b"epoch";
pub const META_SCHEMA: &[u8] = b"schema";
pub const SCHEMA_VERSION: u32 = 1;

/// `client id` length-prefixed, so that "ab" + n never collides with "a" + ...
pub fn client_prefix(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut key = Vec::with_capacity(2 + id.len() + 8);
    key.extend_from_slice(&(id.len() as u16).to_be_bytes());
    key.extend_from_slice(id);
    key
}

/// (client id, n): one queued or in-flight message of a session.
pub fn outbox_key(client_id: &str, n: u64) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// (client id, packet id): an incoming QoS 2 message awaiting PUBREL.
pub fn inbound_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.extend_from_slice(&pkid.to_be_bytes());
    key
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // A prefix of all 0xFF bytes has no successor: the scan runs to the end.
    vec![0xFF; prefix.len() + 9]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_keys_sort_by_n_within_a_client() {
        assert!(outbox_key("c", 2) < outbox_key("c", 256));
        assert!(outbox_key("c", u64::MAX) < prefix_end(&client_prefix("c")));
        assert!(outbox_key("c", 0) >= client_prefix("c"));
    }

    #[test]
    fn client_prefixes_do_not_overlap() {
        let a = client_prefix("a");
        let ab = outbox_key("ab", 0);
        assert!(!ab.starts_with(&a));
    }
}
