//! `chatmq-cli`: a terminal chat client for chatmq that behaves like a
//! well-built mobile app. The behaviour (MQTT 5 with a persistent session,
//! reconnects with backoff and jitter, the state file with the last seq of
//! every conversation and the outbox, each message once and in order,
//! resends with the original envelope id) is the `chatmq-client` library;
//! this program is its terminal front-end.
//!
//! | module | owns |
//! |---|---|
//! | `args` | the command line |
//! | `command` | what a typed line means |
//! | `app` | typed lines to client calls, client events to output |
//! | `output` | human or JSON-lines output |

mod app;
mod args;
mod command;
mod output;

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
