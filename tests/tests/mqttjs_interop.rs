//! MQTT.js, the JavaScript MQTT client, in a real browser (Chromium) over
//! chatmq's WebSocket listener, with MQTT 3.1.1 and 5: subscribe, QoS
//! 0/1/2 round trips, a retained message for a later subscriber, MQTT 5
//! user properties and an RPC answered on the Response Topic, a chat
//! envelope that comes back with its seq, and a non-member's message
//! refused (PUBACK 0x87 in MQTT 5, an error event in 3.1.1). The checks
//! live in `mobile-demo/web/e2e/interop-page.js`.

use chatmq_tests::web;

/// Plain topics for the checks that are not chat.
const INTEROP_ACL: &str = r#"
[[acl.rules]]
user = "*"
topic = "interop/#"
access = "pubsub"
"#;

#[test]
fn mqttjs_in_chromium_speaks_both_versions_over_websocket() {
    let broker = web::demo_broker(INTEROP_ACL);
    let base = format!("http://{}", broker.http_addr);
    let output = web::node("e2e/mqttjs.interop.mjs", &["--base", &base]);
    println!("{output}");
    for version in ["MQTT.js 3.1.1", "MQTT.js 5.0"] {
        assert!(
            output
                .lines()
                .any(|l| l.starts_with(&format!("ok   {version}"))),
            "{version} did not pass:\n{output}"
        );
    }
    assert!(
        output.contains("v5 user property carried to the subscriber")
            && output.contains("v3.1.1 chat envelope round trip"),
        "checks missing from the run:\n{output}"
    );
}
