//! The RPC request parser: any payload is a request or a refusal, and every
//! parameter the methods read is a value or a named refusal.
#![no_main]

use chatmq_protocol::rpc_request::{
    bool_param, opt_str_param, parse, seq_param, str_param, users_param,
};
use libfuzzer_sys::fuzz_target;

/// Every parameter name a method of `chat::rpc` reads.
const NAMES: &[&str] = &[
    "id", "conv", "user", "title", "members", "limit", "after", "before", "seq", "muted",
    "platform", "token", "app_id",
];

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse(data) else {
        return;
    };
    assert!(request.is_object());
    for name in NAMES {
        let _ = str_param(&request, name);
        let _ = opt_str_param(&request, name);
        let _ = seq_param(&request, name);
        let _ = bool_param(&request, name, true);
        let _ = users_param(&request, name);
    }
});
