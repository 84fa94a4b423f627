//! Bridge networking end to end, entirely inside network namespaces this test creates: the
//! real root helper, the daemon and real VMs run in namespace `bgn-*`; namespace `bgo-*` plays
//! "the outside" behind a veth pair. No packet leaves them. Needs root (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use banger_e2e::{Netns, TestEnv, bin, poll, tcp_server};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// The root helper running inside `ns`, killed on drop.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_helper(ns: &Netns, socket: &Path, state_dir: &Path) -> Helper {
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(helper_bin())
        .args(["--foreground", "--owner", "0"])
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(socket.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let helper = Helper(child);
    poll(Duration::from_secs(20), "the helper's socket", || {
        std::os::unix::net::UnixStream::connect(socket).ok()
    });
    helper
}

fn helper_bin() -> PathBuf {
    bin("banger-helper")
}

/// Writes the instance's config: bridge mode through this helper, ssh config files in the
/// test's directory (never the real ~/.ssh).
fn configure(env: &TestEnv, socket: &Path, pool: u32) -> (PathBuf, PathBuf) {
    let generated = env.dir().join("ssh/config.d/banger");
    let user_config = env.dir().join("ssh/config");
    std::fs::write(
        env.config_file(),
        format!(
            "[network]\nmode = \"bridge\"\nhelper_socket = \"{}\"\npool_size = {pool}\n\
             [ssh]\nconfig_file = \"{}\"\nuser_config = \"{}\"\n",
            socket.display(),
            generated.display(),
            user_config.display()
        ),
    )
    .unwrap();
    (generated, user_config)
}

fn leases(env: &TestEnv) -> Vec<(String, String, String)> {
    let status = env.banger(&["network", "status", "--json"]).ok().json();
    status["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["vm"].as_str().unwrap().to_owned(),
                l["ip"].as_str().unwrap().to_owned(),
                l["tap"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// One DNS query over UDP to `server`, from the current thread's namespace.
fn dns_query(server: SocketAddr, name: &str) -> Message {
    let mut query = Message::new();
    query
        .set_id(0x4242)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket.send_to(&query.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 1500];
    let (len, _) = socket.recv_from(&mut buf).unwrap();
    Message::from_vec(&buf[..len]).unwrap()
}

/// Answers every A query with 192.0.2.7 (a documentation address), like an upstream resolver.
fn fake_upstream(socket: UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((len, peer)) = socket.recv_from(&mut buf) {
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let mut reply = Message::new();
        reply
            .set_id(query.id())
            .set_message_type(hickory_proto::op::MessageType::Response);
        for q in query.queries() {
            reply.add_query(q.clone());
            reply.add_answer(hickory_proto::rr::Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(Ipv4Addr::new(192, 0, 2, 7).into()),
            ));
        }
        let _ = socket.send_to(&reply.to_vec().unwrap(), peer);
    }
}

#[test]
fn twenty_parallel_creates_get_distinct_leases_and_dns_forwards_other_names() {
    if !banger_e2e::root_or_skip(
        "twenty_parallel_creates_get_distinct_leases_and_dns_forwards_other_names",
        "network namespaces",
    ) {
        return;
    }
    let ns = Netns::new("bgl");
    // `ip netns exec` shows the daemon this file as /etc/resolv.conf: its upstream resolver
    // is a fake one inside the namespace.
    let etc = PathBuf::from(format!("/etc/netns/{}", ns.0));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
    let upstream = ns
        .run(|| UdpSocket::bind("127.0.0.53:53").unwrap())
        .join()
        .unwrap();
    std::thread::spawn(move || fake_upstream(upstream));
    let mut env = TestEnv::new();
    env.set_netns(&ns.0);
    let socket = env.dir().join("helper.sock");
    std::fs::create_dir_all(env.home()).unwrap();
    let _helper = start_helper(&ns, &socket, &env.home());
    configure(&env, &socket, 0);
    env.import_stub_image();
    let names: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    std::thread::scope(|scope| {
        for name in &names {
            let env = &env;
            scope.spawn(move || {
                env.banger(&["vm", "create", name, "--disk", "64M", "--memory", "256"])
                    .ok()
            });
        }
    });
    let leases = leases(&env);
    assert_eq!(leases.len(), 20, "{leases:?}");
    let ips: std::collections::HashSet<_> = leases.iter().map(|l| l.1.clone()).collect();
    let taps: std::collections::HashSet<_> = leases.iter().map(|l| l.2.clone()).collect();
    assert_eq!((ips.len(), taps.len()), (20, 20), "{leases:?}");
    for (_, addr, tap) in &leases {
        let addr: Ipv4Addr = addr.parse().unwrap();
        assert!(
            addr.octets()[..3] == [172, 30, 0] && addr.octets()[3] >= 2,
            "{addr}"
        );
        assert!(tap.starts_with("bg0t"), "{tap}");
    }
    // The daemon's DNS server answers .vm names itself and forwards the rest upstream.
    let answers = ns
        .run(|| {
            let server: SocketAddr = "172.30.0.1:53".parse().unwrap();
            (
                dns_query(server, "p0.vm."),
                dns_query(server, "example.test."),
            )
        })
        .join()
        .unwrap();
    let p0_ip: Ipv4Addr = leases
        .iter()
        .find(|l| l.0 == "p0")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(answers.0.answers()[0].data(), &RData::A(p0_ip.into()));
    assert_eq!(answers.1.response_code(), ResponseCode::NoError);
    assert_eq!(
        answers.1.answers()[0].data(),
        &RData::A(Ipv4Addr::new(192, 0, 2, 7).into())
    );

    // The VM shows its network; `--network user` gets no lease.
    let shown = env.banger(&["vm", "show", "p0", "--json"]).ok().json();
    assert_eq!(shown["network"]["mode"], "bridge");
    let p0 = leases.iter().find(|l| l.0 == "p0").unwrap();
    assert_eq!(shown["network"]["ip"], p0.1.as_str());
    assert_eq!(shown["network"]["tap"], p0.2.as_str());
    let user = env
        .banger(&[
            "vm",
            "create",
            "u",
            "--network",
            "user",
            "--disk",
            "64M",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(user["network"]["mode"], "user");
    assert_eq!(self::leases(&env).len(), 20);
    env.banger(&["vm", "rm", "u"]).ok();
    // rm releases the lease.
    env.banger(&["vm", "rm", "p3"]).ok();
    assert_eq!(self::leases(&env).len(), 19);
    let all: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "p3")
        .collect();
    let mut rm = vec!["vm", "rm"];
    rm.extend(all);
    env.banger(&rm).ok();
    assert!(self::leases(&env).is_empty());
}

#[test]
fn bridge_vms_resolve_each_other_reach_the_outside_and_leave_nothing() {
    if !banger_e2e::root_or_skip(
        "bridge_vms_resolve_each_other_reach_the_outside_and_leave_nothing",
        "network namespaces",
    ) {
        return;
    }
    let mut env = TestEnv::new();
    // The image comes from the shared cache, imported by a daemon outside the namespaces.
    env.build_default_image();
    env.banger(&["daemon", "stop"]).ok();

    let ns = Netns::new("bgn");
    let out = Netns::new("bgo");
    // "The outside": a veth pair, ns's default route through it.
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &out.0,
    ]);
    ns.ip(&["addr", "add", "10.231.0.1/24", "dev", "veth0"]);
    ns.ip(&["link", "set", "veth0", "up"]);
    out.ip(&["addr", "add", "10.231.0.2/24", "dev", "veth1"]);
    out.ip(&["link", "set", "veth1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.231.0.2"]);

    env.set_netns(&ns.0);
    let socket = env.dir().join("helper.sock");
    let _helper = start_helper(&ns, &socket, &env.home());
    let (generated, user_config) = configure(&env, &socket, 2);

    env.banger(&["vm", "create", "a"]).ok();
    env.banger(&["vm", "create", "b"]).ok();
    std::thread::scope(|scope| {
        for name in ["a", "b"] {
            let env = &env;
            scope.spawn(move || env.banger(&["vm", "start", name]).ok());
        }
    });
    let leases = leases(&env);
    let lease_a = leases.iter().find(|l| l.0 == "a").unwrap().clone();
    assert_eq!(ns.nft_tables(), ["banger_0"]);

    // From VM a, b.vm resolves (through the daemon's DNS) and answers.
    let ping = env.banger(&["vm", "exec", "a", "--", "ping", "-c1", "-W5", "b.vm"]);
    assert_eq!(ping.code, 0, "{}\n{}", ping.stdout, ping.stderr);

    // From the host side of the namespace: a.vm is a's lease, nosuch.vm does not exist.
    let expected: Ipv4Addr = lease_a.1.parse().unwrap();
    let answers = ns
        .run(|| {
            let server: SocketAddr = "172.30.0.1:53".parse().unwrap();
            (dns_query(server, "a.vm."), dns_query(server, "nosuch.vm."))
        })
        .join()
        .unwrap();
    assert_eq!(answers.0.response_code(), ResponseCode::NoError);
    assert_eq!(answers.0.answers()[0].data(), &RData::A(expected.into()));
    assert_eq!(answers.1.response_code(), ResponseCode::NXDomain);

    // ssh a.vm with the generated config (through the Include), host key pinned.
    let installed = env
        .banger(&["ssh-config", "--install", "--json"])
        .ok()
        .json();
    assert_eq!(installed["path"], generated.display().to_string());
    assert_eq!(installed["include_added"], true);
    let again = env
        .banger(&["ssh-config", "--install", "--json"])
        .ok()
        .json();
    assert_eq!(again["include_added"], false);
    let text = std::fs::read_to_string(&generated).unwrap();
    assert!(text.contains(&format!("HostName {}", lease_a.1)), "{text}");
    let ssh = |extra: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "ssh", "-F"])
            .arg(&user_config)
            .args(["-o", "BatchMode=yes"])
            .args(extra)
            .args(["a.vm", "hostname"])
            .output()
            .unwrap()
    };
    let out_ok = ssh(&[]);
    assert!(
        out_ok.status.success(),
        "{}",
        String::from_utf8_lossy(&out_ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out_ok.stdout).trim(), "a");
    // Stop the shared connection ControlMaster started.
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ssh", "-F"])
        .arg(&user_config)
        .args(["-O", "exit", "a.vm"])
        .output();
    // A changed host key is refused.
    let known_hosts = text
        .lines()
        .skip_while(|l| l.trim() != "Host a.vm")
        .find_map(|l| l.trim().strip_prefix("UserKnownHostsFile "))
        .unwrap()
        .to_owned();
    let pinned = std::fs::read_to_string(&known_hosts).unwrap();
    let other_key = env.dir().join("other_key");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .unwrap();
    assert!(status.success());
    let other_pub = std::fs::read_to_string(other_key.with_extension("pub")).unwrap();
    std::fs::write(&known_hosts, format!("a.vm {other_pub}")).unwrap();
    let refused = ssh(&["-o", "ControlPath=none"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("Host key verification failed") || stderr.contains("CHANGED"),
        "{stderr}"
    );
    std::fs::write(&known_hosts, pinned).unwrap();

    // NAT: a TCP server in the outside namespace sees the connection come from ns's veth
    // address (masquerade), not from the VM's private address.
    let listener = out
        .run(|| TcpListener::bind("10.231.0.2:8080").unwrap())
        .join()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream.write_all(b"hello-from-outside\n").unwrap();
        let mut line = String::new();
        let _ = BufReader::new(&stream).read_line(&mut line);
        peer.ip()
    });
    let fetched = env.banger(&[
        "vm",
        "exec",
        "a",
        "--",
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.231.0.2/8080; head -1 <&3; echo bye >&3",
    ]);
    assert_eq!(fetched.code, 0, "{}", fetched.stderr);
    assert_eq!(fetched.stdout.trim(), "hello-from-outside");
    assert_eq!(server.join().unwrap().to_string(), "10.231.0.1");

    // Killing the daemon mid-start leaks nothing: the next daemon cleans the VM up.
    env.banger(&["vm", "create", "c"]).ok();
    let mut starting = env.command(&["vm", "start", "c"]).spawn().unwrap();
    let c_id = env.banger(&["vm", "show", "c", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    poll(Duration::from_secs(120), "c's QEMU", || {
        (!banger_e2e::processes_with_cmdline("qemu-system-x86", &c_id).is_empty()).then_some(())
    });
    env.kill_daemon();
    let _ = starting.wait();
    let shown = env.banger(&["vm", "show", "c", "--json"]).ok().json();
    assert_eq!(shown["state"], "stopped");
    assert!(banger_e2e::processes_with_cmdline("qemu-system-x86", &c_id).is_empty());
    let tap_c = self::leases(&env)
        .iter()
        .find(|l| l.0 == "c")
        .unwrap()
        .2
        .clone();
    env.banger(&["vm", "rm", "c"]).ok();
    assert!(!ns.links().contains(&tap_c));

    // rm and network down leave no tap, bridge, nft table or lease.
    let refused = env.banger(&["network", "down"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("bridge VMs are running"),
        "{}",
        refused.stderr
    );
    env.banger(&["vm", "stop", "a"]).ok();
    env.banger(&["vm", "stop", "b"]).ok();
    env.banger(&["vm", "rm", "a", "b"]).ok();
    assert!(self::leases(&env).is_empty());
    let links = ns.links();
    assert!(!links.iter().any(|l| l.starts_with("bg0t")), "{links:?}");
    env.banger(&["network", "down"]).ok();
    let mut links = ns.links();
    links.sort();
    assert_eq!(links, ["lo", "veth0"]);
    assert!(ns.nft_tables().is_empty());
    let text = std::fs::read_to_string(&generated).unwrap();
    assert!(!text.contains("Host a.vm"), "{text}");
}

#[test]
fn helper_install_writes_or_prints_the_systemd_units() {
    let env = TestEnv::new();
    let dir = env.dir().join("units");
    std::fs::create_dir_all(&dir).unwrap();
    let run = env
        .banger(&["helper", "install", "--unit-dir", dir.to_str().unwrap()])
        .ok();
    assert!(
        run.stdout.contains("systemctl enable --now banger-helper@"),
        "{}",
        run.stdout
    );
    let socket = std::fs::read_to_string(dir.join("banger-helper@.socket")).unwrap();
    assert!(socket.contains("ListenStream=/run/banger-helper/%i.sock"));
    let service = std::fs::read_to_string(dir.join("banger-helper@.service")).unwrap();
    assert!(service.contains("--foreground --owner %i"));
    let printed = env.banger(&["helper", "install", "--print"]).ok();
    assert!(printed.stdout.contains("[Socket]") && printed.stdout.contains("[Service]"));
    // It never needs the daemon.
    assert!(env.daemon_pids().is_empty());
}

/// A local user (created when missing): (uid, gid).
fn ensure_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        // Another test may create it at the same time: only the result counts.
        let _ = Command::new("useradd")
            .args(["--create-home", name])
            .stderr(Stdio::null())
            .status();
    }
    (
        id("-u").unwrap_or_else(|| panic!("cannot create user {name}")),
        id("-g").unwrap(),
    )
}

/// One owner's root helper in `ns` with its subnet, and that owner's client.
struct OwnerHelper {
    uid: u32,
    gid: u32,
    socket: PathBuf,
    bin: PathBuf,
    _child: Helper,
}

impl OwnerHelper {
    fn start(ns: &Netns, dir: &Path, uid: u32, gid: u32, subnet: &str) -> Self {
        let socket = dir.join(format!("{uid}.sock"));
        let state = dir.join(format!("state-{uid}"));
        std::fs::create_dir_all(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
        let bin = dir.join("banger-helper");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(&bin)
            .args([
                "--foreground",
                "--owner",
                &uid.to_string(),
                "--subnet",
                subnet,
            ])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(socket.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        let helper = Helper(child);
        poll(Duration::from_secs(20), "the helper's socket", || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        Self {
            uid,
            gid,
            socket,
            bin,
            _child: helper,
        }
    }

    /// Sends `op` to `helper`'s socket as this owner (its uid): (succeeded, reply text).
    fn call(&self, helper: &OwnerHelper, op: &str) -> (bool, String) {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg(&self.bin)
            .args(["call", "--socket"])
            .arg(&helper.socket)
            .arg(op)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    #[track_caller]
    fn ok(&self, op: &str) {
        let (ok, text) = self.call(self, op);
        assert!(ok, "{op}: {text}");
    }
}

/// Puts `vm` on `bridge` through a veth pair: a stand-in for a VM on one of the bridge's
/// taps (same L2 segment, same firewall), with `addr` and its default route via `gateway`.
fn plug_vm(host: &Netns, vm: &Netns, bridge: &str, port: &str, addr: &str, gateway: &str) {
    host.ip(&[
        "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &vm.0,
    ]);
    host.ip(&["link", "set", port, "master", bridge]);
    host.ip(&["link", "set", port, "up"]);
    vm.ip(&["addr", "add", addr, "dev", "eth0"]);
    vm.ip(&["link", "set", "eth0", "up"]);
    vm.ip(&["route", "add", "default", "via", gateway]);
}

/// Whether a TCP connection from inside `ns` to `to` is accepted within 3 s.
fn connects(ns: &Netns, to: &str) -> bool {
    let to: SocketAddr = to.parse().unwrap();
    ns.run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).is_ok())
        .join()
        .unwrap()
}

/// Whether a DNS query from inside `ns` (from `from`, default address when `None`) to `server`
/// gets an answer within 3 s.
fn dns_answers(ns: &Netns, from: Option<&str>, server: &str) -> bool {
    let server: SocketAddr = server.parse().unwrap();
    let from = from.unwrap_or("0.0.0.0").to_owned();
    ns.run(move || {
        let mut query = Message::new();
        query.set_id(7).add_query(Query::query(
            Name::from_ascii("a.vm.").unwrap(),
            RecordType::A,
        ));
        let socket = UdpSocket::bind((from.as_str(), 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket.send_to(&query.to_vec().unwrap(), server).unwrap();
        let mut buf = [0u8; 1500];
        socket.recv_from(&mut buf).is_ok()
    })
    .join()
    .unwrap()
}

/// A UDP server in `ns` on `addr` that answers every datagram with itself.
fn udp_echo(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let socket = ns
        .run(move || UdpSocket::bind(addr).unwrap())
        .join()
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((len, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..len], peer);
        }
    });
}

fn sysctl(ns: &Netns, key: &str) -> String {
    ns.output(&["cat", &format!("/proc/sys/net/ipv4/{key}")])
        .trim()
        .to_owned()
}

#[test]
fn two_owners_networks_are_isolated_from_each_other_and_the_lan() {
    let (alice, alice_gid) = ensure_user("bangertest");
    let (evil, evil_gid) = ensure_user("bangerevil");
    assert_ne!(alice, evil);
    // "The host" (both helpers run there) and a LAN neighbour that routes the VM subnets
    // to the host, as a neighbour on a real LAN could.
    let host = Netns::new("bgH");
    let lan = Netns::new("bgL");
    host.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "lan1", "netns", &lan.0,
    ]);
    host.ip(&["addr", "add", "10.232.0.1/24", "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    lan.ip(&["addr", "add", "10.232.0.2/24", "dev", "lan1"]);
    lan.ip(&["link", "set", "lan1", "up"]);
    host.ip(&["route", "add", "default", "via", "10.232.0.2"]);
    lan.ip(&["route", "add", "172.31.0.0/16", "via", "10.232.0.1"]);

    let dir = tempfile::Builder::new()
        .prefix("bgiso")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::copy(helper_bin(), dir.path().join("banger-helper")).unwrap();
    let a = OwnerHelper::start(&host, dir.path(), alice, alice_gid, "172.31.1.0/24");
    let e = OwnerHelper::start(&host, dir.path(), evil, evil_gid, "172.31.2.0/24");
    let up = r#"{"kind":"network_up","pool_size":2}"#;
    a.ok(up);
    e.ok(up);
    let (bridge_a, bridge_e) = (format!("bg{alice}"), format!("bg{evil}"));
    let tap_a = format!("bg{alice}t0");
    let links = host.links();
    for name in [&bridge_a, &bridge_e, &tap_a, &format!("bg{evil}t1")] {
        assert!(links.contains(name), "{name} missing: {links:?}");
    }
    let mut tables = host.nft_tables();
    tables.sort();
    let mut expected = vec![format!("banger_{alice}"), format!("banger_{evil}")];
    expected.sort();
    assert_eq!(tables, expected);

    // Another owner's helper is not even reachable, and a tap of alice's is not evil's to
    // touch through its own helper.
    let (ok, text) = e.call(&a, r#"{"kind":"hello"}"#);
    assert!(!ok && text.contains("not this helper's owner"), "{text}");
    for op in ["delete_tap", "ensure_tap"] {
        let (ok, text) = e.call(&e, &format!(r#"{{"kind":"{op}","name":"{tap_a}"}}"#));
        assert!(!ok && text.contains("not of this helper's owner"), "{text}");
    }
    let tap_owner = host.output(&["cat", &format!("/sys/class/net/{tap_a}/owner")]);
    assert_eq!(tap_owner.trim(), alice.to_string());
    let master = host.output(&["readlink", &format!("/sys/class/net/{tap_a}/master")]);
    assert!(master.trim().ends_with(&bridge_a), "{master}");
    // Evil's status lists evil's taps only; evil's `network down` leaves alice's network.
    let (_, status) = e.call(&e, r#"{"kind":"network_status"}"#);
    assert!(!status.contains(&format!("bg{alice}t")), "{status}");
    e.ok(r#"{"kind":"network_down"}"#);
    let links = host.links();
    assert!(
        links.contains(&bridge_a) && links.contains(&tap_a),
        "{links:?}"
    );
    assert!(!links.contains(&bridge_e), "{links:?}");
    assert_eq!(host.nft_tables(), [format!("banger_{alice}")]);
    e.ok(up);

    // Forwarding is on for the bridges and the uplink only, not host-wide.
    assert_eq!(sysctl(&host, "ip_forward"), "0");
    assert_eq!(sysctl(&host, &format!("conf/{bridge_a}/forwarding")), "1");
    assert_eq!(sysctl(&host, "conf/lan0/forwarding"), "1");

    // A "VM" of each owner, and what runs around them.
    let va = Netns::new("bgVA");
    let ve = Netns::new("bgVE");
    plug_vm(&host, &va, &bridge_a, "vmA", "172.31.1.2/24", "172.31.1.1");
    plug_vm(&host, &ve, &bridge_e, "vmE", "172.31.2.2/24", "172.31.2.1");
    udp_echo(&host, "172.31.1.1:53"); // stands in for alice's DNS socket
    udp_echo(&host, "172.31.2.1:53"); // and evil's
    tcp_server(&host, "0.0.0.0:2222"); // a host service (sshd, say)
    tcp_server(&va, "0.0.0.0:8000"); // a service in alice's VM
    tcp_server(&ve, "0.0.0.0:8000"); // one in evil's VM
    tcp_server(&lan, "10.232.0.2:8080"); // "the outside"
    udp_echo(&lan, "10.232.0.2:9999");

    // DNS: each owner's gateway answers that owner's VMs only.
    assert!(dns_answers(&va, None, "172.31.1.1:53"));
    assert!(dns_answers(&ve, None, "172.31.2.1:53"));
    assert!(
        !dns_answers(&ve, None, "172.31.1.1:53"),
        "evil's VM asked alice's DNS"
    );
    assert!(
        !dns_answers(&va, None, "172.31.2.1:53"),
        "alice's VM asked evil's DNS"
    );
    assert!(
        !dns_answers(&lan, None, "172.31.1.1:53"),
        "open resolver to the LAN"
    );

    // Nothing from outside reaches a VM; the host itself does (how SSH to a VM works).
    assert!(connects(&host, "172.31.1.2:8000"));
    assert!(
        !connects(&lan, "172.31.1.2:8000"),
        "LAN neighbour reached a VM"
    );
    assert!(
        !connects(&ve, "172.31.1.2:8000"),
        "evil's VM reached alice's VM"
    );
    assert!(
        !connects(&va, "172.31.2.2:8000"),
        "alice's VM reached evil's VM"
    );

    // A VM reaches no host service but DNS: not on its gateway, the host's LAN address or
    // another owner's gateway. (The LAN does reach the service: it is up.)
    assert!(connects(&lan, "10.232.0.1:2222"));
    for target in ["172.31.1.1:2222", "10.232.0.1:2222", "172.31.2.1:2222"] {
        assert!(
            !connects(&va, target),
            "alice's VM reached host service {target}"
        );
    }

    // Out through NAT works, and the outside sees the host's address.
    let seen = va
        .run(|| {
            let stream = std::net::TcpStream::connect_timeout(
                &"10.232.0.2:8080".parse().unwrap(),
                Duration::from_secs(3),
            )
            .unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).unwrap();
            line
        })
        .join()
        .unwrap();
    assert_eq!(seen.trim(), "10.232.0.1");
    // A spoofed source from a VM goes nowhere, outside or to its DNS.
    va.ip(&["addr", "add", "10.99.0.5/32", "dev", "eth0"]);
    assert!(dns_answers(&va, Some("172.31.1.2"), "10.232.0.2:9999"));
    assert!(
        !dns_answers(&va, Some("10.99.0.5"), "10.232.0.2:9999"),
        "spoofed source left"
    );
    assert!(
        !dns_answers(&va, Some("10.99.0.5"), "172.31.1.1:53"),
        "spoofed source asked DNS"
    );

    // Alice's `network down` leaves evil's network as it was.
    a.ok(r#"{"kind":"network_down"}"#);
    let links = host.links();
    assert!(
        !links.iter().any(|l| l.starts_with(&format!("bg{alice}"))),
        "{links:?}"
    );
    assert!(links.contains(&bridge_e) && links.contains(&format!("bg{evil}t0")));
    assert_eq!(host.nft_tables(), [format!("banger_{evil}")]);
    assert!(dns_answers(&ve, None, "172.31.2.1:53"));
    e.ok(r#"{"kind":"network_down"}"#);
}
