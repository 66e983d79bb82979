"""Run one command as N processes of a torch.distributed group on this machine, every socket of the group on the
loopback interface (torchrun's rendezvous store listens on every interface, and unpickles what it reads there)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.distributed as dist

STORE_FD_ENV = "VAE_STORE_FD"  # rank 0's inherited socket, already listening on 127.0.0.1:MASTER_PORT
LAUNCHER_ENV = "VAE_LAUNCHER_PID"  # set in every process launch() starts: the launcher's process id
LOOPBACK = "127.0.0.1"
STOP_SECONDS = 10.0  # how long the others get to exit after one process failed, before SIGKILL


def launch(command: Sequence[str], processes: int, *, env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` as ``processes`` processes (ranks 0 to N-1) and wait for them; the exit code of the group.

    Each process gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    and rank 0 a listening socket on 127.0.0.1 for the group's store (see :func:`loopback_store`). Gloo and NCCL are
    told to use the loopback interface, and OMP_NUM_THREADS (unless set) shares the cores among the processes. When
    one process fails, the others are stopped (they would wait for it in a collective), and its exit code is the
    group's; otherwise rank 0's is.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    listener = socket.create_server((LOOPBACK, 0))
    shared = {
        **(os.environ if env is None else env),
        "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
        "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(listener.getsockname()[1]), LAUNCHER_ENV: str(os.getpid()),
    }
    # As torchrun does, so that N processes do not each start a thread per core.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    shared.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes)))
    if interface := loopback_interface():
        shared.setdefault("GLOO_SOCKET_IFNAME", interface)
        shared.setdefault("NCCL_SOCKET_IFNAME", interface)
    children = []
    try:
        for rank in range(processes):
            own = {"RANK": str(rank), "LOCAL_RANK": str(rank)}
            if rank == 0:
                own[STORE_FD_ENV] = str(listener.fileno())
            fds = (listener.fileno(),) if rank == 0 else ()
            children.append(subprocess.Popen(list(command), env={**shared, **own}, pass_fds=fds))
        listener.close()
        return _wait(children)
    finally:
        listener.close()
        _stop(children)


def loopback_store(rank: int, world_size: int) -> dist.TCPStore | None:
    """The group's store, when :func:`launch` started this process (else None): rank 0 serves it on the loopback
    socket it was handed, the others connect to it there.

    Every process also stops (SIGTERM to itself) once the launcher is gone, instead of waiting in a collective for
    processes that the launcher would have stopped.
    """
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is None:
        return None
    threading.Thread(target=_exit_without, args=(int(launcher),), name="launcher-watch", daemon=True).start()
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        return dist.TCPStore(address, port, world_size, is_master=True, master_listen_fd=int(os.environ[STORE_FD_ENV]))
    return dist.TCPStore(address, port, world_size, is_master=False)


def _exit_without(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def listening() -> list[tuple[str, int, str]]:
    """(address, port, socket inode) of every TCP socket of this machine that listens, from /proc/net/tcp and tcp6
    (Linux; elsewhere none): address "0.0.0.0" or "::" is every interface."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words in little-endian order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(port, 16), fields[9]))
    return found


def exposed_store_warning() -> str | None:
    """What to tell the user when the store at MASTER_PORT (torchrun's) listens on every interface, else None."""
    port = int(os.environ.get("MASTER_PORT", "0"))
    if not any(address in ("0.0.0.0", "::") and found == port for address, found, _ in listening()):
        return None
    return (
        f"the process group's store listens on port {port} of every network interface, without authentication "
        "(torchrun's always does, and its c10d rendezvous, which --standalone uses, unpickles what it reads there): "
        "whoever reaches that port while this runs can disturb the group or run code as you. On one machine, use "
        "`flows.py train --processes N` (loopback only); across machines, let a firewall admit only the training "
        "hosts to the port."
    )


def loopback_interface() -> str | None:
    """The name of this machine's loopback network interface, where Linux says which it is (else None)."""
    for flags in sorted(Path("/sys/class/net").glob("*/flags")):
        try:
            if int(flags.read_text(), 16) & 0x8:  # IFF_LOOPBACK
                return flags.parent.name
        except (OSError, ValueError):
            continue
    return None


def _wait(children: list[subprocess.Popen]) -> int:
    while True:
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            return failed[0] if codes[0] in (None, 0) else codes[0]
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.1)


def _stop(children: list[subprocess.Popen]) -> None:
    """SIGTERM to the processes still running, SIGKILL to those still there ``STOP_SECONDS`` later."""
    running = [child for child in children if child.poll() is None]
    for child in running:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for child in running:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
