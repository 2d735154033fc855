//! Topic names and filters: validation and matching (MQTT 4.7).
//!
//! Owns the rules for what a topic or filter may look like and which topics
//! a filter matches, including the `$`-topic rule and `$share/` parsing.
//! It must never allocate on the matching path. Everything here is
//! iterative: a client chooses how many levels a topic has, never how deep
//! the broker's stack goes.

/// Longest topic or filter we accept (the MQTT string limit).
const MAX_LEN: usize = 65_535;

/// The operator's bounds on topic names and filters (`mqtt.max_topic_levels`,
/// `mqtt.max_topic_length`): what one name may cost the trie, the retained
/// store and every match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub max_levels: usize,
    pub max_length: usize,
}

impl TopicLimits {
    /// Is `name` (a topic or a filter) within the bounds?
    pub fn admit(&self, name: &str) -> bool {
        // Checked first, so the level count below is bounded by it.
        name.len() <= self.max_length && levels(name) <= self.max_levels
    }
}

/// How many levels `name` has: one more than it has separators.
pub fn levels(name: &str) -> usize {
    name.bytes().filter(|&b| b == b'/').count() + 1
}

/// Why a topic name or filter from the network is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// U+0000 inside: the packet is malformed [MQTT-1.5.4-2].
    Malformed,
    /// Breaks a topic rule (empty, misplaced wildcard) [MQTT-4.7.3-1].
    Invalid,
    /// Valid MQTT, but longer or deeper than the operator allows.
    OverLimit,
}

/// Checks a PUBLISH (or will) topic name.
pub fn check_topic(topic: &str, limits: &TopicLimits) -> Result<(), Refusal> {
    check(topic, limits, valid_topic)
}

/// Checks a SUBSCRIBE or UNSUBSCRIBE filter (the part after `$share/g/`).
pub fn check_filter(filter: &str, limits: &TopicLimits) -> Result<(), Refusal> {
    check(filter, limits, valid_filter)
}

fn check(name: &str, limits: &TopicLimits, valid: fn(&str) -> bool) -> Result<(), Refusal> {
    if name.contains('\0') {
        Err(Refusal::Malformed)
    } else if !valid(name) {
        Err(Refusal::Invalid)
    } else if !limits.admit(name) {
        Err(Refusal::OverLimit)
    } else {
        Ok(())
    }
}

/// A valid topic name for PUBLISH: non-empty, no wildcards, no NUL
/// [MQTT-4.7.3-1], [MQTT-3.3.2-2], [MQTT-4.7.3-2].
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_LEN && !topic.contains(['+', '#', '\0'])
}

/// A valid topic filter: `#` only as the whole last level, `+` only as a
/// whole level [MQTT-4.7.1-2], [MQTT-4.7.1-3], non-empty [MQTT-4.7.3-1].
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Does `filter` match `topic`? Leading wildcards never match topics that
/// start with `$` [MQTT-4.7.2-1]; `a/#` also matches `a` [MQTT-4.7.1-2].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Is every topic that `inner` matches also matched by `outer`? Used for
/// access control: a rule grants a subscription only if it covers it.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(il)) if il != "#" => {}
            (Some(ol), Some(il)) if ol == il => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Do `a` and `b` match at least one common topic? Used to see whether a
/// deny rule touches part of a subscription.
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A `$share/{group}/{filter}` subscription, split; `None` if `filter` is
/// not a shared subscription. `Some(Err(()))` if it is one but malformed.
pub fn parse_shared(filter: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = filter.strip_prefix("$share/")?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err(()));
    };
    if group.is_empty() || group.contains(['+', '#']) || !valid_filter(inner) {
        return Some(Err(()));
    }
    Some(Ok((group, inner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_validated_per_level() {
        for ok in [
            "#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "$SYS/#", "sport/+",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a/b#", "a+", "a/+b", "#/a", "a\0"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn topics_have_no_wildcards() {
        assert!(valid_topic("a/b"));
        assert!(valid_topic("/"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("a/+"));
        assert!(!valid_topic("a/#"));
    }

    // [MQTT-4.7.1-2] "sport/tennis/player1/#" matches the parent level too.
    #[test]
    fn multi_level_wildcard_matches_parent() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(!matches("sport/tennis/#", "sport"));
    }

    #[test]
    fn single_level_wildcard_matches_one_level() {
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("a/+/c", "a/b/c/d"));
    }

    // [MQTT-4.7.2-1] leading wildcards do not match $-topics.
    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!covers("#", "$SYS/x"));
    }

    #[test]
    fn coverage_for_access_control() {
        assert!(covers("sensors/alice/#", "sensors/alice/+/temp"));
        assert!(covers("sensors/+/temp", "sensors/bob/temp"));
        assert!(!covers("sensors/+/temp", "sensors/#"));
        assert!(!covers("sensors/alice/#", "sensors/#"));
        assert!(covers("#", "#"));
        assert!(overlaps("secret/#", "#"));
        assert!(overlaps("a/+/c", "a/b/#"));
        assert!(!overlaps("a/b", "a/c"));
    }

    #[test]
    fn limits_bound_levels_and_length_and_nul_is_malformed() {
        let limits = TopicLimits {
            max_levels: 3,
            max_length: 10,
        };
        assert_eq!(check_topic("a/b/c", &limits), Ok(()));
        assert_eq!(check_topic("a/b/c/d", &limits), Err(Refusal::OverLimit));
        assert_eq!(check_topic("abcdefghijk", &limits), Err(Refusal::OverLimit));
        assert_eq!(check_topic("a/+", &limits), Err(Refusal::Invalid));
        assert_eq!(check_topic("a\0b", &limits), Err(Refusal::Malformed));
        assert_eq!(check_filter("a/+/#", &limits), Ok(()));
        assert_eq!(check_filter("a///", &limits), Err(Refusal::OverLimit));
        assert_eq!(check_filter("a/#/b", &limits), Err(Refusal::Invalid));
        assert_eq!(check_filter("#\0", &limits), Err(Refusal::Malformed));
        assert_eq!(levels("/"), 2);
    }

    #[test]
    fn shared_subscriptions_are_parsed() {
        assert_eq!(parse_shared("$share/g/a/#"), Some(Ok(("g", "a/#"))));
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$share/g"), Some(Err(())));
        assert_eq!(parse_shared("$share//a"), Some(Err(())));
        assert_eq!(parse_shared("$share/g+/a"), Some(Err(())));
    }
}
