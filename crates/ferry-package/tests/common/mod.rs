//! Helpers shared by the package tests: test inputs and raw edits of a
//! package file (header fields, table) with the checksums fixed up, so the
//! checks behind them can be reached.
#![allow(dead_code)]

use std::path::Path;

use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// Chunk size used by the tests (small, so debug builds stay fast).
pub const CHUNK: u64 = 64 << 10;

/// `n` pseudo-random (incompressible) bytes.
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// `n` compressible bytes.
pub fn text_bytes(n: usize) -> Vec<u8> {
    b"the quick ferry crosses the lazy river; "
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}

/// What each chunk of [`mixed_input`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Random,
    Zero,
    Text,
}

/// The chunk kinds of [`mixed_input`]; the last chunk is short.
pub const LAYOUT: [Kind; 8] = [
    Kind::Random,
    Kind::Zero,
    Kind::Text,
    Kind::Zero,
    Kind::Zero,
    Kind::Random,
    Kind::Text,
    Kind::Random,
];

/// Length of the short last chunk of [`mixed_input`].
pub const LAST_LEN: usize = 10_000;

/// An input of random, zero and compressible chunks of [`CHUNK`] bytes,
/// the last one [`LAST_LEN`] bytes long.
pub fn mixed_input(seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, k) in LAYOUT.iter().enumerate() {
        let n = if i == LAYOUT.len() - 1 {
            LAST_LEN
        } else {
            CHUNK as usize
        };
        match k {
            Kind::Random => v.extend(random_bytes(seed + i as u64, n)),
            Kind::Zero => v.extend(std::iter::repeat_n(0u8, n)),
            Kind::Text => v.extend(text_bytes(n)),
        }
    }
    v
}

/// The table offset and length recorded in a package's header.
pub fn table_range(bytes: &[u8]) -> (usize, usize) {
    let off = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    (off, len)
}

/// Recomputes the header checksum (bytes 64..96 over 0..64).
pub fn fix_header_checksum(bytes: &mut [u8]) {
    let sum = Sha256::digest(&bytes[..64]);
    bytes[64..96].copy_from_slice(&sum);
}

/// Replaces the section table of the package at `path` by `table` (JSON),
/// fixing the header's table length, table checksum and header checksum.
pub fn replace_table(path: &Path, table: &serde_json::Value) {
    let mut bytes = std::fs::read(path).unwrap();
    let (off, _) = table_range(&bytes);
    let json = serde_json::to_vec(table).unwrap();
    bytes.truncate(off);
    bytes.extend_from_slice(&json);
    bytes[24..32].copy_from_slice(&(json.len() as u64).to_le_bytes());
    let sum = Sha256::digest(&json);
    bytes[32..64].copy_from_slice(&sum);
    fix_header_checksum(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

/// The section table of the package at `path`, as JSON.
pub fn read_table(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (off, len) = table_range(&bytes);
    serde_json::from_slice(&bytes[off..off + len]).unwrap()
}

/// The metadata of a small VM package; `generation` tells packages apart.
pub fn vm_meta(generation: u64) -> ferry_package::VmMeta {
    ferry_package::VmMeta {
        ferry_version: "0.0.0-test".into(),
        written_unix: 1_700_000_000,
        generation,
        provenance: ferry_engine::Provenance {
            engine: "test".into(),
            engine_version: "1".into(),
            cpu_model: "max".into(),
            accel: ferry_engine::Accel::Tcg,
            memory_mib: 64,
            memory_extra_kib: 0,
            shell_port: true,
            cpus: 1,
        },
        recipe: "test".into(),
        cmdline: "console=ttyS0".into(),
        network: ferry_blueprint::NetworkConfig::default(),
        liveness: ferry_agent_proto::Liveness::None,
        memory_in_state: false,
    }
}
