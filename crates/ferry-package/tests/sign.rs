//! Signed packages: what `--trust` accepts and what it refuses.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ferry_package::{
    Package, PackageError, PackageIndex, PackageWriter, SecretKey, SectionKind, TablePin,
    TrustedKeys, HEADER_SIZE, SIGNATURE_BLOCK_LEN,
};

/// A package of `input` (config + memory), signed with `key` if given.
fn write(dir: &Path, name: &str, input: &[u8], key: Option<&SecretKey>) -> PathBuf {
    let dest = dir.join(name);
    let mut w = PackageWriter::create(&dest).unwrap();
    w.add_bytes(SectionKind::Config, br#"{"vcpus":1}"#).unwrap();
    w.add_bytes(SectionKind::Memory, input).unwrap();
    if let Some(k) = key {
        w.sign_with(k.clone());
    }
    w.commit(&vm_meta(0)).unwrap();
    dest
}

fn trust(keys: &[&SecretKey]) -> TrustedKeys {
    TrustedKeys::new(keys.iter().map(|k| k.public_key()).collect())
}

fn check(trusted: &TrustedKeys, path: &Path) -> Result<(), PackageError> {
    trusted.check(Package::open(path).unwrap().index())
}

#[test]
fn a_signed_package_passes_and_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let path = write(dir.path(), "signed.ferry", &mixed_input(1), Some(&key));
    let p = Package::open(&path).unwrap();
    let sig = p.index().signature().expect("signed");
    assert!(sig.matches_table);
    assert_eq!(sig.key_id(), key.public_key().key_id());
    check(&trust(&[&key]), &path).unwrap();
    // Among other trusted keys too.
    check(&trust(&[&SecretKey::generate(), &key]), &path).unwrap();
    // And its content reads as ever.
    assert_eq!(p.read_bytes(SectionKind::Memory).unwrap(), mixed_input(1));
    p.verify(&mut |_, _| {}).unwrap();
}

#[test]
fn without_trust_anything_passes() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let unsigned = write(dir.path(), "u.ferry", b"abc", None);
    let signed = write(dir.path(), "s.ferry", b"abc", Some(&key));
    assert!(Package::open(&unsigned)
        .unwrap()
        .index()
        .signature()
        .is_none());
    check(&TrustedKeys::default(), &unsigned).unwrap();
    check(&TrustedKeys::default(), &signed).unwrap();
}

#[test]
fn an_unsigned_package_is_refused_under_trust() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "u.ferry", &mixed_input(2), None);
    let err = check(&trust(&[&SecretKey::generate()]), &path).unwrap_err();
    assert!(matches!(err, PackageError::NotSigned { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("is not signed by a trusted key"), "{msg}");
    assert!(msg.contains("ferry package --sign KEY"), "{msg}");
    assert!(msg.contains("drop --trust"), "{msg}");
}

#[test]
fn a_package_signed_by_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (SecretKey::generate(), SecretKey::generate());
    let path = write(dir.path(), "s.ferry", &mixed_input(3), Some(&theirs));
    let err = check(&trust(&[&ours]), &path).unwrap_err();
    assert!(
        matches!(&err, PackageError::UntrustedSigner { key_id, .. } if *key_id == theirs.public_key().key_id()),
        "{err}"
    );
}

/// The attack: a package re-packed with a valid internal table (every
/// checksum fixed up, so it opens and verifies) but keeping the signature
/// block of the original.
#[test]
fn a_repacked_table_with_the_old_signature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let path = write(dir.path(), "s.ferry", &mixed_input(4), Some(&key));
    let mut table = read_table(&path);
    table["metadata"]["cmdline"] = "console=ttyS0 init=/bin/evil".into();
    replace_table(&path, &table);
    // A valid package in every other respect.
    let p = Package::open(&path).unwrap();
    p.verify(&mut |_, _| {}).unwrap();
    assert_eq!(p.vm_meta().unwrap().cmdline, "console=ttyS0 init=/bin/evil");
    let sig = p.index().signature().expect("the block is still there");
    assert!(!sig.matches_table);
    let err = trust(&[&key]).check(p.index()).unwrap_err();
    assert!(
        matches!(err, PackageError::SignatureMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("changed or re-packed"), "{err}");
}

/// The other way round: a package's own valid table, with the signature
/// block of another package signed by the trusted key.
#[test]
fn a_signature_taken_from_another_package_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let good = write(dir.path(), "good.ferry", &mixed_input(5), Some(&key));
    let evil = write(
        dir.path(),
        "evil.ferry",
        &mixed_input(6),
        Some(&SecretKey::generate()),
    );
    let block_of = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        let (off, _) = table_range(&bytes);
        (off, bytes[off - SIGNATURE_BLOCK_LEN as usize..off].to_vec())
    };
    let (_, good_block) = block_of(&good);
    let (evil_off, _) = block_of(&evil);
    let mut bytes = std::fs::read(&evil).unwrap();
    bytes[evil_off - SIGNATURE_BLOCK_LEN as usize..evil_off].copy_from_slice(&good_block);
    std::fs::write(&evil, bytes).unwrap();
    let p = Package::open(&evil).unwrap();
    p.verify(&mut |_, _| {}).unwrap();
    assert_eq!(p.index().signature().unwrap().signer, key.public_key());
    let err = trust(&[&key]).check(p.index()).unwrap_err();
    assert!(
        matches!(err, PackageError::SignatureMismatch { .. }),
        "{err}"
    );
}

/// A reader of format 1.0 that knows nothing of signatures (the header and
/// table checks alone) opens a signed package: the block is in bytes no
/// chunk refers to.
#[test]
fn a_signed_package_is_a_plain_format_1_0_package() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let path = write(dir.path(), "s.ferry", &mixed_input(7), Some(&key));
    let bytes = std::fs::read(&path).unwrap();
    let head = &bytes[..HEADER_SIZE as usize];
    let range = PackageIndex::table_range(&path, head, bytes.len() as u64).unwrap();
    let table = &bytes[range.start as usize..range.end as usize];
    let index = PackageIndex::from_parts(&path, head, table, bytes.len() as u64).unwrap();
    assert_eq!(index.format_version(), (1, 0));
    assert!(index.signature().is_none(), "only read when asked for");
    let block = index.signature_range().unwrap();
    assert_eq!(block.end, range.start);
    assert_eq!(&bytes[block.start as usize..][..8], b"FERRYSIG");
    let index = index.with_signature_block(&bytes[block.start as usize..block.end as usize]);
    assert!(index.signature().unwrap().matches_table);
}

/// An unsigned package's last chunk ends where the table starts: its bytes
/// are never read as a signature, even if they look like one.
#[test]
fn chunk_bytes_are_never_a_signature() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    // A signed package's block, stored as the (raw, incompressible) tail of
    // another package's memory.
    let signed = write(dir.path(), "s.ferry", b"abc", Some(&key));
    let bytes = std::fs::read(&signed).unwrap();
    let (off, _) = table_range(&bytes);
    let mut input = random_bytes(8, 4096 - SIGNATURE_BLOCK_LEN as usize);
    input.extend_from_slice(&bytes[off - SIGNATURE_BLOCK_LEN as usize..off]);
    let path = write(dir.path(), "u.ferry", &input, None);
    let p = Package::open(&path).unwrap();
    assert!(p.index().signature_range().is_none());
    assert!(p.index().signature().is_none());
}

#[test]
fn a_signed_empty_package_has_room_for_its_block() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let path = write(dir.path(), "s.ferry", &[], Some(&key));
    check(&trust(&[&key]), &path).unwrap();
}

#[test]
fn pins_match_the_table_digest_only() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.ferry", &mixed_input(9), None);
    let b = write(dir.path(), "b.ferry", &mixed_input(10), None);
    let ia = Package::open(&a).unwrap();
    let ib = Package::open(&b).unwrap();
    let pin = TablePin::parse(&ia.index().table_sha256()).unwrap();
    pin.check(ia.index()).unwrap();
    let err = pin.check(ib.index()).unwrap_err();
    assert!(matches!(err, PackageError::PinMismatch { .. }), "{err}");
    assert!(err.to_string().contains("is not the pinned one"), "{err}");
}
