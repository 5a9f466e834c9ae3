//! Why a packet was passed or dropped. One list, read by the eBPF counters and by `dump`.

/// The direction of a packet from the pod's point of view.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Delivered to the pod (TC egress hook of its host-side veth).
    Ingress = 0,
    /// Leaving the pod (TC ingress hook of its host-side veth).
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    pub const fn opposite(self) -> Direction {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }
}

/// Verdict reasons. Values below [`Reason::FIRST_DROP`] pass the packet; the rest drop it.
/// Numbers are part of the pinned-map contract: append, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// A new flow allowed by a policy entry.
    AllowedByPolicy = 0,
    /// The pod is not isolated in this direction.
    NotIsolated = 1,
    /// A packet of a tracked flow, in the direction that opened it.
    Established = 2,
    /// A reply of a tracked flow.
    Reply = 3,
    /// From an address of the pod's own node (kubelet probes).
    FromHost = 4,
    /// ARP and IPv6 neighbour discovery: the link must work whatever the policy.
    Control = 5,
    /// An ICMP error (unreachable, time exceeded, too big) about a tracked flow.
    Related = 6,
    /// A non-first fragment of a datagram whose first fragment was passed.
    FragmentOfFlow = 7,

    /// No policy entry allows this new flow.
    DeniedByPolicy = 16,
    /// The interface carries our program but has no endpoint entry (fail closed).
    NoEndpoint = 17,
    /// Headers too short or inconsistent (bad IHL, truncated L4, overlong extension chain).
    Malformed = 18,
    /// Neither IPv4, IPv6 nor ARP.
    UnsupportedL3 = 19,
    /// Leaving the pod with a source address that is not the pod's.
    Spoofed = 20,
    /// A non-first fragment that belongs to no allowed flow.
    Fragment = 21,
    /// The conntrack table refused the new entry.
    ConntrackFull = 22,
}

impl Reason {
    pub const FIRST_DROP: u32 = 16;
    /// Slots per direction in `NP_COUNTERS`.
    pub const SLOTS: u32 = 32;
    pub const ALL: [Reason; 15] = [
        Reason::AllowedByPolicy,
        Reason::NotIsolated,
        Reason::Established,
        Reason::Reply,
        Reason::FromHost,
        Reason::Control,
        Reason::Related,
        Reason::FragmentOfFlow,
        Reason::DeniedByPolicy,
        Reason::NoEndpoint,
        Reason::Malformed,
        Reason::UnsupportedL3,
        Reason::Spoofed,
        Reason::Fragment,
        Reason::ConntrackFull,
    ];

    pub const fn is_drop(self) -> bool {
        self as u32 >= Self::FIRST_DROP
    }

    pub const fn name(self) -> &'static str {
        match self {
            Reason::AllowedByPolicy => "allowed-by-policy",
            Reason::NotIsolated => "not-isolated",
            Reason::Established => "established",
            Reason::Reply => "reply",
            Reason::FromHost => "from-host",
            Reason::Control => "control",
            Reason::Related => "related",
            Reason::FragmentOfFlow => "fragment-of-flow",
            Reason::DeniedByPolicy => "denied-by-policy",
            Reason::NoEndpoint => "no-endpoint",
            Reason::Malformed => "malformed",
            Reason::UnsupportedL3 => "unsupported-l3",
            Reason::Spoofed => "spoofed",
            Reason::Fragment => "fragment",
            Reason::ConntrackFull => "conntrack-full",
        }
    }
}
