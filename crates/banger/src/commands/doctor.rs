//! `banger doctor`: the daemon's host checks, one row each; problems come with a fix line.
//! Exit 0 when no check fails (warnings allowed), 1 otherwise, with or without `--json`.

use banger_proto::{CheckStatus, DoctorReport};
use hyper::Method;

use crate::cli::JsonFlag;
use crate::client::{Client, ClientError};
use crate::commands::print_json;

pub async fn run(client: &Client, flag: JsonFlag) -> Result<u8, ClientError> {
    let report: DoctorReport = client.call(Method::GET, "/v1/doctor", None::<&()>).await?;
    if flag.json {
        print_json(&report)?;
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// One `STATUS  NAME  DETAIL` row per check, names padded to the widest; a `  fix: …` line
/// under every row that is not ok.
fn render(report: &DoctorReport) -> String {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for check in &report.checks {
        let status = match check.status {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        };
        out.push_str(&format!(
            "{status:<4}  {name:<width$}  {detail}\n",
            name = check.name,
            detail = crate::output::escape_line(&check.detail)
        ));
        if check.status != CheckStatus::Ok
            && let Some(fix) = &check.fix
        {
            out.push_str(&format!("      fix: {}\n", crate::output::escape_line(fix)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use banger_proto::{CheckStatus, DoctorCheck, DoctorReport};

    fn check(name: &str, status: CheckStatus, fix: Option<&str>) -> DoctorCheck {
        DoctorCheck {
            name: name.into(),
            status,
            detail: format!("{name} detail"),
            fix: fix.map(str::to_owned),
        }
    }

    #[test]
    fn rows_align_and_problems_carry_a_fix_line() {
        let report = DoctorReport::from_checks(vec![
            check("kvm", CheckStatus::Warn, Some("modprobe kvm")),
            check("qemu", CheckStatus::Ok, None),
            check("disk-space", CheckStatus::Fail, Some("free space")),
        ]);
        assert_eq!(
            super::render(&report),
            "WARN  kvm         kvm detail\n      fix: modprobe kvm\n\
             ok    qemu        qemu detail\n\
             FAIL  disk-space  disk-space detail\n      fix: free space\n"
        );
    }
}
