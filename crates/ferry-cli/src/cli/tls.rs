//! `ferry tls init`.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_runtime::RuntimeError;

use super::render::out;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Make a small CA and a server and a client certificate for a test
    /// cluster: DIR/ca.crt, DIR/server.crt, DIR/server.key (valid for
    /// localhost, 127.0.0.1 and each --san), DIR/client.crt,
    /// DIR/client.key. Keys are 0600; existing files are never replaced.
    Init {
        /// Where to write them (created 0700).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Another name (DNS name or IP address) the server certificate is
        /// valid for (repeatable).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Init { dir, sans } => {
            let files = ferry_transport::tls_init(&dir, &sans)
                .map_err(|e| RuntimeError::BadOption(e.to_string()))?;
            out(&format!(
                "wrote {} (the CA: --ca for clients, --client-ca for servers)",
                files.ca_cert.display()
            ));
            out(&format!(
                "wrote {} and {} (--tls-cert, --tls-key; valid for {})",
                files.server_cert.display(),
                files.server_key.display(),
                files.names.join(", ")
            ));
            out(&format!(
                "wrote {} and {} (--client-cert, --client-key)",
                files.client_cert.display(),
                files.client_key.display()
            ));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A server's TLS flags (`ferry registry`, `ferry manager`).
#[derive(clap::Args, Debug, Default)]
pub struct ServerTlsArgs {
    /// Speak only TLS, with this certificate (PEM; e.g. from `ferry tls
    /// init`).
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's key (PEM).
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long = "client-ca", value_name = "FILE", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The listener's TLS configuration, the files read and checked now;
    /// none without `--tls-cert`.
    pub fn config(&self) -> Result<Option<ferry_transport::ServerTls>, RuntimeError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                ferry_transport::ServerTls::from_files(cert, key, self.client_ca.as_deref())
                    .map(Some)
                    .map_err(|e| RuntimeError::BadOption(e.to_string()))
            }
            _ => Ok(None),
        }
    }
}

/// A client's TLS flags for an `https://` server (`ferry worker`, `ferry
/// cluster`, `ferry operator`).
#[derive(clap::Args, Debug, Default)]
pub struct ClientTlsArgs {
    /// Trust this CA (PEM) instead of the public roots (e.g. ca.crt from
    /// `ferry tls init`); a manager given as a bare HOST:PORT is then
    /// https:// (a boot service's URL needs https:// written out).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Present this client certificate (PEM) to a server that asks for one
    /// (`--client-ca`).
    #[arg(long = "client-cert", value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long = "client-key", value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The settings, if any flag was given (paths made absolute: they may
    /// travel to a process with another working directory).
    pub fn settings(&self) -> Option<ferry_transport::ClientTls> {
        let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        (self.ca.is_some() || self.client_cert.is_some()).then(|| ferry_transport::ClientTls {
            ca: self.ca.as_ref().map(absolute),
            client_cert: self.client_cert.as_ref().map(absolute),
            client_key: self.client_key.as_ref().map(absolute),
        })
    }
}
