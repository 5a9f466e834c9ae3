//! The contract between the netpol eBPF programs and the agent: map names, the layout of every
//! map key and value, reserved identities, and the reasons a packet is passed or dropped.
//!
//! Owns only plain data. Every map type is `#[repr(C)]` with explicit padding, holds no `bool`,
//! enum or `Option`, and has a compile-time size assertion so the two sides cannot drift apart.
//! Addresses and ports stay in network byte order; IPv4 addresses are stored IPv4-mapped
//! (`::ffff:a.b.c.d`) so one 16-byte layout serves both families.
#![no_std]

pub mod ct;
pub mod reason;

pub use reason::{Direction, Reason};

/// Names of the maps, as the kernel sees them (at most 15 characters) and as pinned under
/// `<pin-dir>/maps/`.
pub mod map_name {
    pub const ENDPOINTS: &str = "NP_ENDPOINTS";
    pub const IPCACHE: &str = "NP_IPCACHE";
    pub const CIDR: &str = "NP_CIDR";
    pub const POLICY: &str = "NP_POLICY";
    pub const PORT_RANGES: &str = "NP_PORT_RANGES";
    pub const CLASSES: &str = "NP_CLASSES";
    pub const CONNTRACK: &str = "NP_CT";
    pub const COUNTERS: &str = "NP_COUNTERS";
    pub const SERVICES: &str = "NP_SERVICES";
    pub const FRAGMENTS: &str = "NP_FRAGS";
    pub const CONFIG: &str = "NP_CONFIG";
    /// Every map the agent owns, in the order `dump` and `reset` walk them.
    pub const ALL: [&str; 11] = [
        ENDPOINTS,
        IPCACHE,
        CIDR,
        POLICY,
        PORT_RANGES,
        CLASSES,
        SERVICES,
        CONNTRACK,
        FRAGMENTS,
        COUNTERS,
        CONFIG,
    ];
}

/// Names of the two classifiers. From the pod's point of view: `pod_egress` runs on the TC
/// ingress hook of the pod's host-side veth (packets leaving the pod), `pod_ingress` on its TC
/// egress hook (packets delivered to the pod).
pub mod prog_name {
    pub const POD_EGRESS: &str = "pod_egress";
    pub const POD_INGRESS: &str = "pod_ingress";
    /// Returns "next" and nothing else: the baseline of the per-packet benchmarks.
    pub const NOOP: &str = "np_noop";
}

/// Default capacities. The agent may size maps differently (`max_entries` is set at load time).
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    pub const IPCACHE: u32 = 65536;
    pub const CIDR: u32 = 65536;
    pub const POLICY: u32 = 262144;
    pub const PORT_RANGES: u32 = 65536;
    pub const CLASSES: u32 = 65536;
    pub const CONNTRACK: u32 = 262144;
    pub const SERVICES: u32 = 65536;
    /// Datagrams in flight in fragments; an LRU, so a flood only evicts old ones.
    pub const FRAGMENTS: u32 = 8192;
}

/// Identities name the peer of a packet. Pods get one per distinct (namespace, labels, named
/// ports); the values below are reserved.
pub mod identity {
    /// In a policy key: any peer at all (a rule without `from`/`to`). Never assigned.
    pub const ANY: u32 = 0;
    /// An address of the node the pod runs on.
    pub const HOST: u32 = 1;
    /// An address with no entry in the ipcache: outside the cluster's pods.
    pub const WORLD: u32 = 2;
    /// The first identity handed to a label set.
    pub const FIRST_POD: u32 = 256;
    /// Identities at and above this value (and below `FIRST_CIDR_SET`) are Service ports: a
    /// pod's egress to a ClusterIP is judged by the Service's backends (see `ServiceKey`).
    pub const FIRST_SERVICE: u32 = 0x4000_0000;
    /// Identities at and above this value are per-class CIDR sets (see [`super::CidrValue`]).
    pub const FIRST_CIDR_SET: u32 = 0x8000_0000;
}

/// Endpoint flags.
pub mod endpoint_flag {
    /// Ingress to the pod is isolated: only what `NP_POLICY` allows gets in.
    pub const ISOLATED_INGRESS: u32 = 1 << 0;
    /// Egress from the pod is isolated.
    pub const ISOLATED_EGRESS: u32 = 1 << 1;
    pub const HAS_IPV4: u32 = 1 << 2;
    pub const HAS_IPV6: u32 = 1 << 3;
}

/// An IPv6 address, or an IPv4 address mapped into IPv6, in network byte order.
pub type Addr = [u8; 16];

/// Maps an IPv4 address (network order) into the shared 16-byte layout.
pub const fn ipv4_mapped(v4: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Bits an IPv4 prefix is offset by inside the mapped layout.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

/// `NP_ENDPOINTS` value, keyed by the ifindex (u32) of the pod's host-side interface.
/// A packet on an interface that carries our program but has no entry is dropped: fail closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Policy class checked for packets delivered to the pod.
    pub ingress_class: u32,
    /// Policy class checked for packets leaving the pod.
    pub egress_class: u32,
    /// `endpoint_flag` bits.
    pub flags: u32,
    /// The pod's own identity.
    pub identity: u32,
    /// The pod's IPv4 address (mapped) and IPv6 address, for anti-spoofing.
    pub ipv4: Addr,
    pub ipv6: Addr,
}

/// `NP_IPCACHE` key: one pod or node address (a hash map: every entry is a whole address, so a
/// lookup costs the same at 10 entries as at 100,000).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    pub addr: Addr,
}

/// `NP_IPCACHE` value: which identity an address belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    pub _pad: u32,
}

/// `NP_CIDR` key data: ipBlock peers of one policy class. Field order matters for the LPM:
/// the class is always matched whole (32 bits), then `prefix_len - 32` bits of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    /// Class id in network byte order, so the key's bytes read as the numbers do.
    pub class: [u8; 4],
    pub addr: Addr,
}

/// `NP_CIDR` value: the CIDR set (an identity `>= FIRST_CIDR_SET`) of the longest matching
/// prefix. A set stands for every ipBlock rule that allows that prefix (its `except`s included),
/// so the longest match alone carries all that broader rules allow there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrValue {
    pub set: u32,
    pub _pad: u32,
}

/// `NP_POLICY` key (a hash map) and `NP_PORT_RANGES` key data (an LPM trie).
///
/// `NP_POLICY` holds the entries every lookup costs the same for: a whole port (`port != 0`),
/// every port of a protocol (`port == 0`), every protocol (`proto == 0`, `port == 0`).
/// `NP_PORT_RANGES` holds the rest, port ranges stored as a few aligned prefixes; there the
/// field order matters: class and peer are always matched whole (64 bits), then the protocol
/// (8 bits), then `prefix_len - 72` bits of the port (see [`policy_prefix`]). The datapath tries
/// the most specific first (whole port, range, every port, every protocol), which is what one
/// longest-prefix match over all of them would answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Class id, network byte order.
    pub class: [u8; 4],
    /// Peer identity, CIDR set or `identity::ANY`, network byte order.
    pub peer: [u8; 4],
    /// IP protocol number.
    pub proto: u8,
    /// Destination port, network byte order.
    pub port: [u8; 2],
    pub _pad: u8,
}

/// Prefix lengths of policy keys, in the LPM sense: how much of the key an entry matches. The
/// agent keeps every entry in this form and stores it in `NP_POLICY` or `NP_PORT_RANGES`.
pub mod policy_prefix {
    /// Class and peer: every protocol and port.
    pub const ANY_PROTO: u32 = 64;
    /// Class, peer and protocol: every port.
    pub const ANY_PORT: u32 = 72;
    /// Class, peer, protocol and the whole port.
    pub const EXACT: u32 = 88;

    /// Whether the entry `(prefix_len, port)` is stored in the hash map `NP_POLICY` (a whole
    /// port other than 0, every port, every protocol) rather than in `NP_PORT_RANGES`. Port 0
    /// stays in the trie: in the hash it would read as "every port".
    pub const fn hashed(prefix_len: u32, port: [u8; 2]) -> bool {
        match prefix_len {
            ANY_PROTO | ANY_PORT => true,
            EXACT => port[0] != 0 || port[1] != 0,
            _ => false,
        }
    }
}

/// `NP_POLICY` value: the rule set that allowed the entry (for attribution in `dump`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub rule_set: u32,
    pub _pad: u32,
}

/// Which kinds of policy entry a class has, in `ClassValue::shapes`: the datapath makes only
/// the lookups that can match, so a new connection costs a fixed number of hash lookups
/// however many rules there are. A class with no `NP_CLASSES` entry allows nothing.
pub mod class_shape {
    /// `NP_POLICY` entries for a whole port.
    pub const PORT: u32 = 1 << 0;
    /// `NP_PORT_RANGES` entries.
    pub const PORT_RANGE: u32 = 1 << 1;
    /// `NP_POLICY` entries for every port of a protocol.
    pub const ANY_PORT: u32 = 1 << 2;
    /// `NP_POLICY` entries for every protocol.
    pub const ANY_PROTO: u32 = 1 << 3;
    /// Entries whose peer is `identity::ANY`.
    pub const ANY_PEER: u32 = 1 << 4;
    /// `NP_CIDR` entries (ipBlock peers).
    pub const CIDR: u32 = 1 << 5;
}

/// `NP_CLASSES` key: a class id (u32). Value: its `class_shape` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClassValue {
    pub shapes: u32,
    pub _pad: u32,
}

/// `NP_SERVICES` key: a Service's ClusterIP, port and protocol as a pod's packet carries them
/// before kube-proxy's DNAT (which runs after the pod veth's TC ingress hook).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Service port, network byte order.
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// `NP_SERVICES` value: the identity of the Service port. Egress policy entries for it say
/// which classes may reach every ready backend of that port on its target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    pub identity: u32,
    pub _pad: u32,
}

/// `NP_FRAGS` key: one fragmented datagram at one endpoint, as IP identifies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub ifindex: u32,
    /// The IPv4 identification (16 bits) or IPv6 fragment identification (32 bits).
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub saddr: Addr,
    pub daddr: Addr,
}

/// `NP_FRAGS` value: set when the first fragment passed; later fragments pass until `expires`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    /// `bpf_ktime_get_ns()` after which the entry is dead.
    pub expires: u64,
}

/// `NP_COUNTERS` slot: per-CPU packets and bytes for one (direction, reason).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// `NP_CONFIG`'s one value (an array of 1): how the agent set the datapath up. All zero, as a
/// new map is before the agent writes it, is the conservative setting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// 1: BPF host routing between the node's pods (`--host-routing bpf`); 0: the node's IP
    /// stack carries every packet.
    pub host_routing: u32,
    pub _pad: u32,
}

/// Index of a (direction, reason) counter in `NP_COUNTERS`.
pub const fn counter_index(dir: Direction, reason: Reason) -> u32 {
    (dir as u32) * Reason::SLOTS + reason as u32
}

/// Number of slots in `NP_COUNTERS`.
pub const COUNTER_SLOTS: u32 = 2 * Reason::SLOTS;

const _: () = {
    assert!(core::mem::size_of::<EndpointInfo>() == 48);
    assert!(core::mem::size_of::<IpcacheKey>() == 16);
    assert!(core::mem::size_of::<IpcacheValue>() == 8);
    assert!(core::mem::size_of::<CidrKey>() == 20);
    assert!(core::mem::size_of::<CidrValue>() == 8);
    assert!(core::mem::size_of::<PolicyKey>() == 12);
    assert!(core::mem::size_of::<PolicyValue>() == 8);
    assert!(core::mem::size_of::<ClassValue>() == 8);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<Config>() == 8);
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 8);
    assert!(core::mem::size_of::<FragKey>() == 44);
    assert!(core::mem::size_of::<FragValue>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for CidrValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for ClassValue {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for ct::CtKey {}
    unsafe impl aya::Pod for ct::CtValue {}
}
