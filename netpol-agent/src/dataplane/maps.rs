//! Reading and writing the pinned maps. Opened from their pins, so the same code serves the
//! agent that just loaded the programs and `dump`, which loads nothing.

use std::collections::BTreeMap;

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, MapError, PerCpuArray,
};
use netpol_common::{
    counter_index,
    ct::{CtKey, CtValue},
    map_name, Counter, Direction, EndpointInfo, Reason,
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

/// What the four agent-written maps hold now.
pub fn read(pins: &PinDir) -> Result<MapContents, DataplaneError> {
    let endpoints = hash::<u32, EndpointInfo>(pins, map_name::ENDPOINTS)?;
    Ok(MapContents {
        endpoints: endpoints
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(pins, map_name::ENDPOINTS))?,
        ipcache: read_lpm(pins, map_name::IPCACHE)?,
        cidr: read_lpm(pins, map_name::CIDR)?,
        policy: read_lpm(pins, map_name::POLICY)?,
    })
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

/// Applies a diff make-before-break: first every new entry the endpoints will point at, then
/// the ipcache and endpoints, and only then the removals. A packet never meets an endpoint
/// whose class entries are missing (which would deny what stays allowed).
pub fn write(pins: &PinDir, diff: &MapDiff) -> Result<(), DataplaneError> {
    let (up, rm) = (&diff.upsert, &diff.remove);
    write_lpm(pins, map_name::POLICY, &up.policy, None)?;
    write_lpm(pins, map_name::CIDR, &up.cidr, None)?;
    write_lpm(pins, map_name::IPCACHE, &up.ipcache, None)?;
    if !up.endpoints.is_empty() || !rm.endpoints.is_empty() {
        let mut endpoints = hash::<u32, EndpointInfo>(pins, map_name::ENDPOINTS)?;
        let err = map_err(pins, map_name::ENDPOINTS);
        for (ifindex, info) in &up.endpoints {
            endpoints.insert(ifindex, info, 0).map_err(&err)?;
        }
        for ifindex in rm.endpoints.keys() {
            endpoints.remove(ifindex).map_err(&err)?;
        }
    }
    write_lpm(pins, map_name::IPCACHE, &BTreeMap::new(), Some(&rm.ipcache))?;
    write_lpm(pins, map_name::CIDR, &BTreeMap::new(), Some(&rm.cidr))?;
    write_lpm(pins, map_name::POLICY, &BTreeMap::new(), Some(&rm.policy))?;
    Ok(())
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
