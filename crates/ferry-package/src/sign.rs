//! Package signatures: who vouches for a package's content.
//!
//! A signature signs the sha256 of the package's section table, which holds
//! every chunk's sha256 and every section's digest: it covers the whole
//! package. It is kept in a 128-byte **signature block** at the end of the
//! data area, immediately before the table, in bytes no chunk refers to. A
//! format 1.0 reader ignores such bytes, so a signed package still opens in
//! a ferry that knows nothing of signatures; and the table's digest does not
//! cover the block, so signing never changes what is signed.
//!
//! Block layout (little-endian; `docs/package-format.md`, "Signature"):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0   | 8  | magic `FERRYSIG` |
//! | 8   | 2  | major (1) |
//! | 10  | 2  | minor (0) |
//! | 12  | 2  | algorithm (1: ed25519) |
//! | 14  | 2  | zero |
//! | 16  | 32 | the signer's public key |
//! | 48  | 64 | ed25519 signature of `"ferry-package-table v1\0" ‖ table_sha256` |
//! | 112 | 16 | zero |
//!
//! Where `--trust` is given, [`TrustedKeys::check`] refuses a package that
//! has no block (or one this version cannot read), one signed by another
//! key, and one whose signature does not match its table (re-packed or
//! tampered with after signing).

use std::path::PathBuf;

use ed25519_dalek::{Signature, Signer, Verifier};
use serde::{Deserialize, Serialize};

use crate::error::PackageError;
use crate::index::PackageIndex;
use crate::key::{KeyError, PublicKey, SecretKey};

/// Size of the signature block.
pub const SIGNATURE_BLOCK_LEN: u64 = 128;
const MAGIC: &[u8; 8] = b"FERRYSIG";
const MAJOR: u16 = 1;
const MINOR: u16 = 0;
const ALG_ED25519: u16 = 1;
/// Prefixed to the table digest before signing, so that a ferry package
/// signature can never be taken for a signature of anything else.
const DOMAIN: &[u8] = b"ferry-package-table v1\0";

/// A package's signature, as read from its signature block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSignature {
    /// Who signed.
    pub signer: PublicKey,
    /// Whether the signature is valid for this package's table. `false`
    /// means the package was changed after it was signed, or the block
    /// was copied from another package.
    pub matches_table: bool,
}

impl PackageSignature {
    /// The signer's key id.
    pub fn key_id(&self) -> String {
        self.signer.key_id()
    }
}

fn message(table_sha256: &[u8; 32]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(table_sha256);
    m
}

/// The signature block for a table with digest `table_sha256`.
pub(crate) fn encode_block(key: &SecretKey, table_sha256: &[u8; 32]) -> Vec<u8> {
    let mut b = vec![0u8; SIGNATURE_BLOCK_LEN as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&MAJOR.to_le_bytes());
    b[10..12].copy_from_slice(&MINOR.to_le_bytes());
    b[12..14].copy_from_slice(&ALG_ED25519.to_le_bytes());
    b[16..48].copy_from_slice(&key.public_key().to_bytes());
    let sig = key.signing().sign(&message(table_sha256));
    b[48..112].copy_from_slice(&sig.to_bytes());
    b
}

/// Reads a signature block; `None` if `bytes` are not one this version
/// reads (no magic, another major version or algorithm, nonzero padding, a
/// public key that is not a curve point). A newer minor version of the
/// block is read: it may only add meaning to the reserved bytes.
pub(crate) fn decode_block(bytes: &[u8], table_sha256: &[u8; 32]) -> Option<PackageSignature> {
    if bytes.len() as u64 != SIGNATURE_BLOCK_LEN || &bytes[..8] != MAGIC {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    if u16_at(8) != MAJOR || u16_at(12) != ALG_ED25519 || u16_at(14) != 0 {
        return None;
    }
    if u16_at(10) == MINOR && bytes[112..].iter().any(|&b| b != 0) {
        return None;
    }
    let signer = PublicKey::from_bytes(bytes[16..48].try_into().expect("32 bytes"))?;
    let sig = Signature::from_bytes(bytes[48..112].try_into().expect("64 bytes"));
    let matches_table = signer
        .verifying()
        .verify(&message(table_sha256), &sig)
        .is_ok();
    Some(PackageSignature {
        signer,
        matches_table,
    })
}

/// The keys `--trust` names. Empty: no signature is required (and none is
/// checked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    /// Trusts these keys.
    pub fn new(keys: Vec<PublicKey>) -> TrustedKeys {
        TrustedKeys { keys }
    }

    /// Reads each public key file (`PREFIX.pub`).
    ///
    /// # Errors
    /// As [`PublicKey::load`], for the first file that fails.
    pub fn load(files: &[PathBuf]) -> Result<TrustedKeys, KeyError> {
        let keys = files
            .iter()
            .map(|f| PublicKey::load(f))
            .collect::<Result<_, _>>()?;
        Ok(TrustedKeys { keys })
    }

    /// Whether no key is trusted (so nothing is required).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks that the package is signed by one of these keys and that the
    /// signature matches its table. Passes anything when no key is trusted.
    ///
    /// # Errors
    /// [`PackageError::NotSigned`], [`PackageError::UntrustedSigner`] or
    /// [`PackageError::SignatureMismatch`].
    pub fn check(&self, index: &PackageIndex) -> Result<(), PackageError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let package = index.source().display().to_string();
        let Some(sig) = index.signature() else {
            return Err(PackageError::NotSigned { package });
        };
        if !self.keys.contains(&sig.signer) {
            return Err(PackageError::UntrustedSigner {
                package,
                key_id: sig.key_id(),
            });
        }
        if !sig.matches_table {
            return Err(PackageError::SignatureMismatch {
                package,
                key_id: sig.key_id(),
            });
        }
        Ok(())
    }
}

/// A table digest a package must have (`URL#sha256=<digest>`): the
/// registry's listing, its `ETag` and `ferry inspect` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablePin([u8; 32]);

impl TablePin {
    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// What is wrong, for a message naming the flag or URL.
    pub fn parse(s: &str) -> Result<TablePin, String> {
        let mut b = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut b).is_err() {
            return Err(format!(
                "`{s}` is not a sha256 (64 hex digits, as `ferry inspect` or the registry's listing shows as table sha256)"
            ));
        }
        Ok(TablePin(b))
    }

    /// The digest in lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Checks that the package's table has this digest.
    ///
    /// # Errors
    /// [`PackageError::PinMismatch`].
    pub fn check(&self, index: &PackageIndex) -> Result<(), PackageError> {
        let actual = index.table_sha256();
        if actual == self.to_hex() {
            Ok(())
        } else {
            Err(PackageError::PinMismatch {
                package: index.source().display().to_string(),
                pinned: self.to_hex(),
                actual,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_verifies_only_for_its_table() {
        let key = SecretKey::generate();
        let table = [7u8; 32];
        let block = encode_block(&key, &table);
        let sig = decode_block(&block, &table).unwrap();
        assert!(sig.matches_table);
        assert_eq!(sig.signer, key.public_key());
        let other = decode_block(&block, &[8u8; 32]).unwrap();
        assert!(!other.matches_table);
        // Any flipped bit of the signature breaks it.
        let mut bad = block.clone();
        bad[60] ^= 1;
        assert!(!decode_block(&bad, &table).unwrap().matches_table);
    }

    #[test]
    fn unknown_blocks_are_no_signature() {
        let key = SecretKey::generate();
        let table = [7u8; 32];
        let block = encode_block(&key, &table);
        assert!(decode_block(&block[..127], &table).is_none());
        for (at, value) in [(0, b'X'), (8, 2), (12, 2), (14, 1), (120, 1)] {
            let mut b = block.clone();
            b[at] = value;
            assert!(decode_block(&b, &table).is_none(), "byte {at}");
        }
        // A newer minor may use the reserved bytes.
        let mut b = block.clone();
        b[10] = 1;
        b[120] = 1;
        assert!(decode_block(&b, &table).unwrap().matches_table);
    }

    #[test]
    fn pins_parse_hex_only() {
        assert!(TablePin::parse(&"ab".repeat(32)).is_ok());
        assert_eq!(
            TablePin::parse(&"AB".repeat(32)).unwrap().to_hex(),
            "ab".repeat(32)
        );
        assert!(TablePin::parse("abc").is_err());
        assert!(TablePin::parse(&"zz".repeat(32)).is_err());
    }
}
