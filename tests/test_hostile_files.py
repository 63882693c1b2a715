"""Hostile and malformed files: every one fails with one line on stderr, exit 2, and nothing written.

Each file is built here, in tmp_path. The crash-prone ones (a pickle that used to segfault CPython, allocations of
terabytes) run the CLI in a subprocess; the rest call ``main`` in-process. Also here: current torch pickles a
tensor that carries Python attributes through ``torch._tensor._rebuild_from_type_v2``, which the SVD-LLM importer
now accepts for plain tensors only.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hostile_zips import (
    deflated_zeros,
    global_call_pickle,
    write_compressed_torch_zip,
    write_raw_zip,
    write_torch_zip,
)
from importer_fixtures import _private_tempdir, tiny_config, write_svd_llm  # noqa: F401 (_private_tempdir is an autouse fixture)
from importer_reference import reference_logits
from safetensors.torch import save_file
from tiny_tok import tiny_tokenizer

from rankserve.cli.main import main
from rankserve.importers import pickle_scan, read_checkpoint, state_dict
from rankserve.importers.errors import UnsafePickleError
from rankserve.importers.unpickler import load_restricted
from rankserve.loaders.source import load_model

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _one_line(code: int, stderr: str, out: Path, needles: tuple[str, ...]) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp siblings
    return lines[0]


def cli_fails(tmp_path: Path, argv: list, *needles: str, subprocess_run: bool = False) -> str:
    """Run the CLI; assert exit 2, one stderr line holding every needle, and no ``tmp_path/X`` written."""
    out = tmp_path / "X"
    argv = [str(a) for a in argv]
    if argv[0] == "import":
        argv += ["--out", str(out)]
    if argv[0] == "generate":
        argv += ["--prompt", "hi", "--max-tokens", "2"]
    if subprocess_run:
        r = subprocess.run(
            [sys.executable, "-m", "rankserve", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        return _one_line(r.returncode, r.stderr, out, needles)
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return _one_line(code, err.getvalue(), out, needles)


def _hf_dir(tmp_path: Path, config: dict | list | str, name: str = "hf") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    tiny_tokenizer().save(str(d))  # so that `import` gets past its tokenizer check to the file at fault
    return d


def _state_dict_dir(tmp_path: Path, bin_bytes: bytes | None = None, state: dict | None = None) -> Path:
    """A directory importable as ``uv`` (and loadable as an HF dir) whose pytorch_model.bin is given."""
    d = _hf_dir(tmp_path, tiny_config(), "bin")
    if state is not None:
        torch.save(state, d / "pytorch_model.bin")
    else:
        (d / "pytorch_model.bin").write_bytes(bin_bytes)
    return d


def _zip_bytes(tmp_path: Path, data_pkl: bytes, storages: dict | None = None) -> bytes:
    return write_torch_zip(tmp_path / "z.bin.tmp", data_pkl, storages).read_bytes()


# ---- pickles that crash, allocate or spin ------------------------------------------------------------------------


def deep_tuple_key(depth: int = 200_000) -> bytes:
    """``{((...((0,),)...),): None}``: hashing the key recursed in C and segfaulted CPython (200 KB of pickle)."""
    return b"\x80\x02}K\x00" + b"\x85" * depth + b"Ns."


def test_deep_tuple_key_svd_llm(tmp_path):
    evil = write_torch_zip(tmp_path / "deep.pt", deep_tuple_key())
    cli_fails(tmp_path, ["import", "svd-llm", evil], "nested more than 256 levels", subprocess_run=True)


@pytest.mark.parametrize("command", ["import", "generate", "inspect"])
def test_deep_tuple_key_bin(tmp_path, command):
    d = _state_dict_dir(tmp_path, _zip_bytes(tmp_path, deep_tuple_key()))
    argv = ["import", "uv", d] if command == "import" else [command, d]
    cli_fails(tmp_path, argv, "pytorch_model.bin", "nested more than 256 levels", subprocess_run=True)


def test_legacy_bin_files_are_scanned_too(tmp_path):
    # torch.save(..., _use_new_zipfile_serialization=False): five pickles in a row, then raw storage bytes
    honest = tmp_path / "legacy.bin"
    torch.save({"w": torch.arange(6.0).view(2, 3)}, honest, _use_new_zipfile_serialization=False)
    assert state_dict.load_state_dict(honest)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    head = b"".join(
        pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})
    )
    d = _state_dict_dir(tmp_path, head + deep_tuple_key() + pickle.dumps([], protocol=2))
    cli_fails(tmp_path, ["generate", d], "nested more than 256 levels", subprocess_run=True)


def test_deep_nesting_is_refused_before_anything_is_built(tmp_path):
    # Lists too (no hash here, but every recursive walker would overflow); 300 levels is past the bound.
    nested = b"\x80\x02" + b"]" * 300 + b"a" * 299 + b"."
    with pytest.raises(UnsafePickleError, match="nested more than 256"):
        pickle_scan.scan_pickle(nested, "x")
    honest = pickle.dumps({"a": [[(1, 2)] * 3] * 50, "b": (("x",),)}, protocol=2)
    pickle_scan.scan_pickle(honest, "x")


def test_huge_allowed_builtin_is_refused(tmp_path):
    for name in ("bytes", "bytearray"):
        evil = write_torch_zip(tmp_path / f"{name}.pt", global_call_pickle("builtins", name, 10**12))
        cli_fails(
            tmp_path, ["import", "svd-llm", evil], "allowed calls create more than", subprocess_run=True
        )


def test_frozenset_of_huge_bytes_is_refused(tmp_path):
    # {'model': frozenset(bytes(300_000_000))}: a 300 MB allocation, then minutes of hashing
    burn = (
        b"\x80\x02}X\x05\x00\x00\x00model"
        + b"c__builtin__\nfrozenset\nc__builtin__\nbytes\nJ"
        + struct.pack("<i", 300_000_000)
        + b"\x85R\x85Rs."
    )
    evil = write_torch_zip(tmp_path / "burn.pt", burn)
    cli_fails(tmp_path, ["import", "svd-llm", evil], "allowed calls create more than", subprocess_run=True)


def test_tuple_builtin_is_not_callable(tmp_path):
    # tuple(list) would build a tuple the scan cannot see into (a list memoized empty, filled later)
    evil = write_torch_zip(tmp_path / "t.pt", global_call_pickle("builtins", "tuple", [1, 2]))
    with pytest.raises(UnsafePickleError, match="refusing to call builtins.tuple"):
        load_restricted(evil)


def test_hashing_work_is_bounded(tmp_path):
    # A tuple key of 2**40 leaves (each level holds the one below twice), inserted once: the hash would never end.
    key = b"K\x00" + b"q\x000h\x00h\x00\x86" * 40
    with pytest.raises(UnsafePickleError, match="more than .* steps of work"):
        pickle_scan.scan_pickle(b"\x80\x02}" + key + b"Ns.", "x")


def test_zip_bomb_data_pkl(tmp_path):
    # 2 MB on disk, 2 GiB inflated
    size = 2 << 30
    bomb = write_raw_zip(
        tmp_path / "bomb.pt",
        [
            ("archive/data.pkl", zipfile.ZIP_DEFLATED, deflated_zeros(size), size),
            ("archive/version", 0, b"3", 1),
        ],
    )
    assert bomb.stat().st_size < 4 << 20
    cli_fails(tmp_path, ["import", "svd-llm", bomb], "inflates to 2,147,483,648 bytes")
    d = _state_dict_dir(tmp_path, bomb.read_bytes())
    cli_fails(tmp_path, ["import", "uv", d], "inflates to 2,147,483,648 bytes")


def test_compressed_storage_is_refused(tmp_path):
    # A storage that inflates beyond the file is refused before it is read: torch.save never compresses them.
    data = pickle.dumps({"w": None}, protocol=2)
    path = write_raw_zip(
        tmp_path / "s.pt",
        [
            ("archive/data.pkl", 0, data, len(data)),
            ("archive/data/0", zipfile.ZIP_DEFLATED, deflated_zeros(64 << 20), 64 << 20),
        ],
    )
    d = _state_dict_dir(tmp_path, path.read_bytes())
    cli_fails(tmp_path, ["import", "uv", d], "storage archive/data/0 is compressed")


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA], ids=["deflate", "lzma"])
def test_corrupt_compressed_member(tmp_path, compression):
    data = pickle.dumps({"model": None, "pad": "rankserve " * 2000}, protocol=2)
    path = write_compressed_torch_zip(tmp_path / "c.pt", data, compression, corrupt=True)
    cli_fails(tmp_path, ["import", "svd-llm", path], "archive entry archive/data.pkl is corrupt")
    d = _state_dict_dir(tmp_path, path.read_bytes())
    cli_fails(tmp_path, ["import", "uv", d], "archive entry archive/data.pkl is corrupt")
    cli_fails(tmp_path, ["generate", d], "archive entry archive/data.pkl is corrupt")


# ---- tensor views ------------------------------------------------------------------------------------------------


def _view_pickle(size: tuple[int, ...], stride: tuple[int, ...], copies: int = 1) -> bytes:
    """{'model': [view, view, ...]}: ``copies`` rebuilds of one view of the 16-float storage '0'."""

    def ints(values):
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    view = (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x10tQ"
        b"K\x00" + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)RtR"
    )
    return b"\x80\x02}X\x05\x00\x00\x00model(" + view * copies + b"ls."


STORAGE = {"0": b"\x00" * 64}


def test_stride_zero_view_is_refused(tmp_path):
    # 64 bytes of storage standing for a 10^8-element tensor
    evil = write_torch_zip(tmp_path / "s0.pt", _view_pickle((10_000, 10_000), (0, 1)), STORAGE)
    cli_fails(tmp_path, ["import", "svd-llm", evil], "overlaps itself")


def test_overlapping_strides_are_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match="overlaps itself"):
        load_restricted(write_torch_zip(tmp_path / "o.pt", _view_pickle((4, 4), (2, 1)), STORAGE))
    # the honest cases: contiguous, transposed, a column slice
    for size, stride in (((4, 4), (4, 1)), ((4, 4), (1, 4)), ((4, 2), (4, 1))):
        load_restricted(write_torch_zip(tmp_path / "ok.pt", _view_pickle(size, stride), STORAGE))


def test_many_views_of_one_storage_are_refused(tmp_path):
    evil = write_torch_zip(tmp_path / "many.pt", _view_pickle((16,), (1,), copies=5), STORAGE)
    cli_fails(tmp_path, ["import", "svd-llm", evil], "more than 4x the storage")
    load_restricted(write_torch_zip(tmp_path / "four.pt", _view_pickle((16,), (1,), copies=4), STORAGE))


def test_view_past_the_storage_is_refused(tmp_path):
    evil = write_torch_zip(tmp_path / "past.pt", _view_pickle((17,), (1,)), STORAGE)
    cli_fails(tmp_path, ["import", "svd-llm", evil], "reads past the end")


@pytest.mark.parametrize("command", ["import", "generate"])
def test_expanded_tensor_in_a_bin_file_is_refused(tmp_path, command):
    d = _state_dict_dir(tmp_path, state={"model.embed_tokens.weight": torch.zeros(64).expand(128, 64)})
    argv = ["import", "uv", d] if command == "import" else [command, d]
    cli_fails(tmp_path, argv, "model.embed_tokens.weight", "overlaps itself")


def test_bin_file_with_foreign_globals_is_refused(tmp_path):
    data = b"\x80\x02}X\x01\x00\x00\x00wc__builtin__\nset\n)Rs."
    d = _state_dict_dir(tmp_path, _zip_bytes(tmp_path, data))
    cli_fails(tmp_path, ["generate", d], "holds more than tensors", "builtins.set")


# ---- _rebuild_from_type_v2 -----------------------------------------------------------------------------------------


def test_tensors_with_python_attributes_import_end_to_end(tmp_path):
    fx = write_svd_llm(tmp_path / "src", tensor_attrs={"_is_hf_initialized": True})
    with zipfile.ZipFile(fx.path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    # what current torch writes for such tensors (not the fixture's own choice)
    assert b"torch._tensor\n_rebuild_from_type_v2" in data
    assert b"_rebuild_parameter_with_state" in data
    out = tmp_path / "out"
    assert main(["import", "svd-llm", str(fx.path), "--out", str(out)]) == 0
    lm = load_model(str(out))
    with torch.no_grad():
        got = lm.model(TOKENS).float()
    diff = (got - reference_logits(fx, TOKENS)).abs().max().item()
    assert diff <= 1e-5, diff


def _from_type_pickle(inner: bytes, new_type: bytes, state: bytes) -> bytes:
    """{'model': _rebuild_from_type_v2(inner, new_type, (storage 0 as 4 floats,), state)}."""
    args = (
        b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
        b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
    )
    return (
        b"\x80\x02}X\x05\x00\x00\x00modelctorch._tensor\n_rebuild_from_type_v2\n("
        + inner
        + new_type
        + args
        + state
    ) + b"tRs."


STORAGE4 = {"0": b"\x00" * 16}
PLAIN_STATE = b"}X\x12\x00\x00\x00_is_hf_initialized\x88s"
REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"


def test_rebuild_from_type_v2_for_a_plain_tensor(tmp_path):
    path = write_torch_zip(
        tmp_path / "ok.pt", _from_type_pickle(REBUILD, b"ctorch\nTensor\n", PLAIN_STATE), STORAGE4
    )
    t = load_restricted(path)["model"]
    assert type(t) is torch.Tensor and t.shape == (4,) and not hasattr(t, "_is_hf_initialized")
    param = b"ctorch.nn.parameter\nParameter\n"
    assert load_restricted(
        write_torch_zip(tmp_path / "p.pt", _from_type_pickle(REBUILD, param, b"N"), STORAGE4)
    )


HOSTILE_FROM_TYPE = {
    "inner-builtin": (b"c__builtin__\nbytes\n", b"ctorch\nTensor\n", PLAIN_STATE, "only tensor-rebuild"),
    "inner-itself": (
        b"ctorch._tensor\n_rebuild_from_type_v2\n",
        b"ctorch\nTensor\n",
        PLAIN_STATE,
        "only tensor",
    ),
    "subclass": (REBUILD, b"cevil.tensors\nHookedTensor\n", PLAIN_STATE, "only torch.Tensor and Parameter"),
    "state-object": (
        REBUILD,
        b"ctorch\nTensor\n",
        b"}X\x01\x00\x00\x00hcevil\nHook\n)\x81s",
        "plain scalars",
    ),
    "state-list": (REBUILD, b"ctorch\nTensor\n", b"]", "plain scalars"),
}


@pytest.mark.parametrize("case", HOSTILE_FROM_TYPE, ids=list(HOSTILE_FROM_TYPE))
def test_rebuild_from_type_v2_refuses_anything_else(tmp_path, case):
    inner, new_type, state, needle = HOSTILE_FROM_TYPE[case]
    evil = write_torch_zip(tmp_path / "evil.pt", _from_type_pickle(inner, new_type, state), STORAGE4)
    cli_fails(tmp_path, ["import", "svd-llm", evil], "refusing", needle)


# ---- tokenizer rebuild -------------------------------------------------------------------------------------------


def _proto_field(number: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_long_sentencepiece_piece_is_bounded(tmp_path):
    # One 200,000-character piece: trying every split took time quadratic in its length.
    pieces = [b"<unk>", b"<s>", b"</s>", b"a", b"a" * 200_000]
    proto = b"".join(_proto_field(1, _proto_field(1, p)) for p in pieces) + _proto_field(2, b"\x18\x02")
    fx = write_svd_llm(tmp_path / "src", sp_proto=proto)
    notes = read_checkpoint("svd-llm", fx.path).provenance["notes"]
    assert any("200,000 characters, more than 256" in n and "pass --tokenizer" in n for n in notes), notes
    cli_fails(tmp_path, ["import", "svd-llm", fx.path], "--tokenizer PATH", subprocess_run=True)
    tok = tmp_path / "tok"
    tiny_tokenizer().save(str(tok))
    assert (
        main(["import", "svd-llm", str(fx.path), "--out", str(tmp_path / "ok"), "--tokenizer", str(tok)]) == 0
    )


# ---- malformed config.json -----------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "vocab-null": ({"vocab_size": None}, "config vocab_size must be a positive integer", "found None"),
    "heads-zero": (
        {"num_attention_heads": 0},
        "config num_attention_heads must be a positive integer",
        "found 0",
    ),
    "hidden-negative": ({"hidden_size": -64}, "config hidden_size must be a positive integer", "found -64"),
    "head-dim-float": (
        {"head_dim": 1e12},
        "config head_dim must be a positive integer",
        "found 1000000000000.0",
    ),
    "head-dim-huge": ({"head_dim": 10**12}, "config head_dim", "no larger than 4,096"),
    "head-dim-odd": ({"head_dim": 15}, "config head_dim must be a positive even integer", "found 15"),
    "layers-string": ({"num_hidden_layers": "2"}, "config num_hidden_layers", "found '2'"),
    "kv-heads-too-many": ({"num_key_value_heads": 8}, "config num_key_value_heads", "no larger than 4"),
    "rope-scaling-string": ({"rope_scaling": "x"}, "config rope_scaling must be an object or null", "'x'"),
    "rope-factor-zero": (
        {"rope_scaling": {"rope_type": "llama3", "factor": 0}},
        "config rope_scaling.factor must be a positive finite number",
        "found 0",
    ),
    "rope-theta-string": (
        {"rope_theta": "big"},
        "config rope_theta must be a positive finite number",
        "'big'",
    ),
    "eps-negative": (
        {"rms_norm_eps": -1e-5},
        "config rms_norm_eps must be a positive finite number",
        "-1e-05",
    ),
    "tie-string": (
        {"tie_word_embeddings": "yes"},
        "config tie_word_embeddings must be true or false",
        "'yes'",
    ),
    "eos-string": ({"eos_token_id": "</s>"}, "config eos_token_id must be a token id", "'</s>'"),
    "rope-parameters-list": ({"rope_parameters": [1]}, "config rope_parameters must be an object", "[1]"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["import", "generate", "inspect"])
def test_malformed_config_is_one_line(tmp_path, command, case):
    override, *needles = BAD_CONFIGS[case]
    d = _hf_dir(tmp_path, dict(tiny_config(), truncation_ranks={}, **override))
    argv = ["import", "asvd", d] if command == "import" else [command, d]
    cli_fails(tmp_path, argv, "config.json" if command != "import" else str(d), *needles)


@pytest.mark.parametrize(
    "text", ["[1, 2]", "[" * 100_000 + "]" * 100_000, '"llama"'], ids=["list", "deep", "str"]
)
@pytest.mark.parametrize("command", ["import", "generate"])
def test_config_that_is_not_an_object(tmp_path, command, text):
    d = _hf_dir(tmp_path, text)
    argv = ["import", "asvd", d] if command == "import" else [command, d]
    cli_fails(tmp_path, argv, "config.json")


# ---- malformed safetensors headers ---------------------------------------------------------------------------------


def _safetensors(header: dict, data: bytes = b"\x00" * 64) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(shape, offsets, dtype="F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


BAD_HEADERS = {
    "negative-shape": ({"w": _entry([-1, 4], [0, 16])}, "shape must be a list of non-negative integers"),
    "float-shape": ({"w": _entry([2.5], [0, 10])}, "shape must be a list of non-negative integers"),
    "string-offsets": ({"w": _entry([4], "0,16")}, "data_offsets must be two non-negative integers"),
    "string-offset": ({"w": _entry([4], ["0", 16])}, "data_offsets must be two non-negative integers"),
    "offsets-past-end": ({"w": _entry([4], [10**9, 10**9 + 16])}, "fall outside the data section"),
    "offsets-reversed": ({"w": _entry([0], [16, 0])}, "fall outside the data section"),
    "overlap": ({"a": _entry([4], [0, 16]), "b": _entry([4], [8, 24])}, "overlap in the data section"),
    "entry-not-object": ({"w": [1, 2]}, "header entry must be an object"),
    "dtype-number": ({"w": _entry([4], [0, 16], dtype=7)}, "unsupported dtype 7"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_malformed_safetensors_header(tmp_path, command, case):
    header, needle = BAD_HEADERS[case]
    d = _hf_dir(tmp_path, tiny_config())
    (d / "model.safetensors").write_bytes(_safetensors(header))
    cli_fails(tmp_path, [command, d], "model.safetensors", needle)


@pytest.mark.parametrize("fmt", ["asvd", "auto"])
@pytest.mark.parametrize("case", ["negative-shape", "string-offsets", "overlap"])
def test_malformed_safetensors_header_import(tmp_path, case, fmt):
    config = dict(tiny_config(), **({"truncation_ranks": {}} if fmt == "asvd" else {}))
    d = _hf_dir(tmp_path, config)
    (d / "model.safetensors").write_bytes(_safetensors(BAD_HEADERS[case][0]))
    cli_fails(tmp_path, ["import", fmt, d], "model.safetensors")


def test_valid_safetensors_still_load(tmp_path):
    d = _hf_dir(tmp_path, tiny_config())
    save_file(
        {"a": torch.ones(2, 3), "b": torch.zeros(0), "c": torch.arange(4.0)}, str(d / "model.safetensors")
    )
    from rankserve.io.safetensors import load_mmap

    t = load_mmap(str(d / "model.safetensors"))
    assert t["a"].shape == (2, 3) and t["b"].numel() == 0 and t["c"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "index", ['{"weight_map": 3}', "[]", '{"weight_map": {"a": "../../etc/passwd"}}', "{"]
)
def test_malformed_shard_index(tmp_path, index):
    d = _hf_dir(tmp_path, tiny_config())
    (d / "model.safetensors.index.json").write_text(index)
    cli_fails(tmp_path, ["generate", d], "model.safetensors.index.json: not a valid shard index")


def test_malformed_shard_index_import(tmp_path):
    d = _hf_dir(tmp_path, dict(tiny_config(), truncation_ranks={}))
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    cli_fails(tmp_path, ["import", "asvd", d], "not a valid shard index")
