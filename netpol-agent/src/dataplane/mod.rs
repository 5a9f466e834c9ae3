//! The kernel side: loading the programs, the pinned maps and links, attaching to interfaces.
//! The ONLY module that imports aya. It writes what it is given and reads back what is there;
//! it decides nothing about policy.
//!
//! Everything lives under one bpffs directory per node (two lab nodes share a bpffs):
//! `<pin-dir>/maps/NP_*` and `<pin-dir>/links/<ifindex>-<hook>`. Pinned maps and links keep
//! enforcement in place when the agent exits, and let the next agent adopt them.

pub mod attach;
pub mod host;
pub mod layout;
pub mod maps;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{ProgramError, SchedClassifier},
    Ebpf, EbpfLoader,
};
use netpol_common::prog_name;

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// Where bpffs is mounted on every node we run on.
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object (maps pinned under {pin_dir})")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name} ({path})")]
    Map {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{action} {path}")]
    Pin {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: Box<io::Error>,
    },
    #[error("attaching {program} to {hook} of {interface}")]
    Attach {
        program: &'static str,
        interface: String,
        hook: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("{what}")]
    Host {
        what: String,
        #[source]
        source: Box<io::Error>,
    },
    #[error("{path} is not on a bpffs mount (mount -t bpf bpf {BPFFS})")]
    NotBpffs { path: PathBuf },
}

/// The pin directory of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// `<bpffs>/netpol/<node>`.
    pub fn for_node(bpffs: &Path, node: &str) -> Self {
        Self(bpffs.join("netpol").join(node))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn maps(&self) -> PathBuf {
        self.0.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.0.join("links")
    }

    pub fn exists(&self) -> bool {
        self.0.exists()
    }
}

/// Fails unless `path`'s filesystem is bpffs (pins anywhere else silently do nothing useful).
fn check_bpffs(path: &Path) -> Result<(), DataplaneError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        DataplaneError::NotBpffs {
            path: path.to_path_buf(),
        }
    })?;
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::NotBpffs {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Sizes chosen at load time. They apply when a map is created; a pinned map is adopted with
/// the size it has (resizing would drop its entries; `reset` first to resize).
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `NP_CT` entries (default `capacity::CONNTRACK`).
    pub conntrack_entries: Option<u32>,
    pub host_routing: HostRouting,
}

/// How packets between two pods of the node are carried once policy passed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    /// Straight from the sender's veth into the receiver's namespace, both policies judged in
    /// one program run (`bpf_redirect_peer`); flows to ClusterIPs still take the node's stack.
    #[default]
    Bpf,
    /// Every packet through the node's IP stack (routing, netfilter), as without netpol.
    Kernel,
}

/// The loaded programs, with the node's maps created or adopted from their pins.
pub struct Dataplane {
    ebpf: Ebpf,
    pins: PinDir,
    /// Links this process updated to its own programs (where the chain could not be read).
    updated: std::collections::BTreeSet<(u32, &'static str)>,
}

impl Dataplane {
    /// Loads and verifies both programs. Existing pinned maps are reused as they are, so their
    /// contents (and conntrack) survive; missing ones are created and pinned, and so are those
    /// whose pin has another build's layout (see `layout`).
    pub fn load(pins: &PinDir) -> Result<Self, DataplaneError> {
        Self::load_with(pins, &LoadOptions::default())
    }

    pub fn load_with(pins: &PinDir, opts: &LoadOptions) -> Result<Self, DataplaneError> {
        let bpffs = pins.path().ancestors().nth(2).unwrap_or(Path::new(BPFFS));
        check_bpffs(bpffs)?;
        for dir in [pins.maps(), pins.links()] {
            fs::create_dir_all(&dir).map_err(|source| DataplaneError::Pin {
                action: "creating",
                path: dir.clone(),
                source: Box::new(source),
            })?;
        }
        for r in layout::replace_incompatible(pins)? {
            tracing::warn!(
                map = r.name,
                found = ?r.found,
                expected = ?r.expected,
                "a pinned map has another build's layout: replaced by an empty one"
            );
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps());
        if let Some(entries) = opts.conntrack_entries {
            loader.map_max_entries(netpol_common::map_name::CONNTRACK, entries);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load {
                pin_dir: pins.maps(),
                source: Box::new(source),
            })?;
        for name in [
            prog_name::POD_EGRESS,
            prog_name::POD_INGRESS,
            prog_name::NOOP,
        ] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    name,
                    source: Box::new(source),
                })?;
        }
        // Applies at the next packet: a flow routed by BPF goes back to the stack when the
        // setting is `kernel`; flows opened under `kernel` stay with the stack.
        let config = netpol_common::Config {
            host_routing: u32::from(opts.host_routing == HostRouting::Bpf),
            _pad: 0,
        };
        maps::write_config(pins, &config)?;
        Ok(Self {
            ebpf,
            pins: pins.clone(),
            updated: Default::default(),
        })
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// Runs a classifier on one packet through `BPF_PROG_TEST_RUN`, `repeat` times: the
    /// kernel executes the program on a synthetic skb (on loopback, ifindex 1); nothing is
    /// sent anywhere. Returns the program's return value and the mean time per run.
    pub fn test_run(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::new()
        };
        let result =
            self.program(name)?
                .test_run(opts)
                .map_err(|source| DataplaneError::Program {
                    name,
                    source: Box::new(source),
                })?;
        Ok((result.return_value as i32, result.duration))
    }

    /// One of our classifiers, for attaching or `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DataplaneError> {
        program(&mut self.ebpf, name)
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let missing = || DataplaneError::Program {
        name,
        source: Box::new(ProgramError::UnexpectedProgramType),
    };
    ebpf.program_mut(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name,
            source: Box::new(source),
        })
}

/// Removes every pin and link under the node's directory. Programs detach as their last
/// link goes; maps are freed once nothing references them.
pub fn reset(pins: &PinDir) -> Result<attach::ResetReport, DataplaneError> {
    let report = attach::detach_all(pins)?;
    if pins.exists() {
        fs::remove_dir_all(pins.path()).map_err(|source| DataplaneError::Pin {
            action: "removing",
            path: pins.path().to_path_buf(),
            source: Box::new(source),
        })?;
    }
    // Remove `<bpffs>/netpol` too once no node is left in it.
    if let Some(parent) = pins.path().parent() {
        let _ = fs::remove_dir(parent);
    }
    Ok(report)
}
