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
