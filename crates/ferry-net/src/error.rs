use std::path::PathBuf;

/// Errors setting up or tearing down VM networking. Each message names the
/// cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Namespaces, taps and NAT need root (CAP_NET_ADMIN).
    #[error("ferry needs root to {what}: run it as root (or with CAP_NET_ADMIN and CAP_SYS_ADMIN){hint}")]
    NotRoot {
        /// What was attempted.
        what: String,
        /// Extra advice, e.g. "; or pass --net none for a VM without a network".
        hint: String,
    },
    /// A host tool ferry calls is missing.
    #[error("'{tool}' is not installed: run scripts/setup.sh (or apt-get install -y {package})")]
    MissingTool {
        /// The program.
        tool: String,
        /// The Debian package that has it.
        package: String,
    },
    /// Another running VM uses this namespace.
    #[error("network namespace '{name}' is in use by {holder}: pick another --netns, or stop that VM first")]
    NamespaceInUse {
        /// The namespace.
        name: String,
        /// Who holds it ("VM 'x' (pid N)").
        holder: String,
    },
    /// A `ferry net up` with this prefix is already running.
    #[error("'ferry net up --prefix {prefix}' is already running{pid}: stop it first, or use another --prefix")]
    NetUpRunning {
        /// The prefix.
        prefix: String,
        /// " (pid N)" if known.
        pid: String,
    },
    /// The host interface given to `net up` does not exist.
    #[error("host interface '{0}' does not exist: pick one from 'ip link' for --host-interface")]
    NoSuchInterface(String),
    /// A host port is already taken.
    #[error("{addr} is already in use: pick another host port for --expose (or stop what listens there)")]
    PortInUse {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// A bad option value.
    #[error("{0}")]
    BadOption(String),
    /// No free host-side subnet for another namespace.
    #[error("no free host-side subnet left in {0}: remove unused VM namespaces ('ferry net down', 'ip netns')")]
    NoFreeSubnet(String),
    /// A netlink request failed.
    #[error("netlink: {what}: {detail}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        detail: String,
    },
    /// iptables refused a rule.
    #[error("iptables {args} failed: {detail}")]
    Iptables {
        /// The arguments.
        args: String,
        /// Its standard error.
        detail: String,
    },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record of what ferry created is unreadable.
    #[error("{path} is not a valid ferry network record ({detail}): remove what it lists by hand, then delete it")]
    BadRecord {
        /// The record.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

impl NetError {
    /// An [`NetError::Io`] with context.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
        let what = what.into();
        move |source| NetError::Io { what, source }
    }

    /// Whether the error is the user's input (bad flag, name in use, port
    /// in use) rather than the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            NetError::NamespaceInUse { .. }
                | NetError::NetUpRunning { .. }
                | NetError::NoSuchInterface(_)
                | NetError::PortInUse { .. }
                | NetError::BadOption(_)
        )
    }

    /// Whether the error is missing software or privileges on the host.
    pub fn is_missing_software(&self) -> bool {
        matches!(
            self,
            NetError::MissingTool { .. } | NetError::NotRoot { .. }
        )
    }
}
