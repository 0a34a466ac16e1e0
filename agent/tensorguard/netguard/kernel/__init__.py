"""Kernel datapath adapters for netguard: iptables-nft (pace mode), tc/eBPF.

tc/eBPF modules: `bpf_maps` (pure map layouts and encoders, mirrors bpf/netguard.bpf.c),
`libbpf` (ctypes on libbpf.so.1), `tc` (load, pin, attach with pyroute2, stats, cleanup).
Import them explicitly: importing this package pulls in neither libbpf nor pyroute2.
"""
