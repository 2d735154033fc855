//! The MQTT decoder, both versions, through the framing the server uses:
//! bytes as they arrive on a socket, CONNECT first (its level picks the
//! codec), then that version's packets, each round-tripped through the
//! encoder. No input may panic; every error is a clean refusal.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The stream arrives in two reads split at a point the input picks, so
    // packets cut across reads are covered too.
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (first, rest) = data.split_at(split);
    let mut buf = BytesMut::new();
    let mut protocol = None;
    for chunk in [first, rest] {
        buf.extend_from_slice(chunk);
        if chatmq_fuzz::read_packets(&mut buf, &mut protocol).is_err() {
            return;
        }
    }
});
