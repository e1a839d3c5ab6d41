//! `ferry net up` / `ferry net down`: VM namespaces made ahead of time
//! (`<prefix>0 … <prefix>N-1`), with NAT from their guests out of a host
//! interface. What `up` makes is written to a record as it goes, so `down`
//! (or a second `up`) can remove or adopt exactly that after a crash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::iptables::Chain;
use crate::plumbing::{self, FileLock, NamespaceRecord};
use crate::NetError;

/// `ferry net up` options.
#[derive(Debug, Clone)]
pub struct NetUpOptions {
    /// Guests reach the outside through this interface (NAT).
    pub host_interface: String,
    /// How many namespaces.
    pub namespaces: u32,
    /// Namespace name prefix.
    pub prefix: String,
    /// Where the record goes (`$FERRY_STATE/net`).
    pub record_dir: PathBuf,
}

/// What `up` made, as written to `<record_dir>/<prefix>.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostNetRecord {
    /// The prefix.
    pub prefix: String,
    /// The host interface NATed to.
    pub host_interface: String,
    /// Namespaces made.
    pub namespaces: Vec<NamespaceRecord>,
    /// Whether host chains were installed.
    pub chains: bool,
    /// `net.ipv4.ip_forward` before `up` changed it, if it did.
    pub ip_forward_was: Option<String>,
}

/// Namespaces and NAT made by `up`; [`HostNet::down`] removes them (after
/// a crash, [`down`] does, from the record).
#[derive(Debug)]
pub struct HostNet {
    record: HostNetRecord,
    path: PathBuf,
    _lock: FileLock,
}

/// Checks a `--prefix`: it names namespaces and iptables chains.
pub fn validate_prefix(prefix: &str) -> Result<(), NetError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 12
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(NetError::BadOption(format!(
            "invalid --prefix '{prefix}': use 1-12 characters from a-z, 0-9 and '-', starting with a letter"
        )))
    }
}

fn chains(prefix: &str) -> [Chain; 2] {
    [
        Chain {
            table: "nat",
            parent: "POSTROUTING",
            name: format!("ferry-{prefix}-nat"),
        },
        Chain {
            table: "filter",
            parent: "FORWARD",
            name: format!("ferry-{prefix}-fwd"),
        },
    ]
}

/// Whether namespace `name` has ferry's veth to this host (named after it,
/// with the alias ferry gives it), so ferry made it here.
fn made_by_ferry(name: &str) -> Result<bool, NetError> {
    let veth = plumbing::host_veth_name(name);
    let alias = format!("ferry:{name}");
    Ok(crate::nl::host_links()?
        .iter()
        .any(|(n, a)| *n == veth && a.as_deref() == Some(alias.as_str())))
}

fn record_path(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!("{prefix}.json"))
}

fn lock_path(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!("{prefix}.lock"))
}

fn load(path: &Path) -> Result<Option<HostNetRecord>, NetError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| NetError::BadRecord {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NetError::io(format!("reading {}", path.display()))(e)),
    }
}

fn save(path: &Path, rec: &HostNetRecord) -> Result<(), NetError> {
    let tmp = path.with_extension("json.new");
    let json = serde_json::to_vec_pretty(rec).expect("serialisable");
    std::fs::write(&tmp, json).map_err(NetError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(NetError::io(format!("renaming {}", tmp.display())))
}

fn take_lock(dir: &Path, prefix: &str) -> Result<FileLock, NetError> {
    let holder = format!("pid {}", std::process::id());
    plumbing::try_lock(&lock_path(dir, prefix), &holder)?.map_err(|held| NetError::NetUpRunning {
        prefix: prefix.to_string(),
        pid: if held.is_empty() {
            String::new()
        } else {
            format!(" ({held})")
        },
    })
}

impl HostNet {
    /// Makes (or adopts, after a crash) the namespaces and NAT. On failure,
    /// whatever this call made is removed again.
    pub fn up(opts: &NetUpOptions) -> Result<HostNet, NetError> {
        validate_prefix(&opts.prefix)?;
        if !crate::is_root() {
            return Err(NetError::NotRoot {
                what: "create network namespaces and NAT".into(),
                hint: String::new(),
            });
        }
        if opts.namespaces == 0 || opts.namespaces > 1024 {
            return Err(NetError::BadOption(format!(
                "--namespaces {}: use 1-1024",
                opts.namespaces
            )));
        }
        if !crate::nl::host_links()?
            .iter()
            .any(|(name, _)| *name == opts.host_interface)
        {
            return Err(NetError::NoSuchInterface(opts.host_interface.clone()));
        }
        std::fs::create_dir_all(&opts.record_dir).map_err(NetError::io(format!(
            "creating {}",
            opts.record_dir.display()
        )))?;
        let lock = take_lock(&opts.record_dir, &opts.prefix)?;
        let path = record_path(&opts.record_dir, &opts.prefix);
        let record = load(&path)?.unwrap_or_else(|| HostNetRecord {
            prefix: opts.prefix.clone(),
            host_interface: opts.host_interface.clone(),
            ..HostNetRecord::default()
        });
        let mut net = HostNet {
            record,
            path,
            _lock: lock,
        };
        if let Err(e) = net.build(opts) {
            if let Err(e2) = net.teardown() {
                tracing::warn!("undoing a failed 'net up': {e2}");
            }
            return Err(e);
        }
        Ok(net)
    }

    fn build(&mut self, opts: &NetUpOptions) -> Result<(), NetError> {
        // A crashed run NATed to another interface: its rules go, new ones
        // are made below.
        if self.record.chains && self.record.host_interface != opts.host_interface {
            for c in chains(&opts.prefix) {
                c.remove(None)?;
            }
            self.record.chains = false;
        }
        self.record.host_interface = opts.host_interface.clone();
        for i in 0..opts.namespaces {
            let name = format!("{}{i}", opts.prefix);
            let ours = self.record.namespaces.iter().any(|r| r.name == name);
            if crate::ns::exists(&name) {
                if ours {
                    continue;
                }
                if made_by_ferry(&name)? {
                    // A crashed run whose record is gone (e.g. another
                    // $FERRY_STATE): ferry's veth still names it. Start clean.
                    plumbing::unprovision(&name)?;
                    let (_ns, rec) = plumbing::provision(&name)?;
                    self.record.namespaces.push(rec);
                    save(&self.path, &self.record)?;
                    continue;
                }
                return Err(NetError::BadOption(format!(
                    "network namespace '{name}' exists but was not made by 'ferry net up --prefix {}': remove it ('ip netns delete {name}') or use another --prefix",
                    opts.prefix
                )));
            }
            if ours {
                // Recorded but gone (removed by hand): forget the old entry.
                self.record.namespaces.retain(|r| r.name != name);
                let _ = crate::nl::delete_link(None, &plumbing::host_veth_name(&name));
            }
            let (_ns, rec) = plumbing::provision(&name)?;
            self.record.namespaces.push(rec);
            save(&self.path, &self.record)?;
        }

        if self.record.ip_forward_was.is_none() {
            let was = plumbing::ip_forward()?;
            if was != "1" {
                self.record.ip_forward_was = Some(was);
                save(&self.path, &self.record)?;
                plumbing::set_ip_forward(None, "1")?;
            }
        }
        self.record.chains = true;
        save(&self.path, &self.record)?;
        let [nat, fwd] = chains(&opts.prefix);
        nat.install(None)?;
        fwd.install(None)?;
        let ifname = opts.host_interface.as_str();
        for rec in &self.record.namespaces {
            let subnet = rec.subnet();
            nat.append(None, &["-s", &subnet, "-o", ifname, "-j", "MASQUERADE"])?;
            fwd.append(None, &["-i", &rec.host_veth, "-o", ifname, "-j", "ACCEPT"])?;
            fwd.append(
                None,
                &[
                    "-i",
                    ifname,
                    "-o",
                    &rec.host_veth,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED",
                    "-j",
                    "ACCEPT",
                ],
            )?;
        }
        Ok(())
    }

    /// What was made.
    pub fn record(&self) -> &HostNetRecord {
        &self.record
    }

    /// Removes everything in the record, then the record.
    pub fn down(mut self) -> Result<(), NetError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), NetError> {
        let mut first_error = None;
        let mut note = |r: Result<(), NetError>| {
            if let Err(e) = r {
                tracing::warn!("{e}");
                first_error.get_or_insert(e);
            }
        };
        if self.record.chains {
            for c in chains(&self.record.prefix) {
                note(c.remove(None));
            }
        }
        for rec in std::mem::take(&mut self.record.namespaces) {
            note(plumbing::unprovision(&rec.name));
        }
        note(self.release_forwarding());
        self.record.chains = false;
        match first_error {
            Some(e) => {
                let _ = save(&self.path, &self.record);
                Err(e)
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
                Ok(())
            }
        }
    }
}

impl HostNet {
    /// Puts `net.ipv4.ip_forward` back to what it was before a `net up`
    /// set it, but only when no other prefix's `net up` (running, or
    /// crashed with its record) still needs forwarding: until then the old
    /// value is handed on in `<record dir>/ip-forward-was`, and the last one
    /// to go restores it.
    fn release_forwarding(&mut self) -> Result<(), NetError> {
        let Some(dir) = self.path.parent().map(Path::to_path_buf) else {
            return Ok(());
        };
        let handed = dir.join(FORWARD_WAS);
        let was = match self.record.ip_forward_was.take() {
            Some(was) => Some(was),
            None => std::fs::read_to_string(&handed)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        };
        let Some(was) = was else {
            return Ok(());
        };
        if let Some(other) = other_prefix_up(&dir, &self.record.prefix) {
            tracing::info!(
                "leaving net.ipv4.ip_forward on: 'ferry net up --prefix {other}' still needs it"
            );
            return std::fs::write(&handed, &was)
                .map_err(NetError::io(format!("writing {}", handed.display())));
        }
        plumbing::set_ip_forward(None, &was)?;
        let _ = std::fs::remove_file(&handed);
        Ok(())
    }
}

/// Where the `ip_forward` value from before the first `net up` waits for
/// the last one to go down.
const FORWARD_WAS: &str = "ip-forward-was";

/// Another prefix whose record in `dir` lists something made (so its
/// namespaces still need forwarding).
fn other_prefix_up(dir: &Path, prefix: &str) -> Option<String> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let path = e.path();
        let stem = path.file_stem()?.to_str()?.to_string();
        if path.extension()? != "json" || stem == prefix {
            return None;
        }
        let rec = load(&path).ok()??;
        (rec.chains || !rec.namespaces.is_empty()).then_some(stem)
    })
}

/// `ferry net down`: removes what a crashed `net up --prefix` made (a
/// running one holds the lock and must be stopped instead). Returns the
/// record removed, if any.
pub fn down(record_dir: &Path, prefix: &str) -> Result<Option<HostNetRecord>, NetError> {
    validate_prefix(prefix)?;
    if !crate::is_root() {
        return Err(NetError::NotRoot {
            what: "remove network namespaces and NAT".into(),
            hint: String::new(),
        });
    }
    let path = record_path(record_dir, prefix);
    if !path.exists() {
        return Ok(None);
    }
    let lock = take_lock(record_dir, prefix)?;
    let Some(record) = load(&path)? else {
        return Ok(None);
    };
    let shown = record.clone();
    HostNet {
        record,
        path,
        _lock: lock,
    }
    .down()?;
    Ok(Some(shown))
}
