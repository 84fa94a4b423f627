//! Bridge networking for an ordinary user: the daemon and QEMU run as the unprivileged owner
//! ([`TestEnv::nonroot`]), the root helper as root for that owner (`--owner <uid>`), all of it
//! inside network namespaces this test creates (`bgN-*` the host, `bgX-*` "the outside" behind
//! a veth pair). The whole QEMU flow (image import, create, start, exec, workspace prepare, git
//! in the guest, export, stop, rm), the VM's lease and NAT to the outside, published ports
//! relayed by the daemon (TCP and UDP, `vm port add|rm` live, a busy port refused, kept across
//! a daemon SIGKILL and a stop/start), and nothing left after rm + `network down`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use banger_e2e::{
    Netns, Run, TestEnv, guest_greeting, loops_backed_by, poll, process_uid, tcp_server,
};

const TEST: &str = "a_nonroot_owner_runs_bridge_vms_through_the_root_helper_with_published_ports";

fn exec(env: &TestEnv, script: &str) -> Run {
    env.banger(&["vm", "exec", "dev", "--", "bash", "-c", script])
}

/// The greeting read from 127.0.0.1:`port` inside `ns`, or None when nothing answers.
fn greeting(ns: &Netns, port: u16) -> Option<String> {
    ns.run(move || guest_greeting(port)).join().unwrap()
}

/// The answer to one datagram sent to 127.0.0.1:`port` inside `ns`, within 2 s.
fn udp_answer(ns: &Netns, port: u16, text: &'static str) -> Option<String> {
    ns.run(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.send_to(text.as_bytes(), ("127.0.0.1", port)).ok()?;
        let mut buf = [0u8; 1500];
        let (len, _) = socket.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..len]).into_owned())
    })
    .join()
    .unwrap()
}

#[track_caller]
fn answers(ns: &Netns, port: u16, guest_port: u16) {
    let got = poll(Duration::from_secs(60), "the published port", || {
        greeting(ns, port)
    });
    assert_eq!(got, format!("hello-from-guest {guest_port}"));
}

/// Waits until nothing listens on 127.0.0.1:`port` inside `ns`.
#[track_caller]
fn closes(ns: &Netns, port: u16) {
    poll(Duration::from_secs(10), "the port to close", || {
        let refused = ns
            .run(move || TcpStream::connect(("127.0.0.1", port)).is_err())
            .join()
            .unwrap();
        refused.then_some(())
    });
}

#[track_caller]
fn udp_answers(ns: &Netns, port: u16) {
    let got = poll(Duration::from_secs(60), "the published UDP port", || {
        udp_answer(ns, port, "ping")
    });
    assert_eq!(got, "echo:ping");
}

fn ports(env: &TestEnv) -> Vec<(String, u16, u16)> {
    let list = env.banger(&["vm", "port", "dev", "--json"]).ok().json();
    let mut ports: Vec<_> = list["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["proto"].as_str().unwrap().to_owned(),
                p["host_port"].as_u64().unwrap() as u16,
                p["guest_port"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    ports.sort();
    ports
}

#[test]
fn a_nonroot_owner_runs_bridge_vms_through_the_root_helper_with_published_ports() {
    if !banger_e2e::root_or_skip(TEST, "network namespaces and the root helper") {
        return;
    }
    let mut env = TestEnv::nonroot();
    let owner = env.owner();
    assert_ne!(owner.uid, 0, "the owner must not be root");
    // The owner's image (built without root, or from the owner's cache), outside the
    // namespaces: the build fetches packages.
    env.build_default_image();
    env.banger(&["daemon", "stop"]).ok();

    let ns = Netns::new("bgN");
    let out = Netns::new("bgX");
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &out.0,
    ]);
    ns.ip(&["addr", "add", "10.233.0.1/24", "dev", "veth0"]);
    ns.ip(&["link", "set", "veth0", "up"]);
    out.ip(&["addr", "add", "10.233.0.2/24", "dev", "veth1"]);
    out.ip(&["link", "set", "veth1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.233.0.2"]);
    tcp_server(&out, "10.233.0.2:8080");

    env.set_netns(&ns.0);
    let Some(helper) = env.start_helper(TEST) else {
        return;
    };
    std::fs::write(
        env.config_file(),
        format!(
            "[defaults]\nmemory = \"768M\"\n[daemon]\nstart_timeout_secs = 900\n\
             [network]\nmode = \"bridge\"\nhelper_socket = \"{}\"\npool_size = 1\n\
             [ssh]\nconfig_file = \"{}\"\nuser_config = \"{}\"\n",
            helper.socket.display(),
            env.dir().join("ssh/config.d/banger").display(),
            env.dir().join("ssh/config").display(),
        ),
    )
    .unwrap();
    env.chown_to_owner(&env.config_file());

    // Image import: the built image's root file system under another name, with its kernel.
    let rootfs = env.image_rootfs("default");
    env.banger(&[
        "image",
        "import",
        "imported",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        "default",
    ])
    .ok();

    // Published ports at create: TCP and UDP.
    let (p_tcp, p_udp, p_added, p_busy) = (18080u16, 15353u16, 18081u16, 18082u16);
    let created = env
        .banger(&[
            "vm",
            "create",
            "dev",
            "--image",
            "imported",
            "-p",
            &format!("127.0.0.1:{p_tcp}:8000"),
            "-p",
            &format!("{p_udp}:8000/udp"),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(created["network"]["mode"], "bridge");
    let lease = created["network"]["ip"].as_str().unwrap().to_owned();
    let tap = created["network"]["tap"].as_str().unwrap().to_owned();
    assert_eq!(tap, format!("bg{}t0", owner.uid));
    env.banger(&["vm", "start", "dev"]).ok();

    // Who runs what: the daemon and QEMU as the owner, the helper as root.
    let daemon = env.wait_for_daemon();
    assert_eq!(
        process_uid(daemon),
        owner.uid,
        "the daemon runs as the owner"
    );
    let qemu = env.qemu_pids();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    assert_eq!(process_uid(qemu[0]), owner.uid, "QEMU runs as the owner");
    assert_eq!(process_uid(helper.pid()), 0, "the helper runs as root");
    let bridge = format!("bg{}", owner.uid);
    let links = ns.links();
    assert!(links.contains(&bridge) && links.contains(&tap), "{links:?}");
    let tap_owner = ns.output(&["cat", &format!("/sys/class/net/{tap}/owner")]);
    assert_eq!(tap_owner.trim(), owner.uid.to_string());
    assert_eq!(ns.nft_tables(), [format!("banger_{}", owner.uid)]);

    // The guest has its lease, resolves its own name through the daemon's DNS, and reaches
    // the outside through NAT (the outside sees the host's address).
    let addrs = exec(&env, "ip -4 -o addr show").ok().stdout;
    assert!(addrs.contains(&format!(" {lease}/")), "{addrs}");
    let resolved = exec(&env, "getent hosts dev.vm").ok().stdout;
    assert!(resolved.starts_with(&format!("{lease} ")), "{resolved}");
    let seen = exec(&env, "exec 3<>/dev/tcp/10.233.0.2/8080 && head -n 1 <&3").ok();
    assert_eq!(seen.stdout.trim(), "10.233.0.1", "{}", seen.stderr);

    // Workspace: a repository the owner made; git works on it in the guest; export comes
    // back to the owner.
    env.workspace_round_trip("dev");

    // Published ports: the daemon relays the host side to the lease address.
    env.guest_servers("dev", 8000, true);
    answers(&ns, p_tcp, 8000);
    udp_answers(&ns, p_udp);
    let shown = env.banger(&["vm", "show", "dev", "--json"]).ok().json();
    assert_eq!(shown["network"]["ports"].as_array().unwrap().len(), 2);

    // vm port add on the running VM: live at once, same QEMU process.
    env.guest_servers("dev", 8001, true);
    env.banger(&["vm", "port", "add", "dev", &format!("{p_added}:8001")])
        .ok();
    answers(&ns, p_added, 8001);
    assert_eq!(env.qemu_pids(), qemu);
    assert_eq!(
        ports(&env),
        [
            ("tcp".to_owned(), p_tcp, 8000),
            ("tcp".to_owned(), p_added, 8001),
            ("udp".to_owned(), p_udp, 8000),
        ]
    );

    // A busy host port is refused and nothing changes.
    let busy = ns
        .run(move || TcpListener::bind(("127.0.0.1", p_busy)).unwrap())
        .join()
        .unwrap();
    let refused = env.banger(&["vm", "port", "add", "dev", &format!("{p_busy}:8000")]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("is in use"), "{}", refused.stderr);
    assert_eq!(ports(&env).len(), 3);
    answers(&ns, p_added, 8001);
    drop(busy);

    // vm port rm: closed at once; the others stay.
    env.banger(&["vm", "port", "rm", "dev", &p_added.to_string()])
        .ok();
    closes(&ns, p_added);
    answers(&ns, p_tcp, 8000);

    // A daemon SIGKILL takes its listeners along; the next daemon (started by the next
    // command) listens again for the running VM.
    env.kill_daemon();
    assert!(greeting(&ns, p_tcp).is_none());
    assert_eq!(ports(&env).len(), 2);
    answers(&ns, p_tcp, 8000);
    udp_answers(&ns, p_udp);
    assert_eq!(env.qemu_pids(), qemu);

    // Stop closes the ports; start opens them again.
    env.banger(&["vm", "stop", "dev"]).ok();
    closes(&ns, p_tcp);
    env.banger(&["vm", "start", "dev"]).ok();
    env.guest_servers("dev", 8000, true);
    answers(&ns, p_tcp, 8000);
    udp_answers(&ns, p_udp);
    // A port taken while the VM is stopped refuses the start, naming it.
    env.banger(&["vm", "stop", "dev"]).ok();
    let busy = ns
        .run(move || TcpListener::bind(("127.0.0.1", p_tcp)).unwrap())
        .join()
        .unwrap();
    let refused = env.banger(&["vm", "start", "dev"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains(&format!("127.0.0.1:{p_tcp}"))
            && refused.stderr.contains("is in use"),
        "{}",
        refused.stderr
    );
    assert!(env.qemu_pids().is_empty());
    drop(busy);

    // rm + network down leave no tap, bridge, nft table, loop device or VMM.
    env.banger(&["vm", "rm", "dev"]).ok();
    env.banger(&["network", "down"]).ok();
    let mut links = ns.links();
    links.sort();
    assert_eq!(links, ["lo", "veth0"]);
    assert!(ns.nft_tables().is_empty());
    assert!(env.qemu_pids().is_empty());
    assert!(
        loops_backed_by(&env.dir().display().to_string()).is_empty(),
        "loop devices left"
    );
}
