//! The JavaScript client SDK (`mobile-demo/web/src/sdk`, issue #14 item
//! 5) against the real binary, as an app uses it: node's test runner runs
//! `mobile-demo/web/test/sdk.test.mjs` (MQTT.js over WebSocket, the HTTP
//! API, the IndexedDB outbox on fake-indexeddb). The stories: connect,
//! send and receive with seqs; a reconnection with the session present
//! sends no SUBSCRIBE and fetches no history, and what was missed comes
//! once; a message written offline is delivered once; a broker restart
//! (this test restarts it when the script asks) is survived by itself,
//! every message once and in order; a hole is filled from history without
//! duplicates; a reload resends the persisted outbox with the same ids
//! (one message, the same seq); history paging; edits, deletes and
//! reaction summaries; an image attachment members can fetch and others
//! cannot; where WebSocket is blocked, the fallback to the event stream
//! and the HTTP API, resumed from the client's cursor; presence and typing.

use chatmq_tests::chat::SECRET;
use chatmq_tests::{web, Broker};

#[test]
fn the_js_sdk_chats_resumes_and_keeps_its_outbox_against_the_real_broker() {
    web::prepare();
    let mut broker = Broker::start(&chatmq_tests::chat::config(
        "[websocket]\nenabled = true\npath = \"/mqtt\"\n[attachments]\nmax_bytes = 65536\n",
    ));
    let ws = format!("ws://{}/mqtt", broker.ws_addr());
    let http = format!("http://{}", broker.http_addr);
    let output = web::node_controlling(
        &mut broker,
        &["--test", "--test-reporter=spec", "test/sdk.test.mjs"],
        &[
            ("CHATMQ_WS_URL", &ws),
            ("CHATMQ_HTTP", &http),
            ("CHATMQ_JWT_SECRET", SECRET),
        ],
    );
    println!("{output}");
    // Every story ran (node --test exits 0 when a file has no tests too).
    for story in [
        "connect, send and receive with seqs",
        "session present: no SUBSCRIBE, no history",
        "delivered once after reconnecting",
        "the broker restarts",
        "fills it from history",
        "subscribes once and fills",
        "a reload resends the IndexedDB outbox",
        "history pages back to the start",
        "edits, deletes and reactions",
        "an image attachment",
        "falls back to the event stream",
        "presence and typing",
    ] {
        assert!(
            output.lines().any(|l| l.contains('✔') && l.contains(story)),
            "no passing test about {story:?}:\n{output}"
        );
    }
}

/// The SDK's TypeScript declarations (`src/sdk/index.d.ts`) are what an
/// app written in TypeScript can use: `tsc --strict` accepts
/// `test/types.ts`, which calls every method and listens to every event,
/// and the SDK's JavaScript against its JSDoc (`checkJs`: the options and
/// messages it types through the declarations).
#[test]
fn the_js_sdk_type_declarations_check_with_tsc_strict() {
    web::prepare();
    let output = web::node(
        "node_modules/typescript/bin/tsc",
        &["-p", "tsconfig.json", "--pretty", "false"],
    );
    assert!(
        !output.contains("error TS"),
        "tsc reported errors:\n{output}"
    );
}
