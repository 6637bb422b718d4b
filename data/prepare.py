"""
The paper's datasets, from their public releases, in one schema: jsonl rows {id, problem, answer,
source, meta} (nanoGPT keeps its data/<name>/prepare.py beside the data; these three share the code
that reads releases, so they share one script).

    python data/prepare.py math|harp|olympiadbench [--source hf://OWNER/REPO@COMMIT|URL|PATH] [--out data]

writes data/math_{train,test}.jsonl, data/harp.jsonl or data/olympiadbench.jsonl, and NAME.meta.json
(the source, the commit read, the counts). `./run.sh paper` runs it for each dataset (pipeline.py).
"""
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # soar.py and grader.py
import grader
from soar import UserError, jsonl_rows, text_field, write_json_atomic, write_jsonl_atomic

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
        raise UserError(f"unknown dataset {name!r}; one of {', '.join(sorted(DOWNLOADS))}")
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



def main(argv):
    """python data/prepare.py NAME [--source PATH_OR_URL] [--out FOLDER]"""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    flags = dict(zip(argv[1::2], argv[2::2]))
    if len(argv) % 2 == 0 or set(flags) - {"--source", "--out"}:
        raise UserError(f"usage: python data/prepare.py {'|'.join(DOWNLOADS)} [--source PATH_OR_URL] [--out FOLDER]")
    prepare(argv[0], flags.get("--source"), flags.get("--out", Path(__file__).parent))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
