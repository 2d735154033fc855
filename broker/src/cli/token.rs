//! `chatmq token --user U --ttl 1h`: a user JWT the configured broker
//! accepts, for tests and local development (in production the app's own
//! server mints them).
//!
//! The claims are the ones the broker checks (`access.rs`): `sub` (the user
//! id), `exp`, and `iss` / `aud` when `auth.jwt_issuer` /
//! `auth.jwt_audience` are set; plus `iat`. Signed HS256 with
//! `auth.jwt_secret`, or RS256 / ES256 with the private key given by
//! `--key`, whose public half the broker reads from
//! `auth.jwt_public_key`. Before printing, the token is checked by the
//! broker's own [`Authenticator`] with the same settings, so a key that
//! does not match is an error here, not a refused login later.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatmq_broker::access::Authenticator;
use clap::Args;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::ConfigFile;

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id the token stands for (its `sub`)
    #[arg(long, value_name = "USER")]
    user: String,
    /// How long the token is valid: 90s, 15m, 1h, 7d...
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// A PEM private key (RSA, or EC P-256 as PKCS#8) to sign with instead
    /// of auth.jwt_secret: the private half of auth.jwt_public_key
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigFile,
}

/// Mints, checks and prints the token.
pub fn run(args: &TokenArgs) -> Result<(), String> {
    if !chatmq_config::is_user_id(&args.user) {
        return Err(format!(
            "--user {:?} is not a user id ([A-Za-z0-9_-], 1 to 64 characters)",
            args.user
        ));
    }
    let ttl = args.ttl.as_secs();
    if ttl == 0 {
        return Err("--ttl must be at least 1s".into());
    }
    let settings = args.config.load()?;
    let auth = &settings.auth;
    let (key, algorithm) = signing_key(args, auth)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the system clock is before 1970".to_string())?
        .as_secs();
    let mut claims = json!({
        "sub": args.user,
        "iat": now,
        "exp": now.saturating_add(ttl),
    });
    if let Some(iss) = &auth.jwt_issuer {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = &auth.jwt_audience {
        claims["aud"] = json!(aud);
    }
    let token = encode(&Header::new(algorithm), &claims, &key)
        .map_err(|e| format!("cannot sign the token: {e}"))?;
    let checker = Authenticator::new(auth).map_err(|e| e.to_string())?;
    if checker.user_from_token(&token).as_deref() != Some(args.user.as_str()) {
        let why = match &args.key {
            Some(_) => ": --key is not the private half of auth.jwt_public_key",
            None => "",
        };
        return Err(format!(
            "the broker configured by {} would refuse this token{why}",
            args.config.path.display()
        ));
    }
    println!("{token}");
    Ok(())
}

/// The key to sign with: `--key`, else `auth.jwt_secret`.
fn signing_key(
    args: &TokenArgs,
    auth: &chatmq_config::Auth,
) -> Result<(EncodingKey, Algorithm), String> {
    let file = args.config.path.display();
    if let Some(path) = &args.key {
        let shown = path.display();
        if auth.jwt_public_key.is_none() {
            return Err(format!(
                "--key {shown}: {file} sets no auth.jwt_public_key, so the broker checks no RS256/ES256 token"
            ));
        }
        let pem = std::fs::read(path).map_err(|e| format!("--key {shown}: {e}"))?;
        return if let Ok(k) = EncodingKey::from_rsa_pem(&pem) {
            Ok((k, Algorithm::RS256))
        } else if let Ok(k) = EncodingKey::from_ec_pem(&pem) {
            Ok((k, Algorithm::ES256))
        } else if String::from_utf8_lossy(&pem).contains("BEGIN EC PRIVATE KEY") {
            Err(format!(
                "--key {shown}: an EC key in SEC1 form; give it as PKCS#8 \
                 (openssl pkcs8 -topk8 -nocrypt -in {shown} -out key.pem)"
            ))
        } else {
            Err(format!(
                "--key {shown}: not an RSA or EC P-256 private key in PEM form"
            ))
        };
    }
    match (&auth.jwt_secret, &auth.jwt_public_key) {
        (Some(secret), _) => Ok((
            EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )),
        (None, Some(_)) => Err(format!(
            "{file} sets auth.jwt_public_key only: give its private half with --key FILE"
        )),
        (None, None) => Err(format!(
            "{file} sets neither auth.jwt_secret nor auth.jwt_public_key: the broker accepts no JWT"
        )),
    }
}
