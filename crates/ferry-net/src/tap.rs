//! Persistent tap devices. The kernel creates taps only through ioctls on
//! `/dev/net/tun`, not rtnetlink; configuring them is then ordinary netlink.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::io::AsRawFd;

use crate::ns::Netns;
use crate::NetError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the persistent tap `name` inside `ns`. It survives this call (and
/// ferry) until deleted; the descriptor returned is attached to it already,
/// for the engine to be handed. Attaching again means a `TUNSETIFF` under
/// the kernel's network lock, and closing this one a detach: with the rest
/// of the namespace being made at the same time, a QEMU's own `TUNSETIFF`
/// waited 11 ms for that lock on a resume's critical path.
pub fn create(ns: &Netns, name: &str) -> Result<OwnedFd, NetError> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(NetError::BadOption(format!(
            "tap name '{name}' is too long"
        )));
    }
    let name = name.to_string();
    ns.run(move || -> Result<OwnedFd, NetError> {
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied => NetError::NotRoot {
                    what: "create a tap device".into(),
                    hint: String::new(),
                },
                _ => NetError::io("opening /dev/net/tun")(e),
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            // The flags QEMU will attach with, so that its TUNSETIFF on the
            // existing device is accepted.
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct we own;
        // TUNSETPERSIST takes an integer argument.
        unsafe {
            if libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EPERM) {
                    return Err(NetError::NotRoot {
                        what: "create a tap device".into(),
                        hint: String::new(),
                    });
                }
                return Err(NetError::io(format!("creating tap {name}"))(e));
            }
            if libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) != 0 {
                return Err(NetError::io(format!("making tap {name} persistent"))(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(tun.into())
    })?
}
