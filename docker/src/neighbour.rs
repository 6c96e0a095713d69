//! This host's neighbour table (ARP) kept true for the local engine's containers as they stop
//! and start, the way gratuitous ARP from the containers would (Docker's engine sends none
//! before version 25).
//!
//! Why: a container's address outlives it in the bridge's neighbour table, and the engine
//! publishes a new container's ports before its network is up. A client that connects in between
//! (a browser polling a service while it is redeployed, the port proxy dialling through) either
//! sends its SYN to the old entry, where nobody takes it, and waits out TCP's first retransmit (a
//! second); or makes the kernel ask for the address while nobody can answer, and waits for the
//! next ask (`retrans_time_ms`, a second by default). So when a container of the local engine
//! stops, skiff forgets its addresses ([`forget`]): a packet for them then waits in the kernel
//! for the address to be known. Once a container has started, skiff writes what the engine says
//! its addresses are as `STALE` ([`announce`], the state an ARP from the container would leave):
//! the waiting packets go at once, and the kernel confirms the address itself on the next use.
//!
//! Only for the local engine, only on an interface of this host whose network holds the
//! container's address, and only where skiff may (CAP_NET_ADMIN): elsewhere nothing changes.

use std::net::Ipv4Addr;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// A container's address on one of its networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

impl Endpoint {
    /// From the engine's `IPAddress` and `MacAddress` texts; None when either is missing or
    /// malformed (a container on the host's network has neither).
    pub fn parse(ip: &str, mac: &str) -> Option<Self> {
        let ip = ip.parse().ok()?;
        let mut bytes = [0u8; 6];
        let mut parts = mac.split(':');
        for b in &mut bytes {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Self { ip, mac: bytes })
    }
}

/// Why an endpoint was not announced.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("no interface of this host is on {0}'s network")]
    NoInterface(Ipv4Addr),
    #[error("netlink: {0}")]
    Netlink(#[from] nix::Error),
    #[error("the kernel refused the neighbour entry: {0}")]
    Refused(nix::Error),
}

/// The index of this host's interface whose IPv4 network holds `ip`.
fn interface_for(ip: Ipv4Addr) -> Result<u32, AnnounceError> {
    let want = u32::from(ip);
    for a in nix::ifaddrs::getifaddrs()? {
        let (Some(addr), Some(mask)) = (
            a.address.as_ref().and_then(|s| s.as_sockaddr_in()),
            a.netmask.as_ref().and_then(|s| s.as_sockaddr_in()),
        ) else {
            continue;
        };
        let (addr, mask) = (u32::from(addr.ip()), u32::from(mask.ip()));
        // A host address (/32) or the container's own address would be no network to share.
        if mask == u32::MAX || addr == want {
            continue;
        }
        if addr & mask == want & mask {
            return Ok(nix::net::if_::if_nametoindex(a.interface_name.as_str())?);
        }
    }
    Err(AnnounceError::NoInterface(ip))
}

/// One acknowledged neighbour request for `ip` on interface `index`: with a link-layer address,
/// `RTM_NEWNEIGH` making the entry `STALE` (created or replaced); without, `RTM_DELNEIGH`.
fn neighbour_message(index: u32, ip: Ipv4Addr, mac: Option<&[u8; 6]>) -> Vec<u8> {
    const NLMSG_HDR: usize = 16;
    const NDMSG: usize = 12;
    let dst_attr: usize = 4 + 4;
    let lladdr_attr: usize = 4 + 6;
    let len = NLMSG_HDR + NDMSG + dst_attr + mac.map_or(0, |_| lladdr_attr.next_multiple_of(4));
    let (kind, flags, state) = match mac {
        Some(_) => (
            libc::RTM_NEWNEIGH,
            libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
            libc::NUD_STALE,
        ),
        None => (libc::RTM_DELNEIGH, libc::NLM_F_REQUEST | libc::NLM_F_ACK, 0),
    };
    let mut m = Vec::with_capacity(len);
    // struct nlmsghdr
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(flags as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    // struct ndmsg
    m.push(libc::AF_INET as u8);
    m.extend_from_slice(&[0, 0, 0]); // padding
    m.extend_from_slice(&(index as i32).to_ne_bytes());
    m.extend_from_slice(&state.to_ne_bytes());
    m.push(0); // flags
    m.push(0); // type
    // NDA_DST
    m.extend_from_slice(&(dst_attr as u16).to_ne_bytes());
    m.extend_from_slice(&libc::NDA_DST.to_ne_bytes());
    m.extend_from_slice(&ip.octets());
    if let Some(mac) = mac {
        // NDA_LLADDR, padded to 4 bytes
        m.extend_from_slice(&(lladdr_attr as u16).to_ne_bytes());
        m.extend_from_slice(&libc::NDA_LLADDR.to_ne_bytes());
        m.extend_from_slice(mac);
    }
    m.resize(len, 0);
    m
}

/// Sends one request to the kernel's routing socket and reads its acknowledgement. A blocking
/// call of a few microseconds.
fn request(message: &[u8]) -> Result<(), AnnounceError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    sendto(raw, message, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    // The acknowledgement: an NLMSG_ERROR whose error is 0, or the negated errno.
    let mut reply = [0u8; 256];
    let n = recv(raw, &mut reply, MsgFlags::empty())?;
    let kind = reply.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    if n >= 20 && kind == Some(libc::NLMSG_ERROR as u16) {
        let code = reply
            .get(16..20)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, i32::from_ne_bytes);
        if code != 0 {
            return Err(AnnounceError::Refused(nix::Error::from_raw(-code)));
        }
    }
    Ok(())
}

/// Writes `e` into the neighbour table of this host's interface on its network, as `STALE`.
pub fn announce(e: &Endpoint) -> Result<(), AnnounceError> {
    request(&neighbour_message(interface_for(e.ip)?, e.ip, Some(&e.mac)))
}

/// Forgets what this host's kernel knows of a container's address that is going away (the
/// container stops): a packet sent to that address before a new container answers on it then
/// waits for the address to be asked for (and announced) instead of going to a port that is not
/// there yet and being lost, which costs a TCP connection a second (its first retransmit). No
/// entry to forget is no error.
pub fn forget(ip: Ipv4Addr) -> Result<(), AnnounceError> {
    match request(&neighbour_message(interface_for(ip)?, ip, None)) {
        Err(AnnounceError::Refused(nix::Error::ENOENT)) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_from_the_engines_texts() {
        let e = Endpoint::parse("172.17.0.2", "02:42:ac:11:00:02").expect("parses");
        assert_eq!(e.ip, Ipv4Addr::new(172, 17, 0, 2));
        assert_eq!(e.mac, [2, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(Endpoint::parse("", ""), None);
        assert_eq!(Endpoint::parse("172.17.0.2", ""), None);
        assert_eq!(Endpoint::parse("172.17.0.2", "02:42:ac:11:00"), None);
        assert_eq!(Endpoint::parse("172.17.0.2", "02:42:ac:11:00:02:03"), None);
        assert_eq!(Endpoint::parse("fe80::1", "02:42:ac:11:00:02"), None);
    }

    #[test]
    fn the_request_is_laid_out_as_the_kernel_reads_it() {
        let e = Endpoint::parse("10.1.2.3", "aa:bb:cc:dd:ee:ff").expect("parses");
        let m = neighbour_message(7, e.ip, Some(&e.mac));
        assert_eq!(m.len(), 16 + 12 + 8 + 12);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().expect("4")),
            m.len() as u32
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), libc::RTM_NEWNEIGH);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().expect("4")), 7);
        assert_eq!(u16::from_ne_bytes([m[24], m[25]]), libc::NUD_STALE);
        assert_eq!(&m[32..36], &[10, 1, 2, 3]);
        assert_eq!(&m[40..46], &[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        let d = neighbour_message(7, e.ip, None);
        assert_eq!(d.len(), 16 + 12 + 8);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), libc::RTM_DELNEIGH);
        assert_eq!(&d[32..36], &[10, 1, 2, 3]);
    }
}
