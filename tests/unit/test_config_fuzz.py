"""Generated malformed configs: each one is refused with errors that say where, never a crash."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorguard.config import ConfigError, load_config
from tensorguard.config.reference import iter_keys, toml_value

KEYS = list(iter_keys())


def bad_values_for(default: Any, key: str) -> st.SearchStrategy[Any]:
    """Values that the key's type or range cannot accept."""
    wrong_type = st.one_of(st.lists(st.integers(), max_size=2), st.just({"x": 1}))
    if isinstance(default, bool):
        return st.one_of(wrong_type, st.integers(), st.text(max_size=5), st.floats(allow_nan=False))
    if isinstance(default, int):
        return st.one_of(wrong_type, st.text(max_size=5), st.booleans(),
                         st.integers(max_value=0), st.integers(min_value=2**24 + 1),
                         st.floats(allow_nan=False).filter(lambda f: not f.is_integer()))
    if isinstance(default, float):
        return st.one_of(wrong_type, st.text(max_size=5), st.booleans(),
                         st.floats(max_value=-0.001), st.floats(min_value=1e6))
    if isinstance(default, list):
        return st.one_of(st.integers(), st.text(max_size=5),
                         st.lists(st.sampled_from(["", "a/b", "x y", "a" * 16, "a:b"]), min_size=1))
    return st.one_of(wrong_type, st.integers(), st.booleans(), st.sampled_from(BAD_STRINGS[key]))


BAD_STRINGS: dict[str, list[str]] = {
    "agent.node_id": ["", "UPPER", "-x-", "a" * 64, "a_b"],
    "agent.socket_dir": ["", "relative/path", "run"],
    "agent.log_level": ["loud", "INFO", ""],
    "agent.metrics_dir": ["relative", "./x"],
    "agent.control.group": ["", "UPPER", "9lives", "a b"],
    "network.fail_mode": ["ajar", ""],
    "network.defence.kind": ["magic", "CBR"],
    "network.netns": ["", "a/b", "x" * 65],
    "network.pin_dir": ["relative", ""],
    "network.defence.wtfpad.histograms": ["relative.json", ""],
    "network.defence.discard": ["no port", "h:0"],
    "identity.server_url": ["ftp://h", "http://h", "https://", "no url"],
    "identity.trust_domain": ["UPPER.example", "-x-", "a..b", ""],
    "identity.key_type": ["rsa", ""],
    "identity.state_dir": ["relative/path", ""],
    "identity.trust_anchor": ["relative.pem", ""],
    "identity.bootstrap_token_file": ["token", ""],
    "identity.key_store": ["tpm", ""],
    "identity.pkcs11.module": ["libsofthsm2.so", ""],
    "identity.pkcs11.token_label": ["", "x" * 33],
    "identity.pkcs11.pin_file": ["pin", ""],
    "fl.superlink": ["no port", "h:0", "h:99999", ":80", "h:"],
    "fl.state_dir": ["relative/path"],
    "server.host": ["", "x" * 300],
    "server.database_url": ["postgres:/x", "mysql://x", ""],
}


def test_every_string_key_has_bad_strings() -> None:
    strings = {d.key for d in KEYS if isinstance(d.default, str) or d.default is None}
    assert strings == set(BAD_STRINGS)


@st.composite
def malformed(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A drop-in that must be refused, and the dotted key the error must name (if any)."""
    kind = draw(st.sampled_from(["value", "unknown", "syntax", "encoding", "shape", "huge", "deep"]))
    if kind == "value":
        doc = draw(st.sampled_from(KEYS))
        value = draw(bad_values_for(doc.default, doc.key))
        table, _, leaf = doc.key.rpartition(".")
        rendered = ("{ x = 1 }" if isinstance(value, dict) else toml_value(value))
        text = f"[{table}]\n{leaf} = {rendered}\n"
        return text.encode(), doc.key
    if kind == "unknown":
        table = draw(st.sampled_from(sorted({d.key.rpartition('.')[0] for d in KEYS})))
        leaf = draw(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).filter(
            lambda k: f"{table}.{k}" not in {d.key for d in KEYS}
            and not any(d.key.startswith(f"{table}.{k}.") for d in KEYS)))
        return f"[{table}]\n{leaf} = 1\n".encode(), f"{table}.{leaf}"
    if kind == "syntax":
        body = draw(st.sampled_from(["[agent\n", "x = \n", 'a = "unterminated\n', "= 3\n",
                                     "[a]\n[a]\n", "k = 1\nk = 2\n", "[agent]\nlog_level = 'x' y\n"]))
        prefix = draw(st.sampled_from(["", "\n", "# comment\n", "  \n", "[fl]\n"]))
        return (prefix + body).encode(), None
    if kind == "encoding":
        junk = draw(st.binary(min_size=1, max_size=8).map(lambda b: b"\xff" + b))
        return b'[agent]\nnode_id = "' + junk + b'"\n', None
    if kind == "huge":  # more digits than Python converts (sys.get_int_max_str_digits)
        doc = draw(st.sampled_from(KEYS))
        table, _, leaf = doc.key.rpartition(".")
        digits = draw(st.integers(sys.get_int_max_str_digits() + 1, 20_000))
        return f"[{table}]\n{leaf} = {draw(st.sampled_from(['', '-', '+']))}{'7' * digits}\n".encode(), None
    if kind == "deep":  # arrays, inline tables or dotted headers nested past any stack
        doc = draw(st.sampled_from(KEYS))
        table, _, leaf = doc.key.rpartition(".")
        depth = draw(st.integers(33, 1500))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{ a = ", " }"), ("[{ a = ", " }]")]))
        if draw(st.booleans()):
            return f"[{table}.{'.'.join(['x'] * depth)}]\n".encode(), None
        return f"[{table}]\n{leaf} = {opener * depth}1{closer * depth}\n".encode(), None
    # shape: a scalar where a table belongs, or a table where a scalar belongs
    doc = draw(st.sampled_from(KEYS))
    top, _, _ = doc.key.partition(".")
    if draw(st.booleans()):
        return f"{top} = 5\n".encode(), top
    return f"[{doc.key}]\nx = 1\n".encode(), doc.key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed())
def test_malformed_drop_in_is_refused_with_located_errors(case: tuple[bytes, str | None]) -> None:
    text, key = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "agent.d").mkdir()
        (root / "agent.toml").write_text("[agent]\n")
        (root / "agent.d" / "10-fuzz.toml").write_bytes(text)
        try:
            load_config(root / "agent.toml")
        except ConfigError as exc:
            assert exc.issues, "ConfigError without issues"
            for issue in exc.issues:
                assert issue.file == "agent.d/10-fuzz.toml", str(issue)
                assert issue.message
            if key is not None:
                keys = [i.key for i in exc.issues]
                assert any(k is not None and (k == key or k.startswith(key + "[")
                                              or key.startswith(k + ".") or k.startswith(key + "."))
                           for k in keys), (str(exc), key)
        else:
            raise AssertionError(f"accepted malformed drop-in: {text!r}")
