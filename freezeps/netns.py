"""Emulated cluster on one machine: the PS and each worker in its own Linux network namespace.

    host (root ns) --- host ┐
    PS namespace   eth0 --- ps   ┤  bridge br0 in the switch namespace
    worker i ns    eth0 --- wi   ┘

Every endpoint has one link (a veth pair) to a bridge, like a host's NIC to a switch port.
With a `LinkShape`, each endpoint link is shaped in both directions (the endpoint's egress,
and the switch port's egress towards it): a bandwidth with a token bucket (tc tbf), as for
hosts with 1 or 10 Gbit/s NICs on CloudLab-like nodes, and optionally a one-way delay (tc
netem, which some kernels lack: then a delay is refused with that reason). The host link is the launcher's control path (Status polling) and is
never shaped; traffic between workers and the PS never crosses it.

Wire bytes are read from the links' kernel counters (`ip -s -j link`): they include the
Ethernet, IP and TCP headers of every frame, TCP's acknowledgements, and gRPC's HTTP/2
framing. Needs root and iproute2; `unavailable()` says why not where they are missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    """The namespaces could not be set up (message says which command failed and why)."""


_RATE_UNITS = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}


def rate_bits(rate: str) -> int:
    """Bits per second of a tc-style rate such as "1gbit", "500mbit" or "2.5gbit"."""
    text = rate.strip().lower()
    for unit, scale in _RATE_UNITS.items():
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * scale)
            break
    raise ValueError(f"link rate {rate!r} is not a rate such as 1gbit, 500mbit or 100kbit")


@dataclass(frozen=True)
class LinkShape:
    """How each endpoint's link is shaped: rate ("1gbit", "10gbit"; "" = unlimited), one-way
    delay (needs the kernel's netem), and MTU."""
    rate: str = ""
    delay_ms: float = 0.0
    mtu: int = 1500
    # Segmentation offload: off, every frame is at most the MTU and the counters count real
    # frames with their headers, as on a wire; on, the kernel moves 64 KiB frames (as a
    # NIC with TSO would: far less CPU per byte, so rates above ~0.6 Gbit/s can be emulated
    # on 2 cores), but counts headers once per 64 KiB.
    offload: bool = False

    def validate(self) -> "LinkShape":
        if self.delay_ms < 0:
            raise ValueError(f"link delay must be >= 0 ms, got {self.delay_ms}")
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"link MTU must be within 576..65535, got {self.mtu}")
        if self.rate:
            rate_bits(self.rate)
        return self


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _tc(netns: str | None, *args: str) -> None:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + ["tc", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        return "no Linux network namespaces on this system"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or in a container with CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"fzprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {e}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@dataclass
class Topology:
    """N worker namespaces and a namespace per PS shard (one by default) on one bridge. Use as
    a context manager: the namespaces (and so every link in them) are deleted on exit, also
    when setup fails midway."""
    workers: int
    shape: LinkShape = field(default_factory=LinkShape)
    tag: str = ""
    servers: int = 1

    def __post_init__(self):
        self.shape.validate()
        if self.workers < 1:
            raise ValueError("a topology needs at least one worker")
        if not 1 <= self.servers <= 8:
            raise ValueError(f"a topology holds 1 to 8 PS shards, not {self.servers}")
        self.tag = self.tag or f"fz{os.getpid() % 100000}"
        # A second octet from the tag, so that two topologies at once do not share the
        # host's route; namespaces themselves are isolated anyway.
        self._net = f"10.{100 + zlib.crc32(self.tag.encode()) % 100}.0"
        self.switch = f"{self.tag}-sw"
        self.ps_ns = [f"{self.tag}-ps"] + [f"{self.tag}-ps{i}" for i in range(1, self.servers)]
        self.ps = self.ps_ns[0]
        self.worker_ns = [f"{self.tag}-w{i}" for i in range(self.workers)]
        self.host_link = f"{self.tag}h"
        self._created: list[str] = []

    # Addresses: host .1, PS shard i .(2 + i), worker i .(10 + i).
    @property
    def host_ip(self) -> str:
        return f"{self._net}.1"

    @property
    def ps_ip(self) -> str:
        return self.server_ip(0)

    def server_ip(self, i: int) -> str:
        return f"{self._net}.{2 + i}"

    def worker_ip(self, i: int) -> str:
        return f"{self._net}.{10 + i}"

    def endpoints(self) -> list[tuple[str, str, str]]:
        """(namespace, switch port, address) of every PS shard and every worker."""
        return [(ns, "ps" if i == 0 else f"ps{i}", self.server_ip(i)) for i, ns in enumerate(self.ps_ns)] + [
            (ns, f"w{i}", self.worker_ip(i)) for i, ns in enumerate(self.worker_ns)]

    def __enter__(self) -> "Topology":
        if self.workers + 10 > 250:
            raise ValueError("at most 240 workers in one topology")
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _setup(self) -> None:
        mtu = str(self.shape.mtu)
        for ns in [self.switch, *self.ps_ns, *self.worker_ns]:
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "mtu", mtu, "up")
        for ns, port, address in self.endpoints():
            _ip("link", "add", "eth0", "netns", ns, "mtu", mtu, *self._segments(), "type", "veth",
                "peer", "name", port, "netns", self.switch, "mtu", mtu, *self._segments())
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if self.shape.rate or self.shape.delay_ms:
                self._shape(ns, "eth0")
                self._shape(self.switch, port)
        _ip("link", "add", self.host_link, "mtu", mtu, "type", "veth", "peer", "name", "host", "netns", self.switch,
            "mtu", mtu)
        self._created.append(self.host_link)
        _ip("-n", self.switch, "link", "set", "host", "master", "br0", "up")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")

    def _segments(self) -> list[str]:
        # A veth hands the stack's 64 KiB segmentation-offload frames over whole and counts
        # them as one packet each, with one set of headers; one segment per frame makes
        # the counters count what a wire would carry.
        return [] if self.shape.offload else ["gso_max_segs", "1"]

    def _shape(self, ns: str, dev: str) -> None:
        parent = ["root"]
        if self.shape.delay_ms:
            try:
                _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                    "delay", f"{self.shape.delay_ms}ms", "limit", "100000")
            except NetnsError as e:
                raise NetnsError(f"cannot emulate a link delay: {e} (the kernel needs sch_netem)") from None
            parent = ["parent", "1:1"]
        if self.shape.rate:
            bits = rate_bits(self.shape.rate)
            # The bucket must hold the largest frame the stack hands over (64 KiB with
            # segmentation offload) and one timer tick of traffic at this rate.
            burst = max(bits // 8 // 250, 128 << 10)
            _tc(ns, "qdisc", "add", "dev", dev, *parent, "tbf", "rate", f"{bits}bit",
                "burst", str(burst), "latency", "100ms")

    def teardown(self) -> None:
        """Delete what was created, in reverse; never raises (it runs in `finally`)."""
        while self._created:
            name = self._created.pop()
            what = ["link", "del", name] if name == self.host_link else ["netns", "del", name]
            subprocess.run(["ip", *what], capture_output=True, timeout=30)

    def exec_prefix(self, ns: str) -> list[str]:
        """Prepend to an argv to run it inside namespace `ns`."""
        return ["ip", "netns", "exec", ns]

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes and packets each endpoint sent and received on its link, by namespace."""
        out = {}
        for ns, _, _ in self.endpoints():
            (link,) = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", "dev", "eth0"))
            stats = link["stats64"]
            out[ns] = {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                       "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}
        return out
