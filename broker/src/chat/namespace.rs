//! The topics the chat layer owns (DESIGN §4) and the rules for who may
//! publish and subscribe there. Everything else is plain MQTT under
//! `[[acl.rules]]`.

use crate::topic;

/// What a topic name means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    Chat(&'a str),
    Typing(&'a str),
    Presence(&'a str),
    Events(&'a str),
    Rpc(&'a str),
    /// `reactions/{conv}`: room reactions, live only.
    Reactions(&'a str),
    /// `occupancy/{conv}`: member and connection counts, server only.
    Occupancy(&'a str),
    Plain,
}

/// The top-level names reserved for the chat layer.
pub const RESERVED: [&str; 7] = [
    "chat",
    "typing",
    "presence",
    "users",
    "rpc",
    "reactions",
    "occupancy",
];

pub fn classify(t: &str) -> Topic<'_> {
    let (head, rest) = t.split_once('/').unwrap_or((t, ""));
    match head {
        "chat" => Topic::Chat(rest),
        "typing" => Topic::Typing(rest),
        "presence" => Topic::Presence(rest),
        "users" => match rest.split_once('/') {
            Some((user, "events")) => Topic::Events(user),
            _ => Topic::Events(""),
        },
        "rpc" => Topic::Rpc(rest),
        "reactions" => Topic::Reactions(rest),
        "occupancy" => Topic::Occupancy(rest),
        _ => Topic::Plain,
    }
}

/// `[A-Za-z0-9_-]{1,64}` ([`chatmq_config::is_user_id`], the one grammar).
pub fn valid_user(u: &str) -> bool {
    chatmq_config::is_user_id(u)
}

/// `[A-Za-z0-9_.:-]{1,128}`
pub fn valid_conv(c: &str) -> bool {
    (1..=128).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The two members of a direct conversation `dm:a:b` (a < b bytewise).
pub fn direct_members(conv: &str) -> Option<(&str, &str)> {
    let rest = conv.strip_prefix("dm:")?;
    let (a, b) = rest.split_once(':')?;
    (valid_user(a) && valid_user(b) && a < b).then_some((a, b))
}

/// How a subscription filter relates to the chat layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterScope<'a> {
    /// Names no reserved topic: plain ACL.
    Plain,
    /// May match reserved topics only through wildcards: the ACL decides,
    /// and the chat layer filters each delivery by membership.
    Wild,
    /// A reserved namespace: the chat layer decides.
    Reserved(Topic<'a>, &'a str),
}

pub fn filter_scope(filter: &str) -> FilterScope<'_> {
    let head = filter.split('/').next().unwrap_or("");
    if head == "+" || head == "#" {
        return FilterScope::Wild;
    }
    if RESERVED.contains(&head) {
        return FilterScope::Reserved(classify(filter), filter);
    }
    FilterScope::Plain
}

/// The QoS at which a session's subscriptions want `topic`, if any: the
/// highest of its matching non-shared filters.
pub fn wanted_qos<'a>(
    filters: impl Iterator<Item = (&'a String, &'a crate::router::SubOptions)>,
    t: &str,
) -> Option<rumqttc::v5::mqttbytes::QoS> {
    let mut best = None;
    for (f, o) in filters {
        if f.starts_with("$share/") || !topic::matches(f, t) {
            continue;
        }
        if best.is_none_or(|b: rumqttc::v5::mqttbytes::QoS| (o.qos as u8) > (b as u8)) {
            best = Some(o.qos);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_classified() {
        assert_eq!(classify("chat/room-1"), Topic::Chat("room-1"));
        assert_eq!(classify("typing/dm:a:b"), Topic::Typing("dm:a:b"));
        assert_eq!(classify("users/alice/events"), Topic::Events("alice"));
        assert_eq!(classify("users/alice/other"), Topic::Events(""));
        assert_eq!(classify("rpc/history"), Topic::Rpc("history"));
        assert_eq!(classify("sensors/x"), Topic::Plain);
        assert_eq!(classify("chatter"), Topic::Plain);
    }

    #[test]
    fn direct_conversations_need_ordered_valid_users() {
        assert_eq!(direct_members("dm:alice:bob"), Some(("alice", "bob")));
        assert_eq!(direct_members("dm:bob:alice"), None);
        assert_eq!(direct_members("dm:alice:alice"), None);
        assert_eq!(direct_members("dm:al ice:bob"), None);
    }

    #[test]
    fn filter_scopes() {
        assert_eq!(filter_scope("#"), FilterScope::Wild);
        assert_eq!(filter_scope("+/+"), FilterScope::Wild);
        assert_eq!(filter_scope("sensors/#"), FilterScope::Plain);
        assert!(matches!(
            filter_scope("chat/+"),
            FilterScope::Reserved(Topic::Chat("+"), _)
        ));
    }
}
