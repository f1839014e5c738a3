//! The cluster DNS address on the node: assigned to `lo` so pods' queries to it are delivered to this node's DNS
//! server (NodeLocal DNSCache puts its address on a dummy link the same way; `lo` serves where there is no dummy
//! link type).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use futures::TryStreamExt;
use tracing::info;

use super::DnsError;

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Whether `ip` is already an address of this namespace (a socket can bind to it).
fn is_local(ip: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0)).is_ok()
}

/// Adds `ip/32` to `lo` unless the namespace already has it. Returns whether it was added.
pub(crate) async fn ensure_on_loopback(ip: Ipv4Addr) -> Result<bool, DnsError> {
    if ip.is_unspecified() || is_local(ip) {
        return Ok(false);
    }
    let err = |e: rtnetlink::Error| DnsError::Address {
        ip,
        message: e.to_string(),
    };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DnsError::Address {
        ip,
        message: format!("netlink socket: {e}"),
    })?;
    let conn = tokio::spawn(conn);
    let result = async {
        let lo = handle
            .link()
            .get()
            .match_name("lo".to_string())
            .execute()
            .try_next()
            .await
            .map_err(err)?
            .ok_or_else(|| DnsError::Address {
                ip,
                message: "no loopback link".into(),
            })?;
        match handle
            .address()
            .add(lo.header.index, IpAddr::V4(ip), 32)
            .execute()
            .await
        {
            Ok(()) => {
                info!(address = %ip, "cluster DNS address assigned to lo");
                Ok(true)
            }
            // Added concurrently (another proxy instance starting): fine.
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }
    .await;
    conn.abort();
    result
}

/// Removes `ip/32` from `lo` if it is there (`--cleanup`). Returns whether it was removed.
pub async fn remove_from_loopback(ip: Ipv4Addr) -> Result<bool, DnsError> {
    let err = |e: rtnetlink::Error| DnsError::Address {
        ip,
        message: e.to_string(),
    };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DnsError::Address {
        ip,
        message: format!("netlink socket: {e}"),
    })?;
    let conn = tokio::spawn(conn);
    let result = async {
        let Some(lo) = handle
            .link()
            .get()
            .match_name("lo".to_string())
            .execute()
            .try_next()
            .await
            .map_err(err)?
        else {
            return Ok(false);
        };
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(lo.header.index)
            .set_address_filter(IpAddr::V4(ip))
            .execute();
        let mut removed = false;
        while let Some(msg) = addrs.try_next().await.map_err(err)? {
            if msg.header.prefix_len != 32 {
                continue;
            }
            match handle.address().del(msg).execute().await {
                Ok(()) => removed = true,
                Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(removed)
    }
    .await;
    conn.abort();
    result
}
