//! What a package says about the VM inside it, as one type:
//! [`ferry_package::VmMeta`], read from a package (local or remote) and
//! written by the save path. Unknown fields (from a newer ferry) are
//! tolerated; a missing required field is refused with an error naming it.

use ferry_package::Package;

use crate::error::StartError;

/// What a package says about the VM inside it (its metadata).
pub use ferry_package::VmMeta as PackageMeta;

/// The metadata of `pkg`.
pub fn read(pkg: &Package) -> Result<PackageMeta, StartError> {
    Ok(pkg.vm_meta()?)
}
