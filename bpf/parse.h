/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Header parsing for the classifier: Ethernet, then IPv4 or IPv6, then TCP.
 *
 * Every access is bounds-checked against data_end; anything the parser does
 * not understand (other ethertypes including VLAN tags, non-TCP, IPv4
 * fragments, truncated headers) makes it return -1 so the packet passes
 * untouched. IPv6 extension headers are not walked: only packets whose
 * fixed header says next header == TCP are parsed, which is what the
 * sidecar's own TCP connections send. IPv6 fragments carry next header 44
 * and are therefore skipped like IPv4 fragments.
 *
 * Cost matters here (bench/bpf_cost.py holds the classifier to 2x an empty
 * program): each family needs one bounds check for Ethernet + IP + TCP
 * together, plus one more only for IPv4 headers with options, and the key is
 * filled with word-sized copies straight from the headers. What only the rare
 * DSCP rewrite needs is read again there (sc_set_dscp), not on every packet.
 */
#ifndef SC_PARSE_H
#define SC_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "sc_abi.h"

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define sc_htons(x) ((__be16)__builtin_bswap16(x))
#define sc_ntohs(x) ((__u16)__builtin_bswap16(x))
#define sc_ntohl(x) ((__u32)__builtin_bswap32(x))
#else
#define sc_htons(x) ((__be16)(x))
#define sc_ntohs(x) ((__u16)(x))
#define sc_ntohl(x) ((__u32)(x))
#endif

/* IPv4 frag_off bits (include/net/ip.h is not UAPI). */
#define SC_IP_MF 0x2000
#define SC_IP_OFFSET 0x1fff

/* Where the IP header starts: right after an untagged Ethernet header. */
#define SC_L3_OFF sizeof(struct ethhdr)

/* Ethernet + IPv4 + TCP: fill *key; 0 when it is a TCP segment we can key, else -1. */
static __always_inline int sc_parse4(void *data, void *data_end, struct sc_flow4_key *key)
{
	struct iphdr *ip = data + SC_L3_OFF;
	struct tcphdr *tcp = (void *)(ip + 1);

	/* One check for the common case, an IPv4 header without options. */
	if ((void *)(tcp + 1) > data_end)
		return -1;
	if (ip->protocol != IPPROTO_TCP || (ip->frag_off & sc_htons(SC_IP_MF | SC_IP_OFFSET)))
		return -1;
	if (ip->ihl != 5) {
		/* Options: the TCP header starts after ihl 32-bit words. */
		if (ip->ihl < 5)
			return -1;
		tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) > data_end)
			return -1;
	}
	/* saddr, daddr and source, dest are adjacent on the wire and in the key. */
	__builtin_memcpy(key, &ip->saddr, 8);
	__builtin_memcpy((void *)key + __builtin_offsetof(typeof(*key), sport), &tcp->source, 4);
	return 0;
}

/* Ethernet + IPv6 + TCP (no extension headers): as sc_parse4. */
static __always_inline int sc_parse6(void *data, void *data_end, struct sc_flow6_key *key)
{
	struct ipv6hdr *ip6 = data + SC_L3_OFF;
	struct tcphdr *tcp = (void *)(ip6 + 1);

	if ((void *)(tcp + 1) > data_end)
		return -1;
	if (ip6->nexthdr != IPPROTO_TCP)
		return -1;
	/* saddr then daddr, in 32-bit words (the compiler would copy the packed bytes in halves) */
	const __u32 *addrs = (const __u32 *)&ip6->saddr;
	__u32 *out = (__u32 *)key;
#pragma unroll
	for (int i = 0; i < 8; i++)
		out[i] = addrs[i];
	__builtin_memcpy((void *)key + __builtin_offsetof(typeof(*key), sport), &tcp->source, 4);
	return 0;
}

#endif /* SC_PARSE_H */
