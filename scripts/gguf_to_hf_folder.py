#!/usr/bin/env python
"""Save a GGUF model (a known name or a .gguf path) as a Hugging Face folder: config.json, model.safetensors and the
tokenizer, its weights dequantized to fp32 and stored as fp32 or bf16. A real-weights Hugging Face source for
building and evaluating where no model hub is reachable (issue 19, item 4: int4/int8 quality against an unquantized
HF-folder source).

    .venv/bin/python scripts/gguf_to_hf_folder.py smollm2-135m /tmp/smollm2-bf16 --dtype bf16
    spectrt build --target /tmp/smollm2-bf16 --draft /tmp/smollm2-bf16 --quantize int8 --out /tmp/b-int8
    spectrt eval /tmp/b-int8 --source /tmp/smollm2-bf16 --no-llamacpp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a known model name (spectrt models list) or a .gguf file")
    parser.add_argument("out", type=Path, help="the folder to write (created; must be empty or missing)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectrt.compiler.fetch import KNOWN_MODELS, fetch_model

    gguf = fetch_model(args.model) if args.model in KNOWN_MODELS else Path(args.model)
    if not gguf.is_file():
        raise SystemExit(f"{args.model} is neither a known model ({', '.join(KNOWN_MODELS)}) nor a .gguf file")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; pass a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).to(dtype)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # GGUF-loaded models carry one; the folder holds plain tensors
    config["torch_dtype"] = "bfloat16" if args.dtype == "bf16" else "float32"
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(args.out / "model.safetensors"))  # save_pretrained refuses GGUF-loaded models
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
