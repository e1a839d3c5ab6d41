//! `ferry run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_runtime::fleet::{run_detached, RunDetachedOptions};
use ferry_runtime::ops::{run as run_package, RunOptions};
use ferry_runtime::record::NetSpec;
use ferry_runtime::vm::NetChoice;
use ferry_runtime::vmdir::generate_name;
use ferry_runtime::{Event, EventSink, Paths, RuntimeError};

use super::render::out;
use super::{AccelArg, Ctx};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The package file (from 'ferry package').
    #[arg(long)]
    package: PathBuf,
    /// The VM's name (default: the recipe's name and a random suffix).
    #[arg(long)]
    name: Option<String>,
    /// Run a copy-on-write clone with its own identity; the package is not changed.
    #[arg(long)]
    clone: bool,
    /// Accelerator; must match the one the package was made with.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Copy the guest's console to standard error.
    #[arg(long)]
    console: bool,
    /// Forward this terminal to the guest's serial console (a shell runs
    /// there); shows the console too. Ctrl-C still suspends the VM.
    #[arg(long = "enable-input", conflicts_with = "detach")]
    enable_input: bool,
    /// Run in the background, owned by a supervisor process of its own;
    /// returns once the VM is live. 'ferry stop NAME' suspends it (a clone
    /// into a package of its own), 'ferry logs NAME' shows its console.
    #[arg(short, long)]
    detach: bool,
    #[command(flatten)]
    trust: super::TrustArgs,
    #[command(flatten)]
    net: super::NetArgs,
}

pub fn run(args: Args, paths: &Paths, started: Instant, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let net = args.net.choice()?;
    let trust = args.trust.keys()?;
    if args.detach {
        return detached(args, net, trust, paths, ctx);
    }
    let engine = super::engine(paths)?;
    let opts = RunOptions {
        package: args.package,
        name: args.name,
        clone: args.clone,
        accel: args.accel.into(),
        console: super::console(args.console || args.enable_input),
        input: args
            .enable_input
            .then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
        started,
        net,
        trust,
    };
    run_package(&engine, paths, opts, &ctx.render, &ctx.cancel()?)?;
    Ok(ExitCode::SUCCESS)
}

fn detached(
    args: Args,
    net: NetChoice,
    trust: ferry_package::TrustedKeys,
    paths: &Paths,
    ctx: &Ctx,
) -> anyhow::Result<ExitCode> {
    if args.console {
        anyhow::bail!(RuntimeError::BadOption(
            "--console shows the console of a VM in the foreground: with --detach, use 'ferry logs NAME -f'".into()
        ));
    }
    let name = match args.name {
        Some(n) => n,
        None => {
            let pkg = ferry_package::Package::open(&args.package)?;
            trust.check(pkg.index())?;
            generate_name(&ferry_runtime::package_meta::read(&pkg)?.recipe)
        }
    };
    let opts = RunDetachedOptions {
        package: args.package,
        name: name.clone(),
        clone: args.clone,
        accel: args.accel.into(),
        net: NetSpec::from_choice(&net),
        live_timeout: Duration::from_secs(60),
        ferry: std::env::current_exe()?,
        trust,
    };
    if ctx.render.json() {
        run_detached(paths, &opts, &ctx.render, &ctx.cancel()?)?;
        return Ok(ExitCode::SUCCESS);
    }
    // A person sees one line for the start, as for every detached VM.
    let only_started = |e: Event| {
        if matches!(e, Event::Started(_)) {
            ctx.render.emit(e);
        }
    };
    run_detached(paths, &opts, &only_started, &ctx.cancel()?)?;
    out(&format!(
        "VM '{name}' runs detached; 'ferry stop {name}' suspends it{}, 'ferry logs {name}' shows its console",
        if args.clone {
            " into a package of its own"
        } else {
            " back into the package"
        }
    ));
    Ok(ExitCode::SUCCESS)
}
