"""Write a GGUF model out as a Hugging Face directory (for peers that cannot read GGUF).

    python benchmarks/gguf_to_hf.py MODEL.gguf OUT_DIR

vLLM's CPU backend needs safetensors and a config; transformers can load a
GGUF file (dequantizing its weights to float32) and save it. The loaded
config keeps a marker that the weights came quantized, which would make the
saved directory claim a quantization it does not have: it is dropped before
saving. The tokenizer is saved with the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def convert(gguf_path: Path, out_dir: Path) -> Path:
    """Save ``gguf_path`` as float32 safetensors + config + tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32,
                                                 **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    for holder in (model.config, model):
        for name in ("quantization_config", "hf_quantizer"):
            if getattr(holder, name, None) is not None:
                setattr(holder, name, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(convert(args.gguf.resolve(), args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
