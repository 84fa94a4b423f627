//! Published ports of bridge VMs: the daemon itself listens on the host side
//! (`HOSTIP:HOSTPORT`) and relays to the VM's lease address (`LEASE:GUESTPORT`), so no helper
//! call and no firewall rule is involved. TCP: one task per connection
//! (`copy_bidirectional`), at most [`MAX_TCP_CONNECTIONS`] at once per port. UDP: one flow per
//! client address (its own socket towards the guest, so replies find their client), at most
//! [`MAX_UDP_FLOWS`] per port, each ended after [`UDP_IDLE`] without traffic either way.
//!
//! A listener lives while the VM runs and the daemon runs: [`Forwards::close_vm`] at every
//! end of the VM's process, and the next daemon opens them again for running VMs. Each
//! port's tasks live in one `JoinSet` owned by its accept task, so aborting that task ends
//! its connections and flows too.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_proto::{PortMapping, PortProto};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

/// TCP connections relayed at once per published port; more are closed at accept.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// UDP client addresses relayed at once per published port; datagrams of more are dropped.
pub const MAX_UDP_FLOWS: usize = 256;
/// A UDP flow without a datagram either way for this long is ended.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long a relayed TCP connection waits for the guest to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A host socket bound for one published port, not serving yet.
#[derive(Debug)]
pub enum Bound {
    Tcp(PortMapping, std::net::TcpListener),
    Udp(PortMapping, std::net::UdpSocket),
}

impl Bound {
    /// Binds the host side of `p` (non-blocking, ready for tokio).
    pub fn bind(p: &PortMapping) -> std::io::Result<Self> {
        let addr = (p.host_ip, p.host_port);
        Ok(match p.proto {
            PortProto::Tcp => {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Self::Tcp(*p, listener)
            }
            PortProto::Udp => {
                let socket = std::net::UdpSocket::bind(addr)?;
                socket.set_nonblocking(true)?;
                Self::Udp(*p, socket)
            }
        })
    }

    pub fn mapping(&self) -> &PortMapping {
        match self {
            Self::Tcp(p, _) | Self::Udp(p, _) => p,
        }
    }
}

/// One serving published port; its task (and with it every connection) ends on drop.
#[derive(Debug)]
struct Forward {
    mapping: PortMapping,
    /// `None` only inside [`Forward::stop`].
    task: Option<JoinHandle<()>>,
}

impl Forward {
    /// Ends the task and waits until it is gone, so its socket is closed on return (an
    /// abort alone closes it whenever the runtime next drops the task).
    async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The published ports the daemon serves now, by VM id.
#[derive(Debug, Default)]
pub struct Forwards {
    by_vm: Mutex<HashMap<String, Vec<Forward>>>,
}

impl Forwards {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Forward>>> {
        // Nothing is left half-changed under this lock (pushes and removals only).
        self.by_vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `bound` for VM `vm_id`, relaying to `guest`. Must run inside the tokio runtime.
    pub fn open(&self, vm_id: &str, guest: Ipv4Addr, bound: Vec<Bound>) -> std::io::Result<()> {
        let mut started = Vec::new();
        for b in bound {
            let mapping = *b.mapping();
            let target = SocketAddr::from((guest, mapping.guest_port));
            let task = match b {
                Bound::Tcp(_, listener) => {
                    tokio::spawn(serve_tcp(TcpListener::from_std(listener)?, target))
                }
                Bound::Udp(_, socket) => {
                    tokio::spawn(serve_udp(UdpSocket::from_std(socket)?, target))
                }
            };
            debug!(vm = vm_id, port = %mapping.host_side(), %target, "forwarding");
            started.push(Forward {
                mapping,
                task: Some(task),
            });
        }
        self.map()
            .entry(vm_id.to_owned())
            .or_default()
            .extend(started);
        Ok(())
    }

    /// Stops serving the host sides of `ports` for VM `vm_id` (those it serves); their
    /// sockets are closed when this returns.
    pub async fn close(&self, vm_id: &str, ports: &[PortMapping]) {
        let removed: Vec<Forward> = {
            let mut map = self.map();
            let Some(list) = map.get_mut(vm_id) else {
                return;
            };
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|f| ports.iter().any(|p| same_host_side(p, &f.mapping)));
            *list = kept;
            gone
        };
        for forward in removed {
            forward.stop().await;
        }
    }

    /// Stops serving every port of VM `vm_id` (its process ended). Their tasks are aborted;
    /// the sockets close as the runtime drops them, right after.
    pub fn close_vm(&self, vm_id: &str) {
        let removed = self.map().remove(vm_id);
        drop(removed);
    }

    /// The host sides served for VM `vm_id` now.
    pub fn served(&self, vm_id: &str) -> Vec<PortMapping> {
        self.map()
            .get(vm_id)
            .map(|list| list.iter().map(|f| f.mapping).collect())
            .unwrap_or_default()
    }
}

fn same_host_side(p: &PortMapping, q: &PortMapping) -> bool {
    p.proto == q.proto && p.host_ip == q.host_ip && p.host_port == q.host_port
}

/// Accepts on `listener` for ever, relaying each connection to `target`.
async fn serve_tcp(listener: TcpListener, target: SocketAddr) {
    let mut conns = JoinSet::new();
    let mut refused = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (client, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, or a connection reset before accept: back off
                        // a little rather than spin.
                        debug!(%target, "accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                while conns.try_join_next().is_some() {}
                if conns.len() >= MAX_TCP_CONNECTIONS {
                    refused += 1;
                    if refused.is_power_of_two() {
                        warn!(%target, refused, "published port at its connection limit; closing new connections");
                    }
                    drop(client);
                    continue;
                }
                conns.spawn(relay_tcp(client, peer, target));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay_tcp(mut client: TcpStream, peer: SocketAddr, target: SocketAddr) {
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, %target, "cannot reach the guest: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, %target, "the guest did not accept in time");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        debug!(%peer, %target, "relay ended: {e}");
    }
}

/// One UDP client's flow: its socket towards the guest and when it last carried a datagram.
struct Flow {
    upstream: Arc<UdpSocket>,
    last: Arc<Mutex<Instant>>,
}

fn touch(last: &Mutex<Instant>) {
    *last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
}

fn last_seen(last: &Mutex<Instant>) -> Instant {
    *last.lock().unwrap_or_else(|p| p.into_inner())
}

/// Receives on `socket` for ever, relaying each client's datagrams to `target` through a
/// socket of that client's own, and the guest's answers back to the client.
async fn serve_udp(socket: UdpSocket, target: SocketAddr) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut replies: JoinSet<SocketAddr> = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    let mut dropped = 0u64;
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let Ok((len, peer)) = received else { continue };
                if !flows.contains_key(&peer) {
                    if flows.len() >= MAX_UDP_FLOWS {
                        dropped += 1;
                        if dropped.is_power_of_two() {
                            warn!(%target, dropped, "published UDP port at its flow limit; dropping datagrams of new clients");
                        }
                        continue;
                    }
                    let upstream = match connect_udp(target).await {
                        Ok(u) => Arc::new(u),
                        Err(e) => {
                            debug!(%target, "cannot open a UDP flow: {e}");
                            continue;
                        }
                    };
                    let last = Arc::new(Mutex::new(Instant::now()));
                    replies.spawn(relay_udp_replies(
                        upstream.clone(),
                        socket.clone(),
                        peer,
                        last.clone(),
                    ));
                    flows.insert(peer, Flow { upstream, last });
                }
                if let Some(flow) = flows.get(&peer) {
                    touch(&flow.last);
                    let _ = flow.upstream.send(&buf[..len]).await;
                }
            }
            Some(ended) = replies.join_next(), if !replies.is_empty() => {
                if let Ok(peer) = ended {
                    flows.remove(&peer);
                }
            }
        }
    }
}

async fn connect_udp(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let upstream = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    upstream.connect(target).await?;
    Ok(upstream)
}

/// Sends the guest's answers on `upstream` back to `peer` until the flow is idle for
/// [`UDP_IDLE`]; returns `peer` so the flow can be forgotten.
async fn relay_udp_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    last: Arc<Mutex<Instant>>,
) -> SocketAddr {
    let mut buf = vec![0u8; 65_536];
    loop {
        let deadline = last_seen(&last) + UDP_IDLE;
        match tokio::time::timeout_at(deadline.into(), upstream.recv(&mut buf)).await {
            Ok(Ok(len)) => {
                touch(&last);
                let _ = socket.send_to(&buf[..len], peer).await;
            }
            // ICMP port unreachable from the guest shows up here: keep the flow for its idle
            // time, the client may retry once the guest listens.
            Ok(Err(_)) => {}
            Err(_) if last_seen(&last) + UDP_IDLE <= Instant::now() => return peer,
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn mapping(proto: &str, host_port: u16, guest_port: u16) -> PortMapping {
        PortMapping::parse(&format!("127.0.0.1:{host_port}:{guest_port}/{proto}")).unwrap()
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn tcp_and_udp_are_relayed_and_closing_ends_them() {
        // "The guest": a TCP echo server and a UDP echo server on loopback.
        let guest_tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_port = guest_tcp.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = guest_tcp.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let guest_udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_port = guest_udp.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = guest_udp.recv_from(&mut buf).await {
                let _ = guest_udp.send_to(&buf[..n], peer).await;
            }
        });

        let forwards = Forwards::default();
        let (ht, hu) = (free_port(), free_port());
        let bound = vec![
            Bound::bind(&mapping("tcp", ht, tcp_port)).unwrap(),
            Bound::bind(&mapping("udp", hu, udp_port)).unwrap(),
        ];
        // A busy host side is an error at bind.
        let err = Bound::bind(&mapping("tcp", ht, 1)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        forwards.open("vm1", Ipv4Addr::LOCALHOST, bound).unwrap();
        assert_eq!(forwards.served("vm1").len(), 2);

        let mut c = TcpStream::connect(("127.0.0.1", ht)).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");

        // Two UDP clients each get their own answers.
        for word in [&b"one"[..], &b"two"[..]] {
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.send_to(word, ("127.0.0.1", hu)).await.unwrap();
            let mut buf = [0u8; 16];
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], word);
        }

        // Closing one port ends its listener and its live connection; the other stays.
        forwards.close("vm1", &[mapping("tcp", ht, 1)]).await;
        let mut end = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut end)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        // Closed on return: the host side binds again at once.
        Bound::bind(&mapping("tcp", ht, 1)).unwrap();
        assert_eq!(forwards.served("vm1"), [mapping("udp", hu, udp_port)]);
        forwards.close_vm("vm1");
        assert!(forwards.served("vm1").is_empty());
    }
}
