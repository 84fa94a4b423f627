//! User-mode networking with real VMs under QEMU, the daemon (and so QEMU) running as an
//! unprivileged owner ([`TestEnv::nonroot`]): outbound network by default (the guest
//! fetches a file from an HTTP server this test runs on the host's loopback, reached as
//! QEMU's host address 10.0.2.2), none with `--net isolated`, and published ports: `-p` at
//! create, `vm port add|rm` on a running VM, kept across a daemon SIGKILL and a stop/start,
//! a busy host port refused with nothing changed. Traffic goes only to the host's loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_e2e::{TestEnv, guest_greeting as greeting, poll, process_uid};

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves `body` to every HTTP request on 127.0.0.1; returns the port.
fn http_server(body: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = std::sync::Arc::new(body);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n" || line == "\n" {
                        break;
                    }
                    line.clear();
                }
                let mut out = &stream;
                let _ = out.write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = out.write_all(&body);
            });
        }
    });
    port
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// The guest's side of the download: bash's /dev/tcp, an HTTP/1.0 GET, the body's digest.
fn fetch_script(port: u16, len: usize) -> String {
    format!(
        "exec 3<>/dev/tcp/10.0.2.2/{port} && printf 'GET /blob HTTP/1.0\\r\\nHost: host\\r\\n\\r\\n' >&3 \
         && cat <&3 > /tmp/resp && tail -c {len} /tmp/resp | sha256sum"
    )
}

#[track_caller]
fn answers(port: u16, guest_port: u16) {
    let got = poll(Duration::from_secs(60), "the published port", || {
        greeting(port)
    });
    assert_eq!(got, format!("hello-from-guest {guest_port}"));
}

fn ports(env: &TestEnv, vm: &str) -> Vec<(u16, u16)> {
    let list = env.banger(&["vm", "port", vm, "--json"]).ok().json();
    list["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["host_port"].as_u64().unwrap() as u16,
                p["guest_port"].as_u64().unwrap() as u16,
            )
        })
        .collect()
}

#[test]
fn user_mode_has_egress_isolated_has_none_and_ports_publish_live() {
    let env = TestEnv::nonroot();
    assert_ne!(env.owner().uid, 0, "the owner must not be root");
    // User mode whether or not a root helper runs here; a generous start timeout for a
    // loaded TCG host.
    std::fs::write(
        env.config_file(),
        "[daemon]\nstart_timeout_secs = 900\n[network]\nmode = \"user\"\n",
    )
    .unwrap();
    env.build_default_image();
    let blob: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| {
            b"abcdefghijklmnopqrstuvwxyz0123456789\n"
                [(i.wrapping_mul(2_654_435_761) >> 7) as usize % 37]
        })
        .collect();
    let digest = sha256(&blob);
    let http = http_server(blob.clone());

    let p1 = free_port();
    env.banger(&[
        "vm",
        "run",
        "web",
        "--memory",
        "512",
        "-p",
        &format!("127.0.0.1:{p1}:8000"),
    ])
    .ok();
    let shown = env.banger(&["vm", "show", "web", "--json"]).ok().json();
    assert_eq!(shown["network"]["mode"], "user");
    assert_eq!(shown["network"]["ports"][0]["host_port"], p1);

    // Outbound: the guest downloads the host's file through 10.0.2.2, intact.
    let fetched = env
        .banger(&[
            "vm",
            "exec",
            "web",
            "--",
            "bash",
            "-c",
            &fetch_script(http, blob.len()),
        ])
        .ok();
    assert_eq!(&fetched.stdout[..64], digest, "{}", fetched.stdout);

    // -p: the host reaches a server started in the guest.
    env.guest_servers("web", 8000, false);
    answers(p1, 8000);

    // vm port add on the running VM: live at once, same QEMU process (no restart).
    let qemu = env.qemu_pids();
    assert_eq!(qemu.len(), 1);
    assert_eq!(
        process_uid(qemu[0]),
        env.owner().uid,
        "QEMU runs as the owner"
    );
    assert_eq!(
        process_uid(env.wait_for_daemon()),
        env.owner().uid,
        "the daemon runs as the owner"
    );
    env.guest_servers("web", 8001, false);
    let p2 = free_port();
    env.banger(&["vm", "port", "add", "web", &format!("{p2}:8001")])
        .ok();
    answers(p2, 8001);
    assert_eq!(env.qemu_pids(), qemu);
    let mut listed = ports(&env, "web");
    listed.sort();
    let mut expected = vec![(p1, 8000), (p2, 8001)];
    expected.sort();
    assert_eq!(listed, expected);

    // A busy host port is refused, and nothing changes: not on a running VM, not at create.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let p3 = busy.local_addr().unwrap().port();
    let refused = env.banger(&["vm", "port", "add", "web", &format!("{p3}:8000")]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("is in use"), "{}", refused.stderr);
    assert_eq!(ports(&env, "web").len(), 2);
    let refused = env.banger(&["vm", "create", "other", "-p", &format!("{p3}:80")]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("is in use"), "{}", refused.stderr);
    assert_ne!(env.banger(&["vm", "show", "other"]).code, 0);
    // Another VM cannot take a port this one publishes.
    let refused = env.banger(&["vm", "create", "other", "-p", &format!("{p1}:80")]);
    assert!(
        refused.stderr.contains("already published by VM web"),
        "{}",
        refused.stderr
    );
    drop(busy);

    // vm port rm: gone at once, the other stays.
    env.banger(&["vm", "port", "rm", "web", &p2.to_string()])
        .ok();
    poll(Duration::from_secs(30), "the removed port to close", || {
        greeting(p2).is_none().then_some(())
    });
    answers(p1, 8000);
    env.banger(&["vm", "port", "add", "web", &format!("{p2}:8001")])
        .ok();
    answers(p2, 8001);

    // A daemon SIGKILL: QEMU keeps the forwards, the next daemon knows them.
    env.kill_daemon();
    answers(p1, 8000);
    answers(p2, 8001);
    assert_eq!(ports(&env, "web").len(), 2);

    // Stop and start: the ports come back with the VM.
    env.banger(&["vm", "stop", "web"]).ok();
    assert!(greeting(p1).is_none());
    let stopped = env.banger(&["vm", "port", "web"]).ok();
    assert!(stopped.stdout.contains("next start"), "{}", stopped.stdout);
    env.banger(&["vm", "start", "web"]).ok();
    env.guest_servers("web", 8000, false);
    env.guest_servers("web", 8001, false);
    answers(p1, 8000);
    answers(p2, 8001);
    env.banger(&["vm", "stop", "web"]).ok();

    // --net isolated: the same download fails, the VM otherwise works.
    env.banger(&["vm", "run", "iso", "--memory", "512", "--net", "isolated"])
        .ok();
    let shown = env.banger(&["vm", "show", "iso", "--json"]).ok().json();
    assert_eq!(shown["network"]["mode"], "isolated");
    let script = format!(
        "timeout 20 bash -c '{}'",
        fetch_script(http, blob.len()).replace('\'', "'\\''")
    );
    let blocked = env.banger(&["vm", "exec", "iso", "--", "bash", "-c", &script]);
    assert_ne!(
        blocked.code, 0,
        "isolated VM downloaded: {}",
        blocked.stdout
    );
    assert!(!blocked.stdout.contains(&digest));
    let works = env
        .banger(&["vm", "exec", "iso", "--", "echo", "alive"])
        .ok();
    assert_eq!(works.stdout.trim(), "alive");
    env.banger(&["vm", "stop", "iso"]).ok();
    env.banger(&["vm", "rm", "iso", "web"]).ok();
    assert!(env.qemu_pids().is_empty());
}
