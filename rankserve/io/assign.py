"""The one way weights reach a model: build the skeleton on the meta device, then assign named tensors to it
after checking every name and shape. Nothing is allocated before assignment, and a memory-mapped tensor already
in the target dtype is not copied at all."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rankserve.config import ModelConfig
from rankserve.errors import InputError
from rankserve.models import model_class


class WeightError(InputError):
    """Checkpoint tensors that do not fit the model the config describes."""


def new_model(cfg: ModelConfig) -> nn.Module:
    """The model skeleton on the meta device: no memory is allocated until weights are assigned."""
    return model_class(cfg)(cfg, device="meta")


def listed(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many more."""
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_names(
    tensors: Mapping[str, torch.Tensor], expected: Mapping, where: str, error: type[Exception] = WeightError
) -> None:
    """Raise ``error`` naming the tensors ``expected`` lacks in ``tensors`` first, then the unexpected ones."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise error(f"{where}: missing tensor(s) {listed(missing)}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise error(f"{where}: unexpected tensor(s) {listed(unexpected)}")


def meta_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter still on the meta device, by state-dict name (a parameter shared by
    several modules, such as a shared basis, under each of its names); a tied LM head is left out."""
    tied = model.config.tie_word_embeddings
    out = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{pname}" if mod_name else pname
            if p.is_meta and not (tied and key == "lm_head.weight"):
                out[key] = tuple(p.shape)
    return out


def assign(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device="cpu",
    source: str = "checkpoint",
    tie: bool = True,
) -> nn.Module:
    """Assign ``tensors`` to the parameters of ``model`` that are still on the meta device, by name, after
    checking that the names are exactly those parameters' and every shape matches; return the model in eval
    mode. Parameters already materialised are kept. One tensor object given under several names (a shared
    basis) becomes one Parameter. Tensors are cast to ``dtype`` (a no-op when they already are). A config with
    tied embeddings ties the LM head to them unless ``tie`` is False (an int8 head of its own).
    """
    expected = meta_parameters(model)
    check_names(tensors, expected, source)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise WeightError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the config expects {shape}"
            )
    made: dict[int, nn.Parameter] = {}  # id(given tensor) -> its Parameter
    for mod_name, mod in model.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)):
            key = f"{mod_name}.{pname}" if mod_name else pname
            if key not in expected:
                continue
            t = tensors[key]
            if id(t) not in made:
                made[id(t)] = nn.Parameter(t.detach().to(device=device, dtype=dtype), requires_grad=False)
            setattr(mod, pname, made[id(t)])
    if tie and model.config.tie_word_embeddings:
        model.tie_weights()
    model.init_buffers(device)
    return model.eval()
