//! Command-line parsing. Hand-written, as in the agent: the binary is copied
//! into guests, and six flags do not justify clap's size.
//!
//! Every flag also has an environment variable (the recipe's
//! `[service.env]` can set it); a flag wins over its variable.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The usage text for `--help` and argument errors.
pub const USAGE: &str =
    "usage: ferry-web [--listen ADDR] [--fleet-file PATH] [--storage-dir DIR]\n\
                 [--name NAME] [--timeout-ms MS] [--debug]\n\
  --listen ADDR      IP:PORT to serve on (default 0.0.0.0:8000; $FERRY_WEB_LISTEN);\n\
                     port 0 picks a free one, printed as 'listening on ADDR'\n\
  --fleet-file PATH  the fleet, re-read on every request (default\n\
                     /run/ferry/fleet.json; $FERRY_WEB_FLEET_FILE)\n\
  --storage-dir DIR  one file per key (default /var/lib/ferry-web;\n\
                     $FERRY_WEB_STORAGE_DIR)\n\
  --name NAME        this instance's name while the fleet file does not give\n\
                     one (default: the hostname; $FERRY_WEB_NAME)\n\
  --timeout-ms MS    limit on each call to another member (default 2000;\n\
                     $FERRY_WEB_TIMEOUT_MS)\n\
  --debug            log every request";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Serve.
    Run(Options),
    /// Print the usage text.
    Help,
    /// Print the version.
    Version,
}

/// Settings of a running service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The fleet file (see `ferry_agent_proto::FleetFile`).
    pub fleet_file: PathBuf,
    /// The directory that holds the values, one file per key.
    pub storage_dir: PathBuf,
    /// Name to use while the fleet file gives none.
    pub name: Option<String>,
    /// Limit on each outgoing call.
    pub timeout: Duration,
    /// Log every request.
    pub debug: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            fleet_file: PathBuf::from(ferry_agent_proto::FLEET_FILE_PATH),
            storage_dir: PathBuf::from("/var/lib/ferry-web"),
            name: None,
            timeout: Duration::from_millis(2000),
            debug: false,
        }
    }
}

/// Parses the arguments after the program name; `env` looks up the
/// environment variables (a parameter so that tests need not set them).
///
/// # Errors
/// A one-line message naming the offending argument or variable.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, String> {
    let mut options = Options::default();
    for (var, flag) in [
        ("FERRY_WEB_LISTEN", "--listen"),
        ("FERRY_WEB_FLEET_FILE", "--fleet-file"),
        ("FERRY_WEB_STORAGE_DIR", "--storage-dir"),
        ("FERRY_WEB_NAME", "--name"),
        ("FERRY_WEB_TIMEOUT_MS", "--timeout-ms"),
    ] {
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            set(&mut options, flag, value).map_err(|e| format!("${var}: {e}"))?;
        }
    }
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (text, None),
        };
        match flag.as_str() {
            "--debug" => options.debug = true,
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" | "--fleet-file" | "--storage-dir" | "--name" | "--timeout-ms" => {
                let value = inline
                    .or_else(|| args.next().map(|a| a.to_string_lossy().into_owned()))
                    .ok_or_else(|| format!("{flag} needs a value"))?;
                set(&mut options, &flag, value)?;
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(Command::Run(options))
}

fn set(options: &mut Options, flag: &str, value: String) -> Result<(), String> {
    match flag {
        // Numeric only: a name would need a resolver, which a static binary
        // in a guest without NSS configuration does not have.
        "--listen" => {
            options.listen = value
                .parse()
                .map_err(|_| format!("--listen: '{value}' is not a numeric IP:PORT"))?;
        }
        "--fleet-file" => options.fleet_file = PathBuf::from(value),
        "--storage-dir" => options.storage_dir = PathBuf::from(value),
        "--name" => options.name = Some(value),
        "--timeout-ms" => {
            let ms: u64 = value
                .parse()
                .ok()
                .filter(|ms| (1..=600_000).contains(ms))
                .ok_or_else(|| {
                    format!("--timeout-ms: '{value}' is not a number of ms from 1 to 600000")
                })?;
            options.timeout = Duration::from_millis(ms);
        }
        _ => unreachable!("only called for flags with values"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str], env: &[(&str, &str)]) -> Result<Command, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(args.iter().map(OsString::from), |var| {
            env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_without_arguments() {
        assert_eq!(parse_strs(&[], &[]), Ok(Command::Run(Options::default())));
    }

    #[test]
    fn flags_win_over_the_environment() {
        let Ok(Command::Run(o)) = parse_strs(
            &[
                "--listen=127.0.0.1:0",
                "--storage-dir",
                "/s",
                "--timeout-ms",
                "150",
            ],
            &[
                ("FERRY_WEB_LISTEN", "0.0.0.0:9000"),
                ("FERRY_WEB_FLEET_FILE", "/f.json"),
                ("FERRY_WEB_NAME", "w1"),
            ],
        ) else {
            panic!("did not parse");
        };
        assert_eq!(o.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(o.fleet_file, PathBuf::from("/f.json"));
        assert_eq!(o.storage_dir, PathBuf::from("/s"));
        assert_eq!(o.name.as_deref(), Some("w1"));
        assert_eq!(o.timeout, Duration::from_millis(150));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse_strs(&["--listen", "localhost:80"], &[]).is_err());
        assert!(parse_strs(&["--timeout-ms", "0"], &[]).is_err());
        assert!(parse_strs(&["--name"], &[]).is_err());
        assert!(parse_strs(&["--bogus"], &[]).is_err());
        let e = parse_strs(&[], &[("FERRY_WEB_TIMEOUT_MS", "soon")]).unwrap_err();
        assert!(e.starts_with("$FERRY_WEB_TIMEOUT_MS:"), "{e}");
    }
}
