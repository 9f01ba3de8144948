//! Passwords: argon2id hashes (PHC strings), generated temporary passwords, and the
//! [`PasswordGate`] that bounds how many hashes run at once.

use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("hashing the password")]
    Hash(#[source] argon2::password_hash::Error),
    #[error("the stored password hash is unreadable")]
    StoredHash(#[source] argon2::password_hash::Error),
}

/// argon2's working memory (19 MiB with the default parameters), kept and reused: allocating
/// it afresh for each hash on whichever blocking thread runs it leaves every thread's malloc
/// arena holding tens of MiB (measured: 540 MiB resident after 200 hashes, two at a time).
#[derive(Default)]
pub struct Memory(Vec<Block>);

impl Memory {
    fn blocks(&mut self, params: &Params) -> &mut [Block] {
        let n = params.block_count();
        if self.0.len() < n {
            self.0.resize(n, Block::default());
        }
        &mut self.0[..n]
    }
}

/// The largest memory cost a stored hash may ask for (4 × the default): a hash written by
/// another tool with absurd parameters must not make a login allocate gigabytes.
const MAX_M_COST: u32 = 4 * Params::DEFAULT_M_COST;

/// Computes the argon2 output for `password` into a buffer of `len` bytes.
fn argon2_output(
    memory: &mut Memory,
    argon2: &Argon2<'_>,
    password: &str,
    salt: &SaltString,
    len: usize,
) -> Result<Output, argon2::password_hash::Error> {
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.as_salt().decode_b64(&mut salt_bytes)?;
    let blocks = memory.blocks(argon2.params());
    Output::init_with(len, |out| {
        Ok(argon2.hash_password_into_with_memory(
            password.as_bytes(),
            salt_bytes,
            out,
            &mut *blocks,
        )?)
    })
}

/// Hashes with argon2id and the crate's recommended parameters into a PHC string. CPU-heavy:
/// call it from a blocking thread in async code ([`Ticket::run`] does).
pub fn hash_password_with(memory: &mut Memory, password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    let params = Params::default();
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let output = argon2_output(memory, &argon2, password, &salt, Params::DEFAULT_OUTPUT_LEN)
        .map_err(AuthError::Hash)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(AuthError::Hash)?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Checks a password against a stored PHC hash (its own algorithm, version and parameters)
/// in constant time.
pub fn verify_password_with(
    memory: &mut Memory,
    password: &str,
    stored: &str,
) -> Result<bool, AuthError> {
    use argon2::password_hash::Error as E;
    let parsed = PasswordHash::new(stored).map_err(AuthError::StoredHash)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(AuthError::StoredHash)?;
    let version = parsed
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(|e| AuthError::StoredHash(e.into()))?
        .unwrap_or_default();
    let params = Params::try_from(&parsed).map_err(AuthError::StoredHash)?;
    if params.m_cost() > MAX_M_COST {
        return Err(AuthError::StoredHash(E::ParamValueInvalid(
            argon2::password_hash::errors::InvalidValue::TooLong,
        )));
    }
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(AuthError::StoredHash(E::PhcStringField));
    };
    let salt = SaltString::from_b64(salt.as_str()).map_err(AuthError::StoredHash)?;
    let argon2 = Argon2::new(algorithm, version, params);
    let output = argon2_output(memory, &argon2, password, &salt, expected.len())
        .map_err(AuthError::StoredHash)?;
    // `Output`'s equality is constant-time.
    Ok(output == expected)
}

/// [`hash_password_with`] with memory of its own, for one-off use (the command line).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    hash_password_with(&mut Memory::default(), password)
}

/// [`verify_password_with`] with memory of its own, for one-off use.
pub fn verify_password(password: &str, stored: &str) -> Result<bool, AuthError> {
    verify_password_with(&mut Memory::default(), password, stored)
}

/// Bounds argon2 work that strangers can trigger (a login for any email costs one hash of
/// 19 MiB and tens of milliseconds): at most `workers` hashes run at once, each in one of
/// `workers` reused [`Memory`] buffers; at most `waiting` more wait for a worker, and anyone
/// beyond that is turned away at once ([`Busy`]) instead of piling up blocking threads and
/// memory.
#[derive(Clone)]
pub struct PasswordGate {
    line: Arc<Semaphore>,
    workers: Arc<Semaphore>,
    memory: Arc<Mutex<Vec<Memory>>>,
}

/// The [`PasswordGate`] is full: answer "try again shortly".
#[derive(Debug, thiserror::Error)]
#[error("too many password checks in progress")]
pub struct Busy;

/// A place in the [`PasswordGate`]'s line; the holder may run password work.
pub struct Ticket {
    _place: OwnedSemaphorePermit,
    gate: PasswordGate,
}

impl PasswordGate {
    pub fn new(workers: usize, waiting: usize) -> Self {
        let workers = workers.max(1);
        PasswordGate {
            line: Arc::new(Semaphore::new(workers + waiting)),
            workers: Arc::new(Semaphore::new(workers)),
            memory: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// One worker per core, and a line of eight per worker: a full line clears in a few
    /// hundred milliseconds.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self::new(cores, cores * 8)
    }

    /// A place in line, or [`Busy`] at once.
    pub fn enter(&self) -> Result<Ticket, Busy> {
        let place = self.line.clone().try_acquire_owned().map_err(|_| Busy)?;
        Ok(Ticket {
            _place: place,
            gate: self.clone(),
        })
    }
}

impl Ticket {
    /// Runs `work` with a worker's [`Memory`] on a blocking thread once a worker is free. The
    /// worker stays taken until `work` ends, even if the caller stops waiting (a client that
    /// hangs up), so the bound holds for the work itself, not only for the requests.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let worker = self.gate.workers.clone().acquire_owned().await;
        let pool = self.gate.memory.clone();
        tokio::task::spawn_blocking(move || {
            let _worker = worker;
            // At most one buffer per worker exists: a worker takes one or makes the first.
            let mut memory = pool
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()
                .unwrap_or_default();
            let out = work(&mut memory);
            pool.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(memory);
            out
        })
        .await
    }
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
        // Hashes made by the argon2 crate's own hasher (the format already stored) verify.
        use argon2::password_hash::PasswordHasher;
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("correct horse", &theirs).unwrap());
        assert!(!verify_password("correct hors", &theirs).unwrap());
        use argon2::password_hash::PasswordVerifier;
        let ours = PasswordHash::new(&hash).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &ours)
                .is_ok()
        );
        let a = generate_password();
        assert_eq!(a.len(), 20);
        assert_ne!(a, generate_password());
    }

    #[tokio::test]
    async fn the_gate_turns_away_what_exceeds_workers_and_line() {
        let gate = PasswordGate::new(1, 2);
        let tickets: Vec<_> = (0..3).map(|_| gate.enter().unwrap()).collect();
        assert!(gate.enter().is_err(), "a fourth caller is turned away");
        assert_eq!(tickets[0].run(|_| 7).await.unwrap(), 7);
        drop(tickets);
        assert!(gate.enter().is_ok(), "places free up again");
    }
}
