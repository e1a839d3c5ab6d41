use std::path::Path;

use crate::BlueprintError;

/// SHA-256 of a file, as lowercase hex, and its size
/// ([`ferry_engine::memo::hash_file`], which the cache's digests use too).
pub fn sha256_file(path: &Path) -> Result<(String, u64), BlueprintError> {
    ferry_engine::memo::hash_file(path).map_err(BlueprintError::io(path))
}
