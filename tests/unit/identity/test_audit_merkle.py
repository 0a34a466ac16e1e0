"""RFC 9162 tree hashing and proofs: published vectors, pymerkle cross-checks and property tests."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymerkle import ConsistencyProof, InclusionProof, InmemoryTree  # type: ignore[import-untyped]

from tensorguard.identity.audit import merkle as m
from tensorguard.identity.audit.merkle import ProofError

# RFC 6962 test tree used by the certificate-transparency implementations (C++ and Go), as
# published in github.com/transparency-dev/merkle, file proof/verify_test.go (variables
# `leaves`, `roots`, `inclusionProofs`, `consistencyProofs`). The Go vectors number leaves
# from 1; the indices below are converted to 0-based.
VECTOR_LEAVES = [bytes.fromhex(h) for h in [
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f",
]]
VECTOR_ROOTS = [bytes.fromhex(h) for h in [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]]
VECTOR_INCLUSION = [  # (0-based leaf index, tree size, audit path)
    (0, 1, []),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
VECTOR_CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
SHA256_EMPTY = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _hashes(data: list[bytes]) -> list[bytes]:
    return [m.leaf_hash(d) for d in data]


def _leaves(n: int, salt: int = 0) -> list[bytes]:
    return [f"leaf-{salt}-{i}".encode() for i in range(n)]


def _flip(value: bytes, bit: int = 3) -> bytes:
    return bytes([value[0] ^ (1 << bit)]) + value[1:]


def _fails(fn: object, *args: object) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
    except ProofError:
        return True
    return False


def _split(n: int) -> int:
    """Independent RFC 9162 split point: the largest power of two strictly below n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _inclusion_shape(index: int, size: int) -> list[str]:
    """Side of each sibling along the RFC 9162 PATH recursion, innermost first."""
    if size == 1:
        return []
    k = _split(size)
    if index < k:
        return [*_inclusion_shape(index, k), "right"]
    return [*_inclusion_shape(index - k, size - k), "left"]


def _pymerkle_tree(data: list[bytes]) -> InmemoryTree:
    tree = InmemoryTree.init_from_entries(data, algorithm="sha256")
    # RFC 6962/9162 hashing: SHA-256 with the 0x00 leaf and 0x01 node prefixes (security mode).
    assert tree.algorithm == "sha256" and tree.security
    assert tree.leaf_prefix == b"\x00" and tree.node_prefix == b"\x01"
    return tree


def _pymerkle_mth(data: list[bytes]) -> bytes:
    return _pymerkle_tree(data).get_root() if data else SHA256_EMPTY


def _reference_consistency(old: int, data: list[bytes], whole: bool = True) -> list[bytes]:
    """RFC 9162 section 2.1.4.1 SUBPROOF written out literally, with pymerkle computing every MTH."""
    n = len(data)
    if old == n:
        return [] if whole else [_pymerkle_mth(data)]
    k = _split(n)
    if old <= k:
        return [*_reference_consistency(old, data[:k], whole), _pymerkle_mth(data[k:])]
    return [*_reference_consistency(old - k, data[k:], False), _pymerkle_mth(data[:k])]


# --- published vectors -------------------------------------------------------------------------


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert m.EMPTY_ROOT == SHA256_EMPTY
    assert m.MerkleTree().root() == SHA256_EMPTY
    assert m.CompactRange().root() == SHA256_EMPTY
    assert m.root_from_leaf_hashes([]) == SHA256_EMPTY


@pytest.mark.parametrize("size", range(1, 9))
def test_vector_roots(size: int) -> None:
    hashes = _hashes(VECTOR_LEAVES[:size])
    assert m.root_from_leaf_hashes(hashes) == VECTOR_ROOTS[size - 1]
    assert m.root_from_leaf_hashes(b"".join(hashes)) == VECTOR_ROOTS[size - 1]
    assert m.MerkleTree.from_leaf_hashes(_hashes(VECTOR_LEAVES)).root(size) == VECTOR_ROOTS[size - 1]
    compact = m.CompactRange()
    for h in hashes:
        compact.append(h)
    assert compact.root() == VECTOR_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size", "path"), VECTOR_INCLUSION)
def test_vector_inclusion(index: int, size: int, path: list[str]) -> None:
    expected = [bytes.fromhex(p) for p in path]
    hashes = _hashes(VECTOR_LEAVES)
    assert m.inclusion_proof(index, size, hashes) == expected
    leaf, root = hashes[index], VECTOR_ROOTS[size - 1]
    m.verify_inclusion(leaf, index, size, expected, root)
    # Corruptions in the style of the transparency-dev probes; each must be refused.
    probes = [
        (leaf, index, size * 2, expected, root),
        (leaf, index, size, expected, SHA256_EMPTY),
        (leaf, index, size, expected, SOME_HASH),
        (m.leaf_hash(b"WrongLeaf"), index, size, expected, root),
        (leaf, index, size, [*expected, b""], root),
        (leaf, index, size, [*expected, root], root),
        (leaf, index, size, [root, *expected], root),
    ]
    if index + 1 < size:
        probes.append((leaf, index + 1, size, expected, root))
    if index > 0:
        probes.append((leaf, index - 1, size, expected, root))
    if size > 1:
        probes.append((leaf, index ^ 2, size, expected, root))
        probes.append((leaf, index, size // 2, expected, root))
    for i in range(len(expected)):
        probes.append((leaf, index, size, [*expected[:i], _flip(expected[i]), *expected[i + 1:]], root))
    if expected:
        probes.append((leaf, index, size, expected[:-1], root))
    for probe in probes:
        assert _fails(m.verify_inclusion, *probe), probe


@pytest.mark.parametrize(("old", "new", "path"), VECTOR_CONSISTENCY)
def test_vector_consistency(old: int, new: int, path: list[str]) -> None:
    expected = [bytes.fromhex(p) for p in path]
    assert m.consistency_proof(old, new, _hashes(VECTOR_LEAVES)) == expected
    r1, r2 = VECTOR_ROOTS[old - 1], VECTOR_ROOTS[new - 1]
    m.verify_consistency(old, new, r1, r2, expected)
    if not expected:
        return
    probes = [
        (old - 1, new, r1, r2, expected),
        (old + 1, new, r1, r2, expected),
        (old ^ 2, new, r1, r2, expected),
        (old, new * 2, r1, r2, expected),
        (old, new // 2, r1, r2, expected),
        (old, new, SOME_HASH, r2, expected),
        (old, new, r1, SOME_HASH, expected),
        (old, new, r2, r1, expected),
        (old, new, r1, r2, []),
        (old, new, r1, r2, [*expected, r1]),
        (old, new, r1, r2, [*expected, r2]),
        (old, new, r1, r2, [r1, *expected]),
        (old, new, r1, r2, [r2, *expected]),
        (old, new, r1, r2, [expected[0], *expected]),
        (old, new, r1, r2, expected[:-1]),
    ]
    for i in range(len(expected)):
        probes.append((old, new, r1, r2, [*expected[:i], _flip(expected[i], 4), *expected[i + 1:]]))
    for probe in probes:
        assert _fails(m.verify_consistency, *probe), probe[:2]


@pytest.mark.parametrize(("old", "new", "r1", "r2", "proof", "ok"), [
    (0, 0, SHA256_EMPTY, SHA256_EMPTY, [], True),
    (0, 1, SHA256_EMPTY, SOME_HASH, [], True),
    (1, 1, SOME_HASH, SOME_HASH, [], True),
    (0, 1, SOME_HASH, SOME_HASH, [], False),  # an empty tree has exactly one root
    (1, 1, SHA256_EMPTY, SOME_HASH, [], False),
    (1, 0, SHA256_EMPTY, SOME_HASH, [], False),  # time travel to the past
    (2, 1, SHA256_EMPTY, SOME_HASH, [], False),
    (1, 2, SHA256_EMPTY, SOME_HASH, [], False),  # empty proof for a real extension
    (0, 0, SHA256_EMPTY, SHA256_EMPTY, [SHA256_EMPTY], False),
    (0, 1, SHA256_EMPTY, SOME_HASH, [SHA256_EMPTY], False),
    (1, 1, SOME_HASH, SOME_HASH, [SHA256_EMPTY], False),
])
def test_consistency_edge_cases(old: int, new: int, r1: bytes, r2: bytes, proof: list[bytes],
                                ok: bool) -> None:
    assert _fails(m.verify_consistency, old, new, r1, r2, proof) is not ok


def test_malformed_inputs_raise_proof_error_naming_the_problem() -> None:
    hashes = _hashes(VECTOR_LEAVES)
    root = VECTOR_ROOTS[7]
    with pytest.raises(ProofError, match="leaf hash must be 32 bytes"):
        m.verify_inclusion(b"short", 0, 8, [], root)
    with pytest.raises(ProofError, match="element 1"):
        m.verify_inclusion(hashes[0], 0, 8, [hashes[1], b"x" * 31, hashes[2]], root)
    with pytest.raises(ProofError, match="not below tree size"):
        m.verify_inclusion(hashes[0], 8, 8, [], root)
    with pytest.raises(ProofError, match="too short"):
        m.verify_inclusion(hashes[0], 0, 8, [], root)
    with pytest.raises(ProofError, match="leads to root"):
        m.verify_inclusion(hashes[1], 0, 8, m.inclusion_proof(0, 8, hashes), root)
    with pytest.raises(ProofError, match="new root"):
        m.verify_consistency(6, 8, VECTOR_ROOTS[5], SOME_HASH, m.consistency_proof(6, 8, hashes))
    cons = m.consistency_proof(6, 8, hashes)
    with pytest.raises(ProofError, match="too long"):
        m.verify_consistency(6, 8, VECTOR_ROOTS[5], root, [*cons, root])
    with pytest.raises(ProofError, match="too short"):
        m.verify_consistency(6, 8, VECTOR_ROOTS[5], root, cons[:-1])
    with pytest.raises(ProofError, match="too long"):
        m.verify_inclusion(hashes[0], 0, 8, [*m.inclusion_proof(0, 8, hashes), root], root)
    with pytest.raises(ValueError, match="outside"):
        m.MerkleTree.from_leaf_hashes(hashes).inclusion_proof(8)
    with pytest.raises(ValueError, match="outside"):
        m.MerkleTree.from_leaf_hashes(hashes).consistency_proof(9)
    with pytest.raises(ValueError, match="multiple of 32"):
        m.MerkleTree(b"x" * 33)
    with pytest.raises(ValueError, match="needs 2 nodes"):
        m.CompactRange(3, [hashes[0]])


# --- independent implementation: pymerkle 7 ----------------------------------------------------


@pytest.mark.parametrize("size", [*range(1, 34), 63, 64, 65, 100, 127, 128, 129])
def test_roots_and_proofs_match_pymerkle(size: int) -> None:
    rng = random.Random(size)
    data = [rng.randbytes(rng.randrange(0, 40)) for _ in range(size)]
    ours = m.MerkleTree(m.pack_leaf_hashes(data))
    ref = _pymerkle_tree(data)
    for i, d in enumerate(data):
        assert ref.hash_buff(d) == ours.leaf_hash(i) == m.leaf_hash(d)
    for n in range(1, size + 1):
        assert ours.root(n) == ref.get_root(n), n
    for i in range(size):
        ref_proof = ref.prove_inclusion(i + 1, size)
        # pymerkle's path starts with the leaf itself; the rest is the RFC audit path.
        assert ours.inclusion_proof(i, size) == ref_proof.path[1:], i
        ref_proof.verify(ours.leaf_hash(i), ours.root(size), index=i + 1, size=size)
    for old in range(1, size + 1):
        proof = ours.consistency_proof(old, size)
        if size <= 65:
            assert proof == _reference_consistency(old, data), old
        m.verify_consistency(old, size, ref.get_root(old), ref.get_root(size), proof)
        ref.prove_consistency(old, size).verify(ours.root(old), ours.root(size),
                                                prior_size=old, later_size=size)


def test_pymerkle_rejects_what_we_reject() -> None:
    data = _leaves(11)
    ours = m.MerkleTree(m.pack_leaf_hashes(data))
    ref = _pymerkle_tree(data)
    bad_root = _flip(ours.root(11))
    with pytest.raises(Exception, match="State does not match"):
        ref.prove_inclusion(4, 11).verify(ours.leaf_hash(3), bad_root)
    with pytest.raises(ProofError):
        m.verify_inclusion(ours.leaf_hash(3), 3, 11, ours.inclusion_proof(3), bad_root)
    # A proof serialised by pymerkle carries the same hashes our verifier accepts.
    round_trip = InclusionProof.deserialize(ref.prove_inclusion(4, 11).serialize())
    m.verify_inclusion(round_trip.path[0], 3, 11, round_trip.path[1:], ours.root(11))
    cons = ConsistencyProof.deserialize(ref.prove_consistency(5, 11).serialize())
    cons.verify(ours.root(5), ours.root(11))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=24), min_size=1, max_size=64))
def test_random_data_matches_pymerkle(data: list[bytes]) -> None:
    ours = m.MerkleTree(m.pack_leaf_hashes(data))
    ref = _pymerkle_tree(data)
    n = len(data)
    assert ours.root() == ref.get_root()
    for i in range(n):
        assert ours.inclusion_proof(i) == ref.prove_inclusion(i + 1).path[1:]
    for old in range(1, n + 1):
        assert ours.consistency_proof(old) == _reference_consistency(old, data)


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), salt=st.integers(0, 2**32), bit=st.integers(0, 7))
def test_every_inclusion_proof_verifies_and_tampering_fails(size: int, salt: int, bit: int) -> None:
    tree = m.MerkleTree(m.pack_leaf_hashes(_leaves(size * 2 + 1, salt)))
    root = tree.root(size)
    for i in range(size):
        leaf = tree.leaf_hash(i)
        proof = tree.inclusion_proof(i, size)
        m.verify_inclusion(leaf, i, size, proof, root)
        assert _fails(m.verify_inclusion, _flip(leaf, bit), i, size, proof, root)
        assert _fails(m.verify_inclusion, leaf, i, size, proof, _flip(root, bit))
        if proof:
            j = (i * 7 + salt) % len(proof)
            bad = [*proof[:j], _flip(proof[j], bit), *proof[j + 1:]]
            assert _fails(m.verify_inclusion, leaf, i, size, bad, root)
            assert _fails(m.verify_inclusion, leaf, i, size, proof[:-1], root)
        assert _fails(m.verify_inclusion, leaf, i, size, [*proof, root], root)
        for other in {i - 1, i + 1, size - 1 - i} - {i}:
            if 0 <= other < size:
                assert _fails(m.verify_inclusion, leaf, other, size, proof, root)
        for other_size in {size - 1, size + 1, size * 2, size // 2} - {size}:
            if other_size <= i:
                continue
            # The proof against the root of the size it claims must fail...
            assert _fails(m.verify_inclusion, leaf, i, other_size, proof, tree.root(other_size))
            # ...and against the original root it passes only where the path has the same shape:
            # the size itself is authenticated by the signed checkpoint, not by the proof.
            same_shape = _inclusion_shape(i, other_size) == _inclusion_shape(i, size)
            assert _fails(m.verify_inclusion, leaf, i, other_size, proof, root) is not same_shape


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 300), salt=st.integers(0, 2**32), bit=st.integers(0, 7))
def test_every_consistency_proof_verifies_and_tampering_fails(size: int, salt: int, bit: int) -> None:
    data = _leaves(size + 2, salt)
    tree = m.MerkleTree(m.pack_leaf_hashes(data))
    new_root = tree.root(size)
    for old in range(1, size + 1):
        old_root = tree.root(old)
        proof = tree.consistency_proof(old, size)
        m.verify_consistency(old, size, old_root, new_root, proof)
        assert _fails(m.verify_consistency, old, size, _flip(old_root, bit), new_root, proof)
        assert _fails(m.verify_consistency, old, size, old_root, _flip(new_root, bit), proof)
        if not proof:
            assert old == size
            continue
        j = (old + salt) % len(proof)
        bad = [*proof[:j], _flip(proof[j], bit), *proof[j + 1:]]
        assert _fails(m.verify_consistency, old, size, old_root, new_root, bad)
        assert _fails(m.verify_consistency, old, size, old_root, new_root, proof[:-1])
        assert _fails(m.verify_consistency, old, size, old_root, new_root, [*proof, new_root])
        assert _fails(m.verify_consistency, old, size, old_root, new_root, [old_root, *proof])
        for other in (old - 1, old + 1):
            if 1 <= other <= size:
                assert _fails(m.verify_consistency, other, size, tree.root(other), new_root, proof)
        for other in (size - 1, size + 1, size + 2):
            if other >= old:
                assert _fails(m.verify_consistency, old, other, old_root, tree.root(other), proof)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(0, 300), salt=st.integers(0, 2**32))
def test_compact_range_and_appends_agree_with_bulk_build(size: int, salt: int) -> None:
    hashes = _hashes(_leaves(size, salt))
    bulk = m.MerkleTree(b"".join(hashes))
    grown = m.MerkleTree()
    compact = m.CompactRange()
    for n, h in enumerate(hashes, start=1):
        grown.append(h)
        compact.append(h)
        assert compact.root() == bulk.root(n) == grown.root()
        assert len(compact.nodes) == bin(n).count("1")
    assert grown.packed_leaf_hashes() == bulk.packed_leaf_hashes()
    assert bulk.compact_range().nodes == compact.nodes
    assert m.root_from_leaf_hashes(hashes) == bulk.root()
    if size:
        middle = size // 2
        resumed = bulk.compact_range(middle)
        for h in hashes[middle:]:
            resumed.append(h)
        assert resumed.root() == bulk.root()


def test_node_and_leaf_hashes_use_domain_separation() -> None:
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    assert m.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert m.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    # A leaf whose data is two hashes must not hash like the node above them.
    assert m.leaf_hash(a + b) != m.node_hash(a, b)
