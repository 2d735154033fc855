//! Topic mappings, as Mosquitto's `topic pattern direction qos
//! local-prefix remote-prefix`: the local topic is `local_prefix +
//! pattern`, the remote one `remote_prefix + pattern`; crossing strips one
//! prefix and puts the other in its place.

use chatmq_config::BridgeTopic;
use rumqttc::v5::mqttbytes::QoS;

/// The mappings of one remote.
#[derive(Debug, Clone)]
pub struct Mappings {
    topics: Vec<BridgeTopic>,
}

/// A topic rewritten for the other side, with the QoS it crosses at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub topic: String,
    pub qos: QoS,
}

impl Mappings {
    pub fn new(topics: Vec<BridgeTopic>) -> Mappings {
        Mappings { topics }
    }

    /// The local filters the bridge subscribes to (direction out or both).
    pub fn local_filters(&self) -> Vec<(String, QoS)> {
        self.topics
            .iter()
            .filter(|t| t.direction.outbound())
            .map(|t| (format!("{}{}", t.local_prefix, t.pattern), qos(t.qos)))
            .collect()
    }

    /// The remote filters the bridge subscribes to (direction in or both).
    pub fn remote_filters(&self) -> Vec<(String, QoS)> {
        self.topics
            .iter()
            .filter(|t| t.direction.inbound())
            .map(|t| (format!("{}{}", t.remote_prefix, t.pattern), qos(t.qos)))
            .collect()
    }

    /// Where a local message goes on the remote: the first outbound
    /// mapping whose local filter it matches; `None` if there is none.
    pub fn to_remote(&self, local: &str, qos_in: QoS) -> Option<Crossing> {
        self.topics
            .iter()
            .filter(|t| t.direction.outbound())
            .find_map(|t| cross(t, &t.local_prefix, &t.remote_prefix, local, qos_in))
    }

    /// Where a remote message goes locally (the first inbound mapping).
    pub fn to_local(&self, remote: &str, qos_in: QoS) -> Option<Crossing> {
        self.topics
            .iter()
            .filter(|t| t.direction.inbound())
            .find_map(|t| cross(t, &t.remote_prefix, &t.local_prefix, remote, qos_in))
    }
}

fn cross(t: &BridgeTopic, from: &str, to: &str, topic: &str, qos_in: QoS) -> Option<Crossing> {
    let rest = topic.strip_prefix(from)?;
    if !matches(rest, &t.pattern) {
        return None;
    }
    Some(Crossing {
        topic: format!("{to}{rest}"),
        qos: lower(qos(t.qos), qos_in),
    })
}

/// Does `topic` match `filter` (MQTT rules: `+` one level, `#` the rest,
/// a wildcard first level never matches a `$` topic)? (rumqttc's own
/// `matches` slices the first byte, which panics on a multibyte first
/// character: topics here come from the network.)
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        match (f, levels.next()) {
            ("#", _) => return true,
            (_, None) => return false,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

pub(crate) fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn lower(a: QoS, b: QoS) -> QoS {
    if a == QoS::AtMostOnce || b == QoS::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatmq_config::Direction;

    fn topic(pattern: &str, direction: Direction, local: &str, remote: &str) -> BridgeTopic {
        BridgeTopic {
            pattern: pattern.into(),
            direction,
            qos: 1,
            local_prefix: local.into(),
            remote_prefix: remote.into(),
        }
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(matches("a/b", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(matches("a/b", "+/b"));
        assert!(!matches("a/b/c", "+/b"));
        assert!(!matches("a", "a/b"));
        assert!(!matches("$SYS/x", "#"));
        assert!(matches("ü/x", "ü/+"));
        assert!(!matches("ü", "a"));
    }

    #[test]
    fn prefixes_are_swapped() {
        let m = Mappings::new(vec![
            topic("sensors/#", Direction::In, "site1/", "plant/"),
            topic("cmd/+", Direction::Out, "hq/", ""),
        ]);
        assert_eq!(
            m.remote_filters(),
            vec![("plant/sensors/#".to_string(), QoS::AtLeastOnce)]
        );
        assert_eq!(
            m.local_filters(),
            vec![("hq/cmd/+".to_string(), QoS::AtLeastOnce)]
        );
        let c = m.to_local("plant/sensors/t1", QoS::AtLeastOnce).unwrap();
        assert_eq!(c.topic, "site1/sensors/t1");
        assert_eq!(m.to_local("plant/other", QoS::AtLeastOnce), None);
        // An inbound-only mapping never sends out.
        assert_eq!(m.to_remote("site1/sensors/t1", QoS::AtLeastOnce), None);
        let c = m.to_remote("hq/cmd/reboot", QoS::AtMostOnce).unwrap();
        assert_eq!(c.topic, "cmd/reboot");
        assert_eq!(c.qos, QoS::AtMostOnce);
        assert_eq!(m.to_remote("hq/cmd/a/b", QoS::AtLeastOnce), None);
    }
}
