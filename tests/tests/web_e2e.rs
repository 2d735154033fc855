//! The web demo as people use it, in a real browser: Debian's Chromium,
//! driven by `mobile-demo/web/e2e/chat.e2e.mjs` (playwright-core). alice
//! and bob log in on phone-sized pages by typing in the form, start a
//! direct conversation and chat both ways (pending -> delivered -> read,
//! typing and presence indicators); alice's browser goes offline while bob
//! sends several messages, and when it is back her page shows each of them
//! once, in order; carol, new, scrolls up through a long group history; a
//! reload keeps alice's conversation intact. Screenshots are kept under
//! `<target>/web-e2e/chat/`.

use chatmq_tests::web;

#[test]
fn two_people_chat_in_the_web_demo_and_nothing_is_lost_offline() {
    let broker = web::demo_broker("");
    let out = web::output_dir("chat");
    let base = format!("http://{}", broker.http_addr);
    let output = web::node(
        "e2e/chat.e2e.mjs",
        &["--base", &base, "--out", &out.to_string_lossy()],
    );
    println!("{output}");
    assert!(
        output.contains("ok   alice comes back: every message once, in order"),
        "the offline scenario did not run:\n{output}"
    );
    let screenshot = out.join("alice.png");
    assert!(
        screenshot.is_file(),
        "no screenshot at {}",
        screenshot.display()
    );
    println!("screenshot: {}", screenshot.display());
}
