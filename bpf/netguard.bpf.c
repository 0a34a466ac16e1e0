// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * netguard tc/eBPF datapath: classification, wire-view telemetry and leak guard.
 *
 * Two programs for a clsact qdisc on the robot's uplink, attached direct-action:
 *   tg_egress   (clsact egress,  parent ffff:fff3)  remote address = destination
 *   tg_ingress  (clsact ingress, parent ffff:fff2)  remote address = source
 *
 * ABI
 *   TG_ABI_VERSION lives in its own read-only section (.rodata.tg_abi, variable tg_abi_version).
 *   The loader (agent/tensorguard/netguard/kernel/tc.py) reads it from the opened object, before
 *   anything is loaded into the kernel, and refuses an object whose version differs from
 *   bpf_maps.ABI_VERSION. It also compares every map's key/value size with the Python layouts.
 *   Bump TG_ABI_VERSION whenever a struct below, a map, a constant or a semantic changes.
 *
 * Maps and their C layout (mirrored by agent/tensorguard/netguard/kernel/bpf_maps.py; all
 * integers host byte order unless noted, addresses network byte order):
 *
 *   tg_config    ARRAY[1]        u32 -> struct tg_config (16 bytes)
 *                  u32 mode          0 observe, 1 fail-open, 2 fail-closed (zeroed map = observe)
 *                  u32 shaper_mark   bits the shaper (NFQUEUE pacer) sets on released packets
 *                  u32 shaper_mask   a packet passed the shaper iff (mark & mask) == shaper_mark
 *                  u32 l2_hlen       bytes before the IP header: 14 (Ethernet) or 0 (tun, wg)
 *
 *   tg_selectors LPM_TRIE        struct tg_lpm_key (24) -> struct tg_lpm_val (8 * 24 = 192)
 *                  key:  u32 prefixlen (bits, counting the family byte: 8 + prefix length)
 *                        u8  family (4 or 6) ; u8 addr[16] (IPv4 in addr[0..3]) ; u8 pad[3]
 *                  val:  TG_MAX_RULES x struct tg_rule { u64 cgroup_id; u32 id;
 *                                   u16 port_lo; u16 port_hi; u8 proto; u8 cgroup_level; u8 pad[6] }
 *                        cgroup_id != 0 restricts an egress rule to sockets inside that cgroup v2
 *                        (the systemd unit's; bpf_skb_ancestor_cgroup_id at cgroup_level). On
 *                        ingress no sending socket is known: such rules match on address only.
 *                        id 0 ends the list. Rules are ordered most specific first; the loader
 *                        copies the rules of every shorter prefix that contains this one into
 *                        its entry, so the longest-prefix hit alone decides (no fallback walk).
 *                        proto: 0 any, 6 tcp, 17 udp. Ports are the REMOTE port (destination
 *                        on egress, source on ingress), inclusive. A packet whose ports are
 *                        unknown (not TCP/UDP, non-first fragment) matches on address+proto.
 *
 *   tg_sel_stats HASH            struct tg_sel_key (8) -> struct tg_sel_stats (552)
 *                  key:  u32 selector_id ; u32 dir (0 egress, 1 ingress)
 *                  val:  u64 packets, bytes, unshaped, dropped, last_ns,
 *                        u64 size_hist[TG_SIZE_BINS], u64 iat_hist[TG_IAT_BINS]
 *                  Entries are created (zeroed) by the loader for every selector/direction;
 *                  the program only updates existing ones (no 552-byte value on the stack).
 *                  size_hist: IP packet length in 64-byte bins, last bin = 1984 bytes and more.
 *                  iat_hist:  time since the previous packet of the same selector/direction,
 *                             bin 0 = < 1 us, bin i = [2^(i-1), 2^i) us, last bin open-ended.
 *
 *   tg_flows     LRU_HASH        struct tg_flow_key (40) -> struct tg_flow_val (40)
 *                  key:  u8 family, proto, dir, pad ; u16 local_port, remote_port (host order)
 *                        u8 local_addr[16] ; u8 remote_addr[16]
 *                  val:  u64 packets, bytes, first_ns, last_ns ; u32 selector_id ; u32 pad
 *                  Protected flows only.
 *
 *   tg_global    PERCPU_ARRAY[TG_G_MAX * 2]   u32 (dir * TG_G_MAX + counter) -> u64
 *                  counters: TG_G_* below, for all traffic crossing the hook.
 *
 * Sizes are IP packet lengths (IPv4 total length, IPv6 payload length + 40): what an eavesdropper
 * on the link sees, minus link framing. GSO/TSO super-packets (TCP on offloading NICs, UDP_SEGMENT)
 * reach tc before segmentation and are counted as one packet of their total length. Not parsed: VLAN tags in the payload, IPv6 extension
 * headers other than Fragment (such packets count as "ports unknown").
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef TG_ABI_VERSION
#define TG_ABI_VERSION 1
#endif

#define TG_MAX_RULES 8
#define TG_SIZE_BINS 32
#define TG_SIZE_BIN_SHIFT 6 /* 64-byte bins */
#define TG_IAT_BINS 32
#define TG_MAX_SELECTOR_ENTRIES 4096
#define TG_MAX_FLOWS 16384

#define TG_DIR_EGRESS 0
#define TG_DIR_INGRESS 1

#define TG_MODE_OBSERVE 0
#define TG_MODE_FAIL_OPEN 1
#define TG_MODE_FAIL_CLOSED 2

#define TG_PROTO_ANY 0

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define NEXTHDR_FRAGMENT 44

/* Global counters, per direction. */
enum {
	TG_G_PACKETS = 0,   /* every packet the program saw */
	TG_G_BYTES,         /* skb->len of those */
	TG_G_IPV4,
	TG_G_IPV6,
	TG_G_OTHER,         /* not IP (ARP, ...) */
	TG_G_TRUNCATED,     /* IP but headers shorter than they claim: passed, unclassified */
	TG_G_PROTECTED,     /* matched a selector */
	TG_G_UNSHAPED,      /* protected egress without the shaper mark (fail-open / closed) */
	TG_G_DROPPED,       /* of those, dropped (fail-closed) */
	TG_G_NO_STATS,      /* protected but no tg_sel_stats entry (selector being swapped) */
	TG_G_MAX = 16,
};

/* Read by the loader only; its own section so it can be found without BTF parsing. */
const volatile __u32 tg_abi_version SEC(".rodata.tg_abi") = TG_ABI_VERSION;

struct tg_config {
	__u32 mode;
	__u32 shaper_mark;
	__u32 shaper_mask;
	__u32 l2_hlen;
};

struct tg_lpm_key {
	__u32 prefixlen;
	__u8 family;
	__u8 addr[16];
	__u8 pad[3];
};

struct tg_rule {
	__u64 cgroup_id;   /* 0: any sender; else the cgroup v2 id the sending socket must be in */
	__u32 id;
	__u16 port_lo;
	__u16 port_hi;
	__u8 proto;
	__u8 cgroup_level; /* depth of that cgroup (root = 0): bpf_skb_ancestor_cgroup_id level */
	__u8 pad[6];
};

struct tg_lpm_val {
	struct tg_rule rules[TG_MAX_RULES];
};

struct tg_sel_key {
	__u32 selector_id;
	__u32 dir;
};

struct tg_sel_stats {
	__u64 packets;
	__u64 bytes;
	__u64 unshaped;
	__u64 dropped;
	__u64 last_ns;
	__u64 size_hist[TG_SIZE_BINS];
	__u64 iat_hist[TG_IAT_BINS];
};

struct tg_flow_key {
	__u8 family;
	__u8 proto;
	__u8 dir;
	__u8 pad;
	__u16 local_port;
	__u16 remote_port;
	__u8 local_addr[16];
	__u8 remote_addr[16];
};

struct tg_flow_val {
	__u64 packets;
	__u64 bytes;
	__u64 first_ns;
	__u64 last_ns;
	__u32 selector_id;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tg_config);
} tg_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TG_MAX_SELECTOR_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct tg_lpm_key);
	__type(value, struct tg_lpm_val);
} tg_selectors SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * TG_MAX_SELECTOR_ENTRIES);
	__type(key, struct tg_sel_key);
	__type(value, struct tg_sel_stats);
} tg_sel_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TG_MAX_FLOWS);
	__type(key, struct tg_flow_key);
	__type(value, struct tg_flow_val);
} tg_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * TG_G_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tg_global SEC(".maps");

/* What the parser extracts from one packet. */
struct tg_pkt {
	__u8 family;       /* 4 or 6 */
	__u8 proto;        /* L4 protocol (IPv6: after a Fragment header) */
	__u8 ports_known;  /* 1 when local/remote ports were read from a TCP/UDP header */
	__u8 pad;
	__u16 local_port;
	__u16 remote_port;
	__u32 ip_len;      /* IP packet length */
	__u8 local_addr[16];
	__u8 remote_addr[16];
};

static __always_inline void global_add(__u32 dir, __u32 counter, __u64 n)
{
	__u32 idx = dir * TG_G_MAX + counter;
	__u64 *v = bpf_map_lookup_elem(&tg_global, &idx);

	if (v)
		*v += n; /* per-CPU slot: no atomic needed */
}

/*
 * Clamp a histogram index to [0, bins - 1] (bins is a power of two). The final AND is done in
 * inline asm on the very register that indexes the map value, so clang cannot reorder it away
 * and the verifier sees the bound where the access happens.
 */
#define clamp_bin(v, bins)                                            \
	({                                                            \
		__u64 __b = (v);                                      \
		if (__b > (bins) - 1)                                 \
			__b = (bins) - 1;                             \
		asm volatile("%0 &= %1" : "+r"(__b) : "i"((bins) - 1)); \
		__b;                                                  \
	})

/* floor(log2(v)) + 1 for v >= 1, 0 for v == 0, capped to the last bin; branch-light, no loop. */
static __always_inline __u64 iat_bin(__u64 delta_ns)
{
	__u64 us = delta_ns / 1000;
	__u32 r = 0;

	if (us == 0)
		return 0;
	if (us >> 32) { us >>= 32; r += 32; }
	if (us >> 16) { us >>= 16; r += 16; }
	if (us >> 8)  { us >>= 8;  r += 8; }
	if (us >> 4)  { us >>= 4;  r += 4; }
	if (us >> 2)  { us >>= 2;  r += 2; }
	if (us >> 1)  { r += 1; }
	r += 1;
	return clamp_bin(r, TG_IAT_BINS);
}

static __always_inline __u64 size_bin(__u32 len)
{
	return clamp_bin(len >> TG_SIZE_BIN_SHIFT, TG_SIZE_BINS);
}

/* Copy a 16-byte address; the verifier is happy with fixed-size byte copies. */
static __always_inline void copy16(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

/*
 * Parse IPv4/IPv6 + TCP/UDP starting at data + l3off. Returns 0 when the packet is IP and its
 * fields are in pkt, -1 for non-IP, -2 for truncated IP. `dir` decides which side is "remote".
 */
static __always_inline int parse(struct __sk_buff *skb, __u32 l3off, __u32 dir, struct tg_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	void *l4;
	int frag_later = 0;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + l3off;

		if ((void *)(ip + 1) > data_end)
			return -2;
		if (ip->ihl < 5)
			return -2;
		pkt->family = 4;
		pkt->proto = ip->protocol;
		pkt->ip_len = bpf_ntohs(ip->tot_len);
		__builtin_memset(pkt->local_addr, 0, 16);
		__builtin_memset(pkt->remote_addr, 0, 16);
		if (dir == TG_DIR_EGRESS) {
			__builtin_memcpy(pkt->local_addr, &ip->saddr, 4);
			__builtin_memcpy(pkt->remote_addr, &ip->daddr, 4);
		} else {
			__builtin_memcpy(pkt->local_addr, &ip->daddr, 4);
			__builtin_memcpy(pkt->remote_addr, &ip->saddr, 4);
		}
		frag_later = (bpf_ntohs(ip->frag_off) & IP_OFFSET) != 0;
		l4 = (void *)ip + ((__u32)ip->ihl) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + l3off;

		if ((void *)(ip6 + 1) > data_end)
			return -2;
		pkt->family = 6;
		pkt->proto = ip6->nexthdr;
		pkt->ip_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		if (dir == TG_DIR_EGRESS) {
			copy16(pkt->local_addr, ip6->saddr.in6_u.u6_addr8);
			copy16(pkt->remote_addr, ip6->daddr.in6_u.u6_addr8);
		} else {
			copy16(pkt->local_addr, ip6->daddr.in6_u.u6_addr8);
			copy16(pkt->remote_addr, ip6->saddr.in6_u.u6_addr8);
		}
		l4 = ip6 + 1;
		if (pkt->proto == NEXTHDR_FRAGMENT) {
			/* Fragment header: 8 bytes, next header in byte 0. Ports are treated as unknown
			 * for every fragment (also the first), so all fragments classify alike. */
			__u8 *fh = l4;

			if ((void *)(fh + 8) > data_end)
				return -2;
			pkt->proto = fh[0];
			frag_later = 1;
		}
	} else {
		return -1;
	}

	pkt->ports_known = 0;
	pkt->local_port = 0;
	pkt->remote_port = 0;
	if (!frag_later && (pkt->proto == IPPROTO_TCP || pkt->proto == IPPROTO_UDP)) {
		/* sport and dport are the first 4 bytes of both TCP and UDP headers. */
		__be16 *ports = l4;

		if ((void *)(ports + 2) > data_end)
			return -2;
		if (dir == TG_DIR_EGRESS) {
			pkt->local_port = bpf_ntohs(ports[0]);
			pkt->remote_port = bpf_ntohs(ports[1]);
		} else {
			pkt->local_port = bpf_ntohs(ports[1]);
			pkt->remote_port = bpf_ntohs(ports[0]);
		}
		pkt->ports_known = 1;
	}
	return 0;
}

/* Selector id of the first matching rule of the longest matching prefix, 0 when unprotected. */
static __always_inline __u32 classify(struct __sk_buff *skb, const struct tg_pkt *pkt, __u32 dir)
{
	struct tg_lpm_key key = {};
	struct tg_lpm_val *val;

	key.prefixlen = 8 + (pkt->family == 4 ? 32 : 128);
	key.family = pkt->family;
	copy16(key.addr, pkt->remote_addr);
	val = bpf_map_lookup_elem(&tg_selectors, &key);
	if (!val)
		return 0;

#pragma unroll
	for (int i = 0; i < TG_MAX_RULES; i++) {
		struct tg_rule *r = &val->rules[i];

		if (r->id == 0)
			break;
		if (r->proto != TG_PROTO_ANY && r->proto != pkt->proto)
			continue;
		if (pkt->ports_known && (pkt->remote_port < r->port_lo || pkt->remote_port > r->port_hi))
			continue;
		if (r->cgroup_id && dir == TG_DIR_EGRESS &&
		    bpf_skb_ancestor_cgroup_id(skb, r->cgroup_level) != r->cgroup_id)
			continue;
		return r->id;
	}
	return 0;
}

static __always_inline void account_flow(const struct tg_pkt *pkt, __u32 dir, __u32 sel, __u64 now)
{
	struct tg_flow_key fk = {};
	struct tg_flow_val *fv;

	fk.family = pkt->family;
	fk.proto = pkt->proto;
	fk.dir = dir;
	fk.local_port = pkt->local_port;
	fk.remote_port = pkt->remote_port;
	copy16(fk.local_addr, pkt->local_addr);
	copy16(fk.remote_addr, pkt->remote_addr);

	fv = bpf_map_lookup_elem(&tg_flows, &fk);
	if (fv) {
		__sync_fetch_and_add(&fv->packets, 1);
		__sync_fetch_and_add(&fv->bytes, pkt->ip_len);
		fv->last_ns = now;
		fv->selector_id = sel;
		return;
	}
	struct tg_flow_val nv = {
		.packets = 1, .bytes = pkt->ip_len, .first_ns = now, .last_ns = now, .selector_id = sel,
	};
	/* A concurrent insert of the same flow loses one packet's count: acceptable for telemetry. */
	bpf_map_update_elem(&tg_flows, &fk, &nv, BPF_NOEXIST);
}

static __always_inline int handle(struct __sk_buff *skb, __u32 dir)
{
	__u32 zero = 0;
	struct tg_config *cfg = bpf_map_lookup_elem(&tg_config, &zero);
	struct tg_pkt pkt = {};
	__u32 mode = TG_MODE_OBSERVE;
	int rc;

	global_add(dir, TG_G_PACKETS, 1);
	global_add(dir, TG_G_BYTES, skb->len);
	if (cfg)
		mode = cfg->mode;

	/* Constant offsets keep direct packet access provable for the verifier. */
	if (cfg && cfg->l2_hlen == 0)
		rc = parse(skb, 0, dir, &pkt);
	else
		rc = parse(skb, ETH_HLEN, dir, &pkt);
	if (rc == -1) {
		global_add(dir, TG_G_OTHER, 1);
		return TC_ACT_OK;
	}
	if (rc < 0) {
		global_add(dir, TG_G_TRUNCATED, 1);
		return TC_ACT_OK;
	}
	global_add(dir, pkt.family == 4 ? TG_G_IPV4 : TG_G_IPV6, 1);

	__u32 sel = classify(skb, &pkt, dir);
	if (!sel)
		return TC_ACT_OK;
	global_add(dir, TG_G_PROTECTED, 1);

	__u64 now = bpf_ktime_get_ns();
	int verdict = TC_ACT_OK;
	int unshaped = 0;

	/* Leak guard: only egress passes the shaper (the NFQUEUE pacer in netfilter OUTPUT). */
	if (dir == TG_DIR_EGRESS && cfg && (mode == TG_MODE_FAIL_OPEN || mode == TG_MODE_FAIL_CLOSED) &&
	    (skb->mark & cfg->shaper_mask) != cfg->shaper_mark) {
		unshaped = 1;
		global_add(dir, TG_G_UNSHAPED, 1);
		if (mode == TG_MODE_FAIL_CLOSED) {
			verdict = TC_ACT_SHOT;
			global_add(dir, TG_G_DROPPED, 1);
		}
	}

	struct tg_sel_key sk = { .selector_id = sel, .dir = dir };
	struct tg_sel_stats *st = bpf_map_lookup_elem(&tg_sel_stats, &sk);

	if (st) {
		if (unshaped)
			__sync_fetch_and_add(&st->unshaped, 1);
		if (verdict == TC_ACT_SHOT) {
			/* Dropped packets never reach the wire: not part of the wire view. */
			__sync_fetch_and_add(&st->dropped, 1);
		} else {
			__u64 last = st->last_ns;

			__sync_fetch_and_add(&st->packets, 1);
			__sync_fetch_and_add(&st->bytes, pkt.ip_len);
			__sync_fetch_and_add(&st->size_hist[size_bin(pkt.ip_len)], 1);
			if (last != 0 && now > last)
				__sync_fetch_and_add(&st->iat_hist[iat_bin(now - last)], 1);
			else if (last != 0)
				__sync_fetch_and_add(&st->iat_hist[0], 1);
			st->last_ns = now;
		}
	} else {
		global_add(dir, TG_G_NO_STATS, 1);
	}
	if (verdict != TC_ACT_SHOT)
		account_flow(&pkt, dir, sel, now);
	return verdict;
}

SEC("tc")
int tg_egress(struct __sk_buff *skb)
{
	return handle(skb, TG_DIR_EGRESS);
}

SEC("tc")
int tg_ingress(struct __sk_buff *skb)
{
	return handle(skb, TG_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
