"""Hostile: tries the network directly (TCP connect, TCP listen, UDP bind, DNS lookup), bypassing
the granted capabilities. libpython imports wasi:sockets whatever the handler does; linked inert,
every attempt must fail. Returns err listing anything that worked, ok when nothing did."""
import encodings.idna  # noqa: F401  (host names are IDNA-encoded; bundle the codec)
import socket

from componentize_py_types import Err
from wit_world.imports import log


def attempt(what, action):
    try:
        action()
    except Exception as e:  # every failure is the expected outcome; log why
        log.log(log.Level.INFO, f"{what}: {type(e).__name__}: {e}")
        return None
    return what


def tcp_connect():
    socket.create_connection(("127.0.0.1", 1), timeout=0.1).close()


def tcp_listen():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()


def udp_bind():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("0.0.0.0", 0))


def dns_lookup():
    socket.getaddrinfo("localhost", 80)


def run(context) -> None:
    worked = [
        w
        for w in (
            attempt("tcp connect 127.0.0.1:1", tcp_connect),
            attempt("tcp listen", tcp_listen),
            attempt("udp bind", udp_bind),
            attempt("dns lookup", dns_lookup),
        )
        if w
    ]
    if worked:
        raise Err("network reachable: " + ", ".join(worked))
