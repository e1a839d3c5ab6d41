//! Link, address and route changes over rtnetlink. A netlink socket talks
//! to the namespace it was created in, so each call runs on a short-lived
//! thread that first enters the target namespace.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::io::AsRawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::ns::Netns;
use crate::NetError;

/// Runs `f` with a netlink handle bound to `ns` (or to the caller's own
/// namespace).
fn with_handle<T, F, Fut>(ns: Option<&Netns>, what: &str, f: F) -> Result<T, NetError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, rtnetlink::Error>>,
{
    let here = crate::ns::current()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            match ns {
                Some(ns) => ns.enter()?,
                // A scoped thread starts in the process's namespace, not
                // necessarily the caller thread's: follow the caller.
                None => crate::ns::enter_fd(&here, "of the caller")?,
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(NetError::io("starting a netlink runtime"))?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(NetError::io("opening a netlink socket"))?;
                tokio::spawn(conn);
                f(handle).await.map_err(|e| netlink_error(what, e))
            })
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn netlink_error(what: &str, e: rtnetlink::Error) -> NetError {
    let detail = match &e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(code) => std::io::Error::from_raw_os_error(-code.get()).to_string(),
            None => e.to_string(),
        },
        _ => e.to_string(),
    };
    if detail.contains("Operation not permitted") {
        return NetError::NotRoot {
            what: what.to_string(),
            hint: String::new(),
        };
    }
    NetError::Netlink {
        what: what.to_string(),
        detail,
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| -c.get()) == Some(errno))
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(m) => Ok(m.map(|m| m.header.index)),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn must_index(h: &Handle, name: &str) -> Result<u32, rtnetlink::Error> {
    index_of(h, name)
        .await?
        .ok_or_else(|| rtnetlink::Error::InvalidNla(format!("interface {name} is missing")))
}

/// Whether interface `name` exists in `ns`.
pub fn link_exists(ns: Option<&Netns>, name: &str) -> Result<bool, NetError> {
    let name = name.to_string();
    with_handle(
        ns,
        &format!("looking up interface {name}"),
        |h| async move { Ok(index_of(&h, &name).await?.is_some()) },
    )
}

/// Deletes interface `name` in `ns`; no error if it is already gone.
pub fn delete_link(ns: Option<&Netns>, name: &str) -> Result<(), NetError> {
    let name = name.to_string();
    with_handle(ns, &format!("deleting interface {name}"), |h| async move {
        if let Some(index) = index_of(&h, &name).await? {
            match h.link().del(index).execute().await {
                Err(e) if is_errno(&e, libc::ENODEV) => {}
                r => r?,
            }
        }
        Ok(())
    })
}

/// Brings `lo` up in `ns`.
pub fn loopback_up(ns: &Netns) -> Result<(), NetError> {
    set_link_up(Some(ns), "lo", true, "bringing lo up")
}

/// Takes interface `name` in `ns` down: the kernel drops what is written
/// to it and delivers nothing through it.
pub fn link_down(ns: Option<&Netns>, name: &str) -> Result<(), NetError> {
    set_link_up(ns, name, false, &format!("taking interface {name} down"))
}

/// Sets interface `name` in `ns` up or down; `what` names it in errors.
fn set_link_up(ns: Option<&Netns>, name: &str, up: bool, what: &str) -> Result<(), NetError> {
    let name = name.to_string();
    with_handle(ns, what, |h| async move {
        let index = must_index(&h, &name).await?;
        let link = LinkUnspec::new_with_index(index);
        let link = if up { link.up() } else { link.down() };
        h.link().set(link.build()).execute().await
    })
}

/// Gives interface `name` in `ns` an address, optionally a MAC address
/// first, and brings it up.
pub fn configure(
    ns: Option<&Netns>,
    name: &str,
    mac: Option<[u8; 6]>,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetError> {
    let name = name.to_string();
    with_handle(
        ns,
        &format!("configuring interface {name}"),
        |h| async move {
            let index = must_index(&h, &name).await?;
            if let Some(mac) = mac {
                h.link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .address(mac.to_vec())
                            .build(),
                    )
                    .execute()
                    .await?;
            }
            match h
                .address()
                .add(index, IpAddr::V4(addr), prefix)
                .execute()
                .await
            {
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                r => r?,
            }
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
        },
    )
}

/// Writes `addr`'s neighbour entry on interface `name` in `ns`: `mac`,
/// in state `stale`, marked `proto static` (so `ip neigh` tells it from
/// one the kernel learnt). A stale entry is used at once, and the kernel
/// confirms it afterwards as it would any other (traffic that is
/// answered confirms it; otherwise a unicast probe, then ARP again), so a
/// guest that changes its MAC is found again. Without it, the first
/// packet to a guest that has just resumed or arrived waits for the
/// guest's ARP answer.
pub fn add_neighbour(
    ns: Option<&Netns>,
    name: &str,
    addr: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(), NetError> {
    let name = name.to_string();
    with_handle(
        ns,
        &format!("writing {addr}'s neighbour entry on {name}"),
        |h| async move {
            let index = must_index(&h, &name).await?;
            let mut add = h
                .neighbours()
                .add(index, IpAddr::V4(addr))
                .link_layer_address(&mac)
                .state(NeighbourState::Stale)
                .replace();
            add.message_mut()
                .attributes
                .push(NeighbourAttribute::Protocol(RouteProtocol::Static));
            add.execute().await
        },
    )
}

/// Creates the veth pair `host_name` (in the caller's namespace, with
/// `alias` as its description) and `ns_name` inside `ns`.
pub fn create_veth(
    host_name: &str,
    alias: &str,
    ns: &Netns,
    ns_name: &str,
) -> Result<(), NetError> {
    // Both ends start here under unique names; the peer then moves and is
    // renamed inside the namespace (its final name may exist here).
    let peer_tmp = format!("{host_name}p");
    let (host, alias_s, tmp) = (host_name.to_string(), alias.to_string(), peer_tmp.clone());
    let fd = ns.file().as_raw_fd();
    with_handle(
        None,
        &format!("creating veth pair {host_name}"),
        |h| async move {
            h.link()
                .add(LinkVeth::new(&host, &tmp).build())
                .execute()
                .await?;
            let host_index = must_index(&h, &host).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(host_index)
                        .alias(alias_s)
                        .build(),
                )
                .execute()
                .await?;
            let peer = must_index(&h, &tmp).await?;
            h.link()
                .set(LinkUnspec::new_with_index(peer).setns_by_fd(fd).build())
                .execute()
                .await
        },
    )?;
    let final_name = ns_name.to_string();
    with_handle(
        Some(ns),
        &format!("naming {ns_name} in {}", ns.name()),
        |h| async move {
            let peer = must_index(&h, &peer_tmp).await?;
            h.link()
                .set(LinkUnspec::new_with_index(peer).name(final_name).build())
                .execute()
                .await
        },
    )
}

/// Adds a default route via `gateway` in `ns`.
pub fn default_route(ns: &Netns, gateway: Ipv4Addr) -> Result<(), NetError> {
    with_handle(Some(ns), "adding the default route", |h| async move {
        match h
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
        {
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            r => r,
        }
    })
}

/// All IPv4 addresses in the caller's namespace.
pub fn host_addresses() -> Result<Vec<Ipv4Addr>, NetError> {
    with_handle(None, "listing addresses", |h| async move {
        let mut out = Vec::new();
        let mut stream = h.address().get().execute();
        while let Some(msg) = stream.try_next().await? {
            for attr in msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a)) = attr {
                    out.push(a);
                }
            }
        }
        Ok(out)
    })
}

/// The names and aliases of all interfaces in the caller's namespace.
pub fn host_links() -> Result<Vec<(String, Option<String>)>, NetError> {
    with_handle(None, "listing interfaces", |h| async move {
        let mut out = Vec::new();
        let mut stream = h.link().get().execute();
        while let Some(msg) = stream.try_next().await? {
            let mut name = None;
            let mut alias = None;
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::IfAlias(a) => alias = Some(a),
                    _ => {}
                }
            }
            if let Some(name) = name {
                out.push((name, alias));
            }
        }
        Ok(out)
    })
}
