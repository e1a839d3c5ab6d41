//! ferry's own iptables chains. ferry only ever adds one jump rule into a
//! built-in chain and keeps its rules in chains it created, so removing them
//! never touches anyone else's rules or their order. There is no practical
//! netlink crate for the iptables (nf_tables) rule format, so this shells
//! out to `iptables`, entering the namespace in the child.

use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::ns::Netns;
use crate::NetError;

fn command(ns: Option<&Netns>, args: &[&str]) -> Command {
    let mut cmd = Command::new("iptables");
    cmd.arg("-w").args(args);
    if let Some(ns) = ns {
        let fd = ns.file().as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only calls
        // setns, which is async-signal-safe; `ns` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

fn run(ns: Option<&Netns>, args: &[&str]) -> Result<Result<(), String>, NetError> {
    let out = command(ns, args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NetError::MissingTool {
                tool: "iptables".into(),
                package: "iptables".into(),
            }
        } else {
            NetError::io("running iptables")(e)
        }
    })?;
    if out.status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Runs `iptables ARGS` in `ns`; an error carries iptables' message.
pub fn exec(ns: Option<&Netns>, args: &[&str]) -> Result<(), NetError> {
    run(ns, args)?.map_err(|detail| {
        if detail.contains("Permission denied") {
            NetError::NotRoot {
                what: "change firewall rules".into(),
                hint: String::new(),
            }
        } else {
            NetError::Iptables {
                args: args.join(" "),
                detail,
            }
        }
    })
}

/// Whether the rule `-C ARGS` exists.
fn exists(ns: Option<&Netns>, table: &str, chain: &str, rule: &[&str]) -> Result<bool, NetError> {
    let mut args = vec!["-t", table, "-C", chain];
    args.extend_from_slice(rule);
    Ok(run(ns, &args)?.is_ok())
}

/// One of ferry's chains: `chain` in `table`, jumped to from the built-in
/// chain `parent`.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The table (`nat`, `filter`).
    pub table: &'static str,
    /// The built-in chain holding the jump.
    pub parent: &'static str,
    /// ferry's chain.
    pub name: String,
}

impl Chain {
    /// Creates the chain (emptying it if it exists, so that re-running
    /// adopts a crashed run's chain) and the jump to it.
    pub fn install(&self, ns: Option<&Netns>) -> Result<(), NetError> {
        if run(ns, &["-t", self.table, "-N", &self.name])?.is_err() {
            exec(ns, &["-t", self.table, "-F", &self.name])?;
        }
        let jump = ["-j", self.name.as_str()];
        if !exists(ns, self.table, self.parent, &jump)? {
            exec(ns, &["-t", self.table, "-A", self.parent, "-j", &self.name])?;
        }
        Ok(())
    }

    /// Appends a rule to the chain.
    pub fn append(&self, ns: Option<&Netns>, rule: &[&str]) -> Result<(), NetError> {
        if exists(ns, self.table, &self.name, rule)? {
            return Ok(());
        }
        let mut args = vec!["-t", self.table, "-A", self.name.as_str()];
        args.extend_from_slice(rule);
        exec(ns, &args)
    }

    /// Removes the jump and the chain; nothing if they are gone already.
    pub fn remove(&self, ns: Option<&Netns>) -> Result<(), NetError> {
        let jump = ["-j", self.name.as_str()];
        while exists(ns, self.table, self.parent, &jump)? {
            exec(ns, &["-t", self.table, "-D", self.parent, "-j", &self.name])?;
        }
        if run(ns, &["-t", self.table, "-F", &self.name])?.is_ok() {
            exec(ns, &["-t", self.table, "-X", &self.name])?;
        }
        Ok(())
    }
}
