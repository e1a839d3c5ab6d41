//! What networking looks like from the host, to check that a test left
//! nothing behind: network namespaces, interface names and the ruleset.

use crate::describe;

/// Namespaces, interface names and the ruleset (without packet counters).
#[derive(Debug, PartialEq, Eq)]
pub struct NetSnapshot {
    /// `ip netns list`, names only, sorted.
    pub netns: Vec<String>,
    /// Interface names, sorted.
    pub links: Vec<String>,
    /// The ruleset, normalised (see [`normalise_rules`]).
    pub rules: Vec<String>,
}

/// Runs `cmd` with `sh -c` and returns its standard output; panics if it fails.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host namespace's networking now.
pub fn snapshot() -> NetSnapshot {
    snapshot_with("ip -o link", "iptables-save")
}

/// Networking as `links_cmd` (`ip -o link` style) and `rules_cmd`
/// (`iptables-save` style) show it, with the namespaces of the host.
pub fn snapshot_with(links_cmd: &str, rules_cmd: &str) -> NetSnapshot {
    let mut netns: Vec<String> = sh("ip netns list")
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    netns.sort();
    let mut links: Vec<String> = sh(links_cmd)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .collect();
    links.sort();
    let rules = normalise_rules(&sh(rules_cmd));
    NetSnapshot {
        netns,
        links,
        rules,
    }
}

/// `iptables-save` output without comments and packet counters, and
/// without tables that hold no rule and only built-in chains that accept:
/// iptables (nf_tables) creates a table the first time a command names it,
/// and an empty table filters nothing.
pub fn normalise_rules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut table: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let line = match line.find(" [") {
            Some(i) if line.starts_with(':') => &line[..i],
            _ => line,
        };
        table.push(line.to_string());
        if line == "COMMIT" {
            let empty = table
                .iter()
                .all(|l| l.starts_with('*') || l == "COMMIT" || l.ends_with(" ACCEPT"));
            if !empty {
                out.append(&mut table);
            }
            table.clear();
        }
    }
    out.append(&mut table);
    out
}

/// What the host still has of the networks of ferry VMs `names` (private
/// namespaces `ferry-<name>`): those namespaces, and host links whose alias
/// names them (`alias ferry:ferry-<name>`). Unlike comparing whole
/// [`snapshot`]s, this ignores VMs that other users of a shared host start
/// and stop meanwhile. VM namespaces add no rule to the host's ruleset:
/// their rules go with them.
pub fn vm_leftovers(names: &[&str]) -> Vec<String> {
    let namespaces: Vec<String> = names.iter().map(|n| format!("ferry-{n}")).collect();
    let mut left: Vec<String> = sh("ip netns list")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| namespaces.iter().any(|n| n == ns))
        .map(|ns| format!("namespace {ns}"))
        .collect();
    for line in sh("ip -o link").lines() {
        let alias = line.rsplit("alias ").next().unwrap_or("").trim();
        if namespaces.iter().any(|n| alias == format!("ferry:{n}")) {
            let link = line.split(": ").nth(1).unwrap_or(line);
            left.push(format!("link {link} ({alias})"));
        }
    }
    left
}
