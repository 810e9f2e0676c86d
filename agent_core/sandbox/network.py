"""Network "on" for bubblewrap sandboxes: slirp4netns gives the sandbox's namespace outbound access, and an
nftables filter inside that namespace keeps it to the public internet (no host, LAN or metadata addresses)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess

SLIRP_DNS = "10.0.2.3"
DNS_CONFIG = f"nameserver {SLIRP_DNS}\n".encode()
# Never reachable from a sandbox: private, shared, link-local (cloud metadata), documentation and multicast ranges.
BLOCKED_V4 = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
              "203.0.113.0/24", "224.0.0.0/3"]
BLOCKED_V6 = ["::1/128", "fc00::/7", "fe80::/10", "ff00::/8"]


def host_addresses() -> tuple[list[str], list[str]]:
    """The host's own addresses: services bound to them must stay out of reach too."""
    proc = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=False)
    v4: list[str] = []
    v6: list[str] = []
    for link in json.loads(proc.stdout or "[]"):
        for info in link.get("addr_info", []):
            address = ipaddress.ip_address(info["local"].split("%")[0])
            (v4 if address.version == 4 else v6).append(str(address))
    return v4, v6


def egress_rules() -> str:
    v4, v6 = host_addresses()
    blocked4 = ", ".join([*BLOCKED_V4, *v4])
    blocked6 = ", ".join([*BLOCKED_V6, *v6])
    return f"""
table inet autocode_egress {{
  chain output {{
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    ip daddr {SLIRP_DNS} udp dport 53 accept
    ip daddr {SLIRP_DNS} tcp dport 53 accept
    ip daddr {{ {blocked4} }} reject with icmp type admin-prohibited
    ip6 daddr {{ {blocked6} }} reject with icmpv6 type admin-prohibited
  }}
}}
"""


async def attach(child_pid: int) -> asyncio.subprocess.Process:
    """Start slirp4netns for the namespace of `child_pid` and fence it; returns the slirp process to kill later."""
    loop = asyncio.get_running_loop()
    ready_read, ready_write = os.pipe()
    slirp = await asyncio.create_subprocess_exec(
        "slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback", f"--ready-fd={ready_write}",
        str(child_pid), "tap0",
        pass_fds=[ready_write], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    os.close(ready_write)
    try:
        await asyncio.wait_for(loop.run_in_executor(None, os.read, ready_read, 1), 10)
        firewall = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/proc/{child_pid}/ns/net", "nft", "-f", "-",
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _, error = await firewall.communicate(egress_rules().encode())
        if firewall.returncode != 0:
            raise OSError(f"nft refused the sandbox egress rules: {error.decode().strip()}")
    except BaseException:
        slirp.kill()
        await slirp.wait()
        raise
    finally:
        os.close(ready_read)
    return slirp
