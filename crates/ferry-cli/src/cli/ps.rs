//! `ferry ps`.

use std::process::ExitCode;

use ferry_runtime::fleet::{list, PsJson, VmInfo};
use ferry_runtime::record::RecordState;
use ferry_runtime::Paths;

/// With the global `--json`: a JSON array, one object per VM with the
/// keys name, state, pid, accel, uptime_s, memory_mib, unique_memory_mib
/// and exposes ([{host, guest}]); null where a value does not apply.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args, paths: &Paths, json: bool) -> anyhow::Result<ExitCode> {
    let vms = list(paths);
    if json {
        let rows: Vec<PsJson> = vms.iter().map(PsJson::from).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&vms));
    Ok(ExitCode::SUCCESS)
}

/// The table: one row per VM, and under a crashed one why, with the
/// guest's last console lines.
fn table(vms: &[VmInfo]) -> String {
    let mut rows = vec![[
        "NAME", "STATE", "PID", "ACCEL", "UPTIME", "MEMORY", "UNIQUE", "EXPOSES",
    ]
    .map(String::from)];
    for v in vms {
        let dash = || "-".to_string();
        rows.push([
            v.name.clone(),
            v.state.to_string(),
            v.pid.map(|p| p.to_string()).unwrap_or_else(dash),
            v.accel.map(|a| a.to_string()).unwrap_or_else(dash),
            v.uptime_s.map(uptime).unwrap_or_else(dash),
            v.memory_mib.map(|m| format!("{m}M")).unwrap_or_else(dash),
            v.unique_memory_mib
                .map(|m| format!("{m}M"))
                .unwrap_or_else(dash),
            if v.exposes.is_empty() {
                dash()
            } else {
                v.exposes
                    .iter()
                    .map(|e| format!("{}->{}", e.host_addr(), e.guest_port))
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        let Some(v) = i.checked_sub(1).map(|j| &vms[j]) else {
            continue;
        };
        if v.state == RecordState::Crashed || v.state == RecordState::Stopped {
            if let Some(note) = &v.note {
                out.push_str(&format!("    {note}\n"));
            }
            if v.state == RecordState::Crashed {
                if v.console_tail.is_empty() {
                    out.push_str("    (the guest printed nothing)\n");
                }
                for l in &v.console_tail {
                    out.push_str(&format!("    | {l}\n"));
                }
            }
        }
    }
    out
}

fn uptime(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_are_short() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(133), "2m13s");
        assert_eq!(uptime(7322), "2h02m");
        assert_eq!(uptime(90000), "1d01h");
    }
}
