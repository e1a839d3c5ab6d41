//! Thin wrappers over the system calls the agent needs and std lacks.
//!
//! Every function here is a direct call into the kernel (through glibc's
//! syscall stubs); none goes through NSS, so they work in the static binary.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// Whether this process is the guest's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

fn clock_ns(clock: libc::clockid_t) -> io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// Milliseconds since the kernel booted. `CLOCK_BOOTTIME` rather than
/// `/proc/uptime`: no file to parse, and it works before /proc is mounted.
pub fn uptime_ms() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME).map_or(0, |ns| u64::try_from(ns / 1_000_000).unwrap_or(0))
}

/// The guest's wall clock, nanoseconds since the Unix epoch.
pub fn realtime_ns() -> io::Result<i128> {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Steps the guest's wall clock to `ns` since the Unix epoch.
pub fn set_realtime_ns(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(ns / 1_000_000_000)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        // Always below 10^9, so it fits any `c_long`.
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's hostname (`uname` nodename), never resolved through NSS.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which is writable.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Sets the kernel's hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which the
    // kernel only reads.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread to `SCHED_IDLE`: it then runs only when no
/// other thread of the guest wants the CPU.
pub fn run_when_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param
    // that the kernel only reads.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Flushes every file system's dirty data to its device.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Sends `signal` to `pid` (a negative pid names a process group).
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers; a stale pid is the caller's
    // concern (see `Reaper::signal_group`), not a memory-safety one.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Powers the guest off, or reboots it if power-off is refused. Never
/// returns: if both fail there is nothing left to do but wait.
pub fn power_off() -> ! {
    sync();
    // SAFETY: reboot(2) with a valid command; it only returns on failure.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    info!("power-off failed: {}", io::Error::last_os_error());
    // SAFETY: as above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    info!("reboot failed: {}", io::Error::last_os_error());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Turns a `wait` status into the shell's convention: the exit code, or
/// `128 + signal` for a process killed by a signal.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Lays out a `struct rand_pool_info { int entropy_count; int buf_size;
/// __u32 buf[]; }` holding `bytes`, credited as `8 * len` bits. Built in
/// `u32`s so the buffer has the struct's alignment.
pub fn rand_pool_info(bytes: &[u8]) -> Vec<u32> {
    let bits = u32::try_from(bytes.len() * 8).unwrap_or(u32::MAX >> 1);
    let mut info = vec![bits, bytes.len() as u32];
    info.extend(bytes.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        u32::from_ne_bytes(word)
    }));
    info
}

/// Mixes `bytes` into the kernel RNG and credits them as entropy, then asks
/// the kernel to reseed its CRNG at once: after a snapshot is resumed (maybe
/// many times, as clones) the CRNG would otherwise keep producing the same
/// stream in every copy until its next scheduled reseed.
///
/// # Errors
/// The ioctl's error (`EPERM` without `CAP_SYS_ADMIN`); the caller falls back
/// to [`write_urandom`].
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    let info = rand_pool_info(bytes);
    // SAFETY: `info` is a correctly laid out rand_pool_info whose `buf_size`
    // matches the bytes that follow; the kernel only reads it.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `bytes` into the kernel RNG without crediting them (any user may).
pub fn write_urandom(bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?
        .write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_layout() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info.len(), 4);
        assert_eq!(info[0], 40);
        assert_eq!(info[1], 5);
        assert_eq!(info[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], u32::from_ne_bytes([5, 0, 0, 0]));
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        // Encodings as the kernel reports them: exit code in bits 8..16,
        // terminating signal in bits 0..7.
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 128 + 9);
    }

    #[test]
    fn clocks_read() {
        assert!(uptime_ms() > 0);
        assert!(realtime_ns().unwrap() > 1_600_000_000 * 1_000_000_000);
        assert!(!hostname().is_empty());
    }
}
