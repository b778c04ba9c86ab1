//! Hostile guest: tries the network directly with `std::net` — a TCP connect to 127.0.0.1:1, a
//! TCP listener, a UDP socket and a DNS lookup — bypassing the granted `http`/`keyfactor`
//! capabilities.
//!
//! On `wasm32-wasip2` these go through `wasi:sockets`, so the component imports it. The engine
//! must refuse the component at load with a message naming sockets; it never runs. (Were it to
//! run, every attempt would fail — the guest returns `err` listing anything that worked.)

use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use jobhook_sdk::{Context, Handler, Result, export_handler, info};

struct Sockets;

impl Handler for Sockets {
    fn run(_ctx: &Context) -> Result<()> {
        let mut worked = Vec::new();
        let target = ([127, 0, 0, 1], 1).into();
        match TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
            Ok(_) => worked.push("tcp connect 127.0.0.1:1"),
            Err(e) => info!("tcp connect: {e}"),
        }
        match TcpListener::bind("127.0.0.1:0") {
            Ok(_) => worked.push("tcp listen"),
            Err(e) => info!("tcp listen: {e}"),
        }
        match UdpSocket::bind("0.0.0.0:0") {
            Ok(_) => worked.push("udp bind"),
            Err(e) => info!("udp bind: {e}"),
        }
        match ("localhost", 80).to_socket_addrs() {
            Ok(_) => worked.push("dns lookup"),
            Err(e) => info!("dns lookup: {e}"),
        }
        if worked.is_empty() {
            Ok(())
        } else {
            Err(format!("network reachable: {}", worked.join(", ")).into())
        }
    }
}

export_handler!(Sockets);
