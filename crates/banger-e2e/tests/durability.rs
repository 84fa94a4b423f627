//! Durability again, on one real QEMU VM reused across rounds: 1,000 small writes in the
//! guest, `vm stop` at once, `vm start`, every file intact (R1); then the same with
//! `vm stop --force`, which skips the power-off but syncs first. Each round writes contents
//! of its own, so a file left from an earlier round does not pass.
//!
//! Rounds per kind: `BANGER_DURABILITY_ROUNDS` (default 3 for `scripts/test` on a developer's
//! machine, a round being a TCG boot; `.ci/run` sets 20).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use banger_e2e::TestEnv;

/// Rounds per kind of stop.
fn rounds() -> u32 {
    std::env::var("BANGER_DURABILITY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3)
}

/// Writes 1,000 small files under /root/durable whose contents name `round`.
fn write_files(round: &str) -> String {
    format!(
        "rm -rf /root/durable && mkdir -p /root/durable && cd /root/durable && \
         i=0; while [ $i -lt 1000 ]; do echo \"{round}: file $i\" > f$i; i=$((i+1)); done"
    )
}

#[test]
fn writes_survive_an_immediate_stop_round_after_round() {
    let env = TestEnv::new();
    env.build_default_image();
    env.banger(&[
        "vm", "run", "dev", "--cpus", "1", "--memory", "512M", "--disk", "1G",
    ])
    .ok();
    let rounds = rounds();
    for (kind, stop) in [
        ("stop", &["vm", "stop", "dev", "--json"][..]),
        ("force", &["vm", "stop", "dev", "--force", "--json"][..]),
    ] {
        let began = Instant::now();
        for n in 0..rounds {
            let round = format!("{kind} round {n}");
            env.banger(&["vm", "exec", "dev", "--", "sh", "-c", &write_files(&round)])
                .ok();
            let stopped = env.banger(stop).ok().json();
            assert_eq!(stopped["vm"]["state"], "stopped", "{stopped}");
            if kind == "force" {
                // No power-off: QEMU was ended under the guest, after the sync.
                assert!(
                    ["quit", "kill"].contains(&stopped["stop_method"].as_str().unwrap()),
                    "{stopped}"
                );
            }
            env.banger(&["vm", "start", "dev"]).ok();
            let hashes = env
                .banger(&[
                    "vm",
                    "exec",
                    "dev",
                    "--",
                    "sh",
                    "-c",
                    "cd /root/durable && md5sum f* | sort -k2",
                ])
                .ok();
            assert!(
                hashes.stdout == env.md5_lines(1000, |i| format!("{round}: file {i}\n")),
                "{round}: the files differ after stop and start"
            );
        }
        eprintln!(
            "{kind}: {rounds} rounds in {:?} ({:?} a round)",
            began.elapsed(),
            began.elapsed() / rounds
        );
    }
    env.banger(&["vm", "stop", "dev"]).ok();
    env.banger(&["vm", "rm", "dev"]).ok();
}
