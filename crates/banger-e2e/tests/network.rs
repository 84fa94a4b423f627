//! Bridge networking end to end, entirely inside network namespaces this test creates: the
//! real root helper, the daemon and real VMs run in namespace `bgn-*`; namespace `bgo-*` plays
//! "the outside" behind a veth pair. No packet leaves them. Needs root (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use banger_e2e::{TestEnv, bin, poll};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// A network namespace, deleted on drop even when the test fails.
struct Netns(String);

impl Netns {
    fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }
    fn output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// Runs `f` on a thread that entered this namespace.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
    fn links(&self) -> Vec<String> {
        let value: serde_json::Value =
            serde_json::from_str(&self.output(&["ip", "-j", "link"])).unwrap();
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }
    fn nft_tables(&self) -> Vec<String> {
        let value: serde_json::Value =
            serde_json::from_str(&self.output(&["nft", "-j", "list", "tables"])).unwrap();
        value["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("table"))
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

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
        assert!(tap.starts_with("bg-tap-"), "{tap}");
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
    assert_eq!(ns.nft_tables(), ["banger"]);

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
    assert!(!links.iter().any(|l| l.starts_with("bg-tap-")), "{links:?}");
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
