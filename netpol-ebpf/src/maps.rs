//! Every map of the datapath. Pinned by name, so the agent can adopt them across restarts and
//! enforcement outlives the agent process. Names and layouts come from `netpol-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use netpol_common::{
    capacity,
    ct::{CtKey, CtValue},
    CidrKey, CidrValue, ClassValue, Config, Counter, EndpointInfo, FragKey, FragValue, IpcacheKey,
    IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue, COUNTER_SLOTS,
};

/// ifindex of a pod's host-side interface -> the pod's classes and flags.
#[map(name = "NP_ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Address -> identity (pods, the node's own addresses).
#[map(name = "NP_IPCACHE")]
pub static IPCACHE: HashMap<IpcacheKey, IpcacheValue> = HashMap::pinned(capacity::IPCACHE, 0);

/// (class, address prefix) -> CIDR set, for ipBlock peers.
#[map(name = "NP_CIDR")]
pub static CIDR: LpmTrie<CidrKey, CidrValue> = LpmTrie::pinned(capacity::CIDR, 0);

/// Class -> the kinds of entry it has, so only lookups that can match are made.
#[map(name = "NP_CLASSES")]
pub static CLASSES: HashMap<u32, ClassValue> = HashMap::pinned(capacity::CLASSES, 0);

/// (class, peer, protocol, port | 0 for every port) -> allowed; protocol 0: every protocol.
#[map(name = "NP_POLICY")]
pub static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(capacity::POLICY, 0);

/// (class, peer, protocol, port prefix) -> allowed: port ranges.
#[map(name = "NP_PORT_RANGES")]
pub static PORT_RANGES: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::PORT_RANGES, 0);

/// (ClusterIP, port, protocol) -> the Service port's identity, for egress before DNAT.
#[map(name = "NP_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

/// Fragmented datagrams whose first fragment was passed, per endpoint.
#[map(name = "NP_FRAGS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Tracked flows per endpoint.
#[map(name = "NP_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// How the agent set the datapath up (one entry).
#[map(name = "NP_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Packets and bytes per (direction, reason).
#[map(name = "NP_COUNTERS")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
