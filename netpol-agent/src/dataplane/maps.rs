//! Reading and writing the pinned maps. Opened from their pins, so the same code serves the
//! agent that just loaded the programs and `dump`, which loads nothing.

use std::collections::BTreeMap;

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, MapError, PerCpuArray,
};
use netpol_common::{
    counter_index,
    ct::{CtKey, CtValue},
    map_name, policy_prefix, ClassValue, Config, Counter, Direction, EndpointInfo, FragKey,
    FragValue, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, Reason, ServiceKey, ServiceValue,
};

use super::{DataplaneError, PinDir};
use crate::policy::desired::{MapContents, MapDiff};

fn map_err(pins: &PinDir, name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    let path = pins.map(name);
    move |source| DataplaneError::Map {
        name,
        path: path.clone(),
        source: Box::new(source),
    }
}

fn open(pins: &PinDir, name: &'static str) -> Result<Map, DataplaneError> {
    let err = map_err(pins, name);
    let data = MapData::from_pin(pins.map(name)).map_err(&err)?;
    Map::from_map_data(data).map_err(err)
}

fn hash<K: aya::Pod, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DataplaneError> {
    HashMap::try_from(open(pins, name)?).map_err(map_err(pins, name))
}

fn lpm<K: aya::Pod, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<LpmTrie<MapData, K, V>, DataplaneError> {
    LpmTrie::try_from(open(pins, name)?).map_err(map_err(pins, name))
}

fn read_lpm<K: aya::Pod + Ord, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<BTreeMap<(u32, K), V>, DataplaneError> {
    let map = lpm::<K, V>(pins, name)?;
    map.iter()
        .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
        .collect::<Result<_, _>>()
        .map_err(map_err(pins, name))
}

fn read_hash<K: aya::Pod + Ord, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<BTreeMap<K, V>, DataplaneError> {
    hash::<K, V>(pins, name)?
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(pins, name))
}

/// The LPM form of an `NP_POLICY` key: a zero protocol is every protocol, a zero port every
/// port (the inverse of the split `policy_prefix::hashed` makes).
fn hashed_policy_prefix(key: &PolicyKey) -> u32 {
    if key.proto == 0 {
        policy_prefix::ANY_PROTO
    } else if key.port == [0, 0] {
        policy_prefix::ANY_PORT
    } else {
        policy_prefix::EXACT
    }
}

/// What the agent-written maps hold now.
pub fn read(pins: &PinDir) -> Result<MapContents, DataplaneError> {
    let mut policy: BTreeMap<(u32, PolicyKey), PolicyValue> =
        read_lpm(pins, map_name::PORT_RANGES)?;
    let hashed = read_hash::<PolicyKey, PolicyValue>(pins, map_name::POLICY)?;
    policy.extend(
        hashed
            .into_iter()
            .map(|(key, value)| ((hashed_policy_prefix(&key), key), value)),
    );
    Ok(MapContents {
        endpoints: read_hash(pins, map_name::ENDPOINTS)?,
        ipcache: read_hash::<IpcacheKey, IpcacheValue>(pins, map_name::IPCACHE)?,
        cidr: read_lpm(pins, map_name::CIDR)?,
        policy,
        classes: read_hash::<u32, ClassValue>(pins, map_name::CLASSES)?,
        services: read_hash::<ServiceKey, ServiceValue>(pins, map_name::SERVICES)?,
    })
}

/// Policy entries by the map that holds them: `(NP_POLICY, NP_PORT_RANGES)`.
type SplitPolicy = (
    BTreeMap<PolicyKey, PolicyValue>,
    BTreeMap<(u32, PolicyKey), PolicyValue>,
);

fn split_policy(entries: &BTreeMap<(u32, PolicyKey), PolicyValue>) -> SplitPolicy {
    let (mut hashed, mut ranges) = (BTreeMap::new(), BTreeMap::new());
    for (&(prefix, key), &value) in entries {
        if policy_prefix::hashed(prefix, key.port) {
            hashed.insert(key, value);
        } else {
            ranges.insert((prefix, key), value);
        }
    }
    (hashed, ranges)
}

fn write_hash<K: aya::Pod + Ord, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
    upsert: &BTreeMap<K, V>,
    remove: Option<&BTreeMap<K, V>>,
) -> Result<(), DataplaneError> {
    if upsert.is_empty() && remove.is_none_or(BTreeMap::is_empty) {
        return Ok(());
    }
    let mut map = hash::<K, V>(pins, name)?;
    let err = map_err(pins, name);
    for (key, value) in upsert {
        map.insert(key, value, 0).map_err(&err)?;
    }
    for key in remove.into_iter().flat_map(BTreeMap::keys) {
        map.remove(key).map_err(&err)?;
    }
    Ok(())
}

fn write_lpm<K: aya::Pod + Ord, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
    upsert: &BTreeMap<(u32, K), V>,
    remove: Option<&BTreeMap<(u32, K), V>>,
) -> Result<(), DataplaneError> {
    if upsert.is_empty() && remove.is_none_or(BTreeMap::is_empty) {
        return Ok(());
    }
    let mut map = lpm::<K, V>(pins, name)?;
    let err = map_err(pins, name);
    for ((prefix, data), value) in upsert {
        map.insert(&Key::new(*prefix, *data), *value, 0)
            .map_err(&err)?;
    }
    for (prefix, data) in remove.into_iter().flat_map(BTreeMap::keys) {
        map.remove(&Key::new(*prefix, *data)).map_err(&err)?;
    }
    Ok(())
}

/// When several endpoints change at once, each is first closed (isolated both ways with class
/// 0, which no entry names: new flows are denied, tracked ones carry on), and only then given
/// its new value. Endpoint writes are one at a time; without this, one endpoint's new rules
/// could meet another's old ones (a's new open egress with c's old ingress that admitted a)
/// and pass a flow that neither the old nor the new policy allows.
fn close_changing_endpoints(
    pins: &PinDir,
    upsert: &BTreeMap<u32, EndpointInfo>,
) -> Result<(), DataplaneError> {
    use netpol_common::endpoint_flag::{ISOLATED_EGRESS, ISOLATED_INGRESS};
    if upsert.len() < 2 {
        return Ok(());
    }
    let err = map_err(pins, map_name::ENDPOINTS);
    let mut map = hash::<u32, EndpointInfo>(pins, map_name::ENDPOINTS)?;
    for (ifindex, new) in upsert {
        match map.get(ifindex, 0) {
            Ok(old) if old != *new => {
                let closed = EndpointInfo {
                    flags: old.flags | ISOLATED_INGRESS | ISOLATED_EGRESS,
                    ingress_class: 0,
                    egress_class: 0,
                    ..old
                };
                map.insert(ifindex, closed, 0).map_err(&err)?;
            }
            Ok(_) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// Applies a diff make-before-break: first every new entry the endpoints will point at (and
/// the class shapes that make the datapath look them up), then the ipcache and endpoints, and
/// only then the removals. A packet never meets an endpoint whose class entries are missing
/// (which would deny what stays allowed); a shape written early can only deny early what is
/// being removed. Service addresses follow the same order: added after their policy entries,
/// removed before them.
pub fn write(pins: &PinDir, diff: &MapDiff) -> Result<(), DataplaneError> {
    let (up, rm) = (&diff.upsert, &diff.remove);
    let (up_hashed, up_ranges) = split_policy(&up.policy);
    let (rm_hashed, rm_ranges) = split_policy(&rm.policy);
    write_hash(pins, map_name::POLICY, &up_hashed, None)?;
    write_lpm(pins, map_name::PORT_RANGES, &up_ranges, None)?;
    write_lpm(pins, map_name::CIDR, &up.cidr, None)?;
    write_hash(pins, map_name::CLASSES, &up.classes, None)?;
    write_hash(pins, map_name::IPCACHE, &up.ipcache, None)?;
    write_hash(pins, map_name::SERVICES, &up.services, Some(&rm.services))?;
    close_changing_endpoints(pins, &up.endpoints)?;
    write_hash(
        pins,
        map_name::ENDPOINTS,
        &up.endpoints,
        Some(&rm.endpoints),
    )?;
    write_hash(pins, map_name::IPCACHE, &BTreeMap::new(), Some(&rm.ipcache))?;
    write_hash(pins, map_name::CLASSES, &BTreeMap::new(), Some(&rm.classes))?;
    write_lpm(pins, map_name::CIDR, &BTreeMap::new(), Some(&rm.cidr))?;
    write_lpm(
        pins,
        map_name::PORT_RANGES,
        &BTreeMap::new(),
        Some(&rm_ranges),
    )?;
    write_hash(pins, map_name::POLICY, &BTreeMap::new(), Some(&rm_hashed))?;
    Ok(())
}

/// Writes one endpoint's value (the CNI plugin closing a new pod's interface).
pub fn write_endpoint(
    pins: &PinDir,
    ifindex: u32,
    info: &EndpointInfo,
) -> Result<(), DataplaneError> {
    let mut map = hash::<u32, EndpointInfo>(pins, map_name::ENDPOINTS)?;
    map.insert(ifindex, info, 0)
        .map_err(map_err(pins, map_name::ENDPOINTS))
}

fn config_map(pins: &PinDir) -> Result<Array<MapData, Config>, DataplaneError> {
    Array::try_from(open(pins, map_name::CONFIG)?).map_err(map_err(pins, map_name::CONFIG))
}

/// How the datapath is set up (`NP_CONFIG`).
pub fn config(pins: &PinDir) -> Result<Config, DataplaneError> {
    config_map(pins)?
        .get(&0, 0)
        .map_err(map_err(pins, map_name::CONFIG))
}

pub fn write_config(pins: &PinDir, config: &Config) -> Result<(), DataplaneError> {
    config_map(pins)?
        .set(0, config, 0)
        .map_err(map_err(pins, map_name::CONFIG))
}

/// Packets and bytes per (direction, reason), summed over CPUs. Zero slots are left out.
pub fn counters(pins: &PinDir) -> Result<BTreeMap<(Direction, Reason), Counter>, DataplaneError> {
    let err = map_err(pins, map_name::COUNTERS);
    let map: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(open(pins, map_name::COUNTERS)?).map_err(&err)?;
    let mut out = BTreeMap::new();
    for dir in Direction::ALL {
        for reason in Reason::ALL {
            let per_cpu = map.get(&counter_index(dir, reason), 0).map_err(&err)?;
            let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            if total.packets > 0 {
                out.insert((dir, reason), total);
            }
        }
    }
    Ok(out)
}

/// Every conntrack entry.
pub fn conntrack(pins: &PinDir) -> Result<Vec<(CtKey, CtValue)>, DataplaneError> {
    let map: HashMap<MapData, CtKey, CtValue> = hash(pins, map_name::CONNTRACK)?;
    map.iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(pins, map_name::CONNTRACK))
}

/// Removes the conntrack entries `remove` picks and returns how many went. Keys are collected
/// first: deleting while walking a hash map can restart or skip the walk.
pub fn remove_conntrack(
    pins: &PinDir,
    remove: impl Fn(&CtKey, &CtValue) -> bool,
) -> Result<usize, DataplaneError> {
    let err = map_err(pins, map_name::CONNTRACK);
    let mut map: HashMap<MapData, CtKey, CtValue> = hash(pins, map_name::CONNTRACK)?;
    let doomed: Vec<CtKey> = map
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(k, v)| remove(k, v))
        .map(|(k, _)| k)
        .collect();
    let mut removed = 0;
    for key in &doomed {
        match map.remove(key) {
            Ok(()) => removed += 1,
            // Gone meanwhile (LRU eviction or the datapath): nothing left to do.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(removed)
}

/// Removes fragment entries that expired before `now` (`monotonic_ns`).
pub fn remove_expired_fragments(pins: &PinDir, now: u64) -> Result<usize, DataplaneError> {
    let err = map_err(pins, map_name::FRAGMENTS);
    let mut map: HashMap<MapData, FragKey, FragValue> = hash(pins, map_name::FRAGMENTS)?;
    let doomed: Vec<FragKey> = map
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, v)| v.expires <= now)
        .map(|(k, _)| k)
        .collect();
    let mut removed = 0;
    for key in &doomed {
        match map.remove(key) {
            Ok(()) => removed += 1,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(removed)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock conntrack and fragment expiries are written in
/// (the datapath reads it as of the last tick, `bpf_ktime_get_coarse_ns`, at most a tick behind).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// `max_entries` of a pinned map, as the kernel holds it.
pub fn capacity(pins: &PinDir, name: &'static str) -> Result<u32, DataplaneError> {
    let err = map_err(pins, name);
    let data = MapData::from_pin(pins.map(name)).map_err(&err)?;
    Ok(data.info().map_err(err)?.max_entries())
}
