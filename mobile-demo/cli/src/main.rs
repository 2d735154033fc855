//! `chatmq-cli`: a terminal chat client for chatmq that behaves like a
//! well-built mobile app. It speaks MQTT 5 with a persistent session,
//! reconnects with capped exponential backoff and jitter, keeps the last
//! seq of every conversation and an outbox in a state file, shows each
//! message once and in order, and resends unacknowledged messages with
//! their original envelope id.
//!
//! | module | owns |
//! |---|---|
//! | `args` | the command line |
//! | `command` | what a typed line means |
//! | `state` | the state file (atomic writes) |
//! | `timeline` | dedup by (conv, seq), ordering, gap detection |
//! | `link` | the MQTT connection and its reconnects |
//! | `app` | the behaviour tying them together |
//! | `output` | human or JSON-lines output |

mod app;
mod args;
mod command;
mod link;
mod output;
mod state;
mod timeline;

use std::process::ExitCode;

fn main() -> ExitCode {
    let opts = args::from_env();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chatmq-cli: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatmq-cli: {e:#}");
            ExitCode::FAILURE
        }
    }
}
