"""RFC 9162 Merkle tree hashing and proofs: the arithmetic an auditor must be able to redo alone.

Everything here is a pure function over bytes (SHA-256, leaf prefix 0x00, node prefix 0x01), so
a third party holding only this module, an entry and a root can check inclusion and consistency.
Verification functions raise ``ProofError`` naming the check that failed; they never return a
silent False.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A proof or root did not verify; the message says which comparison failed and where."""


def leaf_hash(data: bytes) -> bytes:
    """Hash one leaf with the 0x00 prefix so a leaf can never pass for an interior node."""
    return _sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two children with the 0x01 prefix (RFC 9162 section 2.1.1)."""
    return _sha256(NODE_PREFIX + left + right).digest()


def pack_leaf_hashes(lines: Iterable[bytes]) -> bytes:
    """Leaf hashes of ``lines`` packed 32 bytes each: the compact form trees and caches use."""
    return b"".join([_sha256(LEAF_PREFIX + line).digest() for line in lines])


def _largest_power_of_two_below(n: int) -> int:
    """The split point k of RFC 9162: the largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _next_level(level: bytes | bytearray) -> bytes:
    """Parents of every complete pair of a packed level; an odd last node has no parent yet."""
    pairs = len(level) // (2 * HASH_SIZE)
    sha = _sha256
    return b"".join([sha(NODE_PREFIX + level[i:i + 64]).digest() for i in range(0, pairs * 64, 64)])


def _fold_right(parts: Sequence[bytes]) -> bytes:
    """Combine the roots of a size's perfect subtrees (largest first) into the tree root."""
    root = parts[-1]
    for part in reversed(parts[:-1]):
        root = node_hash(part, root)
    return root


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise ProofError(f"{what} must be {HASH_SIZE} bytes")


class CompactRange:
    """Root accumulator holding only the O(log n) perfect-subtree roots, so appends stay cheap."""

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(nodes) != size.bit_count():
            raise ValueError(f"a compact range of size {size} needs {max(size, 0).bit_count()} nodes, "
                             f"got {len(nodes)}")
        for i, node in enumerate(nodes):
            _check_hash(node, f"compact range node {i}")
        self._size = size
        self._nodes = [bytes(n) for n in nodes]

    @property
    def size(self) -> int:
        return self._size

    @property
    def nodes(self) -> tuple[bytes, ...]:
        """Perfect-subtree roots, largest (leftmost) first."""
        return tuple(self._nodes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash, merging equal-sized subtrees the way a binary counter carries."""
        _check_hash(leaf, "leaf hash")
        node = bytes(leaf)
        carries = self._size
        while carries & 1:
            node = node_hash(self._nodes.pop(), node)
            carries >>= 1
        self._nodes.append(node)
        self._size += 1

    def root(self) -> bytes:
        """The RFC 9162 root of all leaves appended so far (SHA-256 of nothing when empty)."""
        return _fold_right(self._nodes) if self._nodes else EMPTY_ROOT


class MerkleTree:
    """All complete subtree hashes, level by level, so proofs of a large tree cost O(log n) lookups.

    Level 0 is the packed leaf hashes (32 bytes each); level L holds every perfect subtree of
    2**L leaves. A node on level L exists once its 2**L leaves exist, and never changes after, so
    one structure answers roots and proofs for every size up to ``size``.
    """

    def __init__(self, packed_leaf_hashes: bytes | bytearray = b"") -> None:
        if len(packed_leaf_hashes) % HASH_SIZE:
            raise ValueError(f"packed leaf hashes must be a multiple of {HASH_SIZE} bytes, "
                             f"got {len(packed_leaf_hashes)}")
        self._levels: list[bytearray] = [bytearray(packed_leaf_hashes)]
        level: bytes | bytearray = self._levels[0]
        while len(level) >= 2 * HASH_SIZE:
            level = _next_level(level)
            self._levels.append(bytearray(level))

    @classmethod
    def from_leaf_hashes(cls, hashes: Iterable[bytes]) -> MerkleTree:
        """Build from individual 32-byte leaf hashes."""
        items = list(hashes)
        for i, h in enumerate(items):
            _check_hash(h, f"leaf hash {i}")
        return cls(b"".join(items))

    @property
    def size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def packed_leaf_hashes(self) -> bytes:
        return bytes(self._levels[0])

    def leaf_hash(self, index: int) -> bytes:
        self._check_index(index, self.size)
        return self._node(0, index)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash and every perfect subtree it completes."""
        _check_hash(leaf, "leaf hash")
        self._levels[0] += leaf
        level = 0
        while len(self._levels[level]) // HASH_SIZE % 2 == 0:
            pair = self._levels[level][-2 * HASH_SIZE:]
            parent = _sha256(NODE_PREFIX + pair).digest()
            if level + 1 == len(self._levels):
                self._levels.append(bytearray())
            self._levels[level + 1] += parent
            level += 1

    def _node(self, level: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self._levels[level][start:start + HASH_SIZE])

    def _range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range that is a node of some RFC tree (start suitably aligned)."""
        parts = []
        pos = start
        width = end - start
        for level in range(width.bit_length() - 1, -1, -1):
            if width >> level & 1:
                if pos % (1 << level):
                    raise ValueError(f"range [{start}, {end}) is not a node of an RFC 9162 tree")
                parts.append(self._node(level, pos >> level))
                pos += 1 << level
        return _fold_right(parts)

    def _resolve_size(self, size: int | None) -> int:
        if size is None:
            return self.size
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")
        return size

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside 0..{size - 1} (tree size {size})")

    def root(self, size: int | None = None) -> bytes:
        """Root of the first ``size`` leaves (default: all)."""
        n = self._resolve_size(size)
        return self._range_hash(0, n) if n else EMPTY_ROOT

    def compact_range(self, size: int | None = None) -> CompactRange:
        """The O(log n) accumulator for the first ``size`` leaves, to keep appending cheaply."""
        n = self._resolve_size(size)
        nodes = []
        pos = 0
        for level in range(n.bit_length() - 1, -1, -1):
            if n >> level & 1:
                nodes.append(self._node(level, pos >> level))
                pos += 1 << level
        return CompactRange(n, nodes)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 section 2.1.3.1 PATH(index, D[0:size]), innermost sibling first."""
        n = self._resolve_size(size)
        self._check_index(index, n)
        path = []
        start, end = 0, n
        while end - start > 1:
            k = _largest_power_of_two_below(end - start)
            if index < start + k:
                path.append(self._range_hash(start + k, end))
                end = start + k
            else:
                path.append(self._range_hash(start, start + k))
                start += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 section 2.1.4.1 PROOF(old_size, D[0:new_size]); empty when old_size is 0 or equal."""
        n = self._resolve_size(new_size)
        if not 0 <= old_size <= n:
            raise ValueError(f"old size {old_size} is outside 0..{n} (new size {n})")
        if old_size in (0, n):
            return []
        path = []
        start, end, m = 0, n, old_size
        whole_old_tree = True
        while m != end - start:
            k = _largest_power_of_two_below(end - start)
            if m <= k:
                path.append(self._range_hash(start + k, end))
                end = start + k
            else:
                path.append(self._range_hash(start, start + k))
                start += k
                m -= k
                whole_old_tree = False
        if not whole_old_tree:
            path.append(self._range_hash(start, end))
        path.reverse()
        return path


def root_from_leaf_hashes(hashes: Sequence[bytes] | bytes | bytearray) -> bytes:
    """RFC 9162 root of a whole tree, level by level (an odd last node is carried up unchanged).

    Accepts a sequence of 32-byte hashes or the packed form. Carrying the odd node up gives the
    same tree as the RFC's split at the largest power of two below n.
    """
    if isinstance(hashes, bytes | bytearray):
        level: bytes | bytearray = hashes
        if len(level) % HASH_SIZE:
            raise ValueError(f"packed leaf hashes must be a multiple of {HASH_SIZE} bytes")
    else:
        for i, h in enumerate(hashes):
            _check_hash(h, f"leaf hash {i}")
        level = b"".join(hashes)
    if not level:
        return EMPTY_ROOT
    while len(level) > HASH_SIZE:
        odd = bytes(level[-HASH_SIZE:]) if len(level) // HASH_SIZE % 2 else b""
        level = _next_level(level) + odd
    return bytes(level)


def inclusion_proof(index: int, size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """One-off inclusion proof; build a ``MerkleTree`` instead when asking for many."""
    return MerkleTree.from_leaf_hashes(leaf_hashes[:size]).inclusion_proof(index, size)


def consistency_proof(old_size: int, new_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """One-off consistency proof; build a ``MerkleTree`` instead when asking for many."""
    return MerkleTree.from_leaf_hashes(leaf_hashes[:new_size]).consistency_proof(old_size, new_size)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check an inclusion proof exactly as RFC 9162 section 2.1.3.2; raise ProofError if it fails.

    The tree size is authenticated by the signed checkpoint that carries ``root``, not by the
    proof: a proof only fixes the shape of the path it walks.
    """
    _check_hash(leaf, "leaf hash")
    _check_hash(root, "root hash")
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    for i, p in enumerate(proof):
        _check_hash(p, f"inclusion proof element {i}")
    fn, sn = index, size - 1
    r = bytes(leaf)
    for p in proof:
        if sn == 0:
            raise ProofError(f"inclusion proof for leaf {index} of {size} is too long "
                             f"({len(proof)} elements)")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"inclusion proof for leaf {index} of {size} is too short "
                         f"({len(proof)} elements)")
    if not hmac.compare_digest(r, root):
        raise ProofError(f"inclusion proof for leaf {index} of {size} leads to root {r.hex()}, "
                         f"not {bytes(root).hex()}")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Check a consistency proof exactly as RFC 9162 section 2.1.4.2; raise ProofError if it fails.

    Beyond the RFC's 0 < old < new case: equal sizes need equal roots and an empty proof, and an
    empty old tree (whose root must be SHA-256 of nothing) is consistent with anything.
    """
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    for i, c in enumerate(proof):
        _check_hash(c, f"consistency proof element {i}")
    if not 0 <= old_size <= new_size:
        raise ProofError(f"old size {old_size} must be between 0 and new size {new_size}")
    if old_size in (0, new_size):
        if proof:
            raise ProofError(f"consistency proof {old_size} -> {new_size} must be empty, "
                             f"has {len(proof)} elements")
        if old_size == 0 and not hmac.compare_digest(old_root, EMPTY_ROOT):
            raise ProofError("old root of an empty tree must be SHA-256 of the empty string")
        if old_size == new_size and not hmac.compare_digest(old_root, new_root):
            raise ProofError(f"trees of equal size {old_size} have different roots "
                             f"{bytes(old_root).hex()} and {bytes(new_root).hex()}")
        return
    if not proof:
        raise ProofError(f"consistency proof {old_size} -> {new_size} is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"consistency proof {old_size} -> {new_size} is too long "
                             f"({len(proof)} elements)")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"consistency proof {old_size} -> {new_size} is too short "
                         f"({len(proof)} elements)")
    if not hmac.compare_digest(fr, old_root):
        raise ProofError(f"consistency proof {old_size} -> {new_size} does not lead to the old root "
                         f"{bytes(old_root).hex()}")
    if not hmac.compare_digest(sr, new_root):
        raise ProofError(f"consistency proof {old_size} -> {new_size} does not lead to the new root "
                         f"{bytes(new_root).hex()}")
