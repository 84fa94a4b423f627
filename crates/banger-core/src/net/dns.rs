//! The `NAME.vm` DNS server: A records for VMs holding a lease, NXDOMAIN for other `.vm`
//! names, and every other query forwarded unchanged to the host's resolvers (from
//! /etc/resolv.conf). Runs on a UDP socket the helper bound on the owner's gateway address,
//! port 53, so the daemon stays unprivileged. It answers only clients in the owner's VM
//! subnet (the host's own queries come from the gateway address, inside it): never an open
//! resolver, even if the firewall were gone. Messages are parsed and built with hickory-proto.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use ipnet::Ipv4Net;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

/// Answers' time to live: short, leases change with `vm rm`.
const TTL: u32 = 5;
/// How long to wait for an upstream resolver.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Looks up the lease address of a VM by name. May block (it reads the state database):
/// [`serve`] calls it on a blocking thread.
pub type Lookup = Arc<dyn Fn(&str) -> Option<Ipv4Addr> + Send + Sync>;

/// The host's resolvers from `resolv.conf` text, without `exclude` (our own address).
pub fn upstreams(resolv_conf: &str, exclude: Ipv4Addr) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|addr| addr.parse::<IpAddr>().ok())
        .filter(|addr| *addr != IpAddr::V4(exclude))
        .map(|addr| SocketAddr::new(addr, 53))
        .collect()
}

/// Whether `peer` may ask: an IPv4 address inside `clients`.
pub fn allowed(peer: SocketAddr, clients: Ipv4Net) -> bool {
    matches!(peer.ip(), IpAddr::V4(ip) if clients.contains(&ip))
}

/// Serves clients in `clients` until the socket fails; anything else is dropped unanswered.
pub async fn serve(
    socket: UdpSocket,
    lookup: Lookup,
    upstreams: Vec<SocketAddr>,
    clients: Ipv4Net,
) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                warn!("DNS socket failed: {e}");
                return;
            }
        };
        if !allowed(peer, clients) {
            debug!(%peer, "ignored a DNS query from outside the VM subnet");
            continue;
        }
        let packet = buf[..len].to_vec();
        let Ok(query) = Message::from_vec(&packet) else {
            debug!(%peer, "ignored an unparsable DNS packet");
            continue;
        };
        let local = {
            let lookup = lookup.clone();
            tokio::task::spawn_blocking(move || {
                let answer = answer_local(&query, &lookup);
                (query, answer)
            })
        };
        let Ok((query, answer)) = local.await else {
            warn!("the DNS lookup task failed");
            continue;
        };
        if let Some(answer) = answer {
            if let Ok(bytes) = answer.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
            continue;
        }
        let socket = socket.clone();
        let upstreams = upstreams.clone();
        tokio::spawn(async move {
            let reply = match forward(&packet, &upstreams).await {
                Some(reply) => reply,
                None => match failure(&query, ResponseCode::ServFail).to_vec() {
                    Ok(bytes) => bytes,
                    Err(_) => return,
                },
            };
            let _ = socket.send_to(&reply, peer).await;
        });
    }
}

/// The answer for a `.vm` query; `None` for names to forward.
pub fn answer_local(query: &Message, lookup: &Lookup) -> Option<Message> {
    let question = query.queries().first()?;
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let label = name.strip_suffix(".vm").or((name == "vm").then_some(""))?;
    let mut reply = failure(query, ResponseCode::NoError);
    reply.set_authoritative(true);
    let address = (!label.is_empty() && !label.contains('.'))
        .then(|| lookup(label))
        .flatten();
    match address {
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        Some(ip) => {
            if question.query_type() == RecordType::A || question.query_type() == RecordType::ANY {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL,
                    RData::A(A(ip)),
                ));
            }
        }
    }
    Some(reply)
}

/// A reply to `query` with `code` and no answers.
fn failure(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for q in query.queries() {
        reply.add_query(q.clone());
    }
    reply
}

/// Sends `packet` to each upstream in turn until one answers.
async fn forward(packet: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(socket) = UdpSocket::bind(bind).await else {
            continue;
        };
        if socket.send_to(packet, upstream).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((len, from))) =
            tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv_from(&mut buf)).await
            && from == *upstream
        {
            buf.truncate(len);
            return Some(buf);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn query(name: &str, kind: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(42)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m
    }

    fn lookup() -> Lookup {
        Arc::new(|name| (name == "a").then(|| Ipv4Addr::new(172, 30, 0, 2)))
    }

    #[test]
    fn leased_names_resolve_others_are_nxdomain() {
        let reply = answer_local(&query("a.vm.", RecordType::A), &lookup()).unwrap();
        assert_eq!(reply.id(), 42);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(
            reply.answers()[0].data(),
            &RData::A(A(Ipv4Addr::new(172, 30, 0, 2)))
        );
        let reply = answer_local(&query("A.VM", RecordType::A), &lookup()).unwrap();
        assert_eq!(reply.answers().len(), 1);
        let reply = answer_local(&query("nosuch.vm.", RecordType::A), &lookup()).unwrap();
        assert_eq!(reply.response_code(), ResponseCode::NXDomain);
        let reply = answer_local(&query("x.a.vm.", RecordType::A), &lookup()).unwrap();
        assert_eq!(reply.response_code(), ResponseCode::NXDomain);
        let reply = answer_local(&query("a.vm.", RecordType::AAAA), &lookup()).unwrap();
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert!(reply.answers().is_empty());
        assert!(answer_local(&query("example.org.", RecordType::A), &lookup()).is_none());
    }

    #[test]
    fn only_the_vm_subnet_is_answered() {
        let clients: Ipv4Net = "172.30.232.0/24".parse().unwrap();
        assert!(allowed("172.30.232.1:5353".parse().unwrap(), clients));
        assert!(allowed("172.30.232.7:40000".parse().unwrap(), clients));
        for other in ["172.30.233.2:1", "10.0.0.9:1", "127.0.0.1:1", "[::1]:1"] {
            assert!(!allowed(other.parse().unwrap(), clients), "{other}");
        }
    }

    #[tokio::test]
    async fn a_query_from_outside_the_subnet_gets_no_answer() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        let clients: Ipv4Net = "127.0.0.2/32".parse().unwrap();
        let task = tokio::spawn(serve(socket, lookup(), vec![], clients));
        let ask = |from: &'static str| async move {
            let client = UdpSocket::bind(from).await.unwrap();
            let bytes = query("a.vm.", RecordType::A).to_vec().unwrap();
            client.send_to(&bytes, server).await.unwrap();
            let mut buf = [0u8; 512];
            tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf))
                .await
                .is_ok()
        };
        assert!(ask("127.0.0.2:0").await, "the subnet is answered");
        assert!(!ask("127.0.0.3:0").await, "others are not");
        task.abort();
    }

    #[test]
    fn upstreams_skip_ourselves() {
        let text = "# c\nnameserver 172.30.0.1\nnameserver 10.0.0.53\nsearch x\nnameserver ::1\n";
        let got = upstreams(text, Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(
            got,
            ["10.0.0.53:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }
}
