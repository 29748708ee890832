"""Packet crafting for BPF_PROG_TEST_RUN: Ethernet frames built from plain bytes.

Just enough of each header for the classifier's parser (Katran's fixtures and
Cilium's PKTGEN build packets the same way): addresses and ports where the
wire puts them, a correct IPv4 header checksum so a test can check that a DSCP
rewrite kept it correct.
"""

from __future__ import annotations

import ipaddress
import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
IPPROTO_TCP = 6
IPPROTO_UDP = 17

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
ETH_LEN = 14


def ether(ethertype: int, payload: bytes) -> bytes:
    return DST_MAC + SRC_MAC + struct.pack("!H", ethertype) + payload


def checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, as it goes into the checksum field."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A TCP header (ACK, no options; checksum left zero: the classifier ignores it)."""
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(
    src: str,
    dst: str,
    l4: bytes,
    *,
    proto: int = IPPROTO_TCP,
    tos: int = 0,
    frag_off: int = 0x4000,  # DF, offset 0
    options: bytes = b"",
) -> bytes:
    """An IPv4 header (with ``options``, padded to 32-bit words) and a valid checksum."""
    options += b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(l4)
    head = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            tos,
            total,
            0x1234,
            frag_off,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + options
    )
    csum = checksum(head)
    return head[:10] + struct.pack("!H", csum) + head[12:] + l4


def ipv6(
    src: str,
    dst: str,
    l4: bytes,
    *,
    proto: int = IPPROTO_TCP,
    tclass: int = 0,
    flow_label: int = 0x12345,
) -> bytes:
    word = (6 << 28) | (tclass << 20) | flow_label
    return (
        struct.pack("!IHBB", word, len(l4), proto, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + l4
    )


def tcp4(src: tuple[str, int], dst: tuple[str, int], **ip_kw) -> bytes:
    """Ethernet + IPv4 + TCP from ``src`` to ``dst`` (each (address, port))."""
    return ether(ETH_P_IP, ipv4(src[0], dst[0], tcp(src[1], dst[1], b"x" * 32), **ip_kw))


def tcp6(src: tuple[str, int], dst: tuple[str, int], **ip_kw) -> bytes:
    return ether(ETH_P_IPV6, ipv6(src[0], dst[0], tcp(src[1], dst[1], b"x" * 32), **ip_kw))


def udp4(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    return ether(ETH_P_IP, ipv4(src[0], dst[0], udp(src[1], dst[1], b"q" * 16), proto=IPPROTO_UDP))


def arp(sender: str, target: str) -> bytes:
    """An ARP request (who-has target tell sender)."""
    body = (
        struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1)
        + SRC_MAC
        + ipaddress.IPv4Address(sender).packed
        + b"\0" * 6
        + ipaddress.IPv4Address(target).packed
    )
    return ether(ETH_P_ARP, body)


# ------------------------------------------------------------------ reading back


def ipv4_tos(frame: bytes) -> int:
    return frame[ETH_LEN + 1]


def ipv4_header_ok(frame: bytes) -> bool:
    """True when the IPv4 header's checksum verifies (sums to zero with itself)."""
    ihl = (frame[ETH_LEN] & 0x0F) * 4
    return checksum(frame[ETH_LEN : ETH_LEN + ihl]) == 0


def ipv6_tclass(frame: bytes) -> int:
    (word,) = struct.unpack("!I", frame[ETH_LEN : ETH_LEN + 4])
    return (word >> 20) & 0xFF


def ipv6_flow_label(frame: bytes) -> int:
    (word,) = struct.unpack("!I", frame[ETH_LEN : ETH_LEN + 4])
    return word & 0xFFFFF
