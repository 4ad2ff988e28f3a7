//! Network namespaces for the Jepsen runner: one per node, so the nemesis can cut the links
//! between real `basaltd` processes.
//!
//! Layout of one [`Namespaces`] (all names carry a tag unique to this process and instance, so
//! concurrent runs never share anything):
//! - a *hub* namespace holding a bridge with the address [`CLIENT_IP`] (10.77.0.254/24);
//! - for node `i`, a namespace whose veth, 10.77.0.`i`/24, is a port of that bridge.
//!
//! The runner's clients join the hub ([`Namespaces::enter_hub`]), so they reach every node and
//! are never cut: a client may keep talking to a node on the minority side, which is exactly the
//! case where a deposed leader could serve a stale read.
//!
//! A cut between nodes `a` and `b` is a pair of `blackhole` routes, one in each node's namespace.
//! That is the one packet filter this kind of machine offers (it has no iptables and no tc
//! classifiers); its semantics differ from Jepsen's iptables DROP in one respect: a new connection
//! across the cut fails at once instead of timing out, while segments of an established
//! connection are dropped silently and only keepalive or a timeout notices. Healing deletes the
//! routes.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and the `ip` tool; [`Namespaces::create`] says
//! plainly when either is missing. Dropping a [`Namespaces`] deletes every namespace it made,
//! which also removes their interfaces and routes; a run killed before that leaves namespaces
//! named `basalt-<tag>-*`, which `ip netns del` removes.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use basalt_bench::local_cluster::NodeHosts;
use parking_lot::Mutex;

/// The address the runner's clients use, on the hub's bridge.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
/// Node ids that fit in the last octet of the subnet, below [`CLIENT_IP`].
const MAX_NODE_ID: u64 = 250;

#[derive(thiserror::Error, Debug)]
pub enum NetnsError {
    #[error(
        "network namespaces need root (CAP_NET_ADMIN): this process runs as uid {uid}; \
         run as root or leave partitions out of --faults"
    )]
    NotRoot { uid: u32 },
    #[error("`ip {args}` failed: {detail}")]
    Ip { args: String, detail: String },
    #[error("entering namespace {name}: {source}")]
    Enter {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node id {0} does not fit the namespace subnet (1 to {MAX_NODE_ID})")]
    NodeId(u64),
}

/// Whether this machine can run [`Namespaces`]: `Err` says why not (not root, no `ip`).
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(format!("network namespaces need root; this process runs as uid {uid}"));
    }
    match Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`ip -V` exited with {s}")),
        Err(e) => Err(format!("the `ip` tool (iproute2) cannot run: {e}")),
    }
}

/// The namespaces of one run; see the module documentation.
#[derive(Debug)]
pub struct Namespaces {
    tag: String,
    /// Node pairs cut now, each with the smaller id first. Behind a lock so the namespaces can be
    /// shared with the cluster that launches nodes in them.
    cuts: Mutex<BTreeSet<(u64, u64)>>,
    /// Namespaces created so far, deleted on drop (also after a failed `create`).
    created: Vec<String>,
}

impl Namespaces {
    /// Creates the hub and one namespace per node, wired as the module documentation describes.
    pub fn create(nodes: &[u64]) -> Result<Self, NetnsError> {
        if let Some(&bad) = nodes.iter().find(|&&id| id == 0 || id > MAX_NODE_ID) {
            return Err(NetnsError::NodeId(bad));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(NetnsError::NotRoot { uid });
        }
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        // Interface names are limited to 15 bytes: the tag stays short.
        let tag = format!(
            "b{:x}{}",
            std::process::id() % 0x10_0000,
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let mut ns = Namespaces {
            tag,
            cuts: Mutex::new(BTreeSet::new()),
            created: Vec::new(),
        };
        let hub = ns.hub();
        ns.add_namespace(&hub)?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        for &id in nodes {
            let name = ns.node_namespace(id);
            ns.add_namespace(&name)?;
            let (inner, outer) = (format!("{}n{id}", ns.tag), format!("{}h{id}", ns.tag));
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer])?;
            ip(&["link", "set", &inner, "netns", &name])?;
            ip(&["link", "set", &outer, "netns", &hub])?;
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", node_ip(id)),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &name, "link", "set", &inner, "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    /// Moves the calling thread into the hub namespace. Threads it starts afterwards (a tokio
    /// runtime's workers, for instance) are born there too; sockets follow the namespace of the
    /// thread that creates them.
    pub fn enter_hub(&self) -> Result<(), NetnsError> {
        enter(&self.hub())
    }

    /// Cuts every link between a node of `a` and a node of `b`, in both directions.
    pub fn cut(&self, pairs: &[(u64, u64)]) -> Result<(), NetnsError> {
        let mut cuts = self.cuts.lock();
        for &(a, b) in pairs {
            let pair = (a.min(b), a.max(b));
            if pair.0 == pair.1 || !cuts.insert(pair) {
                continue;
            }
            for (from, to) in [(pair.0, pair.1), (pair.1, pair.0)] {
                let dest = format!("{}/32", node_ip(to));
                ip(&["-n", &self.node_namespace(from), "route", "add", "blackhole", &dest])?;
            }
        }
        Ok(())
    }

    /// Restores every cut link.
    pub fn heal(&self) -> Result<(), NetnsError> {
        let mut cuts = self.cuts.lock();
        for (a, b) in std::mem::take(&mut *cuts) {
            for (from, to) in [(a, b), (b, a)] {
                let dest = format!("{}/32", node_ip(to));
                ip(&["-n", &self.node_namespace(from), "route", "del", "blackhole", &dest])?;
            }
        }
        Ok(())
    }

    fn hub(&self) -> String {
        format!("basalt-{}-hub", self.tag)
    }

    fn node_namespace(&self, id: u64) -> String {
        format!("basalt-{}-n{id}", self.tag)
    }

    fn add_namespace(&mut self, name: &str) -> Result<(), NetnsError> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        Ok(())
    }
}

impl NodeHosts for Namespaces {
    fn ip(&self, id: u64) -> IpAddr {
        IpAddr::V4(node_ip(id))
    }

    fn command(&self, id: u64, program: &Path) -> Command {
        // `ip netns exec` enters the namespace and execs the program in place: the child's pid
        // is the node's, so the nemesis' signals reach it.
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(self.node_namespace(id)).arg(program);
        c
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.created.drain(..).rev() {
            // Deleting a namespace drops its interfaces (and so the veth peers) and routes; an
            // error here leaves a namespace behind, which is all that can go wrong and is named
            // in the module documentation.
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Moves the calling thread into the named network namespace.
fn enter(name: &str) -> Result<(), NetnsError> {
    let fail = |source| NetnsError::Enter {
        name: name.to_string(),
        source,
    };
    let file = File::open(Path::new("/run/netns").join(name)).map_err(fail)?;
    // SAFETY: the descriptor is open for the duration of the call; CLONE_NEWNET asks the kernel
    // to check that it refers to a network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn node_ip(id: u64) -> Ipv4Addr {
    // `create` checked that every id fits in the last octet.
    Ipv4Addr::new(10, 77, 0, id as u8)
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let fail = |detail: String| NetnsError::Ip {
        args: args.join(" "),
        detail,
    };
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run `ip` (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    /// Connects from a fresh thread in namespace `from` and reads one byte: true if it arrived.
    fn reaches(from: String, to: SocketAddr) -> bool {
        std::thread::spawn(move || {
            enter(&from).expect("enter the namespace");
            let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("set a timeout");
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(1))
        })
        .join()
        .expect("the probe thread does not panic")
    }

    #[test]
    fn a_cut_separates_two_nodes_but_not_the_clients_and_heal_restores_it() {
        if let Err(why) = available() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        let ns = Namespaces::create(&[1, 2]).expect("create namespaces");
        let server = SocketAddr::new(ns.ip(2), 7000);
        let node2 = ns.node_namespace(2);
        let listener = std::thread::spawn(move || {
            enter(&node2).expect("enter node 2");
            let l = TcpListener::bind(server).expect("bind in node 2");
            // Three probes succeed (before, from the hub during the cut, after healing); a
            // probe across the cut never connects.
            for _ in 0..3 {
                let (mut s, _) = l.accept().expect("accept");
                s.write_all(b"x").expect("answer");
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            reaches(ns.node_namespace(1), server),
            "node 1 reaches node 2 before any cut"
        );
        ns.cut(&[(1, 2)]).expect("cut");
        assert!(
            !reaches(ns.node_namespace(1), server),
            "the cut stops node 1 reaching node 2"
        );
        assert!(reaches(ns.hub(), server), "clients on the hub still reach node 2");
        ns.heal().expect("heal");
        assert!(reaches(ns.node_namespace(1), server), "healing restores the link");
        listener.join().expect("the listener thread ends");
    }

    #[test]
    fn ids_outside_the_subnet_are_refused() {
        assert!(matches!(Namespaces::create(&[1, 251]), Err(NetnsError::NodeId(251))));
    }
}
