"""Ports for the fleet's listeners (nodes' metrics, the payload server, Prometheus)."""
import random
import socket

_TAKEN = set()


def free_port():
    """A port free now, never handed out twice in this run, and below the kernel's
    ephemeral range. bind(port 0) is neither: a port closed again may be drawn again
    (by estimate, ~52 draws from the ~14,000 even ports bind(0) prefers coincide in about
    one run of ten; a daemon that cannot bind its metrics never shows up in Prometheus),
    and a port from the ephemeral range can be taken by any outgoing connection before
    the daemon binds it."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    if low <= 2048:
        raise SystemExit(f"fleet: the ephemeral port range starts at {low}: no room below it")
    start = random.randrange(1024, low)
    for port in list(range(start, low)) + list(range(1024, start)):
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    raise SystemExit(f"fleet: no free port below {low}")
