//! The layout every pinned map must have for this build's programs, and the replacement of pins
//! left by a build whose layout differs (an upgrade that changed a key or value).
//!
//! The loader adopts a pinned map by name without comparing layouts; a program would then run
//! against a map whose bytes mean something else, and the agent could not read it back. So
//! before loading, a pin whose type, key size or value size differs from this build's is
//! removed (with a warning naming both layouts) and the loader creates the map afresh. Programs
//! still attached from the previous agent keep their own reference to the old map, so they
//! enforce the old state unchanged until the reconcile pass has written the new maps and
//! swapped the links to the new programs. A replaced conntrack table starts empty: allowed flows
//! are tracked again at their next packet, which policy judges as new.

use std::{fs, mem::size_of};

use aya::maps::{MapData, MapType};
use netpol_common::{
    ct::{CtKey, CtValue},
    map_name, CidrKey, CidrValue, ClassValue, Config, Counter, EndpointInfo, FragKey, FragValue,
    IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue,
};

use super::{DataplaneError, PinDir};

/// A map's type and the sizes of its key and value, as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
}

/// LPM trie keys carry a 4-byte prefix length before the data.
const LPM_PREFIX: usize = 4;

const fn layout(map_type: MapType, key: usize, value: usize) -> Layout {
    Layout {
        map_type,
        key_size: key as u32,
        value_size: value as u32,
    }
}

/// What this build's programs expect of the map called `name`.
pub fn expected(name: &str) -> Option<Layout> {
    let l = match name {
        map_name::ENDPOINTS => layout(MapType::Hash, 4, size_of::<EndpointInfo>()),
        map_name::IPCACHE => layout(
            MapType::Hash,
            size_of::<IpcacheKey>(),
            size_of::<IpcacheValue>(),
        ),
        map_name::CIDR => layout(
            MapType::LpmTrie,
            LPM_PREFIX + size_of::<CidrKey>(),
            size_of::<CidrValue>(),
        ),
        map_name::POLICY => layout(
            MapType::Hash,
            size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
        ),
        map_name::PORT_RANGES => layout(
            MapType::LpmTrie,
            LPM_PREFIX + size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
        ),
        map_name::CLASSES => layout(MapType::Hash, 4, size_of::<ClassValue>()),
        map_name::SERVICES => layout(
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
        ),
        map_name::FRAGMENTS => layout(
            MapType::LruHash,
            size_of::<FragKey>(),
            size_of::<FragValue>(),
        ),
        map_name::CONNTRACK => layout(MapType::LruHash, size_of::<CtKey>(), size_of::<CtValue>()),
        map_name::COUNTERS => layout(MapType::PerCpuArray, 4, size_of::<Counter>()),
        map_name::CONFIG => layout(MapType::Array, 4, size_of::<Config>()),
        _ => return None,
    };
    Some(l)
}

/// A pinned map replaced because its layout was not this build's.
#[derive(Debug, PartialEq)]
pub struct Replaced {
    pub name: &'static str,
    pub found: Layout,
    pub expected: Layout,
}

/// Removes the pins of maps whose layout differs from this build's, so the loader creates them
/// afresh; returns what it removed. A pin that cannot be read as a map is an error (something
/// else lives at our path).
pub fn replace_incompatible(pins: &PinDir) -> Result<Vec<Replaced>, DataplaneError> {
    let mut replaced = Vec::new();
    for name in map_name::ALL {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let pin_err = |source: std::io::Error| DataplaneError::Pin {
            action: "reading the layout of",
            path: path.clone(),
            source: Box::new(source),
        };
        let info = MapData::from_pin(&path)
            .and_then(|map| map.info())
            .map_err(|e| pin_err(std::io::Error::other(e)))?;
        let found = Layout {
            map_type: info
                .map_type()
                .map_err(|e| pin_err(std::io::Error::other(e)))?,
            key_size: info.key_size(),
            value_size: info.value_size(),
        };
        let expected = expected(name).expect("every name in map_name::ALL has a layout");
        if found != expected {
            fs::remove_file(&path).map_err(|source| DataplaneError::Pin {
                action: "removing the incompatible pin",
                path: path.clone(),
                source: Box::new(source),
            })?;
            replaced.push(Replaced {
                name,
                found,
                expected,
            });
        }
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_has_a_layout() {
        for name in map_name::ALL {
            let l = expected(name).unwrap();
            assert!(l.key_size > 0 && l.value_size > 0, "{name}: {l:?}");
        }
        assert_eq!(expected("NP_NOPE"), None);
        assert_eq!(expected(map_name::CONNTRACK).unwrap().value_size, 24);
    }
}
