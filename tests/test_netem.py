"""Emulated links for the e2e benchmark: link specs, tc commands, the delaying proxy, and a smoke run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from cartosplit.benchmarks import netem
from cartosplit.benchmarks.netem import (
    DEFAULT_LINKS,
    DelayProxy,
    LinkSpec,
    ProxyThread,
    links_from_args,
    parse_link,
    parse_tc_stats,
    plan_topology,
    setup_commands,
    tbf_command,
    tbf_parameters,
    teardown_commands,
)
from tests.conftest import synthetic_rows, write_csv

# ------------------------------------------------------------------------------------------------ link specs


@pytest.mark.parametrize(
    ("text", "name", "rate", "delay"),
    [
        ("device-edge=50mbit/5ms", "device-edge", 50_000_000, 5.0),
        ("edge-device=1.5Mbit/250us", "device-edge", 1_500_000, 0.25),  # either order, any case
        ("cloud-edge=1gbit/0.03s", "edge-cloud", 1_000_000_000, 30.0),
        ("device-cloud=64kbit/0ms", "device-cloud", 64_000, 0.0),
    ],
)
def test_parse_link_reads_name_rate_and_delay(text, name, rate, delay):
    assert parse_link(text) == (name, LinkSpec(rate, delay))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device-edge", "expected NAME=RATE/DELAY"),
        ("device-edge=50mbit", "expected RATE/DELAY"),
        ("device-phone=1mbit/1ms", "expected two of device, edge, cloud"),
        ("device-edge-cloud=1mbit/1ms", "expected two of device, edge, cloud"),
        ("edge-edge=1mbit/1ms", "two different tiers"),
        ("device-edge=50mb/5ms", "unknown unit 'mb'"),
        ("device-edge=50mbps/5ms", "unknown unit 'mbps'"),
        ("device-edge=fast/5ms", "expected a number and a unit"),
        ("device-edge=1bit/5ms", "below 8kbit"),
        ("device-edge=50mbit/5", "expected a number and a unit"),
        ("device-edge=50mbit/-1ms", "expected a number and a unit"),
        ("device-edge=50mbit/5min", "unknown unit 'min'"),
        ("device-edge=50mbit/11s", "over 10 s"),
    ],
)
def test_parse_link_refuses_bad_specs_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        parse_link(text)


def test_links_from_args_overrides_defaults_and_refuses_a_link_twice():
    links = links_from_args(["edge-device=10mbit/20ms"])
    assert links["device-edge"] == LinkSpec(10_000_000, 20.0)
    assert links["edge-cloud"] == DEFAULT_LINKS["edge-cloud"]
    assert links_from_args(None) == DEFAULT_LINKS
    assert str(DEFAULT_LINKS["device-cloud"]) == "10mbit/50ms"
    with pytest.raises(ValueError, match="given twice"):
        links_from_args(["device-edge=1mbit/1ms", "edge-device=2mbit/1ms"])


# ------------------------------------------------------------------------------------------- tc and topology


def test_tbf_parameters_and_command():
    slow, fast = tbf_parameters(10_000_000), tbf_parameters(100_000_000)
    assert slow.burst_bytes == 2 * 1514  # 2 ms of 10 Mbit is less than two full frames
    assert fast.burst_bytes == 25_000  # 2 ms of 100 Mbit
    assert tbf_command("ns-a", "to-b", fast) == [
        *("tc", "-n", "ns-a", "qdisc", "replace", "dev", "to-b", "root", "tbf"),
        *("rate", "100000000bit", "burst", "25000", "latency", "100ms"),
    ]


def test_topology_commands_make_three_namespaces_three_shaped_veth_pairs_and_delete_them():
    links = links_from_args(["device-cloud=2mbit/40ms"])
    plan = plan_topology("cs-test", links)
    assert plan.namespaces == {"device": "cs-test-device", "edge": "cs-test-edge", "cloud": "cs-test-cloud"}
    commands = setup_commands(plan)
    assert [c[3] for c in commands if c[:3] == ["ip", "netns", "add"]] == list(plan.namespaces.values())
    veths = [c for c in commands if c[:3] == ["ip", "link", "add"]]
    assert veths[2] == [
        *("ip", "link", "add", "to-cloud", "netns", "cs-test-device", "type", "veth"),
        *("peer", "name", "to-device", "netns", "cs-test-cloud"),
    ]
    addresses = [c[5] for c in commands if c[3:5] == ["addr", "add"]]
    assert len(addresses) == 6 and len(set(addresses)) == 6 and all(a.endswith("/30") for a in addresses)
    # each /30 holds exactly the two ends of one link
    assert {a.rsplit(".", 1)[0] for a in addresses} == {"10.231.1", "10.231.2", "10.231.3"}
    tbfs = [c for c in commands if c[0] == "tc"]
    assert len(tbfs) == 6  # both ends of every veth
    assert tbf_command("cs-test-cloud", "to-device", tbf_parameters(2_000_000)) in tbfs
    assert teardown_commands(plan) == [["ip", "netns", "delete", ns] for ns in plan.namespaces.values()]
    with pytest.raises(ValueError, match="namespace prefix"):
        plan_topology("bad name;rm", links)


def test_parse_tc_stats():
    text = (
        "qdisc tbf 8001: root refcnt 3 rate 10Mbit burst 3028b lat 100ms \n"
        " Sent 525863 bytes 390 pkt (dropped 59, overlimits 763 requeues 0) \n backlog 0b 0p requeues 0\n"
    )
    assert parse_tc_stats(text) == {"sent_bytes": 525863, "sent_packets": 390, "dropped": 59, "overlimits": 763}
    assert parse_tc_stats("") is None


def test_make_network_falls_back_when_namespaces_are_refused(monkeypatch):
    monkeypatch.setattr(netem, "netns_available", lambda: (False, "not root"))
    network, why = netem.make_network("auto", DEFAULT_LINKS)
    with network:
        assert network.kind == "inprocess" and "not root" in why
    with pytest.raises(RuntimeError, match="not available here: not root"):
        netem.make_network("netns", DEFAULT_LINKS)
    with pytest.raises(ValueError, match="shaper must be"):
        netem.make_network("tc", DEFAULT_LINKS)


# ------------------------------------------------------------------------------------------------ the proxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(7000):  # an odd size: chunks are cut differently on each hop
        writer.write(data)
        await writer.drain()
    writer.close()


async def _reverse_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()  # until the client half-closes
    writer.write(data[::-1])
    await writer.drain()
    writer.close()


async def _through_proxy(handler, rate_bps, exchange, connections: int = 1, delay_s: float = 0.005):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    proxy = DelayProxy("127.0.0.1", server.sockets[0].getsockname()[1], delay_s, rate_bps=rate_bps)
    port = await proxy.start()
    try:
        return await asyncio.gather(*(exchange(port, k) for k in range(connections))), proxy
    finally:
        await proxy.close()
        server.close()


@pytest.mark.parametrize("rate_bps", [None, 200_000_000])
def test_delay_proxy_forwards_bytes_intact_and_in_order_both_ways(rate_bps):
    payloads = [os.urandom(150_000 + 1000 * k) for k in range(3)]

    async def exchange(port: int, k: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for start in range(0, len(payloads[k]), 9000):  # many writes, interleaved across connections
            writer.write(payloads[k][start : start + 9000])
            await writer.drain()
        received = await reader.readexactly(len(payloads[k]))
        writer.close()
        return received

    received, proxy = asyncio.run(_through_proxy(_echo, rate_bps, exchange, connections=3))
    assert received == payloads
    assert proxy.connections == 3
    assert proxy.bytes_up == proxy.bytes_down == sum(map(len, payloads))


def test_delay_proxy_passes_half_close_on():
    payload = os.urandom(50_000)

    async def exchange(port: int, k: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        answer = await reader.read()  # until the server, through the proxy, closes
        writer.close()
        return answer

    (answer,), _ = asyncio.run(_through_proxy(_reverse_after_eof, 50_000_000, exchange))
    assert answer == payload[::-1]


def test_delay_proxy_adds_at_least_the_delay_each_way():
    loop_time = []

    async def exchange(port: int, k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        for _ in range(3):
            began = loop.time()
            writer.write(b"x")
            await reader.readexactly(1)
            loop_time.append(loop.time() - began)
        writer.close()

    asyncio.run(_through_proxy(_echo, None, exchange, delay_s=0.02))
    assert min(loop_time) >= 0.04  # a lower bound only: the delay, once each way


def test_probe_link_through_a_proxy_thread():
    proxies = ProxyThread()
    try:
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(netem._probe_connection, "127.0.0.1", 0), proxies.loop
        ).result()
        port = proxies.add(DelayProxy("127.0.0.1", server.sockets[0].getsockname()[1], 0.002, 100_000_000))
        measured = netem.probe_link("127.0.0.1", port, pings=3, bulk_bytes=200_000)
        proxies.loop.call_soon_threadsafe(server.close)
    finally:
        proxies.close()
    assert measured["bulk_bytes"] == 200_000
    assert measured["rtt_ms"]["min"] >= 4.0  # 2 ms each way, at least
    assert measured["goodput_mbit"] > 0


# ------------------------------------------------------------------------------------------------ e2e smoke


FAST_LINKS = ["--link", "device-edge=1gbit/1ms", "--link", "edge-cloud=1gbit/2ms", "--link", "device-cloud=1gbit/3ms"]


def _smoke(bundle, tmp_path, shaper: str, extra: list[str]) -> dict:
    from cartosplit.benchmarks.e2e import main

    dev = write_csv(tmp_path / "dev.csv", synthetic_rows(6, seed=5, noise=0.0))
    out = tmp_path / "e2e"
    argv = ["--bundle", str(bundle), "--dev-file", str(dev), "--clients", "2", "--warmup", "1"]
    argv += ["--shaper", shaper, *FAST_LINKS, "--device-format", "onnx-int8", "--out", str(out), *extra]
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().startswith("# End to end over emulated links")
    assert report["command"].startswith("cartosplit bench e2e ") and report["machine"]
    assert report["network"]["shaper"] == shaper
    assert set(report["results"]) == {"cartosplit", "all-cloud", "all-device"}
    for mode, passes in report["results"].items():
        assert set(passes) == {"sequential", "concurrent"}
        for name, p in passes.items():
            assert p["every_input_answered"] and p["answered"] == 6 and p["errors"] == 0, (mode, name, p)
            assert p["clients"] == (1 if name == "sequential" else 2)
            assert 0.0 <= p["accuracy"] <= 1.0 and p["latency_ms"]["count"] == 6
            assert abs(sum(p["share_by_tier"].values()) - 1.0) < 1e-3
    assert report["results"]["all-device"]["sequential"]["share_by_tier"] == {"device": 1.0}
    assert report["results"]["all-device"]["sequential"]["bytes_sent_per_input"] == 0
    assert report["results"]["all-cloud"]["sequential"]["share_by_tier"] == {"cloud": 1.0}
    assert report["results"]["all-cloud"]["sequential"]["bytes_sent_per_input"] > 0
    return report


def test_e2e_smoke_inprocess(bundle, tmp_path):
    report = _smoke(bundle, tmp_path, "inprocess", ["--no-link-check"])
    assert (tmp_path / "e2e.png").stat().st_size > 0
    assert report["measured_links"] == {}
    # the device reached the cloud through the device-cloud proxy: it counted the all-cloud requests
    assert report["shaper_counters"]["device-cloud"]["bytes_up"] > 0


def _netns_refusal() -> str | None:
    allowed, reason = netem.netns_available()
    return None if allowed else reason


@pytest.mark.skipif(_netns_refusal() is not None, reason=f"network namespaces unavailable: {_netns_refusal()}")
def test_e2e_smoke_in_network_namespaces(bundle, tmp_path):
    prefix = f"cstest{os.getpid()}"
    report = _smoke(bundle, tmp_path, "netns", ["--netns-prefix", prefix, "--probe-seconds", "0.01", "--no-plot"])
    assert report["network"]["namespaces"]["device"] == f"{prefix}-device"
    assert set(report["measured_links"]) == {"device-edge", "edge-cloud", "device-cloud"}
    assert report["measured_links"]["device-cloud"]["rtt_ms"]["min"] >= 6.0  # 3 ms each way, at least
    tbf = report["shaper_counters"]["tbf"]
    assert tbf["device-cloud device->"]["sent_bytes"] > 0  # all-cloud traffic crossed the shaped veth
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in left  # torn down
