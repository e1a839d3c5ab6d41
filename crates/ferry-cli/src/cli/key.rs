//! `ferry key gen`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::render::out;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Make an ed25519 key pair for signing packages: PREFIX.key (the
    /// secret, mode 0600: `ferry package --sign PREFIX.key`) and PREFIX.pub
    /// (`ferry run|peer|up --trust PREFIX.pub`). Existing files are never
    /// replaced.
    Gen {
        /// Where to write them: PREFIX.key and PREFIX.pub.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
}

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Gen { out: prefix } => {
            let files = ferry_package::generate_key_pair(&prefix)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "v": 1,
                        "type": "key",
                        "secret": files.secret,
                        "public": files.public,
                        "key_id": files.key_id,
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            out(&format!(
                "wrote {} (secret, 0600: ferry package --sign) and {} (ferry run/peer/up --trust); key id {}",
                files.secret.display(),
                files.public.display(),
                files.key_id
            ));
            Ok(ExitCode::SUCCESS)
        }
    }
}
