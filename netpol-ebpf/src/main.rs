//! The netpol classifiers. Entry points only: each hands the packet to `datapath::handle`,
//! which decides, counts, and returns the TC action.
#![no_std]
#![no_main]

mod clock;
mod conntrack;
mod counters;
mod datapath;
mod fragments;
mod maps;
mod parse;
mod policy;
mod route;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netpol_common::Direction;

/// TC ingress hook of the pod's host-side veth: packets leaving the pod.
#[classifier]
pub fn pod_egress(ctx: TcContext) -> i32 {
    datapath::handle(&ctx, Direction::Egress)
}

/// TC egress hook of the pod's host-side veth: packets delivered to the pod.
#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    datapath::handle(&ctx, Direction::Ingress)
}

/// Does nothing: the baseline benchmarks measure our programs against. Loaded, never attached.
#[classifier]
pub fn np_noop(_ctx: TcContext) -> i32 {
    -1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
