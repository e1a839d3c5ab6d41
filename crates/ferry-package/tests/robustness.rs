//! `Package::open` on hostile input: arbitrary bytes and mutations of a valid
//! package never panic, and a package only opens if its header and table are
//! untouched.

mod common;

use std::sync::OnceLock;

use common::*;
use ferry_package::{Package, PackageError, PackageWriter, SectionKind, HEADER_SIZE, MAGIC};
use proptest::prelude::*;

/// A small valid package (4 KiB chunks) and the input of its memory section.
fn sample() -> &'static (Vec<u8>, Vec<u8>) {
    static SAMPLE: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut input = random_bytes(1, 4096);
        input.extend([0u8; 8192]);
        input.extend(text_bytes(4096));
        input.extend(random_bytes(2, 300));
        let src = dir.path().join("mem");
        std::fs::write(&src, &input).unwrap();
        let dest = dir.path().join("p");
        let mut w = PackageWriter::create(&dest).unwrap();
        w.add_bytes(SectionKind::Config, br#"{"a":1}"#).unwrap();
        w.add_file(SectionKind::Memory, &src, 4096, None, &mut |_, _| {})
            .unwrap();
        w.commit(&vm_meta(0)).unwrap();
        (std::fs::read(&dest).unwrap(), input)
    })
}

/// Opens `bytes` as a package file (kept as long as the returned file).
fn open_bytes(bytes: &[u8]) -> Result<(Package, tempfile::NamedTempFile), PackageError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, bytes).unwrap();
    Package::open(file.path()).map(|p| (p, file))
}

/// Reads every section of an opened package: each either reads or reports a
/// corrupt chunk.
fn exercise(p: &Package) {
    let _ = p.verify(&mut |_, _| {});
    if let Err(e) = p.vm_meta() {
        assert!(matches!(e, PackageError::NotAVmPackage { .. }), "{e}");
    }
    for s in p.sections() {
        match p.read_bytes(s.kind) {
            Ok(data) => assert_eq!(data.len() as u64, s.size),
            Err(e) => assert!(matches!(e, PackageError::ChunkCorrupt { .. }), "{e}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Truncate { len: usize },
    Append { junk: Vec<u8> },
    Insert { at: usize, junk: Vec<u8> },
    Remove { at: usize, n: usize },
}

/// Positions biased towards the header and the table.
fn position() -> impl Strategy<Value = usize> {
    let (bytes, _) = sample();
    let len = bytes.len();
    let (off, _) = table_range(bytes);
    prop_oneof![0..96usize, 0..HEADER_SIZE as usize, off..len, 0..len]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let len = sample().0.len();
    prop_oneof![
        4 => (position(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        1 => (0..len).prop_map(|len| Mutation::Truncate { len }),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(|junk| Mutation::Append { junk }),
        1 => (position(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, junk)| Mutation::Insert { at, junk }),
        1 => (position(), 1..16usize).prop_map(|(at, n)| Mutation::Remove { at, n }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip { at, xor } => {
            if let Some(b) = bytes.get_mut(*at) {
                *b ^= xor;
            }
        }
        Mutation::Truncate { len } => bytes.truncate(*len),
        Mutation::Append { junk } => bytes.extend_from_slice(junk),
        Mutation::Insert { at, junk } => {
            let at = (*at).min(bytes.len());
            bytes.splice(at..at, junk.iter().copied());
        }
        Mutation::Remove { at, n } => {
            let at = (*at).min(bytes.len());
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
    }
}

/// Whether `mutated` differs from `original` in its header or table region
/// (or in length, which moves the table).
fn metadata_changed(original: &[u8], mutated: &[u8]) -> bool {
    let (off, _) = table_range(original);
    original.len() != mutated.len()
        || original[..HEADER_SIZE as usize] != mutated[..HEADER_SIZE as usize]
        || original[off..] != mutated[off..]
}

proptest! {
    // PROPTEST_CASES=n runs more (or fewer) cases.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        let _ = open_bytes(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_magic_never_panic(
        rest in proptest::collection::vec(any::<u8>(), 0..6000),
        major in prop_oneof![Just(1u16), any::<u16>()],
        minor in prop_oneof![Just(0u16), any::<u16>()],
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend(major.to_le_bytes());
        bytes.extend(minor.to_le_bytes());
        bytes.extend(rest);
        if bytes.len() >= 96 {
            fix_header_checksum(&mut bytes);
        }
        if let Ok((p, _dir)) = open_bytes(&bytes) {
            exercise(&p);
        }
    }

    #[test]
    fn mutated_packages_open_only_if_header_and_table_are_intact(
        mutations in proptest::collection::vec(mutation(), 1..4)
    ) {
        let (original, input) = sample();
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        match open_bytes(&bytes) {
            Ok((p, _dir)) => {
                prop_assert!(
                    !metadata_changed(original, &bytes),
                    "a package with a changed header or table opened"
                );
                exercise(&p);
                // Only chunk data changed: whatever verifies is the original.
                if p.verify(&mut |_, _| {}).is_ok() {
                    prop_assert_eq!(&p.read_bytes(SectionKind::Memory).unwrap(), input);
                }
            }
            Err(e) => {
                prop_assert!(metadata_changed(original, &bytes), "{}", e);
            }
        }
    }

    /// A valid header and checksummed table with arbitrary JSON behind it:
    /// the validation, not the checksum, has to refuse it.
    #[test]
    fn arbitrary_checksummed_tables_never_panic(
        table in prop_oneof![arbitrary_table(), perturbed_table()]
    ) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &sample().0).unwrap();
        replace_table(file.path(), &table);
        if let Ok(p) = Package::open(file.path()) {
            exercise(&p);
        }
    }
}

/// The sample's own table with one number replaced: everything else stays
/// consistent, so each check of the validation is reached.
fn perturbed_table() -> impl Strategy<Value = serde_json::Value> {
    let field = prop_oneof![
        Just("offset"),
        Just("stored_len"),
        Just("size"),
        Just("chunk_size")
    ];
    (0..2usize, 0..6usize, field, numbers()).prop_map(|(section, chunk, field, n)| {
        let bytes = &sample().0;
        let (off, len) = table_range(bytes);
        let mut table: serde_json::Value = serde_json::from_slice(&bytes[off..off + len]).unwrap();
        let s = &mut table["sections"][section];
        match field {
            "size" | "chunk_size" => s[field] = n.into(),
            _ => {
                if let Some(c) = s["chunks"].get_mut(chunk).filter(|c| !c.is_null()) {
                    c[field] = n.into();
                }
            }
        }
        table
    })
}

fn numbers() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![
        0u64..10,
        4090u64..4200,
        Just(4096u64 * 3),
        Just(u64::MAX),
        any::<u64>(),
        0u64..40_000,
    ]
}

/// JSON tables close to real ones, with numbers and strings drawn at random.
fn arbitrary_table() -> impl Strategy<Value = serde_json::Value> {
    let num = numbers();
    let chunk = prop_oneof![
        Just(serde_json::Value::Null),
        (
            num.clone(),
            num.clone(),
            prop_oneof![Just("none"), Just("zstd")],
            prop_oneof![Just("0".repeat(64)), "[0-9a-f]{64}", ".{0,70}"]
        )
            .prop_map(
                |(offset, stored_len, compression, sha256)| serde_json::json!({
                    "offset": offset, "stored_len": stored_len,
                    "compression": compression, "sha256": sha256
                })
            ),
    ];
    let section = (
        prop_oneof![Just("memory"), Just("config"), Just("disk")],
        num.clone(),
        prop_oneof![Just(4096u64), num],
        prop_oneof![Just("0".repeat(64)), "[0-9a-f]{64}"],
        proptest::collection::vec(chunk, 0..6),
    )
        .prop_map(|(kind, size, chunk_size, digest, chunks)| {
            serde_json::json!({
                "kind": kind, "size": size, "chunk_size": chunk_size,
                "digest": digest, "chunks": chunks
            })
        });
    proptest::collection::vec(section, 0..3)
        .prop_map(|sections| serde_json::json!({"metadata": {}, "sections": sections}))
}

#[test]
fn the_sample_is_valid() {
    let (bytes, input) = sample();
    let (p, _dir) = open_bytes(bytes).unwrap();
    p.verify(&mut |_, _| {}).unwrap();
    assert_eq!(&p.read_bytes(SectionKind::Memory).unwrap(), input);
    assert!(!metadata_changed(bytes, bytes));
}
