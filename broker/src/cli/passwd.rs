//! `chatmq passwd`: an argon2 PHC string for the `password` of an
//! `[[auth.users]]` entry, like `mosquitto_passwd` but printed, not
//! written into a file (the configuration is the operator's).
//!
//! argon2id with the `argon2` crate's defaults (19 MiB, 2 passes, 1 lane):
//! the parameters travel in the string, and they are what the broker's
//! password-check pool (`auth.limits.password_checks`) is sized for.

use std::io::{BufRead, IsTerminal};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;

/// Reads the password, prints its hash.
pub fn run() -> Result<(), String> {
    let password = read_password()?;
    println!("{}", hash(&password)?);
    Ok(())
}

/// The password from the terminal (no echo, asked twice), or the first
/// line of standard input when it is a pipe or a file.
fn read_password() -> Result<String, String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")
            .map_err(|e| format!("cannot read the password from the terminal: {e}"))?;
        let again = rpassword::prompt_password("Reenter password: ")
            .map_err(|e| format!("cannot read the password from the terminal: {e}"))?;
        if first != again {
            return Err("the passwords do not match".into());
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
        let line = line.strip_suffix('\n').unwrap_or(&line);
        line.strip_suffix('\r').unwrap_or(line).to_string()
    };
    if password.is_empty() {
        return Err("the password is empty; nothing was hashed".into());
    }
    Ok(password)
}

/// The PHC string of `password` with a fresh 16-byte salt from the OS.
fn hash(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for the salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| format!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::{PasswordHash, PasswordVerifier};

    #[test]
    fn the_hash_verifies_and_is_salted_afresh() {
        let a = hash("s3cret").unwrap();
        let b = hash("s3cret").unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "one salt per hash");
        let parsed = PasswordHash::new(&a).unwrap();
        assert!(Argon2::default()
            .verify_password(b"s3cret", &parsed)
            .is_ok());
        assert!(Argon2::default()
            .verify_password(b"wrong", &parsed)
            .is_err());
    }
}
