//! Passwords: argon2id hashes (PHC strings), generated temporary passwords.

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("hashing the password")]
    Hash(#[source] argon2::password_hash::Error),
    #[error("the stored password hash is unreadable")]
    StoredHash(#[source] argon2::password_hash::Error),
}

/// Hashes with argon2id and the crate's recommended parameters. CPU-heavy: call it from a
/// blocking thread in async code.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(AuthError::Hash)
}

/// Checks a password against a stored PHC hash in constant time.
pub fn verify_password(password: &str, stored: &str) -> Result<bool, AuthError> {
    let parsed = PasswordHash::new(stored).map_err(AuthError::StoredHash)?;
    Ok(Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok())
}

/// A random password of 20 characters from an alphabet without look-alikes (0/O, 1/l/I).
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut bytes = [0u8; 20];
    rand::fill(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// A fresh secret token (256 random bits, hex) and the SHA-256 hash that is stored instead.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token = hex::encode(bytes);
    let hash = token_hash(&token);
    (token, hash)
}

/// What the store keeps of a token: its SHA-256, so a database leak yields no usable token.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse", &hash).unwrap());
        assert!(!verify_password("wrong horse", &hash).unwrap());
        let a = generate_password();
        assert_eq!(a.len(), 20);
        assert_ne!(a, generate_password());
    }
}
