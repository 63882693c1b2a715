"""The importers of public SVD checkpoint layouts: right factors, right config, safe pickles, clear errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hostile_zips import global_call_pickle, write_torch_zip
from importer_fixtures import (  # noqa: F401 (_private_tempdir is an autouse fixture)
    _private_tempdir,
    fast_tokenizer_json,
    module_name,
    tiny_config,
    write_asvd,
    write_basis_sharing,
    write_svd_llm,
    write_uv,
)
from importer_reference import reference_logits
from safetensors.torch import load_file, save_file

from rankserve.importers import (
    CheckpointImportError,
    ImportedModel,
    UnsafePickleError,
    detect_format,
    read_checkpoint,
)
from rankserve.importers.unpickler import Record, load_restricted

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """One fixture per layout (plus variants), written once for the whole module."""
    root = tmp_path_factory.mktemp("importers")
    return {
        "svd-llm": write_svd_llm(root / "svd-llm"),
        "asvd": write_asvd(root / "asvd", shards=2),
        "basis-sharing": write_basis_sharing(root / "basis-sharing"),
        "uv": write_uv(root / "uv"),
        "asvd-qwen2": write_asvd(root / "asvd-qwen2", config=tiny_config(model_type="qwen2")),
        "uv-bin-sniffed": write_uv(root / "uv-bin", file_format="bin", low_rank_config=False),
        "basis-sharing-no-aliases": write_basis_sharing(root / "bs-noalias", aliases=False, shards=2),
    }


ALL = ["svd-llm", "asvd", "basis-sharing", "uv", "asvd-qwen2", "uv-bin-sniffed", "basis-sharing-no-aliases"]


def _copy(fixture, tmp_path: Path) -> Path:
    dst = tmp_path / fixture.path.name
    if fixture.path.is_dir():
        shutil.copytree(fixture.path, dst)
    else:
        shutil.copy(fixture.path, dst)
    return dst


# ---- every reader ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_reader_returns_family_ranks_and_products(fixtures, name):
    fx = fixtures[name]
    assert detect_format(fx.path) == fx.family
    model = read_checkpoint("auto", fx.path)
    assert isinstance(model, ImportedModel)
    assert model.family == fx.family
    assert model.ranks() == fx.ranks
    for module, w in fx.weights.items():
        torch.testing.assert_close(model.weight(module).float(), w.float(), rtol=0, atol=1e-6, msg=module)
    for module, b in fx.biases.items():
        found = model.lowrank[module][2] if module in model.lowrank else model.dense[f"{module}.bias"]
        torch.testing.assert_close(found.float(), b)
    for key, t in fx.dense.items():
        assert torch.equal(model.dense[key], t), key
        assert model.dense[key].dtype == t.dtype, key  # dtypes as stored (SVD-LLM mixes fp16 and fp32)
    for u, v, _ in model.lowrank.values():
        assert u.shape[1] == v.shape[0]
    assert model.provenance["format"] == fx.family
    assert all(len(h) == 64 for h in model.provenance["sha256"].values())
    assert 0 < model.provenance["ratio"] < 1


@pytest.mark.parametrize("name", ALL)
def test_config_is_the_clean_base_config(fixtures, name):
    fx = fixtures[name]
    config = read_checkpoint(fx.family, fx.path).config
    assert config["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config["model_type"]]
    ]
    for key in (
        "auto_map",
        "truncation_ranks",
        "low_rank_config",
        "q_groups",
        "num_basis_q",
        "_name_or_path",
    ):
        assert key not in config
    for key, value in fx.config.items():
        if key != "architectures":
            assert config[key] == value, key
    json.dumps(config)


@pytest.mark.parametrize("name", ALL)
def test_imported_model_reproduces_the_reference_forward(fixtures, name):
    """Dense reconstruction of the import through transformers' own model == the layout's reference forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fx = fixtures[name]
    model = read_checkpoint(fx.family, fx.path)
    config = {k: v for k, v in model.config.items() if k not in ("torch_dtype", "dtype")}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), attn_implementation="eager").float()
    state = {k: v.float() for k, v in model.dense.items()}
    for module in model.ranks():
        state[f"{module}.weight"] = model.weight(module)
    state.update({f"{m}.bias": b.float() for m, (_, _, b) in model.lowrank.items() if b is not None})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    with torch.no_grad():
        logits = hf(TOKENS).logits
    torch.testing.assert_close(logits, reference_logits(fx, TOKENS), rtol=1e-4, atol=1e-4)


# ---- format specifics --------------------------------------------------------------------------------------------


def test_basis_groups_are_stored_once(fixtures):
    fx = fixtures["basis-sharing"]
    model = read_checkpoint("basis-sharing", fx.path)
    assert {k: sorted(g.members) for k, g in model.shared.items()} == {
        k: sorted(v) for k, v in fx.groups.items()
    }
    for key, group in model.shared.items():
        kind = key.split("_proj")[0]
        assert group.basis.shape[0] == fx.ranks[fx.groups[key][0]]
        for module, (coeff, bias) in group.members.items():
            assert coeff.shape[1] == group.basis.shape[0] and bias is None
            assert module.endswith(f"{kind}_proj") and module not in model.lowrank
    # singleton groups (private bases) are plain low-rank pairs: coefficient = U, basis = V
    assert set(model.lowrank) == {module_name(i, k) for i in (0, 1) for k in ("o", "down")}
    assert "model.layers.0.self_attn.q_proj.weight" not in model.dense  # a coefficient, not a dense weight


def test_basis_aliases_that_disagree_are_named(fixtures, tmp_path):
    src = _copy(fixtures["basis-sharing"], tmp_path)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.layers.1.self_attn.q_basis.weight"] = state["model.layers.1.self_attn.q_basis.weight"] + 1e-3
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointImportError) as e:
        read_checkpoint("basis-sharing", src)
    assert "model.q_basis.0.weight" in str(e.value) and "model.layers.1.self_attn.q_basis.weight" in str(
        e.value
    )


def test_basis_groups_must_cover_every_layer(fixtures, tmp_path):
    src = _copy(fixtures["basis-sharing"], tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["up_groups"] = [[0]]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointImportError, match="up_groups"):
        read_checkpoint("basis-sharing", src)


def test_asvd_never_imports_remote_code(fixtures):
    fx = fixtures["asvd"]
    model = read_checkpoint("asvd", fx.path)
    assert not (fx.path / "REMOTE_CODE_WAS_IMPORTED").exists()
    assert "lm_head" in model.lowrank and "model.layers.1.mlp.down_proj.weight" in model.dense
    assert model.tokenizer_dir == str(fx.path)
    assert any("remote code" in note for note in model.provenance["notes"])


def test_uv_keeps_dense_v_proj_apart_from_v_factors(fixtures):
    model = read_checkpoint("uv", fixtures["uv"].path)
    assert "model.layers.1.self_attn.v_proj.weight" in model.dense
    assert "model.layers.0.self_attn.v_proj" in model.lowrank
    assert model.provenance["original_architectures"] == ["LlamaLowRankForCausalLM"]


def test_single_weight_file_uses_its_directory(fixtures):
    fx = fixtures["uv"]
    model = read_checkpoint("auto", fx.path / "model.safetensors")
    assert model.family == "uv" and model.ranks() == fx.ranks


def test_svd_llm_tokenizer_rebuilt_from_sentencepiece(fixtures):
    pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    model = read_checkpoint("svd-llm", fixtures["svd-llm"].path)
    try:
        import sentencepiece as spm

        tok = AutoTokenizer.from_pretrained(model.tokenizer_dir)
        sp = spm.SentencePieceProcessor(model_file=str(Path(model.tokenizer_dir) / "tokenizer.model"))
        for text in ("Hello world", "rankserve imports public checkpoints safely"):
            assert tok(text).input_ids == [1] + sp.encode(text)
    finally:
        shutil.rmtree(model.tokenizer_dir)


def test_svd_llm_tokenizer_rebuilt_from_fast_json(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fx = write_svd_llm(tmp_path, tokenizer="fast")
    model = read_checkpoint("svd-llm", fx.path)
    try:
        tok = AutoTokenizer.from_pretrained(model.tokenizer_dir)
        original = Tokenizer.from_str(fast_tokenizer_json())
        text = "The quick brown fox jumps over the lazy dog."
        assert tok(text).input_ids == original.encode(text).ids
        assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    finally:
        shutil.rmtree(model.tokenizer_dir)


def test_svd_llm_without_tokenizer_asks_for_one(tmp_path, fixtures):
    fx = write_svd_llm(tmp_path, tokenizer=None)
    model = read_checkpoint("svd-llm", fx.path)
    assert model.tokenizer_dir is None
    assert any("--tokenizer" in note for note in model.provenance["notes"])
    user = fixtures["asvd"].path
    assert read_checkpoint("svd-llm", fx.path, tokenizer=str(user)).tokenizer_dir == str(user)


def test_svd_llm_records_the_pickled_rope_base(tmp_path):
    fx = write_svd_llm(tmp_path, config=tiny_config(rope_theta=500000.0), tokenizer=None)
    model = read_checkpoint("svd-llm", fx.path)
    assert model.config["rope_theta"] == 500000.0
    assert any("rotary embedding uses base 10000" in note for note in model.provenance["notes"])
    assert model.provenance["svd_llm_ratio_attribute"] == [0.8]


def test_restricted_unpickler_turns_classes_into_records(fixtures):
    obj = load_restricted(fixtures["svd-llm"].path)
    model = obj["model"]
    assert isinstance(model, Record) and model.name == "LlamaForCausalLM"
    attn = (
        model.state["_modules"]["model"].state["_modules"]["layers"].state["_modules"]["0"].state["_modules"]
    )
    assert attn["self_attn"].qualname == "component.svd_llama.SVD_LlamaAttention"
    assert isinstance(
        attn["self_attn"].state["_modules"]["q_u_proj"].state["_parameters"]["weight"], torch.Tensor
    )
    assert Record().state is None  # instantiable with no args


# ---- hostile pickles ---------------------------------------------------------------------------------------------

HOSTILE = [
    ("os", "system", lambda marker: (f"touch {marker}",)),
    ("posix", "system", lambda marker: (f"touch {marker}",)),
    ("builtins", "exec", lambda marker: (f"open({str(marker)!r}, 'w').close()",)),
    ("builtins", "eval", lambda marker: (f"open({str(marker)!r}, 'w')",)),
    ("subprocess", "Popen", lambda marker: (["touch", str(marker)],)),
    ("builtins", "getattr", lambda marker: ("x", "y")),
]


@pytest.mark.parametrize("module,name,args", HOSTILE, ids=[f"{m}.{n}" for m, n, _ in HOSTILE])
def test_hostile_pickle_is_refused(tmp_path, module, name, args):
    marker = tmp_path / "pwned"
    path = write_torch_zip(
        tmp_path / "evil_whitening_only_0.8.pt", global_call_pickle(module, name, *args(marker))
    )
    with pytest.raises(UnsafePickleError, match=rf"refusing to call {module}\.{name} from .*evil"):
        read_checkpoint("svd-llm", path)
    assert not marker.exists()


def test_hostile_reduce_written_by_torch_save_is_refused(tmp_path):
    import os

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "tokenizer": None}, path)
    with pytest.raises(UnsafePickleError, match="refusing to call"):
        read_checkpoint("auto", path)
    assert not marker.exists()


def test_calling_a_model_class_is_refused(tmp_path):
    path = write_torch_zip(
        tmp_path / "m.pt",
        global_call_pickle("transformers.models.llama.modeling_llama", "LlamaForCausalLM", 1),
    )
    with pytest.raises(UnsafePickleError, match="refusing to call transformers.models.llama.modeling_llama"):
        load_restricted(path)


def test_raw_pickle_stream_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pt"
    path.write_bytes(global_call_pickle("os", "system", f"touch {marker}"))
    with pytest.raises(CheckpointImportError, match="not a torch zip archive"):
        read_checkpoint("svd-llm", path)
    assert not marker.exists()


def test_tensor_view_past_its_storage_is_refused(tmp_path):
    tensor = (
        b"\x80\x02}X\x05\x00\x00\x00modelctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
        b"K\x00K\x10\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    )
    path = write_torch_zip(tmp_path / "oob.pt", tensor, {"0": b"\x00" * 16})
    with pytest.raises(UnsafePickleError, match="reads past the end"):
        load_restricted(path)


def test_weights_only_bin_refuses_objects(tmp_path, fixtures):
    src = _copy(fixtures["basis-sharing"], tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(src / "pytorch_model.bin", weights_only=True)

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    state["evil"] = Payload()
    with open(src / "pytorch_model.bin", "wb") as f:
        torch.save(state, f)
    with pytest.raises(UnsafePickleError):
        read_checkpoint("basis-sharing", src)
    assert not marker.exists()


# ---- validation errors -------------------------------------------------------------------------------------------


def _edit_safetensors(directory: Path, edit) -> None:
    for path in directory.glob("*.safetensors"):
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path))


def test_factor_shape_mismatch_names_tensor_and_both_shapes(fixtures, tmp_path):
    src = _copy(fixtures["uv"], tmp_path)
    key = "model.layers.0.self_attn.k_proj.u_proj.weight"  # [32, r] for 2 kv heads x 16
    _edit_safetensors(src, lambda s: s.update({key: torch.zeros(48, s[key].shape[1], dtype=torch.float16)}))
    with pytest.raises(CheckpointImportError) as e:
        read_checkpoint("uv", src)
    rank = fixtures["uv"].ranks["model.layers.0.self_attn.k_proj"]
    assert (
        str(e.value)
        == f"{key}: expected shape [32, r] (output side of model.layers.0.self_attn.k_proj), found [48, {rank}]"
    )


def test_dense_shape_mismatch_names_tensor_and_both_shapes(fixtures, tmp_path):
    src = _copy(fixtures["asvd"], tmp_path)
    key = "model.layers.1.input_layernorm.weight"

    def edit(state):
        if key in state:
            state[key] = torch.ones(65, dtype=torch.float16)

    _edit_safetensors(src, edit)
    with pytest.raises(CheckpointImportError, match=rf"^{key}: expected shape \[64\], found \[65\]$"):
        read_checkpoint("asvd", src)


def test_rank_disagreeing_with_config_is_named(fixtures, tmp_path):
    src = _copy(fixtures["asvd"], tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["truncation_ranks"]["model.layers.0.mlp.up_proj"] += 1
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointImportError, match=r"model.layers.0.mlp.up_proj: config truncation_ranks declares rank"
    ):
        read_checkpoint("asvd", src)


def test_missing_tensor_is_named(fixtures, tmp_path):
    src = _copy(fixtures["asvd"], tmp_path)
    key = "model.layers.0.self_attn.v_proj.BLinear.weight"
    _edit_safetensors(src, lambda s: s.pop(key, None))
    with pytest.raises(CheckpointImportError, match=rf"missing tensor: {key}"):
        read_checkpoint("asvd", src)


def test_missing_norm_is_named(fixtures, tmp_path):
    src = _copy(fixtures["basis-sharing"], tmp_path)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state["model.norm.weight"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(
        CheckpointImportError, match=r"missing tensor: model.norm.weight \(expected shape \[64\]\)"
    ):
        read_checkpoint("basis-sharing", src)


def test_unexpected_tensors_are_named(fixtures, tmp_path):
    src = _copy(fixtures["uv"], tmp_path)
    _edit_safetensors(
        src, lambda s: s.update({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 2)})
    )
    with pytest.raises(CheckpointImportError, match="unexpected tensors.*lora_A"):
        read_checkpoint("uv", src)


def test_bias_presence_follows_the_config(fixtures, tmp_path):
    qwen = _copy(fixtures["asvd-qwen2"], tmp_path / "qwen")
    key = "model.layers.0.self_attn.k_proj.ALinear.bias"
    _edit_safetensors(qwen, lambda s: s.pop(key))
    with pytest.raises(CheckpointImportError, match=rf"^missing tensor: {key} \(qwen2 "):
        read_checkpoint("asvd", qwen)
    llama = _copy(fixtures["uv"], tmp_path / "llama")
    key = "model.layers.0.mlp.up_proj.u_proj.bias"
    _edit_safetensors(llama, lambda s: s.update({key: torch.zeros(128, dtype=torch.float16)}))
    with pytest.raises(CheckpointImportError, match=rf"^{key}: unexpected bias"):
        read_checkpoint("uv", llama)


def test_tied_embeddings_need_no_lm_head(fixtures, tmp_path):
    src = _copy(fixtures["uv"], tmp_path)
    _edit_safetensors(src, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointImportError, match=r"missing tensor: lm_head.weight"):
        read_checkpoint("uv", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    model = read_checkpoint("uv", src)
    assert "lm_head.weight" not in model.dense and "lm_head" not in model.lowrank
    assert reference_logits(src, TOKENS).shape == (2, 9, 128)


@pytest.mark.parametrize("family", ["asvd", "uv", "basis-sharing"])
def test_unsupported_architecture(fixtures, tmp_path, family):
    src = _copy(fixtures[family], tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="opt", architectures=["OPTForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointImportError, match=r"^not supported: .*'opt' \(OPTForCausalLM\)"):
        read_checkpoint(family, src)


def test_unsupported_svd_llm_architecture(tmp_path):
    fx = write_svd_llm(
        tmp_path, tokenizer=None, config_class="transformers.models.opt.configuration_opt.OPTConfig"
    )
    with pytest.raises(CheckpointImportError, match=r"^not supported: .*'opt'"):
        read_checkpoint("svd-llm", fx.path)


def test_detect_format_refuses_unsupported_layouts(tmp_path):
    for key in ("low_rank_schema", "dobi_target_modules"):
        d = tmp_path / key
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(tiny_config(), **{key: "ABLinear"})))
        with pytest.raises(CheckpointImportError, match="not supported"):
            detect_format(d)
    with pytest.raises(CheckpointImportError, match="does not exist"):
        read_checkpoint("auto", tmp_path / "nope")
    with pytest.raises(CheckpointImportError, match="unknown checkpoint format"):
        read_checkpoint("gguf", tmp_path)


def test_profiling_file_is_not_a_model(tmp_path):
    path = tmp_path / "meta_llama_Llama_2_7b_hf_profiling_wikitext2_256_3.pt"
    torch.save({0: {"self_attn.q_proj": torch.eye(4)}}, path)
    with pytest.raises(CheckpointImportError, match="whitening matrices"):
        read_checkpoint("svd-llm", path)


def test_truncated_archive_is_a_clear_error(fixtures, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(fixtures["svd-llm"].path.read_bytes()[:4096])
    with pytest.raises(CheckpointImportError):
        read_checkpoint("svd-llm", path)


def test_pickle_module_is_plain_python():
    # The restricted unpickler must not fall back to the C one, which cannot intercept REDUCE/BUILD.
    from rankserve.importers import unpickler as safe_pickle

    assert issubclass(safe_pickle._RestrictedUnpickler, pickle._Unpickler)
