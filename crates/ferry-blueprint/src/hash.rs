use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::BlueprintError;

/// SHA-256 of a file, as lowercase hex, and its size.
pub fn sha256_file(path: &Path) -> Result<(String, u64), BlueprintError> {
    let mut file = std::fs::File::open(path).map_err(BlueprintError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(BlueprintError::io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}
