"""Emulated network links for ``cartosplit bench e2e``: namespaces, veth, ``tbf`` and a delaying TCP proxy.

This kernel has no ``netem`` (``tc qdisc ... netem``: "Specified qdisc kind is unknown"), so a link is
emulated in two parts:

- **netns** shaper (root, ``ip netns add`` allowed): three network namespaces ``<prefix>-device``,
  ``<prefix>-edge`` and ``<prefix>-cloud`` joined pairwise by veth pairs, each pair with its own /30 subnet.
  ``tbf`` on both ends of each veth sets the link's rate in each direction. A userspace TCP proxy in the
  client's namespace (the device for device->edge and device->cloud, the edge for edge->cloud) adds the
  one-way delay to each direction: the client connects to the proxy on its own loopback, the proxy to the
  server's address across the veth.
- **inprocess** shaper (no namespaces): everything on loopback; the same proxy adds the delay and also
  limits the rate itself (a FIFO link per direction, shared by every connection through that proxy).

The proxy delivers each chunk ``delay`` after the moment it was read (with a rate limit: after the moment
its last byte left the modelled link), in order, in both directions; delays do not add up chunk after chunk.
Because the delay is added in user space, TCP sees a short round trip on every hop: slow start and window
limits of a real long-delay link are not reproduced (small requests, as here, barely feel them).

Run as a module it is the helper process that lives in a namespace:

    python -m cartosplit.benchmarks.netem proxy --listen 127.0.0.1:0 --target 10.231.1.2:50051 --delay-ms 5
    python -m cartosplit.benchmarks.netem probe-server --listen 0.0.0.0:0
    python -m cartosplit.benchmarks.netem probe --target 127.0.0.1:41234 --bulk-bytes 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from cartosplit.serving.process import ServerProcess

ROLES = ("device", "edge", "cloud")
# canonical link names: the first role is the client side (where the delaying proxy runs in netns mode)
LINK_NAMES = ("device-edge", "edge-cloud", "device-cloud")


# ------------------------------------------------------------------------------------------------ link specs


@dataclass(frozen=True)
class LinkSpec:
    """One link: rate in bits per second (each direction) and one-way delay in milliseconds."""

    rate_bps: int
    delay_ms: float

    def __str__(self) -> str:
        return f"{format_rate(self.rate_bps)}/{self.delay_ms:g}ms"


DEFAULT_LINKS: dict[str, LinkSpec] = {
    "device-edge": LinkSpec(50_000_000, 5.0),  # Wi-Fi
    "edge-cloud": LinkSpec(100_000_000, 30.0),  # metro / backbone
    "device-cloud": LinkSpec(10_000_000, 50.0),  # 4G
}

_RATE_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}  # tc's units, decimal
_DELAY_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_NUMBER_AND_UNIT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*$")
MAX_DELAY_MS = 10_000.0


def parse_rate(text: str) -> int:
    """``"50mbit"`` -> 50_000_000 bits/s. Units as tc writes them: bit, kbit, mbit, gbit (powers of 1000)."""
    match = _NUMBER_AND_UNIT.match(text)
    if not match:
        raise ValueError(f"rate {text!r}: expected a number and a unit, like 50mbit")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _RATE_UNITS:
        raise ValueError(f"rate {text!r}: unknown unit {unit!r}; use bit, kbit, mbit or gbit (bits per second)")
    rate = round(value * _RATE_UNITS[unit])
    if rate < 8_000:
        raise ValueError(f"rate {text!r}: below 8kbit, too slow to carry a request")
    return rate


def parse_delay(text: str) -> float:
    """``"5ms"`` -> 5.0 (milliseconds, one way). Units: us, ms, s."""
    match = _NUMBER_AND_UNIT.match(text)
    if not match:
        raise ValueError(f"delay {text!r}: expected a number and a unit, like 5ms")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _DELAY_UNITS:
        raise ValueError(f"delay {text!r}: unknown unit {unit!r}; use us, ms or s")
    delay = value * _DELAY_UNITS[unit]
    if delay > MAX_DELAY_MS:
        raise ValueError(f"delay {text!r}: over {MAX_DELAY_MS / 1000:g} s one way")
    return delay


def format_rate(rate_bps: int) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        if rate_bps >= _RATE_UNITS[unit]:
            return f"{rate_bps / _RATE_UNITS[unit]:g}{unit}"
    return f"{rate_bps}bit"


def canonical_link(name: str) -> str:
    """``"edge-device"`` -> ``"device-edge"``; refuses unknown roles and a role linked to itself."""
    parts = name.strip().lower().split("-")
    if len(parts) != 2 or any(p not in ROLES for p in parts):
        raise ValueError(f"link {name!r}: expected two of {', '.join(ROLES)} joined by '-', like device-edge")
    if parts[0] == parts[1]:
        raise ValueError(f"link {name!r}: a link joins two different tiers")
    forward, backward = "-".join(parts), "-".join(reversed(parts))
    return forward if forward in LINK_NAMES else backward


def parse_link(text: str) -> tuple[str, LinkSpec]:
    """``"device-edge=50mbit/5ms"`` -> ("device-edge", LinkSpec(50_000_000, 5.0))."""
    name, sep, spec = text.partition("=")
    if not sep:
        raise ValueError(f"--link {text!r}: expected NAME=RATE/DELAY, like device-edge=50mbit/5ms")
    rate, sep, delay = spec.partition("/")
    if not sep:
        raise ValueError(f"--link {text!r}: expected RATE/DELAY after '=', like 50mbit/5ms")
    return canonical_link(name), LinkSpec(parse_rate(rate), parse_delay(delay))


def links_from_args(items: Sequence[str] | None) -> dict[str, LinkSpec]:
    """The default links with each ``--link`` applied; one link given twice is refused."""
    links = dict(DEFAULT_LINKS)
    seen: set[str] = set()
    for item in items or ():
        name, spec = parse_link(item)
        if name in seen:
            raise ValueError(f"--link {name} given twice")
        seen.add(name)
        links[name] = spec
    return links


# ------------------------------------------------------------------------------------------- tc and topology

ETHERNET_FRAME = 1514  # a full-size frame as tbf counts it (IP MTU 1500 + Ethernet header)
TBF_BURST_S = 0.002  # bucket depth: 2 ms of line rate, at least two full frames
TBF_LATENCY_MS = 100.0  # longest a packet may wait in the tbf queue before it is dropped


@dataclass(frozen=True)
class TbfParameters:
    rate_bps: int
    burst_bytes: int
    latency_ms: float


def tbf_parameters(rate_bps: int) -> TbfParameters:
    """tbf settings for a rate: a bucket of 2 ms of traffic (>= 2 frames, so a frame always fits), 100 ms queue."""
    burst = max(math.ceil(rate_bps / 8 * TBF_BURST_S), 2 * ETHERNET_FRAME)
    return TbfParameters(rate_bps, burst, TBF_LATENCY_MS)


def tbf_command(namespace: str, interface: str, params: TbfParameters) -> list[str]:
    """``tc`` command putting a tbf root qdisc on an interface inside a namespace (``replace``: idempotent)."""
    return [
        "tc",
        "-n",
        namespace,
        "qdisc",
        "replace",
        "dev",
        interface,
        "root",
        "tbf",
        "rate",
        f"{params.rate_bps}bit",
        "burst",
        str(params.burst_bytes),
        "latency",
        f"{params.latency_ms:g}ms",
    ]


_TC_STATS = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)")


def parse_tc_stats(text: str) -> dict[str, int] | None:
    """Counters of the first qdisc in ``tc -s qdisc show`` output; None when there is none."""
    match = _TC_STATS.search(text)
    if not match:
        return None
    sent_bytes, packets, dropped, overlimits = (int(g) for g in match.groups())
    return {"sent_bytes": sent_bytes, "sent_packets": packets, "dropped": dropped, "overlimits": overlimits}


SUBNETS = {"device-edge": "10.231.1", "edge-cloud": "10.231.2", "device-cloud": "10.231.3"}  # each a /30


@dataclass(frozen=True)
class VethEnd:
    role: str
    namespace: str
    interface: str
    address: str  # IPv4, without the prefix length


@dataclass(frozen=True)
class VethLink:
    name: str
    spec: LinkSpec
    tbf: TbfParameters
    ends: tuple[VethEnd, VethEnd]  # (client side, server side), in the order of the link's name

    def end(self, role: str) -> VethEnd:
        return next(e for e in self.ends if e.role == role)


@dataclass(frozen=True)
class TopologyPlan:
    prefix: str
    namespaces: dict[str, str]  # role -> namespace name
    links: dict[str, VethLink]


def plan_topology(prefix: str, links: dict[str, LinkSpec]) -> TopologyPlan:
    """Names and addresses of the namespaces and veth pairs; no command is run."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", prefix):
        raise ValueError(f"namespace prefix {prefix!r}: letters, digits, '_', '.', '-' only, at most 41 characters")
    namespaces = {role: f"{prefix}-{role}" for role in ROLES}
    planned = {}
    for name in LINK_NAMES:
        a, b = name.split("-")
        ends = (
            VethEnd(a, namespaces[a], f"to-{b}", f"{SUBNETS[name]}.1"),
            VethEnd(b, namespaces[b], f"to-{a}", f"{SUBNETS[name]}.2"),
        )
        planned[name] = VethLink(name, links[name], tbf_parameters(links[name].rate_bps), ends)
    return TopologyPlan(prefix, namespaces, planned)


def setup_commands(plan: TopologyPlan) -> list[list[str]]:
    """Commands creating the namespaces, the veth pairs, their addresses and their tbf qdiscs."""
    commands = []
    for namespace in plan.namespaces.values():
        commands += [["ip", "netns", "add", namespace], ["ip", "-n", namespace, "link", "set", "lo", "up"]]
    for link in plan.links.values():
        a, b = link.ends
        # created straight inside the namespaces: the host namespace never sees these names, so runs cannot clash
        veth = ["ip", "link", "add", a.interface, "netns", a.namespace, "type", "veth"]
        commands.append([*veth, "peer", "name", b.interface, "netns", b.namespace])
        for end in link.ends:
            commands += [
                ["ip", "-n", end.namespace, "addr", "add", f"{end.address}/30", "dev", end.interface],
                ["ip", "-n", end.namespace, "link", "set", end.interface, "up"],
                tbf_command(end.namespace, end.interface, link.tbf),
            ]
    return commands


def teardown_commands(plan: TopologyPlan) -> list[list[str]]:
    """Deleting a namespace deletes the veth ends in it, and with them their peers."""
    return [["ip", "netns", "delete", namespace] for namespace in plan.namespaces.values()]


def netns_available() -> tuple[bool, str]:
    """Whether this process may create network namespaces (tried, then removed), and why not."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return False, "not root (ip netns add needs CAP_SYS_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"no `{tool}` command (iproute2)"
    probe = f"csprobe-{secrets.token_hex(3)}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return False, f"ip netns add failed: {done.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return True, "root, ip netns add works"


# ------------------------------------------------------------------------------------------------ the proxy


class _LinkDirection:
    """One direction of a link: when a chunk read now reaches the far side (rate first, then delay)."""

    def __init__(self, delay_s: float, rate_bps: int | None) -> None:
        self.delay_s, self.rate_bps = delay_s, rate_bps
        self.free_at = 0.0  # when the modelled wire has sent everything queued so far

    def arrival(self, size: int, now: float) -> float:
        if self.rate_bps is None:
            return now + self.delay_s
        self.free_at = max(now, self.free_at) + size * 8 / self.rate_bps
        return self.free_at + self.delay_s


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DelayProxy:
    """A TCP proxy adding ``delay_s`` one way to each direction; with ``rate_bps``, also that link's rate.

    Each chunk is delivered ``delay_s`` after it was read (or after its last byte left the rate-limited
    link), in order; bytes are never changed, merged out of order or dropped. Half-closes are passed on.
    The rate is one FIFO link per direction, shared by all connections through this proxy.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay_s: float,
        rate_bps: int | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        chunk_bytes: int = 16384,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay must be >= 0 s, got {delay_s}")
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate must be > 0 bit/s, got {rate_bps}")
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.delay_s, self.rate_bps, self.chunk_bytes = delay_s, rate_bps, chunk_bytes
        self.upstream = _LinkDirection(delay_s, rate_bps)  # client -> target
        self.downstream = _LinkDirection(delay_s, rate_bps)  # target -> client
        self.connections = 0
        self.bytes_up = self.bytes_down = 0
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self.connections += 1
        try:
            await self._forward(client_reader, client_writer)
        except asyncio.CancelledError:
            pass  # close() ends every connection; asyncio's stream callback must not see it as an error
        finally:
            self._handlers.discard(task)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        target_writer = None
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the client sees the connection close: the same as the server refusing it
            _no_delay(client_writer)
            _no_delay(target_writer)
            pipes = [
                asyncio.create_task(self._pipe(client_reader, target_writer, self.upstream, "bytes_up")),
                asyncio.create_task(self._pipe(target_reader, client_writer, self.downstream, "bytes_down")),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)  # retrieved: a reset is a normal end
        finally:
            for writer in (client_writer, target_writer):
                if writer is not None:
                    writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _LinkDirection, counter: str
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read_side() -> None:
            while True:
                data = await reader.read(self.chunk_bytes)
                queue.put_nowait((link.arrival(len(data), loop.time()), data))
                if not data:
                    return
                setattr(self, counter, getattr(self, counter) + len(data))

        async def write_side() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # the sender half-closed: pass it on, after the delay like any byte
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        await asyncio.gather(read_side(), write_side())


class ProxyThread:
    """Delay proxies on loopback, served by an event loop in a daemon thread (the inprocess shaper)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxies: list[DelayProxy] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="delay-proxies", daemon=True)
        self._thread.start()

    def add(self, proxy: DelayProxy) -> int:
        """Start ``proxy``; its port."""
        port = asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(timeout=10)
        self.proxies.append(proxy)
        return port

    def remove(self, proxy: DelayProxy) -> None:
        asyncio.run_coroutine_threadsafe(proxy.close(), self.loop).result(timeout=10)
        self.proxies.remove(proxy)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        for proxy in list(self.proxies):
            with contextlib.suppress(Exception):
                self.remove(proxy)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


# ------------------------------------------------------------------------------------------------ link probe


async def _probe_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Per connection: b"P" -> b"p" (a ping); b"B" + length + bytes -> b"b" once all bytes arrived."""
    _no_delay(writer)
    try:
        while True:
            command = await reader.read(1)
            if command == b"P":
                writer.write(b"p")
            elif command == b"B":
                (size,) = struct.unpack("!I", await reader.readexactly(4))
                while size:
                    chunk = await reader.read(min(size, 1 << 16))
                    if not chunk:
                        return
                    size -= len(chunk)
                writer.write(b"b")
            else:
                return
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


def probe_link(host: str, port: int, pings: int = 10, bulk_bytes: int = 1 << 20, timeout_s: float = 60.0) -> dict:
    """Round-trip time of one-byte pings and the goodput of one bulk transfer through a link, measured.

    goodput = bulk bits / (time until the receiver's acknowledgement - the median ping RTT): TCP payload
    only, so it reads a little under a tbf rate, which counts IP and Ethernet headers too.
    """
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            began = time.perf_counter()
            sock.sendall(b"P")
            if sock.recv(1) != b"p":
                raise ConnectionError("probe: no answer to a ping")
            rtts.append(1000 * (time.perf_counter() - began))
        payload = os.urandom(bulk_bytes)
        began = time.perf_counter()
        sock.sendall(b"B" + struct.pack("!I", bulk_bytes) + payload)
        if sock.recv(1) != b"b":
            raise ConnectionError("probe: bulk transfer not acknowledged")
        elapsed_ms = 1000 * (time.perf_counter() - began)
    rtt_ms = sorted(rtts)[len(rtts) // 2]
    transfer_s = max(elapsed_ms - rtt_ms, 1e-3) / 1000
    return {
        "rtt_ms": {"median": round(rtt_ms, 2), "min": round(min(rtts), 2), "max": round(max(rtts), 2)},
        "bulk_bytes": bulk_bytes,
        "bulk_ms": round(elapsed_ms, 1),
        "goodput_mbit": round(bulk_bytes * 8 / transfer_s / 1e6, 2),
    }


# ------------------------------------------------------------------------------------------------ networks


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Network:
    """Where the tiers run and how they reach each other; :class:`NetnsNetwork` or :class:`LoopbackNetwork`."""

    kind = "abstract"
    bind_host = "127.0.0.1"  # the address servers listen on
    links: dict[str, LinkSpec]

    def prefix(self, role: str) -> list[str]:
        """Command prefix that runs a command in ``role``'s network (``ip netns exec NS`` or nothing)."""
        return []

    def open_link(self, client: str, server: str, port: int) -> str:
        """An address ``client`` dials to reach ``server``'s ``port`` through the emulated link between them."""
        raise NotImplementedError

    def close_links(self) -> None:
        """Stop every proxy :meth:`open_link` started (the namespaces, if any, stay)."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def counters(self) -> dict:
        """What the shaper saw (tbf qdisc counters, proxy byte counts)."""
        return {}

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoopbackNetwork(Network):
    """The inprocess shaper: servers on loopback, each link a DelayProxy with its own rate limit."""

    kind = "inprocess"

    def __init__(self, links: dict[str, LinkSpec]) -> None:
        self.links = links
        self.proxies = ProxyThread()
        self.opened: list[tuple[str, DelayProxy]] = []

    def open_link(self, client: str, server: str, port: int) -> str:
        name = canonical_link(f"{client}-{server}")
        spec = self.links[name]
        proxy = DelayProxy("127.0.0.1", port, spec.delay_ms / 1000, rate_bps=spec.rate_bps)
        self.opened.append((name, proxy))
        return f"127.0.0.1:{self.proxies.add(proxy)}"

    def close_links(self) -> None:
        for _, proxy in self.opened:
            with contextlib.suppress(Exception):
                self.proxies.remove(proxy)
        self.opened = []

    def describe(self) -> dict:
        return {
            "shaper": self.kind,
            "how": "all processes on loopback; a userspace TCP proxy per link (asyncio) adds the one-way delay "
            "to each direction and limits the rate (one FIFO link per direction, shared by the link's "
            "connections)",
            "links": {name: {"spec": str(spec)} for name, spec in self.links.items()},
        }

    def counters(self) -> dict:
        return {
            name: {"connections": p.connections, "bytes_up": p.bytes_up, "bytes_down": p.bytes_down}
            for name, p in self.opened
        }

    def close(self) -> None:
        self.close_links()
        self.proxies.close()


class NetnsNetwork(Network):
    """The netns shaper: three namespaces, veth pairs with tbf on both ends, delay proxies as processes.

    Torn down in :meth:`close`, which also runs at interpreter exit and on SIGTERM, so an interrupted run
    leaves no namespace behind.
    """

    kind = "netns"
    bind_host = "0.0.0.0"

    def __init__(self, links: dict[str, LinkSpec], prefix: str | None = None, log: Callable[[str], None] = print):
        self.links = links
        self.plan = plan_topology(prefix or f"cs-{secrets.token_hex(3)}", links)
        self.log = log
        self.proxies: list[tuple[str, ServerProcess]] = []  # (link name, its proxy)
        self._closed = False
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        clash = sorted(set(existing) & set(self.plan.namespaces.values()))
        if clash:
            raise RuntimeError(f"network namespaces already exist: {', '.join(clash)}; choose another prefix")
        atexit.register(self.close)
        self._previous_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            for command in setup_commands(self.plan):
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
        except BaseException:
            self.close()
            raise
        log(f"netns: namespaces {', '.join(self.plan.namespaces.values())} with tbf-shaped veth links")

    def _on_sigterm(self, signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: servers stopped, namespaces deleted

    def prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.plan.namespaces[role]]

    def server_address(self, link: str, role: str) -> str:
        return self.plan.links[link].end(role).address

    def open_link(self, client: str, server: str, port: int) -> str:
        name = canonical_link(f"{client}-{server}")
        spec = self.plan.links[name].spec
        target = f"{self.server_address(name, server)}:{port}"
        args = ["proxy", "--listen", "127.0.0.1:0", "--target", target, "--delay-ms", f"{spec.delay_ms:g}"]
        proxy = ServerProcess(args, f"{name} proxy", timeout_s=30, prefix=self.prefix(client), module=__name__)
        self.proxies.append((name, proxy))
        return proxy.address

    def close_links(self) -> None:
        for _, proxy in reversed(self.proxies):
            with contextlib.suppress(Exception):
                proxy.stop(grace_s=5)
        self.proxies = []

    def describe(self) -> dict:
        return {
            "shaper": self.kind,
            "how": "three Linux network namespaces joined pairwise by veth pairs (own /30 each); tbf on both "
            "ends of each veth sets the rate per direction; a userspace TCP proxy (asyncio, its own process) "
            "in the client's namespace adds the one-way delay to each direction (this kernel has no netem)",
            "namespaces": self.plan.namespaces,
            "links": {
                name: {
                    "spec": str(link.spec),
                    "tbf": asdict(link.tbf),
                    "ends": [asdict(end) for end in link.ends],
                    "proxy_in": link.ends[0].namespace,
                }
                for name, link in self.plan.links.items()
            },
        }

    def counters(self) -> dict:
        stats = {}
        for name, link in self.plan.links.items():
            for end in link.ends:
                command = ["tc", "-s", "-n", end.namespace, "qdisc", "show", "dev", end.interface]
                done = subprocess.run(command, capture_output=True, text=True)
                stats[f"{name} {end.role}->"] = parse_tc_stats(done.stdout) if done.returncode == 0 else None
        return {"tbf": stats}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_links()
        for namespace in self.plan.namespaces.values():
            # anything still inside was started by this run (the names are unique to it): stop it by pid
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        for command in teardown_commands(self.plan):
            subprocess.run(command, capture_output=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def make_network(
    shaper: str, links: dict[str, LinkSpec], prefix: str | None = None, log: Callable[[str], None] = print
) -> tuple[Network, str]:
    """The network for ``--shaper`` (auto: netns when allowed, else inprocess) and why it was chosen."""
    if shaper not in ("auto", "netns", "inprocess"):
        raise ValueError(f"shaper must be auto, netns or inprocess, got {shaper!r}")
    if shaper == "inprocess":
        return LoopbackNetwork(links), "--shaper inprocess given"
    allowed, reason = netns_available()
    if shaper == "netns" and not allowed:
        raise RuntimeError(f"--shaper netns: network namespaces are not available here: {reason}")
    if not allowed:
        log(f"netns not available ({reason}): using the inprocess shaper")
        return LoopbackNetwork(links), f"auto; netns not available: {reason}"
    return NetnsNetwork(links, prefix, log), f"{'auto' if shaper == 'auto' else '--shaper netns given'}; {reason}"


def check_links(
    network: Network, log: Callable[[str], None] = print, probe_s: float = 0.4, pings: int = 10
) -> dict[str, dict]:
    """Measure each link as its client sees it: ping RTT and bulk goodput through the emulation."""
    results = {}
    for name in LINK_NAMES:
        spec = network.links[name]
        client, server = name.split("-")
        probe_server = ServerProcess(
            ["probe-server", "--listen", f"{network.bind_host}:0"],
            f"{name} probe server",
            timeout_s=30,
            prefix=network.prefix(server),
            module=__name__,
        )
        try:
            address = network.open_link(client, server, int(probe_server.address.rsplit(":", 1)[1]))
            bulk = int(min(max(spec.rate_bps / 8 * probe_s, 64 << 10), 16 << 20))
            command = network.prefix(client) + _python_module(
                __name__, "probe", "--target", address, "--pings", str(pings), "--bulk-bytes", str(bulk)
            )
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"link probe {name} failed: {done.stderr.strip()[-500:]}")
            measured = json.loads(done.stdout)
        finally:
            network.close_links()
            probe_server.stop(grace_s=5)
        results[name] = {"configured": str(spec), "expected_rtt_ms": 2 * spec.delay_ms, **measured}
        log(
            f"link {name}: configured {spec}; measured RTT {measured['rtt_ms']['median']} ms, "
            f"goodput {measured['goodput_mbit']} Mbit/s"
        )
    return results


# ------------------------------------------------------------------------------------------------ helper CLI


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _serve_until_signal(start: Callable[[], object], banner: Callable[[], str], stop: Callable) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await start()
    print(banner(), flush=True)
    await stopped.wait()
    await stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cartosplit.benchmarks.netem", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("proxy", help="a delaying (and optionally rate-limiting) TCP proxy until SIGTERM")
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    p.add_argument("--target", type=_address, required=True)
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each direction")
    p.add_argument("--rate", type=parse_rate, help="also limit the rate, e.g. 10mbit (default: no limit)")
    p = sub.add_parser("probe-server", help="answer link probes until SIGTERM")
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    p = sub.add_parser("probe", help="measure RTT and goodput to a probe server; prints JSON")
    p.add_argument("--target", type=_address, required=True)
    p.add_argument("--pings", type=int, default=10)
    p.add_argument("--bulk-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)

    if args.command == "probe":
        print(json.dumps(probe_link(*args.target, pings=args.pings, bulk_bytes=args.bulk_bytes)))
        return 0
    if args.command == "proxy":
        proxy = DelayProxy(*args.target, args.delay_ms / 1000, args.rate, *args.listen)
        target = f"{args.target[0]}:{args.target[1]}"
        asyncio.run(
            _serve_until_signal(
                proxy.start,
                lambda: f"proxy serving {target} +{args.delay_ms:g}ms on {args.listen[0]}:{proxy.port}",
                proxy.close,
            )
        )
        return 0
    servers: list[asyncio.base_events.Server] = []

    async def start() -> None:
        servers.append(await asyncio.start_server(_probe_connection, *args.listen))

    async def stop() -> None:
        servers[0].close()

    asyncio.run(
        _serve_until_signal(
            start, lambda: f"probe serving probes on {args.listen[0]}:{servers[0].sockets[0].getsockname()[1]}", stop
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
