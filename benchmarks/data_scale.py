"""Launch-to-first-batch time and peak memory of `prism.data.corpus.Corpus`, cold and warm cache.

    python benchmarks/data_scale.py [--n 200000] [--workdir /tmp/prism-data-scale] [--num-proc N]

Writes a sharegpt JSONL of N demonstrations referencing 2,000 distinct 224 px PNGs (the images and the
tiny model are made once in the workdir and reused), then measures, each in a fresh subprocess
(so peak RSS is that of one launch): `Corpus.build_or_load` + the first collated batch
(`SFTCollator` of the tiny model's processor), with an empty cache (cold) and again (warm), at N/4
and N; and extrapolates both linearly to 1.37M examples. `--num-proc` readers build the cache (a
JSONL file is split between them). Memory: the launch's peak RSS, and at the first batch what of it is
private (anonymous) and what is the memory-mapped cache (file pages: shared between the processes of a
run and reclaimable, so it does not add up across ranks); and the largest build reader's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prism, not an installed one

TARGET = 1_370_000
N_IMAGES = 2000
BATCH = 8


def make_data(workdir: Path, n: int) -> Path:
    from PIL import Image

    images = workdir / "images"
    if not (images / f"{N_IMAGES - 1}.png").is_file():
        images.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for i in range(N_IMAGES):
            color = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (224, 224), color).save(images / f"{i}.png")
    path = workdir / f"train_{n}.jsonl"
    if not path.is_file():
        rng = random.Random(n)
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                words = " ".join(rng.choice(["red", "blue", "square", "left", "count", "three"]) for _ in range(rng.randrange(5, 40)))
                record = {"messages": [{"role": "user", "content": f"<image>Question {i}: {words}?"},
                                       {"role": "assistant", "content": f"The answer is {words[:60]}."}],
                          "images": [f"images/{rng.randrange(N_IMAGES)}.png"], "answer": str(i)}
                f.write(json.dumps(record) + "\n")
    return path


def tiny_dir(workdir: Path) -> Path:
    out = workdir / "tiny"
    if not (out / "config.json").is_file():
        from prism.models.tiny import build_tiny

        build_tiny(out)
    return out


def launch(data: str, model: str, cache: str, num_proc: int | None) -> None:
    """One launch (run in a subprocess): corpus, then the first collated batch; prints JSON."""
    t0 = time.perf_counter()
    from prism.data.collate import SFTCollator
    from prism.data.corpus import Corpus
    from prism.models.processor import load_processor

    processor = load_processor(model)
    t1 = time.perf_counter()
    corpus = Corpus.build_or_load(data, processor, max_length=4096, cache_dir=cache, num_proc=num_proc)
    t2 = time.perf_counter()
    batch = SFTCollator(processor, 4096)(corpus.examples(range(BATCH)))
    t3 = time.perf_counter()
    assert batch["input_ids"].shape[0] == BATCH
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    readers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest build reader
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    anon_mb, file_mb = (int(status.get(k, "0 kB").split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
    print(json.dumps({"seconds": t3 - t0, "corpus_s": t2 - t1, "batch_s": t3 - t2, "rss_mb": rss_mb,
                      "private_mb": anon_mb, "mapped_file_mb": file_mb, "reader_rss_mb": readers_mb,
                      "rows": len(corpus)}))


def measure(data: Path, model: Path, cache: Path, num_proc: int | None) -> dict:
    cmd = [sys.executable, __file__, "--launch", str(data), str(model), str(cache), str(num_proc or 0)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def extrapolate(small: tuple[int, float], large: tuple[int, float], n: int = TARGET) -> float:
    (n0, y0), (n1, y1) = small, large
    return y1 + (y1 - y0) / (n1 - n0) * (n - n1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--launch":
        data, model, cache, num_proc = argv[1:5]
        return launch(data, model, cache, int(num_proc) or None)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prism-data-scale"))
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = tiny_dir(args.workdir)
    results = {}
    for n in (args.n // 4, args.n):
        data = make_data(args.workdir, n)
        cache = args.workdir / f"cache_{n}"
        shutil.rmtree(cache, ignore_errors=True)
        results[n] = {"cold": measure(data, model, cache, args.num_proc), "warm": measure(data, model, cache, args.num_proc)}
        for kind, r in results[n].items():
            readers = f", build readers {r['reader_rss_mb']:.0f} MB each at most" if kind == "cold" else ""
            print(f"N={n:>9,} {kind}: launch-to-first-batch {r['seconds']:7.1f} s (corpus {r['corpus_s']:.1f} s), "
                  f"peak RSS {r['rss_mb']:5.0f} MB (at the first batch: {r['private_mb']:.0f} MB private, "
                  f"{r['mapped_file_mb']:.0f} MB mapped files: the cache, shared page cache){readers}", flush=True)
    small, large = args.n // 4, args.n
    for kind in ("cold", "warm"):
        r = results[large][kind]  # the corpus part scales with N; imports, processor and one batch do not
        corpus_s = extrapolate((small, results[small][kind]["corpus_s"]), (large, r["corpus_s"]))
        s = r["seconds"] - r["corpus_s"] + max(corpus_s, r["corpus_s"])
        m = extrapolate((small, results[small][kind]["rss_mb"]), (large, results[large][kind]["rss_mb"]))
        private = extrapolate((small, results[small][kind]["private_mb"]), (large, results[large][kind]["private_mb"]))
        print(f"N={TARGET:>9,} {kind} (linear from N={small:,} and N={large:,}): ~{s:.0f} s, ~{m:.0f} MB peak RSS, "
              f"~{private:.0f} MB private")


if __name__ == "__main__":
    main()
