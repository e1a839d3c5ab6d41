//! `ferry inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_runtime::ops::inspect;

use super::render::out;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The package file.
    file: PathBuf,
    /// Check every chunk against its sha256.
    #[arg(long)]
    verify: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let i = inspect(&args.file, args.verify)?;
    let (major, minor) = i.format;
    out(&format!("package:   {}", i.path.display()));
    out(&format!("format:    {major}.{minor}"));
    out(&format!(
        "file size: {} bytes ({} MiB)",
        i.file_size,
        i.file_size >> 20
    ));
    match &i.meta {
        Ok(meta) => {
            let p = &meta.provenance;
            out(&format!("recipe:    {}", meta.recipe));
            out(&format!(
                "made with: {} {} ({}, cpu {}), {} MiB, {} vCPU",
                p.engine, p.engine_version, p.accel, p.cpu_model, p.memory_mib, p.cpus
            ));
            out(&format!(
                "written:   by ferry {} at {} (unix), generation {}",
                meta.ferry_version, meta.written_unix, meta.generation
            ));
        }
        Err(e) => out(&format!("metadata:  unreadable ({e})")),
    }
    out(&format!(
        "{:<13} {:>12} {:>7} {:>7} {:>7} {:>12}  digest",
        "section", "size", "chunks", "stored", "zero", "stored bytes"
    ));
    for s in &i.sections {
        out(&format!(
            "{:<13} {:>12} {:>7} {:>7} {:>7} {:>12}  {}",
            s.kind,
            s.size,
            s.chunks,
            s.stored,
            s.chunks - s.stored,
            s.stored_bytes,
            &s.digest[..16.min(s.digest.len())]
        ));
    }
    if let Some(report) = &i.verified {
        out(&format!("verify:    ok ({report})"));
    }
    Ok(ExitCode::SUCCESS)
}
