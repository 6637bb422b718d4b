"""
SOAR, in one file: a teacher model learns to write math problems that make a student model better
at problems it cannot solve at all (fail@128). Reference implementation of

    Sundaram, Quan, Kwiatkowski, Ahuja, Ollivier, Kempe.
    "Teaching Models to Teach Themselves: Reasoning at the Edge of Learnability" (2026), arXiv:2601.18778

Read it top to bottom; it follows the algorithm.
    1. configuration        every value marked [paper ...] (where the paper states it) or [ours] (and why)
    2. data and prompts     jsonl problems, atomic files, the student and teacher prompts, the teacher's parser
    3. models and samplers  fp32 master weights; vLLM (or HF generate), synced after every optimizer step
    4. RL core              RLOO / GRPO advantages, the clipped policy-gradient loss, one RL step
    5. evaluation           greedy accuracy and unbiased pass@k
    6. SOAR                 Q_R -> teacher datasets -> inner loops -> reward -> promotion -> teacher update
    7. commands             train, eval, soar; the small models the test and demo presets run on

Commands: python soar.py COMMAND [--preset paper|lab|demo|test] [--FIELD VALUE ...], FIELD any Config field;
COMMAND --help lists the options it reads, with their defaults and why ([paper ...] or [ours]).
    train      RL with verifiable rewards on jsonl problems (Hard-Only; the protocol's trainings)
    eval       pass@k (--n N --k 1,2,4,...) and greedy accuracy on jsonl problems, as JSON
    soar       the meta-RL loop (torchrun for several GPUs); Intrinsic-T: --teacher_reward learnability
The paper's whole experiment (data, fail@128, SOAR, the evaluation protocol, the report) is
pipeline.py; the data preparation is data/prepare.py, the lab's world data/lab/prepare.py.
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

# vLLM must run inside this process so the trainer can push weights into it (README, notes on vLLM).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.distributed as dist

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
# One flat config, nanoGPT style: defaults below, a preset on top, then `--key value` flags
# (make_config, section 7). [paper] = stated in Sundaram et al. 2026; [ours] = our choice.


MATH_SUBJECTS = ("Algebra, Counting and Probability, Geometry, Intermediate Algebra, Number Theory, Prealgebra, "
                 "Precalculus")


@dataclass
class Config:
    # --- models ---
    model: str = "meta-llama/Llama-3.2-3B-Instruct"  # [paper 4.1] teacher and student are both copies of it
    sampler: str = "auto"           # [ours] "vllm" when importable, else "hf" (HF generate, slow)
    gpu_memory_utilization: float = 0.15  # [ours] vLLM's share of GPU memory (12 GB of 80: weights + KV);
                                    #        the trainer and its KL reference need the rest (README, memory plan)
    max_model_len: int = 2048       # [ours] prompt + response tokens
    gradient_checkpointing: bool = True  # [ours] GPU only: trades ~30% compute for activations
    micro_batch_tokens: int = 4096  # [ours] tokens per forward/backward, padding included (README, memory plan)
    seed: int = 0                   # [ours] the run's randomness derives from it (seed_of)
    # --- RL: the student (the inner loop, and every training of the protocol) ---
    algo: str = "rloo"              # [paper 3.3] the student and the teacher are both trained with RLOO
    lr: float = 1e-5                # [paper Table 3]
    lr_schedule: str = "cosine"     # [paper Table 3] cosine decay, to 0 at the run's last step [ours: the
                                    #        final value is not stated]; "constant"
    warmup: int = 0                 # [paper Table 3] lr warmup steps: 0 in the inner loop (the protocol: 20)
    weight_decay: float = 0.0       # [ours] not stated
    max_grad_norm: float = 1.0      # [ours] not stated
    clip_eps: float = 0.2           # [ours] PPO's value, not stated; with one update per batch it only
                                    #        matters through sampler/trainer mismatch
    kl_beta: float = 0.001          # [paper Table 3] k3 KL to a frozen reference: where the run started
                                    #        (an inner loop: the baseline student [ours: not stated])
    batch_size: int = 8             # [paper Table 3] problems per RL step (the inner loop and `train`)
    group_size: int = 32            # [paper Table 3] samples per problem (RLOO needs >= 2)
    temperature: float = 1.0        # [paper Table 3]
    max_new_tokens: int = 1024      # [paper Table 3] the student's response budget
    reward_levels: str = "120,20,10,0"  # [paper B.3] boxed and right, boxed and wrong but holding the gold
                                    #        answer, boxed and wrong, no box ("1,0,0,0": right or not); the
                                    #        printed scale [ours: only its ratios matter to RLOO, but it sets
                                    #        the KL penalty's weight]
    steps: int = 1500               # [paper B.6] `train`: RL steps
    save_every: int = 50            # [ours] `train`: checkpoint interval (steps)
    synthetic: list = field(default_factory=list)  # `train`: synthetic questions trained on besides --data
    curriculum_steps: int = 0       # [paper B.6] `train`: the first N steps on --synthetic only, then --data
                                    #        (MATH: 64); 0: both mixed throughout (HARP, OlympiadBench)
    # --- SOAR: the outer loop ---
    outer_steps: int = 200          # [paper 4.2]
    dataset_size: int = 64          # [paper 4.2] n, questions per teacher dataset
    n_datasets: int = 4             # [paper Table 3] g, the teacher's RLOO group: datasets compared
    teacher_batch: int = 2          # [paper Table 3] RLOO groups per outer step: g x batch datasets
    repeats: int = 4                # [paper B.3] r, inner loops per dataset, averaged into R(X_k)
    qr_size: int = 64               # [paper 4.2] |Q_R|, hard problems the reward is measured on
    inner_steps: int = 10           # [paper 3.3] student RL steps per inner loop
    promoted_inner_steps: int = 15  # [paper B.7] inner steps once the baseline has been promoted (+5)
    tau: float = 0.01               # [paper 4.2] promotion threshold on the moving average reward
    window: int = 3                 # [paper 4.2] moving-average window (outer steps)
    promote_repeat: str = "median"  # [paper Alg. 1] which of the best dataset's repeats is promoted: "median"
                                    #        (r = 4: the lower middle [ours]) or "best" (ours, earlier)
    promotion_gate: bool = False    # [ours] also require the best dataset's own R > tau (off: Alg. 1 has none)
    teacher_lr: float = 1e-5        # [paper Table 3]
    teacher_warmup: int = 20        # [paper Table 3]
    teacher_kl_beta: float = 0.001  # [paper Table 3] to the untrained teacher
    teacher_temperature: float = 1.0  # [paper Table 3]
    teacher_max_new_tokens: int = 512  # [paper Table 3]
    teacher_topics: str = MATH_SUBJECTS  # [paper B.1] the topics the teacher prompt allows
    rejection_sampling: bool = True  # [paper B.2] draw until g*n*batch rollouts parse, train on those only
    max_teacher_draws: int = 8      # [ours] rejection sampling gives up after drawing 8x what it needs
    parse_penalty: float = -0.1     # [ours] without rejection sampling: an unparseable rollout's reward
    teacher_reward: str = "grounded"  # [paper 3.2] "grounded" (SOAR) or "learnability" (Intrinsic-T): TEACHER_REWARDS
    learnability_samples: int = 32  # [paper B.4] student samples per question for Intrinsic-T's success rate
    eval_max_new_tokens: int = 1024  # [paper Table 3] greedy decoding: Q_R, PS selection, `eval`
    teacher_snapshots: list = field(default_factory=list)  # outer steps after which a copy of the teacher
                                    #        is kept (teacher_step_XXXX; the paper samples HARP's at 170, B.7)
    checkpoint_every: int = 1       # [ours] outer steps between teacher checkpoints (38.5 GB each at 3B);
                                    #        a crash repeats the steps since the last one
    # --- evaluation ---
    eval_n: int = 32                # [paper 4.3] samples per problem for pass@k (`eval --n`)
    eval_k: str = "1,4,8,16,32"     # [paper 4.3] the k of pass@k (`eval --k`)
    curve_every: int = 0            # [ours] `train`: pass@k and greedy accuracy on --curve_data every N steps
    # --- files ---
    data: list = field(default_factory=lambda: ["runs/paper/filter/math_train.jsonl"])  # problem files (jsonl)
    out: str = "runs/paper"         # the folder a command writes: a run, or the pipeline's root
    resume: str = ""                # a SOAR run to continue: its config.json, changed only by the flags given
    curve_data: str = ""            # `train`: held-out problems for a learning curve
    output: str = ""                # `eval`: also write the result to this file
    method: str = ""                # `eval`: labels stored in that JSON
    dataset: str = ""               # `eval`: a label in its JSON (pipeline.py: the dataset's name)
    teacher: str = ""               # `eval`: a label in its JSON (pipeline.py: the teacher run it comes from)
    note: str = ""                  # `eval`: a remark in its JSON (the pipeline's: why a method degenerated)


PRESETS = {
    # The paper's setting, value for value (Table 3 and Appendix B): 2 x 4 datasets x 4 repeats = 32 inner
    # loops a step, the paper's 4 nodes of 8 GPUs.
    "paper": dict(),
    # The paper on one node of 8 GPUs: 8 inner loops a step, one per GPU, in about a quarter of the time
    # (README, time). What it gives up: the teacher's second RLOO group (half the rollouts per update)
    # and two of the four repeats (R(X_k) twice as noisy). Every other value is the paper's.
    "node": dict(teacher_batch=1, repeats=2),
    # A real LM through vLLM on a laptop CPU in minutes: SmolLM2-135M-Instruct on our own small hard
    # set (data/demo/demo_hard.jsonl), the paper's mechanics at small sizes [ours], but for rejection
    # sampling: a 135M model does not write the tagged format (README, the demo), so its rollouts are
    # all trained on, an unparseable one with the parse penalty.
    "demo": dict(model="models/SmolLM2-135M-Instruct", data=["data/demo/demo_hard.jsonl"], out="runs/demo",
                 outer_steps=4, dataset_size=8, n_datasets=2, teacher_batch=1, repeats=1, qr_size=8, inner_steps=2,
                 promoted_inner_steps=3, batch_size=2, group_size=4, max_new_tokens=160, teacher_max_new_tokens=128,
                 eval_max_new_tokens=160, max_model_len=768, window=2, rejection_sampling=False),
    # The lab (data/lab; `python pipeline.py lab`): the paper's mechanics, |Q_R| = 64 and fail@128; sizes
    # [ours], 40 outer steps among them (data/lab/README.md: the lrs were chosen in world 0).
    "lab": dict(model="models/lab", data=[], out="runs/lab", sampler="hf", dataset_size=16, teacher_batch=1, repeats=1,
                outer_steps=40, group_size=4, lr=5e-4, teacher_lr=2e-4, kl_beta=0.0, teacher_kl_beta=0.0, max_new_tokens=10,
                teacher_max_new_tokens=32, eval_max_new_tokens=10, max_model_len=128, teacher_topics="Code, Roll",
                steps=40, save_every=40, eval_n=16, eval_k="1,2,4,8,16"),
    # A tiny model for the tests and the pre-flight check: `main` builds it (build_tiny_model) when
    # --model is not given. Its character tokenizer makes prompts long: the teacher's is ~380 tokens.
    "test": dict(model="", data=["data/demo/demo_hard.jsonl"], outer_steps=3, dataset_size=4, n_datasets=2, teacher_batch=1,
                 repeats=1, qr_size=4, inner_steps=2, promoted_inner_steps=3, batch_size=2, group_size=2,
                 max_new_tokens=16, teacher_max_new_tokens=64, eval_max_new_tokens=16, lr=1e-2, teacher_lr=1e-3,
                 teacher_warmup=0, max_model_len=2048, micro_batch_tokens=2048, sampler="hf", tau=-1.0, steps=2,
                 eval_n=4, eval_k="1,2,4", out="runs/test-pipeline"),
}


def teacher_config(cfg):
    """The teacher's RL settings, in one place: its own lr, warmup, KL coefficient, sampling
    temperature and token budget; the schedule's shape, clip, gradient-norm and micro-batch
    settings are the student's [ours: the paper states the latter for neither]."""
    return dataclasses.replace(cfg, lr=cfg.teacher_lr, warmup=cfg.teacher_warmup, kl_beta=cfg.teacher_kl_beta,
                               temperature=cfg.teacher_temperature, max_new_tokens=cfg.teacher_max_new_tokens)


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


def load_problems(paths):
    problems = [row for p in paths for row in read_jsonl(p)]
    if not problems:
        raise UserError(f"--data: no problems in {' '.join(map(str, paths)) or '(no file given)'}")
    return problems


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


@contextlib.contextmanager
def folder_in_place(folder, replace=True):
    """Write a folder whole or not at all: fill the temporary folder this yields; then it takes
    FOLDER's place (the old one moved to FOLDER.old first, restored by recover_folder if a crash
    comes between the renames). replace=False: if FOLDER appeared meanwhile (another process built
    the same thing), it stays and ours is dropped. Temporary folders of dead processes are removed."""
    folder = Path(folder)
    for stale in folder.parent.glob(f"{folder.name}.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    yield tmp
    if folder.exists() and not replace:
        shutil.rmtree(tmp)
        return
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(folder):
    """The folder, restoring FOLDER.old if a crash came between folder_in_place's renames."""
    folder, old = Path(folder), Path(str(folder) + ".old")
    if not folder.exists() and old.exists():
        with contextlib.suppress(FileNotFoundError):  # another worker may have restored it first
            os.replace(old, folder)
    return folder


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


# The student prompt [paper B.1], the same for fail@128, the inner loop and the protocol's trainings:
# the paper's elements (a User/Assistant conversation, reasoning step by step, the result as "The final
# answer is: \boxed{...}"), in our words. It goes through the model's chat template as the user turn
# [ours: the paper does not say whether its frame went through one].
STUDENT_PROMPT = ("A conversation between User and Assistant. The User gives a math problem and the "
                  "Assistant solves it: its reasoning first, step by step, then the result in \\boxed{{}}, "
                  "always in the form 'User: [question] Assistant: [reasoning, step by step] The final "
                  "answer is: \\boxed{{[answer]}}.'\n\nUser: {problem} Assistant:")

# The teacher prompt [paper B.1], one fixed prompt every step: the paper's elements (a new problem for
# a math assistant, the allowed topics, the tagged format, explanations outside the tags, original and
# challenging, at least 2-3 steps of reasoning, exactly one problem), in our words. No example
# question: given seed questions, the paper's teacher lost diversity and copied them.
TEACHER_PROMPT = ("Write a new math problem for a math assistant to solve. Allowed topics: {topics}.\n\n"
                  "Format, followed exactly: the problem between <question> and </question>, then its answer "
                  "between <answer> and </answer> as \\boxed{{the answer}}. Any explanation or working goes "
                  "outside these tags.\n\nThe problem must be original and challenging, take at least 2-3 "
                  "steps of reasoning, and be the only one you write.\n\nBegin.")


def teacher_prompt(cfg):
    return TEACHER_PROMPT.format(topics=cfg.teacher_topics)


def parse_teacher_output(text, max_chars=4000):  # [ours] no real question is longer
    r"""(question, answer) of a teacher rollout in the tagged format [paper B.2]: the text inside the
    first <question>...</question>, and the \boxed{} answer inside the <answer>...</answer> after it,
    which the grader must read as mathematics (grader.parsable); else None. A question holding a
    \boxed{} is rejected too [ours]: it would hand the student its answer."""
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    q = re.search(r"<question>(.*?)</question>", text, re.S)
    a = q and re.search(r"<answer>(.*?)</answer>", text[q.end():], re.S)
    if not a:
        return None
    question, answer = q[1].strip(), (grader.extract_answer(a[1]) or "").strip()
    if not question or "\\boxed" in question or not grader.parsable(answer):
        return None
    return question, answer


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
        checks += [("the teacher prompt", len(chat_ids(tok, teacher_prompt(cfg))), "teacher_max_new_tokens"),
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
    return torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")


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
    """A plain KV-cache sampling loop on the trainer's own weights (the HF model's forward): no sync,
    always available, fast enough for small models (vLLM is the sampler for large ones), seeded per
    call: the deterministic path the tests use. It keeps each sampled token's log-probability as it
    goes (log softmax(logits / temperature)): no second forward, no per-step vocabulary logits kept."""

    def __init__(self, tokenizer):
        self.tokenizer, self.policy = tokenizer, None

    def load(self, policy):
        self.policy = policy

    @torch.no_grad()
    def generate(self, prompts, n, temperature, max_tokens, seed):
        model, tok = self.policy.model, self.tokenizer
        eos = model.generation_config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=model.device)
        pad, stops = (tok.pad_token_id if tok.pad_token_id is not None else eos[0].item()), set(eos.tolist())
        was_training, flat, rows = model.training, [], [p for p in prompts for _ in range(n)]
        model.eval()
        for start in range(0, len(rows), 64):  # [ours] 64 sequences at a time (memory)
            chunk, gen = rows[start:start + 64], torch.Generator(model.device).manual_seed(seed_of(seed, start))
            width = max(map(len, chunk))  # left-pad so every prompt ends where generation starts
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)  # [B, P]
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
            position, cache = (mask.cumsum(-1) - 1).clamp(min=0), None  # [B, P]
            tokens, logprobs, done = [], [], torch.zeros(len(chunk), dtype=torch.bool, device=model.device)
            for _ in range(max_tokens):
                out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                            use_cache=True)
                logits, cache = out.logits[:, -1].float() / (temperature or 1.0), out.past_key_values  # [B, V]
                pick = torch.multinomial(logits.softmax(-1), 1, generator=gen) if temperature > 0 else \
                    logits.argmax(-1, keepdim=True)  # [B, 1]: no top-k, no top-p, as in vLLM
                tokens.append(pick[:, 0])
                logprobs.append(logits.log_softmax(-1).gather(-1, pick)[:, 0])
                done |= torch.isin(pick[:, 0], eos)
                if done.all():
                    break
                ids, position = pick, position[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(pick)], dim=-1)
            tokens, logprobs = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()  # [B, T]
            for prompt, resp, lps in zip(chunk, tokens, logprobs):
                end = next((i + 1 for i, t in enumerate(resp) if t in stops), len(resp))  # to EOS
                flat.append(Completion(list(prompt), resp[:end], tok.decode(resp[:end], skip_special_tokens=True),
                                       lps[:end], temperature or 1.0))
        model.train(was_training)
        return [flat[i:i + n] for i in range(0, len(flat), n)]


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


def host_buffer(t):  # pinned if `t` is on a GPU: one DMA copy, not staged through pageable memory
    """A CPU tensor like `t` (36 GiB from an H200: 0.7 s each way pinned, 7 s up and 27 s down pageable)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)


class Policy:
    """A trainable model: fp32 master weights, gradients and Adam states, and an engine that samples
    from it, trained with cfg's settings (teacher_config(cfg) for the teacher). On GPU the model
    computes with a bf16 copy of the master weights (`dtype`), refreshed once per optimizer step
    (autocast would recast every weight in every forward); each bf16 gradient is added to the fp32
    master gradient when complete (README, memory plan: why fp32, and the sizes)."""

    def __init__(self, path, cfg, engine, device, dtype=None, reference=None, horizon=None):
        from transformers import AutoModelForCausalLM
        self.path, self.cfg, self.engine = str(path), cfg, engine
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)  # CPU: bf16 matmuls are slow
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).to(device)
        self.model.config.use_cache = False
        self.names, params = zip(*self.model.named_parameters())  # a tied embedding counts once
        copy = dtype != torch.float32
        self.master = [p.data if copy else p for p in params]  # the fp32 weights
        for p, m in zip(params, self.master) if copy else ():  # parameters only: buffers (RoPE's) stay fp32
            p.data = m.to(dtype)
            p.register_post_accumulate_grad_hook(functools.partial(add_grad, m))
        if cfg.gradient_checkpointing and device.type == "cuda":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(self.master, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), fused=device.type == "cuda")  # [ours] defaults
        self.version = 0  # bumped whenever the weights change, so engines know when to re-sync
        self.updates, self.horizon = 0, horizon  # optimizer steps of this run, and its length (lr_factor; None: no decay)
        self.pinned = {}  # to(): the CPU side of each tensor
        self.ref = None   # the frozen reference for the KL penalty, if kl_beta > 0: `reference` (--model)
        if cfg.kl_beta:
            self.ref = AutoModelForCausalLM.from_pretrained(str(reference or cfg.model), dtype=dtype).to(device)
            self.ref.requires_grad_(False)

    def sample(self, prompts, n, temperature, max_tokens, seed):
        """n completions for each prompt (lists of token ids), grouped per prompt."""
        self.engine.load(self)
        return self.engine.generate(prompts, n, temperature, max_tokens, seed)

    def state(self, into=None):
        """A CPU copy of the master weights by name (to restore the baseline student, or promote one),
        into `into` (an earlier copy, reused) or new buffers, pinned on GPU."""
        with timed("copy"):
            into = into or {name: host_buffer(m) for name, m in zip(self.names, self.master)}
            for name, m in zip(self.names, self.master):
                into[name].copy_(m)
            return into

    @torch.no_grad()
    def set_state(self, state=None):
        """Load master weights (from state() or a state_dict), and the optimizer and its schedule start
        fresh (each inner loop is a fresh RL run). state=None, after an optimizer step: the copy follows."""
        with timed("copy"):
            for name, p, m in zip(self.names, self.model.parameters(), self.master):
                if state is not None:
                    m.copy_(state[name])
                    self.optimizer.state.pop(m, None)
                if p is not m:
                    p.copy_(m)
            self.version += 1
            self.updates = 0 if state is not None else self.updates

    @torch.no_grad()
    def set_reference(self, state):
        """The KL penalty's reference becomes `state` (a promoted baseline: where inner loops now start)."""
        for name, p in self.ref.named_parameters() if self.ref is not None else ():
            p.copy_(state[name])

    def to(self, device, optimizer=True):
        """Move the policy (weights, master weights, Adam states) between CPU and GPU: the teacher lives
        in CPU memory between its updates, so a GPU holds one trainer at a time (README, memory plan).
        The CPU side of each tensor is a pinned buffer, allocated at its first move and kept.
        optimizer=False: the model's weights only (for sampling). No-op on CPU."""
        tensors = {("weight", i): p for i, p in enumerate(self.model.parameters())}
        for i, m in enumerate(self.master if optimizer else []):  # keys: the same tensor's buffer each time
            tensors.update({("master", i): m, **{(key, i): v for key, v in self.optimizer.state.get(m, {}).items()}})
        for i, r in enumerate(self.ref.parameters() if optimizer and self.ref is not None else []):
            tensors[("ref", i)] = r
        with timed("offload"):
            for key, t in tensors.items():
                if t.device != device and device.type == "cuda":
                    t.data = t.data.to(device, non_blocking=True)
                elif t.device != device:
                    if key not in self.pinned:
                        self.pinned[key] = host_buffer(t)
                    t.data = self.pinned[key].copy_(t, non_blocking=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the copies are asynchronous
        return self


def add_grad(master, p):
    """A bf16 weight's gradient is complete: add it to the fp32 master gradient, free it."""
    master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
    p.grad = None


def save_model(folder, weights, tokenizer, template):
    """`weights` (by name) as an HF folder that `eval` and `train` load, written whole (folder_in_place).
    template: a Policy of the same architecture."""
    with folder_in_place(folder) as tmp:
        template.model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)


def load_state(folder, into):
    """save_model's weights into `into` (a Policy.state()) a tensor at a time: no second copy in host memory."""
    from safetensors import safe_open
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                into[name].copy_(f.get_tensor(name))
    return into


def save_checkpoint(folder, policy, tokenizer, extra=None, final=False):
    """Master weights + tokenizer + optimizer + `extra` (run_state.json, the commit point), written
    whole. final=True: bf16 weights and no optimizer (a finished run is only evaluated: 6.4 GB, not
    38.5 at 3B). The weights must not change until it returns (`soar` runs it in a thread)."""
    weights = {name: m.to(torch.bfloat16) if final else m for name, m in zip(policy.names, policy.master)}
    with folder_in_place(folder) as tmp:
        policy.model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        if not final:
            torch.save({"optimizer": policy.optimizer.state_dict()}, tmp / "trainer_state.pt")
        write_json_atomic(tmp / "run_state.json", extra or {})


def load_trainer_state(folder, policy):
    state = torch.load(Path(folder) / "trainer_state.pt", map_location="cpu", weights_only=False)
    policy.optimizer.load_state_dict(state["optimizer"])
    policy.version += 1


def writer_lock(path):
    """Hold the lock file `path` (while the returned file is open) or raise UserError naming the
    process that holds it. flock: a process killed in any way releases it."""
    import fcntl
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise UserError(f"{Path(path).parent}: process {lock.read().strip() or '?'} is writing here; wait for it "
                        f"to end, or give another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class RunFolder:
    """A run's folder, its one writer, and its commit point: CHECKPOINT/run_state.json. A step's rows
    in the logs count only once the step is committed, so a run killed anywhere resumes at its last
    commit and repeats the steps after it with the same seeds (seed_of). A second process on a folder
    whose writer is alive stops at once; a dead writer's lock is gone with it (flock)."""

    def __init__(self, path, checkpoint):
        self.path, self.lock = Path(path), None
        self.checkpoint = recover_folder(self.path / checkpoint)

    def state(self):
        """What the last commit recorded ({} before the first)."""
        saved = self.checkpoint / "run_state.json"
        return json.loads(saved.read_text()) if saved.exists() else {}

    def finished(self, total, flag, unit):
        """True (and says how to go on) when the last commit reached `total`."""
        step = self.state().get("step", 0)
        if step >= total:
            print(f"{self.path}: finished ({step} of {total} {unit}). To continue it: the same command with "
                  f"--{flag} N (N > {step}); to start another: --out NEW_FOLDER")
        return step >= total

    def open(self, cfg, logs=(), step_folders=None):
        """Become the folder's writer, write config.json, and drop what uncommitted steps left: rows
        of `logs` (jsonl) with a step at or after the committed one, and such `step_folders/step_XXXX`."""
        self.lock = writer_lock(self.path / ".writer")
        write_json_atomic(self.path / "config.json", dataclasses.asdict(cfg))
        step = self.state().get("step", 0)
        for log in logs:
            if (self.path / log).exists():
                write_jsonl_atomic(self.path / log, [row for row in read_log(self.path / log) if row["step"] < step])
        for folder in (self.path / step_folders).glob("step_*") if step_folders else ():
            if int(folder.name.split("_")[1]) >= step:
                shutil.rmtree(folder)
        return step

    def close(self):
        if self.lock:
            self.lock.close()
            self.lock = None


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
    of similar lengths (little padding). Without a KL penalty a sequence with zero advantage has a
    zero gradient, so it is skipped (on hard problems most groups are all-zero)."""
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
    if batches:  # AdamW on the fp32 master weights at the schedule's lr, then the model's copy follows them
        torch.nn.utils.clip_grad_norm_(policy.master, cfg.max_grad_norm)
        stats["lr"] = cfg.lr * lr_factor(policy.updates, cfg.warmup, policy.horizon, cfg.lr_schedule)
        for group in policy.optimizer.param_groups:
            group["lr"] = stats["lr"]
        policy.optimizer.step()
        policy.optimizer.zero_grad(set_to_none=True)
        policy.set_state()
    policy.updates += 1  # a step of the schedule, also when nothing was trained
    for key in ("kl_sampler", "kl_ref"):
        if key in stats:
            stats[key] /= max(stats["tokens_trained"], 1)
    return stats


def lr_factor(update, warmup, horizon, schedule="cosine"):
    """The lr's factor at optimizer step `update` (from 0) of a run of `horizon` steps [paper Table 3]:
    linear warmup over `warmup` steps, then cosine decay from 1 to 0 at the run's end ("constant", or
    no horizon: 1)."""
    if update < warmup:
        return (update + 1) / warmup
    if schedule == "constant" or horizon is None:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (update - warmup) / max(1, horizon - warmup))))


def student_reward(response, gold, levels):
    """The student's reward [paper B.3, which grades with Math-Verify; grader.py here]: levels[0] if the
    last boxed answer is right, levels[1] if it is wrong but holds the gold answer, levels[2] if it is
    wrong, levels[3] with no box. pass@k and the accuracy on Q_R count right answers only."""
    answer = grader.extract_answer(response)
    if answer is None:
        return levels[3]
    if grader.grade(response, gold):
        return levels[0]
    return levels[1] if "".join(str(gold).split()) in "".join(answer.split()) else levels[2]


def rl_step(policy, tokenizer, problems, cfg, seed, reward_fn=None):
    """One step of RL with verifiable rewards: sample a group per problem, reward (student_reward at
    cfg's levels), update. problems: dicts with "problem" and "answer" (the inner loop: the teacher's)."""
    reward_fn = reward_fn or functools.partial(student_reward, levels=[float(v) for v in cfg.reward_levels.split(",")])
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
    return dict(reward=rewards.mean().item(), solved_share=(rewards.max(-1).values >= float(
                    cfg.reward_levels.split(",")[0])).float().mean().item(),  # groups with a right answer
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
# One outer step (soar() numbers its parts as Algorithm 1 of the paper does): Q_R -> the teacher's
# g datasets -> the teacher's reward R(X_k) (SOAR: inner loops) -> promotion -> teacher update ->
# records and the commit. A reward's jobs are spread over workers (torchrun: one per GPU); each job's
# randomness is seed_of(seed, step, k, repeat, ...), so results do not depend on the number of workers.

def ranks():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_gather(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, src=0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def spread(owners, run_job):
    """Run the jobs this worker owns ({job: rank}), in order; every worker gets every result {job: result}."""
    mine = {job: run_job(job) for job, owner in owners.items() if owner == ranks()[0]}
    return {job: result for part in all_gather(mine) for job, result in part.items()}


@dataclass
class Loop:
    """What a SOAR run carries from one outer step to the next."""
    cfg: Config
    run: RunFolder
    tok: object
    device: torch.device
    student: "Policy"
    baseline: dict             # the baseline student's weights (Policy.state()): every inner loop starts there
    state: dict                # what a commit records: step, the moving-average window, baseline, promotions
    probe: object
    teacher: "Policy" = None   # rank 0's
    trained: dict = field(default_factory=dict)  # (k, repeat) -> a trained student's weights (buffers reused)
    saving: object = None      # the teacher checkpoint being written (SAVER)
    started: tuple = ()        # (time, TIMES) at the step's start


def sample_reward_set(d_train, cfg, step):
    """Step 1: Q_R, a fresh random handful of the real hard problems [paper: |Q_R| = 64]."""
    return random.Random(seed_of(cfg.seed, step, "qr")).sample(d_train, min(cfg.qr_size, len(d_train)))


def draw_questions(teacher, tok, cfg, count, seed, rejection=True):
    """Teacher rollouts of the one fixed prompt, parsed: with rejection sampling [paper B.2], drawn
    until `count` parse (each draw asks for what is missing, at the parse rate so far; at most
    max_teacher_draws x count in all), the rest dropped; without, `count` drawn once and kept, the
    unparseable as None. Returns (rollouts, questions [{"problem", "answer", "rollout"} or None],
    number drawn); raises UserError when the teacher cannot fill `count`."""
    prompt, kept, questions, drawn = chat_ids(tok, teacher_prompt(cfg)), [], [], 0
    for draw in range(cfg.max_teacher_draws if rejection else 1):
        ask = min(count * cfg.max_teacher_draws - drawn,
                  math.ceil((count - len(questions)) * max(1, drawn / max(len(questions), 1))))
        if ask <= 0:
            break
        for c in teacher.sample([prompt], ask, cfg.teacher_temperature, cfg.teacher_max_new_tokens,
                                seed_of(seed, draw))[0]:
            parsed = parse_teacher_output(c.text)
            if (parsed or not rejection) and len(kept) < count:
                kept.append(c)
                questions.append(parsed and {"problem": parsed[0], "answer": parsed[1], "rollout": len(kept) - 1})
        drawn += ask
        if len(questions) == count:
            break
    if len(questions) < count:
        raise UserError(f"the teacher wrote {len(questions)} parseable rollouts of the {count} needed in {drawn} draws; "
                        f"its model does not write the tagged format. --rejection_sampling false trains on every "
                        f"rollout, an unparseable one rewarded --parse_penalty; or raise --max_teacher_draws")
    return kept, questions, drawn


def teacher_datasets(loop, step):
    """Step 2 (rank 0, then shared with every worker): teacher_batch x g datasets of n questions,
    split by rollout index. With rejection sampling [paper B.2] only parsed rollouts are kept: with
    RLOO's advantages, which sum to zero, the update on them is the update of the distribution they
    were drawn from (Proposition 1), so the rejected ones need no term. Without, the unparseable
    rollouts stay out of the datasets and are trained on with parse_penalty. Returns the rollouts
    (rank 0), per dataset its questions, and the number of rollouts drawn."""
    cfg, teacher, need = loop.cfg, loop.teacher, loop.cfg.teacher_batch * loop.cfg.n_datasets * loop.cfg.dataset_size
    rollouts, datasets, drawn, error = [], None, 0, None
    if teacher is not None:
        with timed("teacher_sample"):  # vLLM takes the weights from the CPU; HF generate needs them here
            teacher.to(loop.device if isinstance(teacher.engine, HFEngine) else torch.device("cpu"), optimizer=False)
            try:
                rollouts, questions, drawn = draw_questions(teacher, loop.tok, cfg, need, seed_of(cfg.seed, step, "teacher"),
                                                            cfg.rejection_sampling)
                datasets = [[q for q in questions[k * cfg.dataset_size:(k + 1) * cfg.dataset_size] if q]
                            for k in range(need // cfg.dataset_size)]
            except UserError as e:
                error = str(e)
            teacher.to(torch.device("cpu"), optimizer=False)
    datasets, drawn, error = broadcast((datasets, drawn, error))
    if error:  # every worker stops with the same one line
        raise UserError(error)
    return rollouts, datasets, drawn


def inner_loop(student, tokenizer, dataset, q_r, cfg, step, k, repeat, probe, steps):
    """One job of step 3: the student, which the caller keeps at the baseline's exact weights between
    jobs, trains on X_k with RLOO for `steps` steps of batch_size problems [paper: 10 x 8, 15 once a
    student was promoted], the teacher's answers as ground truth; then its greedy accuracy on Q_R."""
    probe("inner_start", student=student, k=k, repeat=repeat, steps=steps)
    rng = random.Random(seed_of(cfg.seed, step, k, repeat, "inner"))
    student.horizon, logs = steps, []  # the lr schedule spans this inner loop
    for s in range(steps if dataset else 0):
        batch = [dataset[rng.randrange(len(dataset))] for _ in range(cfg.batch_size)]  # [ours] drawn with
        # replacement: 10 x 8 draws from n = 64 questions
        logs.append(rl_step(student, tokenizer, batch, cfg, seed_of(cfg.seed, step, k, repeat, s)))
    acc = greedy_accuracy(student, tokenizer, q_r, cfg.eval_max_new_tokens)
    probe("inner_end", student=student, k=k, repeat=repeat, acc=acc)
    return {"acc": acc, "train_reward": sum(l["reward"] for l in logs) / max(len(logs), 1)}


def grounded_reward(loop, datasets, q_r, step):
    """Steps 3-4 of SOAR [paper 3.2]: R(X_k) = mean over r repeats of acc(the baseline student
    trained on X_k; Q_R) - acc(the baseline student; Q_R), both greedy. Jobs: an inner loop per
    (k, repeat), and the baseline's accuracy on the last worker (rank 0 also has the teacher's work).
    Returns R and what was measured (the promotion reads it)."""
    cfg, world_size = loop.cfg, ranks()[1]
    jobs = [(k, j) for k in range(len(datasets)) for j in range(cfg.repeats)]
    owners = {job: i % world_size for i, job in enumerate(jobs)} | {"baseline": world_size - 1}
    keep = len(loop.state["window"]) + 1 >= cfg.window  # a promotion is possible this step
    steps = cfg.promoted_inner_steps if loop.state["promotions"] else cfg.inner_steps  # [paper B.7]

    def run_job(job):
        if job == "baseline":
            return {"acc": greedy_accuracy(loop.student, loop.tok, q_r, cfg.eval_max_new_tokens)}
        result = inner_loop(loop.student, loop.tok, datasets[job[0]], q_r, cfg, step, *job, loop.probe, steps)
        if keep:
            loop.trained[job] = loop.student.state(loop.trained.get(job))  # into last step's buffers
        loop.student.set_state(loop.baseline)  # revert: the next job starts from the baseline again
        return result

    results = spread(owners, run_job)
    base = results.pop("baseline")["acc"]
    rewards = [sum(results[k, j]["acc"] - base for j in range(cfg.repeats)) / cfg.repeats for k in range(len(datasets))]
    return rewards, {"baseline_acc": base, "jobs": dict(sorted(results.items())), "owners": owners, "inner_steps": steps}


def learnability(counts, m):
    """Intrinsic-T's score of a dataset [paper B.4]: the mean over its questions of 0 if s = 0 else
    1 - s, s = c/m the student's success rate (what it can learn and has not); 0 for no question."""
    return statistics.fmean([0.0 if c == 0 else 1 - c / m for c in counts] or [0.0])


def learnability_reward(loop, datasets, q_r, step):
    """Intrinsic-T, the ungrounded baseline [paper B.4]: R(X_k) = learnability of X_k's questions,
    each judged over learnability_samples samples of the (never promoted) student against the
    teacher's own answer. Q_R is not used."""
    cfg, m = loop.cfg, loop.cfg.learnability_samples

    def run_job(k):
        return learnability(successes(loop.student, loop.tok, datasets[k], m, cfg.temperature, cfg.max_new_tokens,
                                      seed_of(cfg.seed, step, k, "learnability")) if datasets[k] else [], m)

    scores = spread({k: k % ranks()[1] for k in range(len(datasets))}, run_job)
    return [scores[k] for k in range(len(datasets))], {}


# --teacher_reward: the one place a reward is chosen. A reward(loop, datasets, q_r, step) returns
# R(X_k) for each dataset and what it measured ("jobs" with trained students makes a promotion possible).
TEACHER_REWARDS = {"grounded": grounded_reward, "learnability": learnability_reward}


def promotion(window, step_reward, best_reward, cfg):
    """The promotion rule [paper Alg. 1]: keep the last `window` mean teacher rewards [3]; promote
    when they average above tau [0.01]. A window not yet full never promotes [ours: the text does not
    say how a shorter one counts]; it runs on across promotions (the text does not reset it). With
    --promotion_gate [ours, off in the paper preset] the step's best dataset must itself beat tau
    too: the window still holds rewards measured against an earlier baseline. best_reward: 0 if
    that dataset has no question. Returns (promote, average)."""
    window.append(step_reward)
    del window[:-cfg.window]
    average = sum(window) / len(window)
    gate = best_reward > cfg.tau if cfg.promotion_gate else True
    return len(window) == cfg.window and average > cfg.tau and gate, average


def promoted_repeat(accs, how="median"):
    """Which repeat j of the best dataset is promoted, from its students' accuracies on Q_R: the one at
    the median [paper Alg. 1] (an even r has two: the lower [ours]), or the best (ours, earlier)."""
    order = sorted(range(len(accs)), key=lambda j: accs[j])  # stable: ties keep the repeats' order
    return order[(len(accs) - 1) // 2] if how == "median" else max(range(len(accs)), key=lambda j: accs[j])


def promote(loop, step, rewards, measured, datasets):
    """Step 5: when the promotion rule says so, the student trained on the step's best X_k (its median
    repeat) becomes the baseline, and the KL reference of the inner loops with it: saved to
    students/step_XXXX/ by the worker that trained it, then loaded by every worker. Only a reward that
    trains students (grounded) promotes. Returns the promoted job (k, repeat) or None, and the
    moving average."""
    cfg, step_reward = loop.cfg, sum(rewards) / len(rewards)
    if "jobs" not in measured:
        return None, step_reward
    best_k = max(range(len(rewards)), key=lambda k: rewards[k])
    promote, average = promotion(loop.state["window"], step_reward, rewards[best_k] if datasets[best_k] else 0.0, cfg)
    if not promote:
        return None, average
    best = (best_k, promoted_repeat([measured["jobs"][best_k, j]["acc"] for j in range(cfg.repeats)], cfg.promote_repeat))
    folder = f"students/step_{step:04d}"
    if ranks()[0] == measured["owners"][best]:
        save_model(loop.run.path / folder, loop.trained[best], loop.tok, loop.student)
    all_gather(None)  # a barrier: the folder is written before anyone reads it
    loop.student.set_state(load_state(loop.run.path / folder, loop.baseline))
    loop.student.set_reference(loop.baseline)
    loop.probe("promotion", student=loop.student, trained=loop.trained, best=best, datasets=datasets)
    loop.state["baseline"], loop.state["promotions"] = folder, loop.state["promotions"] + [step]
    return best, average


def rollout_rewards(rollouts, datasets, rewards, cfg):
    """Every parsed rollout of X_k carries R(X_k); an unparseable one cfg.parse_penalty."""
    parsed = {q["rollout"]: k for k, ds in enumerate(datasets) for q in ds}
    return [rewards[parsed[i]] if i in parsed else cfg.parse_penalty for i in range(len(rollouts))]


def teacher_advantages(per_rollout, rewards, cfg):
    """RLOO across the datasets of each group of g [paper 3.2; teacher_batch groups, Table 3]: each
    rollout's reward less the mean R of the other g-1 datasets of its group, so a parsed rollout of
    X_k gets exactly RLOO(R)_k, and a group's advantages sum to zero."""
    R = torch.tensor(rewards, dtype=torch.float32).view(-1, cfg.n_datasets)  # [teacher_batch, g]
    others = (R - rloo_advantages(R)).flatten()  # [teacher_batch * g] the leave-one-out means
    return torch.tensor(per_rollout, dtype=torch.float32) - others.repeat_interleave(cfg.dataset_size)


def update_teacher(loop, rollouts, datasets, rewards):
    """Step 6 (rank 0): one policy-gradient step of the teacher on its g*n rollouts, with RLOO
    advantages across the datasets; on a GPU the student waits on the CPU meanwhile."""
    if loop.teacher is None:
        return None
    cfg, cpu = loop.cfg, torch.device("cpu")
    per_rollout = rollout_rewards(rollouts, datasets, rewards, cfg)
    advantages = teacher_advantages(per_rollout, rewards, cfg)
    loop.probe("teacher_update", rewards=per_rollout, advantages=advantages, dataset_rewards=rewards,
               datasets=datasets, rollouts=rollouts)
    with timed("checkpoint"):  # the update changes the weights the last checkpoint is written from
        if loop.saving:
            loop.saving.result()
    with timed("teacher_update"):
        loop.student.to(cpu)
        loop.teacher.to(loop.device)
        update = policy_update(loop.teacher, rollouts, advantages, loop.teacher.cfg)
        loop.teacher.to(cpu)
        loop.student.to(loop.device)
    return {**update, "rewards": per_rollout}


# `soar` writes the teacher's checkpoints in this thread while the next step runs (safetensors and
# torch.save release the GIL while writing); at exit, Python waits for a write in progress.
SAVER = concurrent.futures.ThreadPoolExecutor(1)


def commit(loop, step, rollouts, datasets, drawn, rewards, measured, promoted, average, update):
    """Step 7: the step's records, then its commit point (rank 0 writes): questions/step_XXXX.jsonl,
    the promoted X_k appended to promotion_questions.jsonl (PQ, the paper's D_best), the metrics row
    (seconds per phase summed over workers); then the teacher's checkpoint with run_state.json,
    written while the next step runs (nothing changes the teacher before its next update, which waits)."""
    cfg, (started, times_before), times = loop.cfg, loop.started, {}
    for part in all_gather({p: TIMES[p] - times_before.get(p, 0.0) for p in TIMES}):
        times = {p: times.get(p, 0.0) + part.get(p, 0.0) for p in {*times, *part}}
    if loop.teacher is not None:
        run, where = loop.run.path, {q["rollout"]: (k, q) for k, ds in enumerate(datasets) for q in ds}
        rows = []
        for i, (c, reward) in enumerate(zip(rollouts, update["rewards"])):
            k, q = where.get(i, (i // cfg.dataset_size, None))
            rows.append({"rollout": i, "dataset": k, "parsed": q is not None, "reward": reward,
                         "question": q["problem"] if q else None, "answer": q["answer"] if q else None,
                         **({} if q else {"text": c.text})})
        write_jsonl_atomic(run / "questions" / f"step_{step:04d}.jsonl", rows)
        if promoted is not None:
            append_jsonl(run / "promotion_questions.jsonl", *[{"step": step, "problem": q["problem"], "answer":
                                                              q["answer"], "source": "teacher"} for q in datasets[promoted[0]]])
        jobs = measured.get("jobs", {})
        append_jsonl(run / "metrics.jsonl", {
            "step": step, "teacher_reward": sum(rewards) / len(rewards), "moving_avg": average, "rewards": rewards,
            "baseline_acc": measured.get("baseline_acc"), "trained_acc": [r["acc"] for r in jobs.values()],
            "inner_train_reward": [r["train_reward"] for r in jobs.values()],
            "parse_rate": sum(map(len, datasets)) / drawn, "drawn": drawn, "inner_steps": measured.get("inner_steps"),
            "promoted": promoted is not None, "promoted_repeat": promoted[1] if promoted else None,
            "promoted_dataset": promoted[0] if promoted else None, "teacher_loss": update["loss"], "teacher_lr": update.get("lr"),
            "teacher_kl_ref": update.get("kl_ref"),  # per token, to --model (only with --teacher_kl_beta)
            "teacher_tokens": update["tokens_trained"], "step_s": time.time() - started,
            "time_s": {p: round(t, 4) for p, t in times.items()}})
        loop.probe("before_commit", step=step)
        loop.state["step"] = step + 1
        if loop.state["step"] % cfg.checkpoint_every == 0 or loop.state["step"] == cfg.outer_steps:
            loop.saving = SAVER.submit(save_checkpoint, loop.run.checkpoint, loop.teacher, loop.tok,
                                       json.loads(json.dumps(loop.state)))
        if loop.state["step"] in map(int, cfg.teacher_snapshots):  # a teacher evaluated before the end (bf16)
            loop.saving = SAVER.submit(save_checkpoint, run / f"teacher_step_{step + 1:04d}", loop.teacher, loop.tok,
                                       {"step": step + 1}, final=True)
    loop.state = broadcast(loop.state)


def soar(cfg, probe=None):
    """The meta-RL loop [paper Algorithm 1]. Writes RUN/config.json, metrics.jsonl,
    promotion_questions.jsonl (PQ), questions/step_XXXX.jsonl, teacher/ (weights, optimizer,
    run_state.json: the commit point of a step) and students/step_XXXX/ at each promotion; a run
    started again resumes at its last commit. probe(event, **data): a hook for tests and diagnostics."""
    probe = probe or (lambda event, **data: None)
    rank, reward = ranks()[0], TEACHER_REWARDS[cfg.teacher_reward]  # the one place the reward is chosen
    SAVER.submit(int).result()  # a write that a crashed run in this process left in flight ends first
    run = RunFolder(cfg.resume or cfg.out, "teacher")
    if run.finished(cfg.outer_steps, "outer_steps", "outer steps"):
        return run.path
    if cfg.n_datasets < 2 or cfg.repeats < 1 or cfg.teacher_batch < 1:
        raise UserError("--n_datasets: RLOO across datasets needs g >= 2 (and --repeats, --teacher_batch >= 1)")
    d_train, tok = load_problems(cfg.data), load_tokenizer(cfg.model)
    check_fits(cfg, tok, cfg.data, ["eval_max_new_tokens"], teacher=True)
    error = None
    if rank == 0:  # one writer; resumed, say what the flags given change
        saved = json.loads((run.path / "config.json").read_text()) if run.state() else {}
        changes = [f"--{k} {saved.get(k)} -> {v}" for k, v in dataclasses.asdict(cfg).items()
                   if saved and k != "resume" and saved.get(k) != v]
        try:
            step = run.open(cfg, ["metrics.jsonl", "promotion_questions.jsonl"], "students")
            (run.path / "promotion_questions.jsonl").touch()
            if saved:
                print(f"resuming {run.path} at outer step {step}" + "; changed: " * bool(changes) + ", ".join(changes))
        except UserError as e:
            error = str(e)
    if error := broadcast(error):
        raise UserError(error)
    loop = None
    try:
        state = {"step": 0, "window": [], "baseline": "", "promotions": []} | run.state()
        device, engine = device_for(rank), make_engine(cfg, cfg.model, tok)
        baseline = run.path / state["baseline"] if state["baseline"] else cfg.model  # the inner loops' start and reference
        student = Policy(baseline, cfg, engine, device, reference=baseline)
        loop = Loop(cfg, run, tok, device, student, student.state(), state, probe)
        if rank == 0:  # the teacher waits on the CPU between its updates; resumed, its Adam states go straight there
            loop.teacher = Policy(run.checkpoint if state["step"] else cfg.model, teacher_config(cfg), engine, device,
                                  horizon=cfg.outer_steps).to(torch.device("cpu"))
            loop.teacher.updates = state["step"]  # one update an outer step: the schedule goes on where it was
            if state["step"]:
                load_trainer_state(run.checkpoint, loop.teacher)
        for step in tqdm(range(state["step"], cfg.outer_steps), desc="outer steps", disable=rank != 0,
                         initial=state["step"], total=cfg.outer_steps):
            loop.started = (time.time(), dict(TIMES))
            q_r = sample_reward_set(d_train, cfg, step)                             # 1. Q_R from D_train
            probe("step_start", step=step, student=student, q_r=q_r)
            rollouts, datasets, drawn = teacher_datasets(loop, step)                # 2. datasets X_k
            rewards, measured = reward(loop, datasets, q_r, step)                   # 3-4. R(X_k)
            promoted, average = promote(loop, step, rewards, measured, datasets)    # 5. promotion
            update = update_teacher(loop, rollouts, datasets, rewards)              # 6. teacher update
            commit(loop, step, rollouts, datasets, drawn, rewards, measured, promoted, average, update)  # 7.
    finally:
        if loop and loop.saving:
            loop.saving.result()  # a failed write fails the run
        run.close()
    if isinstance(engine, VLLMEngine):
        engine.close()
    return run.path


# ================================================================================================
# 7. Commands: train and eval; the small models; the command line
# ================================================================================================

def load_policy(cfg, path, data=(), budgets=("max_new_tokens",), teacher=False, horizon=None):
    """A command's model and tokenizer, once its prompts are known to fit (check_fits)."""
    tok = load_tokenizer(path)
    check_fits(cfg, tok, data, budgets, teacher)
    return Policy(path, cfg, make_engine(cfg, path, tok), device_for(0), horizon=horizon), tok


def pass_at_ks(policy, tok, problems, cfg, seed):
    """pass@k for each k of --eval_k (--eval_n samples per problem at --temperature, right or not),
    and greedy accuracy."""
    counts, n = [], cfg.eval_n
    for start in tqdm(range(0, len(problems), 32), desc="eval", leave=False):  # [ours] 32 prompts a call
        counts += successes(policy, tok, problems[start:start + 32], n, cfg.temperature, cfg.max_new_tokens,
                            seed + start)
    return {"pass_at_k": {str(k): sum(pass_at_k(n, c, k) for c in counts) / len(counts)
                          for k in map(int, cfg.eval_k.split(",")) if k <= n},
            "greedy_acc": greedy_accuracy(policy, tok, problems, cfg.eval_max_new_tokens)}


def evaluate(cfg):
    """pass@k and greedy accuracy on --data (pass_at_ks), as JSON (printed, and written to --output)."""
    problems = load_problems(cfg.data)
    policy, tok = load_policy(cfg, cfg.model, cfg.data, ["max_new_tokens", "eval_max_new_tokens"])
    result = {"n": cfg.eval_n, "problems": len(problems), **pass_at_ks(policy, tok, problems, cfg, cfg.seed),
              "model": cfg.model, "data": cfg.data, "seed": cfg.seed, "method": cfg.method, "dataset": cfg.dataset,
              "teacher": cfg.teacher, "note": cfg.note}
    print(json.dumps(result, indent=2))
    if cfg.output:
        write_json_atomic(cfg.output, result)
    return result


def train(cfg, reward_fn=None):
    """RL with verifiable rewards on --data and --synthetic questions: mixed throughout, or the first
    --curriculum_steps on the synthetic ones alone [paper B.6]; Hard-Only and every training of the
    protocol. With --curve_data, every --curve_every steps a `curve` row: pass@k and greedy accuracy
    there, the curve the protocol reads its result off (B.6). Resumes at its last checkpoint."""
    run = RunFolder(cfg.out, "checkpoint")
    if run.finished(cfg.steps, "steps", "steps"):
        return None
    real, synthetic = load_problems(cfg.data), load_problems(cfg.synthetic) if cfg.synthetic else []
    curve = load_problems([cfg.curve_data]) if cfg.curve_every and cfg.curve_data else []
    step = run.open(cfg, ["metrics.jsonl"])
    try:
        policy, tok = load_policy(cfg, run.checkpoint if step else cfg.model, cfg.data + cfg.synthetic,
                                  horizon=cfg.steps)
        policy.updates = step  # the lr schedule goes on where it was
        if step and (run.checkpoint / "trainer_state.pt").exists():
            load_trainer_state(run.checkpoint, policy)
            print(f"resuming from {run.checkpoint} at step {step}")
        elif step:  # a finished run, extended with more --steps: its final bf16 weights, a fresh optimizer
            print(f"continuing the finished run {run.checkpoint} at step {step} with a fresh optimizer")
        for step in tqdm(range(step, cfg.steps), desc="train", initial=step, total=cfg.steps):
            pool = (synthetic if step < cfg.curriculum_steps else real) if cfg.curriculum_steps and synthetic \
                else real + synthetic
            rng = random.Random(f"{cfg.seed}-train-{step}")  # a function of the step: resume-safe
            batch = rng.sample(pool, min(cfg.batch_size, len(pool)))
            row = {"step": step, **rl_step(policy, tok, batch, cfg, seed_of(cfg.seed, "train", step), reward_fn)}
            if curve and (step + 1) % cfg.curve_every == 0:  # a learning curve on held-out problems
                row["curve"] = pass_at_ks(policy, tok, curve, cfg, seed_of(cfg.seed, "curve", step))
            append_jsonl(run.path / "metrics.jsonl", row)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(run.checkpoint, policy, tok, {"step": step + 1}, final=step + 1 == cfg.steps)
    finally:
        run.close()
    return policy


# ----- the test preset's model, built here from a config -----

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
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
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
    with folder_in_place(folder, replace=False) as tmp:  # torchrun's workers all build it: the first stays
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return folder


def build_tiny_model(folder, seed=0):
    """The test preset's model: a 2-layer Llama with the character tokenizer, small enough for a test
    RL run to take seconds on a CPU, real enough for vLLM to serve. A few seconds of supervised
    warm-up on toy addition teach it both formats (random weights never write a parseable question,
    and the teacher's path would go untested); it stays wrong often, which is what RL needs."""
    def sample(rng, step):
        a, b = rng.randrange(10), rng.randrange(10)
        q = f"What is {a}+{b}?"
        return rng.choice([(teacher_prompt(Config()), f"<question>{q}</question><answer>\\boxed{{{a + b}}}</answer>"),
                           (STUDENT_PROMPT.format(problem=q), f"\\boxed{{{a + b}}}")])
    folder = Path(folder)
    if not (folder / "config.json").exists():
        small_llama(folder, char_tokenizer(), sample, steps=150, hidden=64, layers=2, batch=16, seed=seed)
    return folder


# ----- the command line -----

def parse_flags(argv, config=Config):
    """{field: value} of `--key value` flags, typed like the field's default (a list field takes
    several values; a bool flag alone means true)."""
    defaults, flags, i = config(), {}, 0
    while i < len(argv):
        key, j = argv[i][2:].replace("-", "_"), i + 1
        if not argv[i].startswith("--") or key not in config.__dataclass_fields__:
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


def make_config(argv, preset="paper", config=Config, presets=PRESETS):
    """Config = defaults, then a preset, then `--key value` flags. With `--resume RUN` the base is
    RUN/config.json instead of the preset: a resumed run changes only in the flags given."""
    flags = parse_flags(argv, config)
    if flags.get("resume"):
        saved = Path(flags["resume"]) / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume {flags['resume']}: no config.json there")
        base = {k: v for k, v in json.loads(saved.read_text()).items() if k in config.__dataclass_fields__}
    elif preset in presets:
        base = presets[preset]
    else:
        raise UserError(f"--preset: unknown preset {preset!r}; one of {', '.join(presets)}")
    return config(**{**base, **flags})


def split_preset(rest, default):
    """(the --preset value, the other arguments)."""
    i = rest.index("--preset") if "--preset" in rest else None
    return (default, rest) if i is None else ((rest + [""])[i + 1], rest[:i] + rest[i + 2:])


# The options each command reads; `python soar.py COMMAND --help` lists them with their defaults and
# the comments of Config, the one place where every value's source and reason are written.
MODEL = "model sampler gpu_memory_utilization max_model_len seed"
TRAINER = ("gradient_checkpointing micro_batch_tokens algo lr lr_schedule warmup weight_decay max_grad_norm clip_eps "
           "kl_beta batch_size group_size temperature max_new_tokens reward_levels")
OPTIONS = {
    "train": f"{MODEL} {TRAINER} data synthetic curriculum_steps out steps save_every curve_data curve_every "
             "eval_n eval_k eval_max_new_tokens",
    "eval": f"{MODEL} data temperature max_new_tokens eval_max_new_tokens eval_n eval_k output method dataset teacher note",
    "soar": f"{MODEL} {TRAINER} data out resume outer_steps dataset_size n_datasets teacher_batch repeats qr_size "
            "inner_steps promoted_inner_steps tau window promote_repeat promotion_gate teacher_lr teacher_warmup "
            "teacher_kl_beta teacher_temperature teacher_max_new_tokens teacher_topics rejection_sampling "
            "max_teacher_draws parse_penalty teacher_reward learnability_samples eval_max_new_tokens "
            "teacher_snapshots checkpoint_every",
}


def config_comments(config=Config):
    """{field: its comment in the config class's source (and its bases'), continuation lines joined}."""
    import inspect
    comments, name = {}, None
    for cls in reversed([c for c in config.__mro__ if dataclasses.is_dataclass(c)]):
        for line in inspect.getsource(cls).splitlines():
            if m := re.match(r"    (\w+): .*?(?:  # (.*))?$", line):
                name, comments[m[1]] = m[1], m[2] or ""
            elif (m := re.match(r"\s+#\s{2,}(.*)$", line)) and name:
                comments[name] += " " + m[1]
    return comments


def command_help(command, preset, script="soar.py", doc=__doc__, options=OPTIONS, config=Config, presets=PRESETS):
    """`python SCRIPT COMMAND --help`: the command's options, their defaults under the preset, and
    the comment of each in the config class ([paper ...] or [ours], and why)."""
    summary = dict(re.findall(r"^    (\w+) {2,}(.+)$", doc, re.M))
    cfg, comments = make_config([], preset, config, presets), config_comments(config)
    lines = [f"python {script} {command} [--preset {'|'.join(presets)}] [--FIELD VALUE ...]", "", summary[command],
             "", f"options and their defaults (--preset {preset}):"]
    for name in options[command].split():
        value = getattr(cfg, name)
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value) if value != "" else "''"
        shown += f" ({preset})" if value != getattr(config(), name) else ""
        lines.append(f"  --{name} {shown}".ljust(46) + f"  {comments[name]}".rstrip())
    return "\n".join(lines)


def prepared_model(cfg, preset):
    """--model, built first where this file can (the test preset's tiny model), or said to be missing."""
    if preset == "test" and not cfg.model:
        return str(build_tiny_model(Path(cfg.out).parent / "tiny-model"))
    if cfg.model == PRESETS["demo"]["model"] and not (Path(cfg.model) / "config.json").exists():
        raise UserError(f"--model {cfg.model}: not converted yet (python data/demo/prepare.py converts it)")
    if preset == "lab" and not (Path(cfg.model) / "config.json").exists():
        raise UserError(f"--model {cfg.model}: not built yet (python data/lab/prepare.py --model {cfg.model} builds it)")
    return cfg.model


def main(argv):
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command in ("-h", "--help"):
        print(__doc__)
        return
    if command not in OPTIONS:
        raise UserError(f"unknown command {command!r}; python soar.py --help lists the commands")
    preset, rest = split_preset(rest, "paper")
    if {"-h", "--help"} & set(rest):
        print(command_help(command, preset) + ("\n\n--n and --k stand for --eval_n and --eval_k" * (command == "eval")))
        return
    if command == "eval":  # `--n N --k 1,2,4`, as in the paper
        rest = [{"--n": "--eval_n", "--k": "--eval_k"}.get(a, a) for a in rest]
    cfg = make_config(rest, preset)
    if "LOCAL_RANK" in os.environ:  # torchrun: each worker sees only its own GPU, as cuda:0, before
        # CUDA starts; an in-process vLLM engine would otherwise put every worker's engine on GPU 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        rank = int(os.environ["LOCAL_RANK"])
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[rank] if len(visible) > rank and visible[rank] else str(rank)
    cfg.model = prepared_model(cfg, preset)
    if command == "train":
        train(cfg)
    elif command == "eval":
        evaluate(cfg)
    else:
        if not cfg.resume and RunFolder(cfg.out, "teacher").state():  # the same --out again: resume that run
            cfg = make_config(rest + ["--resume", cfg.out], preset)
        launched = "RANK" in os.environ  # by torchrun: one worker per GPU
        if launched:  # only pickled results and states cross workers: gloo suffices. Rank 0's teacher
            # update and checkpoint keep the others waiting for minutes, hence the long timeout.
            import datetime
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
        try:
            soar(cfg)
        finally:  # vLLM can have replaced or destroyed the group by now (README, notes on vLLM)
            if launched and dist.is_initialized():
                with contextlib.suppress(ValueError):
                    dist.destroy_process_group()


def cli(argv, main=main):
    """`python soar.py ...`: main, with a user error (UserError) as one line and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
