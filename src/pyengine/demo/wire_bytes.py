"""Bytes a process has sent and received over TCP, read from the kernel's per-socket counters.

gloo carries every collective of a CPU world over TCP sockets, whoever issues it: DDP's
reducer (C++), FSDP2's all-gathers and reduce-scatters, DTensor's functional collectives,
the pipeline's sends. Counting at the sockets therefore needs no hook in any of them, and
it measures what really crossed between the processes (gloo's framing included), not what
a strategy is supposed to send.

Linux only (/proc and TCP_INFO); elsewhere `tcp_bytes()` returns None and the demo says so.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received are the two u64
# after tcpi_max_pacing_rate, at byte 120; stable since Linux 4.1.
_BYTES_OFFSET = 120
_INFO_SIZE = 256


def tcp_bytes() -> tuple[int, int] | None:
    """(bytes sent and acknowledged, bytes received) summed over this process's TCP sockets."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    sent = received = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            # fromfd duplicates the descriptor: closing the copy leaves gloo's socket open.
            sock = socket.fromfd(int(fd), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue  # closed meanwhile
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO_SIZE)
        except OSError:
            continue  # a Unix or UDP socket
        finally:
            sock.close()
        if len(info) >= _BYTES_OFFSET + 16:
            acked, got = struct.unpack_from("QQ", info, _BYTES_OFFSET)
            sent, received = sent + acked, received + got
    return sent, received
