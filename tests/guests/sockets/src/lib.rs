//! Hostile guest: tries the network directly with `std::net` — a TCP connect and a UDP datagram
//! to the ports in the properties `tcp_port` and `udp_port` on 127.0.0.1 (listeners the test
//! opened), a TCP listener, a UDP socket and a DNS lookup — bypassing the granted
//! `http`/`keyfactor` capabilities.
//!
//! On `wasm32-wasip2` these go through `wasi:sockets`, so the component imports it. The engine
//! links `wasi:sockets` inert: the component runs and every attempt must fail. The guest returns
//! `err` listing anything that worked; the test also checks that its listeners saw nothing.

use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use jobhook_sdk::{Context, Handler, Result, export_handler, info, properties};

struct Sockets;

impl Handler for Sockets {
    fn run(_ctx: &Context) -> Result<()> {
        let mut worked = Vec::new();
        let tcp_port: u16 = properties::parse_or("tcp_port", 1)?;
        let udp_port: u16 = properties::parse_or("udp_port", 1)?;
        let target = ([127, 0, 0, 1], tcp_port).into();
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(_) => worked.push("tcp connect"),
            Err(e) => info!("tcp connect: {e}"),
        }
        match UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| socket.send_to(b"escaped", ("127.0.0.1", udp_port)))
        {
            Ok(_) => worked.push("udp send"),
            Err(e) => info!("udp send: {e}"),
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
