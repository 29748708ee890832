/*
 * Layout probe for tests/unit/test_abi.py (Cilium's alignchecker, without BTF):
 * compiled with the host compiler against bpf/sc_abi.h, it prints every shared
 * struct's size, each field's offset and size, and every constant, one per line:
 *
 *   size STRUCT BYTES
 *   field STRUCT FIELD OFFSET BYTES
 *   const NAME VALUE
 *
 * The test compares these with sidecar/datapath/abi.py. A field listed here but
 * missing in abi.py (or the other way round) fails the test too.
 */
#include <stddef.h>
#include <stdio.h>

#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#include "sc_abi.h"

#define SIZE(s) printf("size %s %zu\n", #s, sizeof(struct s))
#define FIELD(s, f) \
	printf("field %s %s %zu %zu\n", #s, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f))
#define CONST(c) printf("const %s %lld\n", #c, (long long)(c))

int main(void)
{
	SIZE(sc_flow4_key);
	FIELD(sc_flow4_key, saddr);
	FIELD(sc_flow4_key, daddr);
	FIELD(sc_flow4_key, sport);
	FIELD(sc_flow4_key, dport);

	SIZE(sc_flow6_key);
	FIELD(sc_flow6_key, saddr);
	FIELD(sc_flow6_key, daddr);
	FIELD(sc_flow6_key, sport);
	FIELD(sc_flow6_key, dport);

	SIZE(sc_flow_value);
	FIELD(sc_flow_value, color_id);
	FIELD(sc_flow_value, flags);

	SIZE(sc_color);
	FIELD(sc_color, mark);
	FIELD(sc_color, mask);
	FIELD(sc_color, priority);
	FIELD(sc_color, flags);
	FIELD(sc_color, dscp);
	FIELD(sc_color, pad);

	SIZE(sc_config);
	FIELD(sc_config, generation);
	FIELD(sc_config, reserved);

	SIZE(sc_counter);
	FIELD(sc_counter, packets);
	FIELD(sc_counter, bytes);

	SIZE(sc_node_color);
	FIELD(sc_node_color, mark);
	FIELD(sc_node_color, keep);
	FIELD(sc_node_color, priority);
	FIELD(sc_node_color, flags);
	FIELD(sc_node_color, color_id);
	FIELD(sc_node_color, restore_dscp);
	FIELD(sc_node_color, pad);

	SIZE(sc_node_table);
	FIELD(sc_node_table, generation);
	FIELD(sc_node_table, reserved);
	FIELD(sc_node_table, colors);


	SIZE(sc_node_counters);
	FIELD(sc_node_counters, colors);

	/* The BPF_PROG_TEST_RUN context: only the fields abi.SkBuff names. */
	SIZE(__sk_buff);
	FIELD(__sk_buff, len);
	FIELD(__sk_buff, pkt_type);
	FIELD(__sk_buff, mark);
	FIELD(__sk_buff, queue_mapping);
	FIELD(__sk_buff, protocol);
	FIELD(__sk_buff, vlan_present);
	FIELD(__sk_buff, vlan_tci);
	FIELD(__sk_buff, vlan_proto);
	FIELD(__sk_buff, priority);
	FIELD(__sk_buff, ingress_ifindex);
	FIELD(__sk_buff, ifindex);
	FIELD(__sk_buff, tc_index);
	FIELD(__sk_buff, cb);
	FIELD(__sk_buff, hash);
	FIELD(__sk_buff, tc_classid);
	FIELD(__sk_buff, data);
	FIELD(__sk_buff, data_end);

	CONST(SC_MAX_COLORS);
	CONST(SC_GENERATIONS);
	CONST(SC_HOOK_INGRESS);
	CONST(SC_HOOK_EGRESS);
	CONST(SC_HOOKS);
	CONST(F_PRESENT);
	CONST(F_HAS_PRIORITY);
	CONST(F_HAS_DSCP);
	CONST(F_FLOW_REPLY);
	CONST(SC_STATS_SLOTS);
	CONST(SC_DSCP_VALUES);
	CONST(F_RESTORE_DSCP);
	CONST(TC_ACT_UNSPEC);
	return 0;
}
