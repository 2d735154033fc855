//! The chat envelope parser: any payload is an envelope or a refusal, and a
//! valid envelope's delivered form parses back to the same id and type.
#![no_main]

use chatmq_protocol::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::parse(data) else {
        return;
    };
    let delivered = envelope.delivered("room", u64::MAX, "alice", u64::MAX);
    let again = Envelope::parse(&delivered).expect("a delivered envelope parses");
    // Bodies are compared as JSON only in unit tests: serde_json's default
    // float parsing may differ in the last bit, which is not a defect here.
    assert_eq!(again.id, envelope.id);
    assert_eq!(again.kind, envelope.kind);
});
