//! `ferry blueprint build|show`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use ferry_blueprint::progress::LineProgress;
use ferry_blueprint::{build, Blueprint, BuildOptions, HostBinaries, Recipe};
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a blueprint (kernel, initramfs, disk.ext4, blueprint.toml) from a recipe.
    Build {
        /// A built-in recipe (tiny, redis, web, node) or the path of a recipe .toml file.
        #[arg(long)]
        recipe: String,
        /// The blueprint directory to create.
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT if it exists (the old one stays until the new one is complete).
        #[arg(long)]
        force: bool,
        /// The static ferry-agent binary (default: beside ferry, or $FERRY_AGENT).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// A static binary the recipe's [binaries] names, as NAME=PATH
        /// (default: $FERRY_BIN_<NAME>, else beside ferry or where
        /// scripts/build.sh leaves it). Repeatable.
        #[arg(long = "binary", value_name = "NAME=PATH", value_parser = HostBinaries::parse_flag)]
        binaries: Vec<(String, PathBuf)>,
        /// Print nothing but errors.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print a blueprint's manifest after checking its files.
    Show {
        /// The blueprint directory.
        dir: PathBuf,
    },
}

pub fn run(args: Args, paths: &Paths) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Build {
            recipe,
            out,
            force,
            agent,
            binaries: given,
            quiet,
        } => {
            let recipe = Recipe::find(&recipe)?;
            let agent = super::find_agent(agent)?;
            let mut binaries = HostBinaries::for_current_exe();
            for (name, path) in given {
                binaries.set(&name, path);
            }
            let mut progress = LineProgress::new(quiet, |l: &str| eprintln!("{l}"));
            let started = std::time::Instant::now();
            let bp = build(BuildOptions {
                recipe,
                out,
                cache_dir: paths.cache.clone(),
                agent,
                binaries,
                force,
                progress: &mut progress,
            })?;
            drop(progress);
            if !quiet {
                eprintln!(
                    "blueprint '{}' ready in {} ({:.1} s): kernel {}, disk {} MiB",
                    bp.manifest.recipe,
                    bp.dir.display(),
                    started.elapsed().as_secs_f64(),
                    bp.manifest.kernel_release,
                    bp.manifest.disk.size >> 20
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { dir } => {
            let bp = Blueprint::load(&dir)?;
            bp.verify(None)?;
            print!("{}", std::fs::read_to_string(dir.join("blueprint.toml"))?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
