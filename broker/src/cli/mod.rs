//! The operator's subcommands of the `chatmq` binary, one file each:
//! [`passwd`] hashes a password for `[[auth.users]]`, [`token`] mints a
//! user JWT, [`status`] asks a running node how it is, [`drain`] moves a
//! node's clients away and waits until it stopped. Each returns the one
//! line to print on failure; `main` prints it and exits non-zero.
//!
//! They check nothing of their own: `passwd` hashes with the argon2
//! defaults the broker verifies, `token` checks what it minted with the
//! broker's own [`Authenticator`](chatmq_broker::access::Authenticator),
//! `status` reads the HTTP API's `/readyz` and `/metrics`, `drain` calls
//! `POST /v1/admin/drain`.

pub mod drain;
pub mod passwd;
pub mod status;
pub mod token;
