"""Resolve the planner's ``--model`` argument into hyper-parameters (and file sizes).

Accepted: a built-in name (see ``catalog.KNOWN_MODELS``), a Hugging Face model
directory, a ``config.json`` path, or a GGUF file, whose metadata gives the
hyper-parameters and whose tensors give the real weight bytes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tokenmill.config import ModelConfig
from tokenmill.plan.catalog import KNOWN_MODELS
from tokenmill.plan.weights import WeightBytes

# Expert matrices: stacked per projection, or one tensor per expert (older Mixtral files).
_EXPERT_TENSOR = re.compile(r"blk\.\d+\.ffn_(gate|up|down)(_exps|\.\d+)\.weight")


@dataclass(frozen=True)
class ModelSource:
    """A model as the planner sees it."""

    name: str  # short display name
    config: ModelConfig
    origin: str  # where the hyper-parameters came from
    file_weights: WeightBytes | None = None  # measured from a GGUF file's tensors


def load_model_source(spec: str) -> ModelSource:
    """Resolve a built-in name, HF directory, ``config.json`` path or GGUF file."""
    known = KNOWN_MODELS.get(spec.lower())
    if known is not None:
        hf = {k: v for k, v in known.items() if k != "source"}
        return ModelSource(spec.lower(), ModelConfig.from_hf_dict(hf, source=spec),
                           f"built-in table ({known['source']} config.json)")
    if os.path.isdir(spec):
        return _from_directory(spec)
    if os.path.isfile(spec):
        if spec.lower().endswith(".gguf"):
            return load_gguf_source(spec)
        return ModelSource(_display_name(spec), ModelConfig.from_json_file(spec), spec)
    raise ValueError(f"--model {spec!r} is neither a file, a directory nor a known model; "
                     f"known models: {', '.join(KNOWN_MODELS)}")


def _from_directory(path: str) -> ModelSource:
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        return ModelSource(_display_name(path), ModelConfig.from_json_file(config_path),
                           config_path)
    ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
    if len(ggufs) == 1:
        return load_gguf_source(os.path.join(path, ggufs[0]))
    raise ValueError(f"{path}: no config.json and not exactly one .gguf file inside")


def _display_name(path: str) -> str:
    path = os.path.normpath(path)
    base = os.path.basename(path)
    if base == "config.json":
        base = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return base


def load_gguf_source(path: str) -> ModelSource:
    """Read hyper-parameters from GGUF metadata (the model loader's own parser) and
    weight bytes from its tensors."""
    from tokenmill.model.gguf_loader import config_from_gguf, open_gguf

    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    name = os.path.basename(path)[: -len(".gguf")]
    return ModelSource(name, config, path, _gguf_weight_bytes(reader.tensors))


def _gguf_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _gguf_weight_bytes(tensors: list[Any]) -> WeightBytes:
    embedding = lm_head = layers = replicated = experts = 0
    bytes_by_type: Counter[str] = Counter()
    for t in tensors:
        size = int(t.n_bytes)
        bytes_by_type[t.tensor_type.name] += size
        if t.name == "token_embd.weight":
            embedding += size
        elif t.name == "output.weight":
            lm_head += size
        elif len(t.shape) == 1 and not t.name.endswith(".bias"):
            replicated += size  # norms (and rope_freqs): every GPU keeps them whole
        else:
            layers += size
            if _EXPERT_TENSOR.fullmatch(t.name):
                experts += size
    dominant = bytes_by_type.most_common(1)[0][0]
    return WeightBytes(embedding, lm_head, layers, replicated, label=f"GGUF {dominant}",
                       experts=experts)
