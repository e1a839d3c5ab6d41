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

pub fn run(args: Args, json: bool) -> anyhow::Result<ExitCode> {
    let i = inspect(&args.file, args.verify)?;
    if json {
        out(&to_json(&i).to_string());
        return Ok(ExitCode::SUCCESS);
    }
    let (major, minor) = i.format;
    out(&format!("package:   {}", i.path.display()));
    out(&format!("format:    {major}.{minor}"));
    out(&format!(
        "file size: {} bytes ({} MiB)",
        i.file_size,
        i.file_size >> 20
    ));
    out(&format!("table:     sha256 {}", i.table_sha256));
    out(&match &i.signature {
        None => "signature: none".to_string(),
        Some(s) if s.matches_table => format!("signature: ed25519, key id {}", s.key_id),
        Some(s) => format!(
            "signature: ed25519, key id {}, INVALID: it does not match this package (changed or re-packed after signing)",
            s.key_id
        ),
    });
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

/// One JSON object: what `ferry inspect --json` prints.
fn to_json(i: &ferry_runtime::ops::Inspection) -> serde_json::Value {
    use serde_json::json;
    let meta = match &i.meta {
        Ok(m) => json!({
            "recipe": m.recipe,
            "ferry_version": m.ferry_version,
            "written_unix": m.written_unix,
            "generation": m.generation,
            "engine": m.provenance.engine,
            "engine_version": m.provenance.engine_version,
            "accel": m.provenance.accel.to_string(),
            "memory_mib": m.provenance.memory_mib,
            "cpus": m.provenance.cpus,
        }),
        Err(e) => json!({ "error": e }),
    };
    json!({
        "v": 1,
        "type": "package",
        "path": i.path,
        "format": format!("{}.{}", i.format.0, i.format.1),
        "file_size": i.file_size,
        "table_sha256": i.table_sha256,
        "signature": i.signature.as_ref().map(|s| json!({
            "algorithm": "ed25519",
            "key_id": s.key_id,
            "valid": s.matches_table,
        })),
        "meta": meta,
        "sections": i.sections.iter().map(|s| json!({
            "kind": s.kind,
            "size": s.size,
            "chunks": s.chunks,
            "stored": s.stored,
            "stored_bytes": s.stored_bytes,
            "digest": s.digest,
        })).collect::<Vec<_>>(),
        "verified": i.verified,
    })
}
