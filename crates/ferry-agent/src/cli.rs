//! Command-line parsing. Hand-written rather than clap: the agent is a
//! static binary copied into every guest, and four flags do not justify the
//! size.

use std::ffi::OsString;
use std::path::PathBuf;

/// The usage text for `--help` and argument errors.
pub const USAGE: &str =
    "usage: ferry-agent [--config PATH] [--port PATH] [--fleet-file PATH] [--debug]\n\
  --config PATH      guest configuration (default: /ferry/agent.json)\n\
  --port PATH        device, FIFO or Unix socket to talk on (default: the\n\
                     virtio-serial port named ferry.agent, found in sysfs)\n\
  --fleet-file PATH  where set-fleet writes the fleet (default:\n\
                     /run/ferry/fleet.json)\n\
  --debug            log every request (also FERRY_AGENT_DEBUG=1)\n\
  --shell-server     serve `ferry shell` sessions on the port named\n\
                     ferry.shell instead (started by /ferry/init)";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the agent.
    Run(Options),
    /// Print the usage text.
    Help,
    /// Print the version.
    Version,
}

/// Settings for a run of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Path of the [`ferry_agent_proto::GuestConfig`] file.
    pub config: PathBuf,
    /// Explicit port path; `None` means discover the virtio-serial port.
    pub port: Option<PathBuf>,
    /// Where `set-fleet` writes the fleet file; tests point it elsewhere
    /// than the host's own `/run`.
    pub fleet_file: PathBuf,
    /// Log every request.
    pub debug: bool,
    /// Be the shell server (`--shell-server`), not the agent.
    pub shell_server: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config: PathBuf::from(ferry_agent_proto::GUEST_CONFIG_PATH),
            port: None,
            fleet_file: PathBuf::from(ferry_agent_proto::FLEET_FILE_PATH),
            debug: false,
            shell_server: false,
        }
    }
}

/// Parses the arguments after the program name.
///
/// # Errors
/// A one-line message naming the offending argument.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(OsString::from(value)))
            }
            _ => (text.into_owned(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .map(PathBuf::from)
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--config" => options.config = value()?,
            "--port" => options.port = Some(value()?),
            "--fleet-file" => options.fleet_file = value()?,
            "--debug" => options.debug = true,
            "--shell-server" => options.shell_server = true,
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(Command::Run(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_without_arguments() {
        assert_eq!(parse_strs(&[]), Ok(Command::Run(Options::default())));
    }

    #[test]
    fn takes_separate_and_inline_values() {
        let Ok(Command::Run(o)) = parse_strs(&[
            "--config",
            "/c.json",
            "--port=/p",
            "--fleet-file",
            "/f.json",
            "--debug",
        ]) else {
            panic!("did not parse");
        };
        assert_eq!(o.config, PathBuf::from("/c.json"));
        assert_eq!(o.port, Some(PathBuf::from("/p")));
        assert_eq!(o.fleet_file, PathBuf::from("/f.json"));
        assert!(o.debug);
    }

    #[test]
    fn rejects_unknown_and_incomplete_arguments() {
        assert!(parse_strs(&["--bogus"]).is_err());
        assert!(parse_strs(&["--port"]).is_err());
    }
}
