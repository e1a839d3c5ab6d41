//! ferry's own iptables chains. ferry only ever adds one jump rule into a
//! built-in chain and keeps its rules in chains it created, so removing them
//! never touches anyone else's rules or their order. There is no practical
//! netlink crate for the iptables (nf_tables) rule format, so this shells
//! out to `iptables`, entering the namespace in the child. A namespace
//! ferry has just made gets all its rules from one `iptables-restore`
//! ([`Batch`]): one process instead of one per rule and check, which took
//! about 300 ms of every VM start.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::ns::Netns;
use crate::NetError;

/// `program -w ARGS`, run inside `ns` when given.
fn command(ns: Option<&Netns>, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
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

fn spawn_error(e: std::io::Error) -> NetError {
    if e.kind() == std::io::ErrorKind::NotFound {
        NetError::MissingTool {
            tool: "iptables".into(),
            package: "iptables".into(),
        }
    } else {
        NetError::io("running iptables")(e)
    }
}

fn run(ns: Option<&Netns>, args: &[&str]) -> Result<Result<(), String>, NetError> {
    let out = command(ns, "iptables", args)
        .output()
        .map_err(spawn_error)?;
    if out.status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

fn refused(args: String, detail: String) -> NetError {
    if detail.contains("Permission denied") {
        NetError::NotRoot {
            what: "change firewall rules".into(),
            hint: String::new(),
        }
    } else {
        NetError::Iptables { args, detail }
    }
}

/// Runs `iptables ARGS` in `ns`; an error carries iptables' message.
pub fn exec(ns: Option<&Netns>, args: &[&str]) -> Result<(), NetError> {
    run(ns, args)?.map_err(|detail| refused(args.join(" "), detail))
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

/// ferry's chains and rules for one namespace, added together.
#[derive(Debug, Default)]
pub struct Batch {
    chains: Vec<Chain>,
    rules: Vec<(Chain, Vec<String>)>,
}

impl Batch {
    /// Adds `chain` (and the jump to it).
    pub fn install(&mut self, chain: &Chain) {
        self.chains.push(chain.clone());
    }

    /// Appends `rule` to `chain`.
    pub fn append(&mut self, chain: &Chain, rule: &[&str]) {
        self.rules
            .push((chain.clone(), rule.iter().map(|a| a.to_string()).collect()));
    }

    /// Adds everything. In a namespace ferry has just created (`fresh`),
    /// where none of it exists, with one `iptables-restore --noflush`;
    /// elsewhere rule by rule, each checked first, so that running again
    /// adopts what a crashed run left ([`Chain::install`]).
    pub fn apply(self, ns: Option<&Netns>, fresh: bool) -> Result<(), NetError> {
        match self.restore_input() {
            Some(input) if fresh => self.restore(ns, &input),
            _ => {
                for chain in &self.chains {
                    chain.install(ns)?;
                }
                for (chain, rule) in &self.rules {
                    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
                    chain.append(ns, &rule)?;
                }
                Ok(())
            }
        }
    }

    /// The `iptables-restore` input, or `None` if an argument would need
    /// quoting (none of ferry's do).
    fn restore_input(&self) -> Option<String> {
        let mut tables: Vec<&'static str> = Vec::new();
        for t in self
            .chains
            .iter()
            .map(|c| c.table)
            .chain(self.rules.iter().map(|(c, _)| c.table))
        {
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
        let mut out = String::new();
        for table in tables {
            out.push_str(&format!("*{table}\n"));
            for c in self.chains.iter().filter(|c| c.table == table) {
                out.push_str(&format!(":{} - [0:0]\n", c.name));
            }
            for c in self.chains.iter().filter(|c| c.table == table) {
                out.push_str(&format!("-A {} -j {}\n", c.parent, c.name));
            }
            for (c, rule) in self.rules.iter().filter(|(c, _)| c.table == table) {
                if rule
                    .iter()
                    .any(|a| a.is_empty() || a.contains(|ch: char| ch.is_whitespace() || ch == '"'))
                {
                    return None;
                }
                out.push_str(&format!("-A {} {}\n", c.name, rule.join(" ")));
            }
            out.push_str("COMMIT\n");
        }
        Some(out)
    }

    fn restore(&self, ns: Option<&Netns>, input: &str) -> Result<(), NetError> {
        let mut child = command(ns, "iptables-restore", &["--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let written = child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes());
        let out = child
            .wait_with_output()
            .map_err(NetError::io("running iptables-restore"))?;
        if !out.status.success() {
            // Its own message first: a write that failed because it had
            // already given up says less.
            let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(refused(
                format!(
                    "iptables-restore --noflush <<< {}",
                    input.replace('\n', "; ")
                ),
                detail,
            ));
        }
        written.map_err(NetError::io("writing to iptables-restore"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_one_restore_input_with_chains_jumps_and_rules() {
        let nat = Chain {
            table: "nat",
            parent: "POSTROUTING",
            name: "FERRY-NAT".into(),
        };
        let input = Chain {
            table: "filter",
            parent: "INPUT",
            name: "FERRY-GUEST-IN".into(),
        };
        let mut b = Batch::default();
        b.install(&nat);
        b.append(&nat, &["-o", "veth0", "-j", "MASQUERADE"]);
        b.install(&input);
        b.append(
            &input,
            &[
                "-i",
                "tap0",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "RETURN",
            ],
        );
        assert_eq!(
            b.restore_input().unwrap(),
            "*nat\n:FERRY-NAT - [0:0]\n-A POSTROUTING -j FERRY-NAT\n-A FERRY-NAT -o veth0 -j MASQUERADE\nCOMMIT\n\
             *filter\n:FERRY-GUEST-IN - [0:0]\n-A INPUT -j FERRY-GUEST-IN\n\
             -A FERRY-GUEST-IN -i tap0 -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\nCOMMIT\n"
        );
        b.append(&input, &["-m", "comment", "--comment", "two words"]);
        assert_eq!(b.restore_input(), None, "an argument that needs quoting");
    }
}
