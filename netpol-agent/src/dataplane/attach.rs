//! TCX attachments on pods' host-side interfaces, pinned as links so they outlive the agent.
//!
//! A pinned link that still holds our program on the right interface is adopted as it is; one
//! holding an older build of the program is updated in place (`bpf_link_update`, atomic: no
//! packet sees the interface without a program); a defunct one (its interface is gone) is
//! replaced. Our program goes first in the TCX chain, so nothing before it can pass a packet
//! it would drop.

use std::{collections::BTreeSet, fs, path::PathBuf};

use aya::programs::{
    links::{FdLink, LinkOrder, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions, TcAttachType},
    SchedClassifier,
};
use netpol_common::prog_name;

use super::{host, Dataplane, DataplaneError, PinDir};

/// The two hooks, named as pins and `dump` show them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress: packets leaving the pod.
    TcIngress,
    /// TC egress: packets delivered to the pod.
    TcEgress,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::TcIngress, Hook::TcEgress];

    pub const fn name(self) -> &'static str {
        match self {
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        }
    }

    pub const fn program(self) -> &'static str {
        match self {
            Hook::TcIngress => prog_name::POD_EGRESS,
            Hook::TcEgress => prog_name::POD_INGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::TcIngress => TcAttachType::Ingress,
            Hook::TcEgress => TcAttachType::Egress,
        }
    }

    fn parse(s: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.name() == s)
    }
}

/// What `attach` did on one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    Attached,
    Adopted,
    Upgraded,
}

/// A program seen on a hook, in TCX order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AttachedProgram {
    pub id: u32,
    /// The program's tag: a hash of its instructions, equal for equal builds.
    pub tag: String,
    pub name: String,
    pub ours: bool,
}

fn link_pin(pins: &PinDir, ifindex: u32, hook: Hook) -> PathBuf {
    pins.links().join(format!("{ifindex}-{}", hook.name()))
}

/// Programs attached to a hook of an interface, first to last.
pub fn attached(interface: &str, hook: Hook) -> Result<Vec<AttachedProgram>, DataplaneError> {
    let (_, programs) =
        SchedClassifier::query_tcx(interface, hook.attach_type()).map_err(|source| {
            DataplaneError::Attach {
                program: hook.program(),
                interface: interface.to_string(),
                hook: hook.name(),
                source: Box::new(source),
            }
        })?;
    Ok(programs
        .iter()
        .map(|p| {
            let name = p.name_as_str().unwrap_or_default().to_string();
            AttachedProgram {
                id: p.id(),
                tag: format!("{:016x}", p.tag()),
                ours: name == hook.program(),
                name,
            }
        })
        .collect())
}

impl Dataplane {
    /// Ensures both programs run on the interface, first in their chains.
    pub fn attach(
        &mut self,
        ifindex: u32,
        interface: &str,
    ) -> Result<[AttachOutcome; 2], DataplaneError> {
        let ingress = self.attach_hook(ifindex, interface, Hook::TcIngress)?;
        let egress = self.attach_hook(ifindex, interface, Hook::TcEgress)?;
        Ok([ingress, egress])
    }

    /// Attaches the empty program (`np_noop`) to both hooks of `interface`, unpinned: the links
    /// live as long as this `Dataplane`. For benchmarks: the cost of any TC program.
    pub fn attach_empty(&mut self, interface: &str) -> Result<(), DataplaneError> {
        let name = prog_name::NOOP;
        let program = self.program(name)?;
        for hook in Hook::ALL {
            program
                .attach(interface, hook.attach_type())
                .map_err(|source| DataplaneError::Attach {
                    program: name,
                    interface: interface.to_string(),
                    hook: hook.name(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    fn attach_hook(
        &mut self,
        ifindex: u32,
        interface: &str,
        hook: Hook,
    ) -> Result<AttachOutcome, DataplaneError> {
        let pin = link_pin(&self.pins, ifindex, hook);
        let name = hook.program();
        let attach_err = |source: aya::programs::ProgramError| DataplaneError::Attach {
            program: name,
            interface: interface.to_string(),
            hook: hook.name(),
            source: Box::new(source),
        };
        let already_updated = self.updated.contains(&(ifindex, hook.name()));
        let program = self.program(name)?;
        let tag = format!(
            "{:016x}",
            program
                .info()
                .map_err(|source| DataplaneError::Program {
                    name,
                    source: Box::new(source)
                })?
                .tag()
        );

        if pin.exists() {
            // Naming the programs of a TCX chain takes CAP_SYS_ADMIN (program info by id),
            // which the DaemonSet does not grant. Without it the pinned link is still ours and
            // live (a deleted interface takes its endpoint, and so this call, with it), so it
            // is updated in place: atomic, never a moment without a program.
            let (ours, readable): (Vec<_>, bool) = match attached(interface, hook) {
                Ok(programs) => (programs.into_iter().filter(|p| p.ours).collect(), true),
                Err(_) => (Vec::new(), false),
            };
            let pinned = PinnedLink::from_pin(&pin).map_err(|source| DataplaneError::Link {
                path: pin.clone(),
                source: Box::new(source),
            })?;
            if !ours.is_empty() || !readable {
                if ours.first().is_some_and(|current| current.tag == tag) {
                    return Ok(AttachOutcome::Adopted);
                }
                if !readable && already_updated {
                    return Ok(AttachOutcome::Adopted);
                }
                // Another build of the program: swap it atomically inside the same link.
                let link =
                    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                        DataplaneError::Link {
                            path: pin.clone(),
                            source: Box::new(source),
                        }
                    })?;
                let id = program.attach_to_link(link).map_err(attach_err)?;
                // The pin still names the same kernel link; dropping our handle keeps it.
                drop(program.take_link(id).map_err(attach_err)?);
                self.updated.insert((ifindex, hook.name()));
                return Ok(AttachOutcome::Upgraded);
            }
            // Defunct: the interface it was made for is gone (or the index was reused).
            pinned.unpin().map_err(|source| DataplaneError::Pin {
                action: "unpinning",
                path: pin.clone(),
                source: Box::new(source),
            })?;
        }
        let id = program
            .attach_with_options(
                interface,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
            path: pin.clone(),
            source: Box::new(source),
        })?;
        fd_link.pin(&pin).map_err(|e| DataplaneError::Pin {
            action: "pinning",
            path: pin.clone(),
            source: Box::new(std::io::Error::other(e.to_string())),
        })?;
        Ok(AttachOutcome::Attached)
    }
}

/// Interfaces (by ifindex) that have pinned links.
pub fn pinned_ifindexes(pins: &PinDir) -> Result<BTreeSet<u32>, DataplaneError> {
    Ok(link_pins(pins)?
        .into_iter()
        .map(|(ifindex, _, _)| ifindex)
        .collect())
}

fn link_pins(pins: &PinDir) -> Result<Vec<(u32, Hook, PathBuf)>, DataplaneError> {
    let dir = pins.links();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DataplaneError::Pin {
                action: "listing",
                path: dir,
                source: Box::new(source),
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let parsed = name
            .split_once('-')
            .and_then(|(i, h)| Some((i.parse::<u32>().ok()?, Hook::parse(h)?)));
        if let Some((ifindex, hook)) = parsed {
            out.push((ifindex, hook, entry.path()));
        }
    }
    out.sort_by_key(|(i, h, _)| (*i, h.name()));
    Ok(out)
}

/// Detaches our programs from every interface not in `keep`. Returns the ifindexes detached.
pub fn detach_except(pins: &PinDir, keep: &BTreeSet<u32>) -> Result<Vec<u32>, DataplaneError> {
    let mut detached = Vec::new();
    for (ifindex, _, path) in link_pins(pins)? {
        if keep.contains(&ifindex) {
            continue;
        }
        unpin_link(&path)?;
        if !detached.contains(&ifindex) {
            detached.push(ifindex);
        }
    }
    Ok(detached)
}

fn unpin_link(path: &PathBuf) -> Result<(), DataplaneError> {
    match PinnedLink::from_pin(path) {
        // Dropping the last reference detaches the program.
        Ok(link) => {
            link.unpin().map_err(|source| DataplaneError::Pin {
                action: "unpinning",
                path: path.clone(),
                source: Box::new(source),
            })?;
        }
        Err(_) => {
            fs::remove_file(path).map_err(|source| DataplaneError::Pin {
                action: "removing",
                path: path.clone(),
                source: Box::new(source),
            })?;
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetReport {
    pub links: usize,
    pub interfaces: Vec<String>,
}

pub fn detach_all(pins: &PinDir) -> Result<ResetReport, DataplaneError> {
    let mut report = ResetReport::default();
    for (ifindex, _, path) in link_pins(pins)? {
        unpin_link(&path)?;
        report.links += 1;
        let name = host::ifname(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"));
        if !report.interfaces.contains(&name) {
            report.interfaces.push(name);
        }
    }
    Ok(report)
}
