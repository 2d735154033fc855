//! The chat envelope (DESIGN §4): what a client publishes on `chat/{conv}`
//! and what subscribers receive. Parsing and formatting only: sequencing,
//! storing and fan-out are the broker's `chat` module.

use serde_json::{json, Map, Value};

/// A validated envelope from a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub kind: String,
    pub body: Value,
}

/// Why an envelope was refused; the code goes into the error event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEnvelope(pub &'static str);

impl Envelope {
    /// `{"id": "<1..64 chars>", "body": <any JSON>, "type": "text"}`.
    pub fn parse(payload: &[u8]) -> Result<Envelope, BadEnvelope> {
        let value: Value = serde_json::from_slice(payload).map_err(|_| BadEnvelope("not JSON"))?;
        Envelope::from_value(value)
    }

    /// The same from JSON already parsed (an HTTP request body); keys
    /// other than `id`, `body` and `type` are ignored.
    pub fn from_value(value: Value) -> Result<Envelope, BadEnvelope> {
        let Value::Object(mut map) = value else {
            return Err(BadEnvelope("not a JSON object"));
        };
        let id = match map.remove("id") {
            Some(Value::String(id)) if (1..=64).contains(&id.chars().count()) => id,
            _ => return Err(BadEnvelope("id must be a string of 1 to 64 characters")),
        };
        let body = map.remove("body").ok_or(BadEnvelope("body is missing"))?;
        let kind = match map.remove("type") {
            None => "text".to_string(),
            Some(Value::String(t)) if (1..=32).contains(&t.len()) => t,
            Some(_) => return Err(BadEnvelope("type must be a short string")),
        };
        Ok(Envelope { id, kind, body })
    }

    /// The envelope subscribers and history readers get.
    pub fn delivered(&self, conv: &str, seq: u64, from: &str, ts: u64) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("conv".into(), json!(conv));
        m.insert("seq".into(), json!(seq));
        m.insert("id".into(), json!(self.id));
        m.insert("from".into(), json!(from));
        m.insert("ts".into(), json!(ts));
        m.insert("type".into(), json!(self.kind));
        m.insert("body".into(), self.body.clone());
        Value::Object(m).to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_envelope_round_trips_into_the_delivered_form() {
        let e = Envelope::parse(br#"{"id":"m1","body":{"text":"hi"}}"#).unwrap();
        assert_eq!(e.kind, "text");
        let out: Value = serde_json::from_slice(&e.delivered("room", 7, "alice", 5)).unwrap();
        assert_eq!(
            out,
            json!({"conv":"room","seq":7,"id":"m1","from":"alice","ts":5,"type":"text","body":{"text":"hi"}})
        );
    }

    #[test]
    fn bad_envelopes_are_refused() {
        for bad in [
            &b"nope"[..],
            b"[]",
            br#"{"body":1}"#,
            br#"{"id":"","body":1}"#,
            br#"{"id":"x"}"#,
            br#"{"id":5,"body":1}"#,
        ] {
            assert!(
                Envelope::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"id":"{}","body":1}}"#, "x".repeat(65));
        assert!(Envelope::parse(long.as_bytes()).is_err());
    }
}
