"""Fuzz targets for every reader of untrusted input (issue "Nothing lost, nothing crashes").

Targets, each a function of one input (bytes):

* ``safetensors``: a safetensors file, through `SafetensorsFile` and `CheckpointReader`.
  Accepted files are read in full and must also be accepted, with the same names, shapes
  and dtypes, by the `safetensors` library (isofast accepts nothing the library refuses).
* ``torch``: a torch `.pt` file (zip or legacy format) through `CheckpointReader`.
* ``index``: a sharded `model.safetensors.index.json`, beside real shards.
* ``config``: a YAML config (isofast's schema or mergekit's) through `load_config`.

Every input must end in a valid result or an isofast error (`CheckpointError`, or an
`IsofastError` for configs) whose message names the file; never another exception, a crash
signal, a hang (`HANG_S` per input) or unbounded memory (the child runs under an
address-space limit, `MEMORY_HEADROOM` above what it maps after its imports: a header that
claims 10^18 elements must not allocate).

Inputs are hypothesis-generated from the seed corpus in tests/fuzz_corpus/ (one folder per
target; regenerate with tests/fuzz_corpus/make_corpus.py): byte-level mutations with
format-aware tokens, plus structure-aware generators (safetensors headers built entry by
entry, torch zips rebuilt around a mutated member, index weight maps, YAML configs).
Inputs that once escaped go to tests/fuzz_corpus/regressions/<target>/: they are mutated
too, and must stay refused.

Default suite: ``pytest tests/test_fuzz.py`` runs a fixed, derandomized set of inputs per
target (about a minute in all), each target in a child process so that a crash signal or a
hang fails the test instead of killing pytest.

Long run (prints inputs per target and time)::

    ISOFAST_FUZZ_EXAMPLES=1000000 python tests/test_fuzz.py              # every target
    ISOFAST_FUZZ_EXAMPLES=1000000 python tests/test_fuzz.py torch config # some
    ISOFAST_FUZZ_EXAMPLES=1000000 pytest tests/test_fuzz.py             # same, as tests

``ISOFAST_FUZZ_SEED=N`` draws other inputs than the default derandomized ones.
``ISOFAST_FUZZ_COLLECT=1`` keeps going after a foreign exception and prints one input per
distinct exception site at the end (to survey a target instead of stopping at the first).

Coverage-guided, with atheris (``pip install ".[fuzz]"``; not needed by the suite)::

    python tests/test_fuzz.py --atheris safetensors -- -runs=1000000 -max_len=8192 \\
        /tmp/fuzz-work tests/fuzz_corpus/safetensors

(libFuzzer arguments after ``--``; it adds new inputs to the first corpus folder.)
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from isofast.errors import IsofastError
from isofast.io import DTYPE_ITEMSIZE, INDEX_NAME, CheckpointError, CheckpointReader
from isofast.io.safetensors_format import SafetensorsFile

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
HANG_S = 10.0  # one input taking longer than this is a hang
MEMORY_HEADROOM = 2 << 30  # bytes of address space a child may map beyond its imports
# Inputs per target in the default suite: about a minute in all on two cores.
DEFAULT_EXAMPLES = {"safetensors": 1500, "torch": 2500, "index": 2000, "config": 1000}
TARGETS = tuple(DEFAULT_EXAMPLES)


# -- inputs ---------------------------------------------------------------------------
def seeds(target: str) -> list[bytes]:
    """The valid seed inputs of a target."""
    folder = CORPUS / target
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


def regressions(target: str) -> list[bytes]:
    """Inputs that once escaped as foreign exceptions, crashes or hangs (all to be refused)."""
    folder = CORPUS / "regressions" / target
    return [p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()]


INTERESTING_INTS = (
    *(0, 1, 2, 3, 4, 7, 8, 255, 256, 4095, 4096, 65536),
    *(2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64),
    *(10**18, -1, -(2**63), -(2**63) - 1),
)
NUMBER_TEXTS = (
    *(str(i).encode() for i in INTERESTING_INTS),
    *(b"-0", b"0.0", b"1.5", b"1e2", b"1e400", b"-1e400", b"1" + b"0" * 400),
    *(b"NaN", b"Infinity", b"-Infinity", b"9" * 5000),
)
JSON_TOKENS = (
    *(b"{", b"}", b"[", b"]", b",", b":", b'"', b"null", b"true", b"false", b" ", b"-"),
    *(b"\\u0000", b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\\\", b"\xff", b"\x00"),
    *(b"\xc3\xa9", b"\t", b"\n", b'"__metadata__"', b'"dtype"', b'"shape"'),
    *(b'"data_offsets"', b'"weight_map"', b'"F32"', b'"BF16"', b'"F4"', b'"U8"', b'"I64"'),
    *(b'"Q7"', b'"a"', b'""', b"[0,0]", b"[]", b"{}", b'"../x"', b'"/etc/passwd"'),
    *(b'"sub/x"', b'"model.safetensors.index.json"', b'"model-00001-of-00002.safetensors"'),
    *(b'"model-00002-of-00002.safetensors"', b'"torch.bin"', b'"a.weight"', b'"b.weight"'),
)
YAML_TOKENS = (
    *(b"\n", b"  ", b"- ", b": ", b"{", b"}", b"[", b"]", b",", b"&a ", b"*a", b"~", b"?"),
    *(b"!!python/object:os.system", b"!!binary ", b"!!str ", b"!!int ", b"!!set ", b"<<: "),
    *(b"null", b"yes", b"no", b"on", b".nan", b".inf", b"-.inf", b"1e400", b"0x1f"),
    *(b"0o17", b"0b1", b"1_000", b"1:30", b"2001-13-45", b"2001-02-03", b"\t", b"%YAML 1.1\n"),
    *(b"---\n", b"...\n", b"|\n", b">\n", b"'", b'"', b"#", b"\xff", b"\x00", b"\xc3\xa9"),
    *(b"base_model", b"models", b"model", b"merge_method", b"parameters", b"weight"),
    *(b"density", b"normalize", b"method", b"alpha", b"seed", b"out_shard_size", b"dtype"),
    *(b"out_dtype", b"exclude", b"threads", b"device", b"allow_pickle", b"int8_mask"),
    *(b"ties", b"linear", b"dare_ties", b"dare_linear", b"task_arithmetic", b"iso_c"),
    *(b"5GB", b"1.2.3", b"0GB", b"500MiB", b"cuda:99", b"float8", b"bf16", b"../"),
    *(b"9" * 400 + b"GB", b"1" * 20, b"-0", b"/abs/path"),
)
PICKLE_TOKENS = (
    *(b"\x80\x02", b"}", b"q\x00", b"(", b"X\x01\x00\x00\x00a", b"K\x05", b"M\xff\xff"),
    *(b"J\xff\xff\xff\x7f", b"\x8a\x08" + b"\xff" * 8, b"t", b"R", b"h\x00", b"Q", b"u"),
    *(b"e", b"]", b".", b"\x85", b"\x86", b"\x87", b"N", b"\x88", b"\x89", b"b", b"s", b"0"),
    *(b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n"),
    *(b"ctorch\nFloatStorage\n", b"ctorch\nBFloat16Storage\n", b"X\x07\x00\x00\x00storage"),
    *(b"ctorch._utils\n_rebuild_meta_tensor_no_storage\n", b"ctorch\nfloat32\n", b"cos\nsystem\n"),
    *(b"X\x03\x00\x00\x00cpu", b"X\x04\x00\x00\x00meta", b"\x94", b"\x95" + b"\xff" * 8),
)


@st.composite
def mutated(
    draw: st.DrawFn,
    pool: Sequence[bytes],
    tokens: Sequence[bytes],
    start: bytes | None = None,
    max_ops: int = 6,
) -> bytes:
    """`start` (or a seed from `pool`) after up to `max_ops` byte-level mutations."""
    data = bytearray(draw(st.sampled_from(pool)) if start is None else start)
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.integers(0, 10))
        at = draw(st.integers(0, len(data)))
        if op == 0 and data:  # flip a bit
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:  # set a byte
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == 2:  # insert a token
            data[at:at] = draw(st.sampled_from(tokens))
        elif op == 3:  # insert random bytes
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == 4:  # delete a range
            del data[at : at + draw(st.sampled_from([1, 2, 4, 8, 64, 4096]))]
        elif op == 5:  # duplicate a range
            n = draw(st.sampled_from([1, 4, 16, 64]))
            data[at:at] = data[at : at + n]
        elif op == 6:  # truncate
            del data[at:]
        elif op == 7:  # replace a number with an interesting one
            numbers = list(re.finditer(rb"-?\d+", bytes(data)))
            if numbers:
                m = numbers[draw(st.integers(0, len(numbers) - 1))]
                data[m.start() : m.end()] = draw(st.sampled_from(NUMBER_TEXTS))
        elif op == 8:  # splice: our head, another seed's tail
            other = draw(st.sampled_from(pool))
            data[at:] = other[draw(st.integers(0, len(other))) :]
        elif op == 9:  # a token repeated (deep nesting, long runs)
            data[at:at] = draw(st.sampled_from(tokens)) * draw(st.sampled_from([2, 127, 2000]))
        elif op == 10:  # overwrite with a token
            token = draw(st.sampled_from(tokens))
            data[at : at + len(token)] = token
    return bytes(data)


def _split_safetensors(blob: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + n], blob[8 + n :]


def _pack_safetensors(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length % 2**64) + header + data


@st.composite
def safetensors_mutated(draw: st.DrawFn, pool: Sequence[bytes]) -> bytes:
    """A seed with its JSON header and data section mutated apart, the length field kept
    consistent (mostly) so that mutations reach the header's content."""
    if draw(st.integers(0, 4)) == 0:  # the whole file, length field and all
        return draw(mutated(pool, JSON_TOKENS))
    header, data = _split_safetensors(draw(st.sampled_from(pool)))
    header = draw(mutated([header], JSON_TOKENS))
    if draw(st.booleans()):
        data = draw(mutated([data], (b"\0", b"\xff" * 4), max_ops=2))
    length = None
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.sampled_from([*INTERESTING_INTS, len(header) + 1, len(header) - 1]))
    return _pack_safetensors(header, data, length)


FUZZ_DTYPES = (*sorted(DTYPE_ITEMSIZE), "F4", "F6_E2M3", "F8_E8M0", "Q7", "f32", "", "F32 ")
WEIRD_VALUES: tuple[Any, ...] = (None, True, -1, 1.0, "1", [], {}, [0], [0, 0, 0], [-1, 1], 2**64)


@st.composite
def safetensors_structured(draw: st.DrawFn) -> bytes:
    """A header built entry by entry: data ranges tiled, then (sometimes) one broken, so that
    most inputs reach the checks on shapes, sizes and tiling."""
    odd_names = st.sampled_from(["", "é", "\0", "\ud800", "__metadata__"])
    dims = st.one_of(st.integers(0, 4), st.sampled_from(INTERESTING_INTS))
    pairs: list[tuple[str, Any]] = []
    cursor = 0
    for i in range(draw(st.integers(0, 5))):
        pick = draw(st.integers(0, 15))  # mostly distinct names; sometimes odd, or repeated
        name = (
            f"t{i}" if pick < 14 else draw(odd_names) if pick == 14 or not pairs else pairs[-1][0]
        )
        dtype = draw(st.sampled_from(FUZZ_DTYPES))
        shape = draw(st.lists(dims, max_size=4))
        itemsize = DTYPE_ITEMSIZE.get(dtype, draw(st.integers(1, 8)))
        size = math.prod(shape) * itemsize
        begin, end = cursor, cursor + size
        cursor = end
        entry: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        fault = draw(st.integers(0, 14))
        if fault == 0:  # shifted: an overlap or a gap
            delta = draw(st.sampled_from([-8, -4, -1, 1, 2, 4]))
            entry["data_offsets"] = [begin + delta, end + delta]
        elif fault == 1 and pairs and isinstance(pairs[-1][1], dict):  # the previous range again
            entry = dict(pairs[-1][1])
        elif fault == 2:  # a size that does not match the shape
            entry["data_offsets"] = [begin, end + draw(st.sampled_from([-1, 1, 4]))]
        elif fault == 3:
            entry["data_offsets"] = draw(st.sampled_from([[end, begin], [0, end], [0, 0]]))
        elif fault == 4:
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif fault == 5:
            entry[draw(st.sampled_from(sorted(entry)))] = draw(st.sampled_from(WEIRD_VALUES))
        elif fault == 6:
            entry[draw(st.sampled_from(["x", "dtype2", "offsets"]))] = draw(
                st.sampled_from(WEIRD_VALUES)
            )
        pairs.append((name, entry))
    metadata = draw(
        st.sampled_from(["absent", "absent", None, {}, {"format": "pt"}, {"k": 1}, [], "x"])
    )
    if metadata != "absent":
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", metadata))
    pairs = list(draw(st.permutations(pairs)))
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    header = text.encode("utf-8", "surrogatepass") + b" " * draw(st.sampled_from([0, 0, 1, 7]))
    extra = draw(st.sampled_from([0, 0, 0, 0, 0, 0, 1, -1, 3, -4]))
    data = bytes(max(0, min(cursor, 1 << 16) + extra))
    return _pack_safetensors(header, data)


@st.composite
def torch_rezipped(draw: st.DrawFn, pool: Sequence[bytes]) -> bytes:
    """A zip-format seed rebuilt with one member mutated, dropped, renamed or added."""
    zipped = [s for s in pool if s.startswith(b"PK")]
    with zipfile.ZipFile(io.BytesIO(draw(st.sampled_from(zipped)))) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    i = draw(st.integers(0, len(members) - 1))
    action = draw(st.integers(0, 5))
    if action <= 1:  # mostly the pickle: that is where the structure is
        i = next((j for j, (n, _) in enumerate(members) if n.endswith("data.pkl")), i)
    name, body = members[i]
    if action <= 2:
        members[i] = (name, draw(mutated([body], PICKLE_TOKENS)))
    elif action == 3:
        del members[i]
    elif action == 4:
        members[i] = (draw(st.sampled_from([name + "x", name.rsplit("/", 1)[0], "a/data/9"])), body)
    else:
        members.append((draw(st.sampled_from([name, "a/data/1", "b/data.pkl"])), body))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate member names are the point
        for member, content in members:
            z.writestr(member, content)
    return out.getvalue()


INDEX_NAMES = ("a.weight", "a.bias", "b.weight", "t.weight", "ghost", "", "\ud800", "a.weight")
INDEX_PATHS: tuple[Any, ...] = (
    *("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "torch.bin"),
    *("sub", "sub/", "./model-00001-of-00002.safetensors", "../model.safetensors", "/etc/hosts"),
    *("..\\x", "x\0y", "\udc80", INDEX_NAME, "x" * 300, "", "missing.safetensors", None, 1),
    ["a"],
)


@st.composite
def index_structured(draw: st.DrawFn) -> bytes:
    weight_map = {
        draw(st.sampled_from(INDEX_NAMES)): draw(st.sampled_from(INDEX_PATHS))
        for _ in range(draw(st.integers(0, 5)))
    }
    doc: Any = {"metadata": {"total_size": draw(st.sampled_from(INTERESTING_INTS))}}
    doc["weight_map"] = weight_map
    doc = draw(st.sampled_from([doc, doc, doc, {"weight_map": list(weight_map)}, [doc], None]))
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


CONFIG_KEYS = (
    *("base_model", "models", "method", "alpha", "parameters", "dtype", "out_dtype"),
    *("exclude", "seed", "threads", "out_shard_size", "allow_pickle", "device"),
    *("merge_method", "merge_method", "tokenizer_source", 1, None),
)
_yaml_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTERESTING_INTS),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        [
            *("./ft0", "/abs/base", "ties", "linear", "dare_ties", "dare_linear", "iso_cts"),
            *("task_arithmetic", "weight_average", "float32", "bf16", "float8", "cuda:0"),
            *("5GB", "1.2.3", ".", "9" * 400 + "GB", "0", "-1GB", "cpu", "gpu", "mean", "sum"),
            *("tensor", "global", "1" * 5000),
        ]
    ),
)
_yaml_value = st.recursive(
    _yaml_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["model", "parameters", "weight", "density"]), inner),
        st.dictionaries(st.sampled_from(["density", "trim", "merge", "rank", "x", 1]), inner),
    ),
    max_leaves=6,
)


@st.composite
def config_structured(draw: st.DrawFn) -> bytes:
    import yaml

    doc: dict[Any, Any] = {}
    if draw(st.booleans()):  # start from a sensible config, then break some of it
        doc = dict(yaml.safe_load(draw(st.sampled_from(seeds("config")))))
    for _ in range(draw(st.integers(1, 4))):
        doc[draw(st.sampled_from(CONFIG_KEYS))] = draw(_yaml_value)
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode("utf-8", "replace")


def strategy(target: str) -> st.SearchStrategy[bytes]:
    pool = seeds(target) + regressions(target)
    if target == "safetensors":
        return st.one_of(safetensors_mutated(pool), safetensors_structured())
    if target == "torch":
        return st.one_of(mutated(pool, PICKLE_TOKENS), torch_rezipped(seeds(target)))
    if target == "index":
        return st.one_of(mutated(pool, JSON_TOKENS), index_structured())
    if target == "config":
        return st.one_of(mutated(pool, YAML_TOKENS), config_structured())
    raise ValueError(target)


# -- oracles --------------------------------------------------------------------------
class Workspace:
    """A scratch folder; every input goes to a fresh file (a new inode), so files that
    earlier inputs left memory-mapped are never truncated under their mappings."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="isofast-fuzz-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        self.root = root
        self.shards: Path | None = None

    def fresh(self, name: str, data: bytes, folder: Path | None = None) -> Path:
        path = (folder or self.root) / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        path.write_bytes(data)
        return path

    def shard_folder(self) -> Path:
        """Shards for the index target: the names its seed indexes map, a torch file, and a
        folder."""
        if self.shards is None:
            import torch
            from safetensors.numpy import save_file

            folder = self.root / "sharded"
            folder.mkdir()
            (folder / "sub").mkdir()
            w = np.arange(6, dtype=np.float32).reshape(2, 3)
            save_file(
                {"a.weight": w, "a.bias": w[0]}, str(folder / "model-00001-of-00002.safetensors")
            )
            save_file({"b.weight": w.T.copy()}, str(folder / "model-00002-of-00002.safetensors"))
            torch.save({"t.weight": torch.ones(2)}, folder / "torch.bin")
            self.shards = folder
        return self.shards


def _names_file(err: BaseException, *paths: Path) -> None:
    msg = str(err)
    assert any(str(p) in msg for p in paths), f"error does not name the file: {msg}"


def _read_all(reader: Any) -> None:
    """Read every tensor in full: the ranges the header promised really lie in the file."""
    for name in reader.names():
        info = reader.info(name)
        array = reader.get(name)
        assert array.shape == info.shape, (name, array.shape, info.shape)
        assert array.nbytes == info.nbytes, (name, array.nbytes, info.nbytes)
        array.tobytes()


def check_safetensors(ws: Workspace, data: bytes) -> str:
    from safetensors import safe_open

    path = ws.fresh("model.safetensors", data)
    try:
        sf = SafetensorsFile(path)
    except CheckpointError as e:
        _names_file(e, path)
        return "refused"
    with sf:
        _read_all(sf)
        infos = dict(sf.infos())
    try:
        with safe_open(str(path), framework="numpy") as lib:
            names = list(lib.keys())
            theirs = {
                k: (lib.get_slice(k).get_dtype(), lib.get_slice(k).get_shape()) for k in names
            }
    except Exception as e:
        raise AssertionError(f"isofast accepts a file the safetensors library refuses: {e}") from e
    ours = {k: (i.dtype, list(i.shape)) for k, i in infos.items()}
    assert ours == theirs, (ours, theirs)
    with CheckpointReader(path) as r:
        assert r.names() == list(infos)
    return "accepted"


def check_torch(ws: Workspace, data: bytes) -> str:
    path = ws.fresh("model.pt", data)
    try:
        reader = CheckpointReader(path)
    except CheckpointError as e:
        _names_file(e, path)
        return "refused"
    with reader:
        _read_all(reader)
    return "accepted"


def check_index(ws: Workspace, data: bytes) -> str:
    folder = ws.shard_folder()
    ws.fresh(INDEX_NAME, data, folder)
    try:
        reader = CheckpointReader(folder)
    except CheckpointError as e:
        _names_file(e, folder)
        return "refused"
    with reader:
        _read_all(reader)
    return "accepted"


def check_config(ws: Workspace, data: bytes) -> str:
    from isofast.config import load_config
    from isofast.request import MergeRequest

    path = ws.fresh("config.yaml", data)
    try:
        request = load_config(path)
    except (IsofastError, CheckpointError) as e:
        _names_file(e, path)
        return "refused"
    assert isinstance(request, MergeRequest)
    return "accepted"


CHECKS: dict[str, Callable[[Workspace, bytes], str]] = {
    "safetensors": check_safetensors,
    "torch": check_torch,
    "index": check_index,
    "config": check_config,
}


# -- the child process that runs a target ---------------------------------------------
class _Hang(BaseException):
    """Raised by the timer; a BaseException, so no `except Exception` in the code under
    test swallows it."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Hang:
        raise AssertionError(f"hang: one input ran longer than {seconds} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _limit_memory() -> int:
    """Cap the address space at what is mapped now plus MEMORY_HEADROOM."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def _site(exc: BaseException) -> str:
    """Where an exception came from: its type, the innermost frame in isofast and the frame
    that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/isofast/" in f.filename and "/tests/" not in f.filename]
    where = [f"{Path(f.filename).name}:{f.lineno}" for f in (ours[-1:] + frames[-1:])]
    return f"{type(exc).__name__} at {' <- '.join(dict.fromkeys(reversed(where)))}"


def run_target(target: str, examples: int, collect: bool = False) -> dict[str, Any]:
    """Run `examples` inputs through a target in this process; returns statistics."""
    ws = Workspace()
    check = CHECKS[target]
    outcomes: Counter[str] = Counter()
    foreign: dict[str, tuple[bytes, str]] = {}

    def one(data: bytes) -> None:
        with _time_limit(HANG_S):
            try:
                outcomes[check(ws, data)] += 1
            except Exception as e:
                if not collect or isinstance(e, AssertionError):
                    raise
                outcomes["foreign"] += 1
                foreign.setdefault(_site(e), (data, traceback.format_exc(limit=-6)))

    env_seed = os.environ.get("ISOFAST_FUZZ_SEED")
    fuzz = settings(
        max_examples=examples,
        derandomize=env_seed is None,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
        print_blob=True,
    )(given(strategy(target))(one))
    if env_seed is not None:
        fuzz = seed(int(env_seed))(fuzz)
    started = time.monotonic()
    fuzz()
    stats = {
        "target": target,
        "inputs": sum(outcomes.values()),
        "seconds": round(time.monotonic() - started, 1),
        "outcomes": dict(outcomes),
    }
    for where, (data, tb) in sorted(foreign.items()):
        print(f"--- foreign exception: {where}\ninput: {data!r}\n{tb}", flush=True)
    return stats


def _atheris(target: str, libfuzzer_args: list[str]) -> None:
    import atheris  # type: ignore[import-not-found]

    ws = Workspace()
    check = CHECKS[target]
    if target in ("torch", "index"):
        import torch  # noqa: F401 - imported (uninstrumented) before the checks need it
    import isofast.config  # noqa: F401

    # Coverage of isofast's own code guides the fuzzer (instrumenting everything loaded,
    # numpy and torch included, takes minutes and guides no better).
    for name, module in list(sys.modules.items()):
        if name == "isofast" or name.startswith("isofast."):
            for obj in list(vars(module).values()):
                if getattr(obj, "__module__", None) != name:
                    continue
                members = vars(obj).values() if isinstance(obj, type) else [obj]
                for fn in members:
                    if isinstance(fn, (staticmethod, classmethod)):
                        fn = fn.__func__
                    if isinstance(fn, types.FunctionType):
                        atheris.instrument_func(fn)
    atheris.Setup([sys.argv[0], *libfuzzer_args], lambda data: check(ws, data))
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")  # torch's notes on odd files are not failures
    if argv[:1] == ["--atheris"]:  # libFuzzer keeps its own time and memory limits
        rest = argv[2:]
        _atheris(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    signal.signal(signal.SIGALRM, _on_alarm)
    targets = argv or list(TARGETS)
    if any(t in ("torch", "index") for t in targets):
        import torch  # noqa: F401 - map torch before the memory limit is set

    from safetensors import safe_open  # noqa: F401

    import isofast.config  # noqa: F401

    limit = _limit_memory()
    collect = os.environ.get("ISOFAST_FUZZ_COLLECT") == "1"
    env = os.environ.get("ISOFAST_FUZZ_EXAMPLES")
    for target in targets:
        examples = int(env) if env else DEFAULT_EXAMPLES[target]
        stats = run_target(target, examples, collect)
        stats["address_space_limit_gib"] = round(limit / 2**30, 2)
        print(json.dumps(stats), flush=True)
    return 0


# -- the default suite ----------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str) -> None:
    env_examples = os.environ.get("ISOFAST_FUZZ_EXAMPLES")
    examples = int(env_examples) if env_examples else DEFAULT_EXAMPLES[target]
    timeout = 120 + examples * 0.05
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, target],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        pytest.fail(f"{target}: the fuzz run hung (over {timeout:.0f} s)\n{out[-4000:]}")
    out = proc.stdout + proc.stderr
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"{target}: the fuzz run died of {name}\n{out[-8000:]}")
    assert proc.returncode == 0, out[-12000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["inputs"] >= examples, stats
    print(stats)


def test_seed_corpus_is_valid(tmp_path: Path) -> None:
    """Every seed is a valid input (mutations start from inputs that reach deep)."""
    ws = Workspace(tmp_path)
    for target in ("safetensors", "torch", "config"):
        for data in seeds(target):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert CHECKS[target](ws, data) == "accepted", (target, data[:80])
    for data in seeds("index"):
        assert check_index(ws, data) == "accepted"
    assert all(len(s) < 4096 for t in TARGETS for s in seeds(t) + regressions(t))


@pytest.mark.parametrize("target", ["safetensors", "torch", "index"])
def test_regressions_are_refused_cleanly(tmp_path: Path, target: str) -> None:
    ws = Workspace(tmp_path)
    for data in regressions(target):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert CHECKS[target](ws, data) == "refused"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
