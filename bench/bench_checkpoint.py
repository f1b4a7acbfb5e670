"""Checkpoint engine benchmark: pe.Checkpointer against what users would otherwise pick,
side by side in one run, reported as ratios (these machines are shared and noisy).

    python bench/bench_checkpoint.py [--params-millions 50] [--width 4096] [--repeats 3]
                                     [--dir /path/on/the/disk] [--dcp-writer-threads 1] [--json OUT]

Measures, on a full state of ~50M parameters with Adam (~600 MB):
  - save() stall vs a plain memcpy of the same bytes, vs DCP async_save's default blocking time
    and vs DCP with a DefaultStager reused across saves (synchronous staging);
  - the training time a save(overlap=True) costs the step that overlaps its copy, vs DCP's
    asynchronous staging (THREAD and PROCESS checkpointer types, torchtitan's recipe), whose
    step waits for staging_completion before opt.step();
  - time to durable commit vs `dd oflag=direct conv=fsync`, vs torch.save + fsync and vs the
    fastest DCP configuration;
  - restore time vs torch.load + load_state_dict.
Each comparison with a target prints PASS or MISS. The DCP configurations are those of
pyengine.benchmarks.dcp_baselines; each gets one untimed save first (planning, its stager's
cache, the PROCESS daemon's start), as pe gets one.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint_workload as wl  # noqa: E402

import pyengine as pe  # noqa: E402
from pyengine.benchmarks.dcp_baselines import CONFIGURED, RECIPES, DcpSaver, close_process_group  # noqa: E402

# The JSON key prefix of each DCP configuration.
KEYS = {"dcp.async_save": "dcp_default", "dcp.cached": "dcp_cached", "dcp.async-thread": "dcp_async_thread",
        "dcp.async-process": "dcp_async_process"}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def run(params_millions: float, repeats: int, workdir: Path, width: int = 4096,
        dcp_writer_threads: int = 1) -> dict[str, float]:
    model, opt = wl.make_state(params_millions, width)
    fresh_model, fresh_opt = wl.make_state(params_millions, width)
    nbytes = wl.state_bytes(model, opt)
    tensors = wl.state_tensors(model, opt)
    dst = [torch.empty_like(t) for t in tensors]
    wl.memcpy_seconds(tensors, dst)  # touch the destination once, as the staging pool does
    batch = torch.randn(16, model[0].in_features)
    ckpt = pe.Checkpointer(workdir / "pe", keep_last=1)
    first = ckpt.save(0, {"model": model, "optimizer": opt})
    first.wait()
    # The same first save, with the staging memory allocated ahead by reserve().
    with pe.Checkpointer(workdir / "pe-reserved", keep_last=1) as reserved:
        t0 = time.perf_counter()
        reserved.reserve({"model": model, "optimizer": opt})
        reserve_s = time.perf_counter() - t0
        first_reserved = reserved.save(0, {"model": model, "optimizer": opt})
    shutil.rmtree(workdir / "pe-reserved")
    dcp = {name: DcpSaver(recipe, workdir, dcp_writer_threads) for name, recipe in RECIPES.items()}
    for saver in dcp.values():
        saver.warm_up(model, opt, workdir / "dcp-warm-up")

    # Every round measures each contender once, so a noisy neighbour hits all of them alike.
    m: dict[str, list[float]] = {}
    for step in range(1, repeats + 1):
        m.setdefault("memcpy_s", []).append(wl.memcpy_seconds(tensors, dst))
        h = ckpt.save(2 * step, {"model": model, "optimizer": opt})
        h.wait()
        m.setdefault("pe_stall_s", []).append(h.stall_seconds)
        m.setdefault("pe_commit_s", []).append(h.stats["persist_seconds"])
        # Overlapped: what a training step loses when save(overlap=True) precedes it (the
        # copy runs during forward/backward; opt.step() waits for it if it is not done).
        plain = wl.train_step_seconds(model, opt, batch)
        t0 = time.perf_counter()
        h = ckpt.save(2 * step + 1, {"model": model, "optimizer": opt}, overlap=True)
        m.setdefault("pe_overlap_stall_s", []).append(h.stall_seconds)
        wl.train_step_seconds(model, opt, batch)
        m.setdefault("pe_overlap_lost_s", []).append(time.perf_counter() - t0 - plain)
        m.setdefault("train_step_s", []).append(plain)
        h.wait()
        cold = wl.drop_page_cache()  # both restores read from the disk, when we may drop caches
        t0 = time.perf_counter()
        ckpt.restore({"model": fresh_model, "optimizer": fresh_opt})
        m.setdefault("pe_restore_s", []).append(time.perf_counter() - t0)
        m.setdefault("dd_fsync_Bps", []).append(wl.dd_fsync_bytes_per_second(workdir, nbytes))
        m.setdefault("dd_direct_Bps", []).append(wl.dd_fsync_bytes_per_second(workdir, nbytes, direct=True))
        pt = workdir / "t.pt"
        m.setdefault("torch_save_fsync_s", []).append(wl.torch_save_fsync_seconds(model, opt, pt))
        wl.drop_page_cache()
        m.setdefault("torch_load_s", []).append(wl.torch_load_seconds(fresh_model, fresh_opt, pt))
        pt.unlink()
        measure_dcp_round(dcp, model, opt, batch, workdir, step, m)
    ckpt.close()
    for saver in dcp.values():
        saver.close()
    close_process_group()
    r = {k: median(v) for k, v in m.items()}
    r.update(bytes=nbytes, params=sum(p.numel() for p in model.parameters()), cold_reads=float(cold),
             pe_first_save_stall_s=first.stall_seconds,  # pays the one-time staging allocation
             pe_reserve_s=reserve_s, pe_first_save_after_reserve_s=first_reserved.stall_seconds,
             dcp_writer_threads=float(dcp_writer_threads))
    return r


def measure_dcp_round(dcp: dict[str, DcpSaver], model, opt, batch: torch.Tensor, workdir: Path, step: int,
                      m: dict[str, list[float]]) -> None:
    """One save of each DCP configuration, in an order that rotates with `step`, into `m`. The
    async-staging ones also time the training step that overlaps their copy, in a second save."""
    names = list(dcp)
    k = step % len(names)
    for name in names[k:] + names[:k]:
        key = KEYS[name]
        r = wl.dcp_durable_seconds(dcp[name], model, opt, workdir / "dcp")
        m.setdefault(f"{key}_block_s", []).append(r["block_s"])
        m.setdefault(f"{key}_durable_s", []).append(r["durable_s"])
        if "staged_s" in r:
            m.setdefault(f"{key}_staged_s", []).append(r["staged_s"])
        if RECIPES[name].async_staging:
            lost, plain = wl.dcp_overlapped_step_seconds(dcp[name], model, opt, batch, workdir / "dcp")
            m.setdefault(f"{key}_lost_s", []).append(lost)
            m.setdefault(f"{key}_train_step_s", []).append(plain)


class Targets:
    """Checks measured ratios against the targets and keeps the verdicts for a summary line."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[str, bool]] = []

    def check(self, name: str, ratio: float, at_least: float | None = None, at_most: float | None = None) -> str:
        ok = (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)
        self.verdicts.append((name, ok))
        bound = f">= {at_least:g}x" if at_least is not None else f"<= {at_most:g}x"
        return f"(target {bound}: {'PASS' if ok else 'MISS'})"

    def summary(self) -> str:
        missed = [name for name, ok in self.verdicts if not ok]
        return f"{len(self.verdicts) - len(missed)} of {len(self.verdicts)} met" + (
            f"; MISS: {', '.join(missed)}" if missed else "")


def report(r: dict[str, float]) -> str:
    t = Targets()
    mb = r["bytes"] / 1e6
    default_vs_pe = r["dcp_default_block_s"] / r["pe_stall_s"]
    commit_bw = r["bytes"] / r["pe_commit_s"]
    rows = [
        ("state", f"{r['params'] / 1e6:.1f}M params + Adam = {mb:.0f} MB"),
        ("memcpy of the same bytes (baseline)", ms(r["memcpy_s"])),
        ("pe save() stall", f"{ms(r['pe_stall_s'])}   = {r['pe_stall_s'] / r['memcpy_s']:.2f}x memcpy "
         + t.check("stall vs memcpy", r["pe_stall_s"] / r["memcpy_s"], at_most=1.0)),
        ("pe save(overlap=True) stall", f"{ms(r['pe_overlap_stall_s'])}   = "
         f"{r['dcp_default_block_s'] / r['pe_overlap_stall_s']:.0f}x less than DCP blocking "
         + t.check("overlap stall vs DCP default", r["dcp_default_block_s"] / r["pe_overlap_stall_s"], at_least=5)),
        ("  + the next step's slowdown (copy, CRC", f"{ms(r['pe_overlap_lost_s'])}   on a "
         f"{r['train_step_s'] * 1e3:.0f} ms training step"),
        ("    and write share the CPUs)", ""),
        ("pe first save() stall (allocates staging)", ms(r["pe_first_save_stall_s"])),
        ("  or: reserve() ahead of training", ms(r["pe_reserve_s"])),
        ("  then the first save() stall", ms(r["pe_first_save_after_reserve_s"])),
        ("DCP async_save blocking", f"{ms(r['dcp_default_block_s'])}   = {default_vs_pe:.1f}x pe stall "
         + t.check("stall vs DCP default", default_vs_pe, at_least=5)),
        *dcp_rows(r, t),
        ("dd conv=fsync bandwidth (baseline)", f"{r['dd_fsync_Bps'] / 1e6:8.0f} MB/s"),
        ("dd oflag=direct conv=fsync (baseline)", f"{r['dd_direct_Bps'] / 1e6:8.0f} MB/s"),
        ("pe save -> durable commit", f"{r['pe_commit_s'] * 1e3:8.0f} ms   = {commit_bw / 1e6:.0f} MB/s = "
         f"{commit_bw / r['dd_fsync_Bps']:.2f}x dd, {commit_bw / r['dd_direct_Bps']:.2f}x dd direct "
         + t.check("commit vs dd direct", commit_bw / r["dd_direct_Bps"], at_least=0.8)),
        ("torch.save + fsync", f"{r['torch_save_fsync_s'] * 1e3:8.0f} ms   = "
         f"{r['torch_save_fsync_s'] / r['pe_commit_s']:.2f}x pe commit "
         + t.check("commit vs torch.save", r["torch_save_fsync_s"] / r["pe_commit_s"], at_least=4)),
        ("DCP async_save to durable", f"{r['dcp_default_durable_s'] * 1e3:8.0f} ms"),
        best_dcp_commit_row(r, t),
        ("  (DCP fsyncs its files but never its", ""),
        ("   directory; pe's commit fsyncs it)", ""),
        ("pe restore (verified, in place), " + ("cold" if r["cold_reads"] else "page cache warm"),
         f"{r['pe_restore_s'] * 1e3:8.0f} ms"),
        ("torch.load + load_state_dict", f"{r['torch_load_s'] * 1e3:8.0f} ms   = "
                                         f"{r['torch_load_s'] / r['pe_restore_s']:.2f}x pe restore"),
        ("targets", t.summary()),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def dcp_rows(r: dict[str, float], t: Targets) -> list[tuple[str, str]]:
    """The configured DCP baselines: blocking time, copy done and the overlapping step's slowdown
    for the async-staging ones, durable commit."""
    rows = []
    for recipe in CONFIGURED:
        key = KEYS[recipe.name]
        block = r[f"{key}_block_s"]
        rows.append((recipe.label, ""))
        if not recipe.async_staging:
            rows.append(("  blocking (one copy into its cache)", f"{ms(block)}   = {block / r['memcpy_s']:.2f}x memcpy,"
                         f" {block / r['pe_stall_s']:.2f}x pe stall "
                         + t.check("stall vs DCP reused stager", block / r["pe_stall_s"], at_least=1.5)))
        else:
            lost, step = r[f"{key}_lost_s"], r[f"{key}_train_step_s"]
            vs_pe = lost / r["pe_overlap_lost_s"]
            rows += [("  async_save returns", ms(block)),
                     ("  copy done (staging_completion)", ms(r[f"{key}_staged_s"])),
                     ("  return + the next step's slowdown", f"{ms(lost)}   on a {step * 1e3:.0f} ms step = "
                      f"{vs_pe:.2f}x pe overlap's " + t.check(f"overlap vs DCP {recipe.name}", vs_pe, at_least=3)),
                     ("    (it waits for the copy before opt.step())", "")]
        rows.append(("  to durable", f"{r[f'{key}_durable_s'] * 1e3:8.0f} ms"))
    return rows


def best_dcp_commit_row(r: dict[str, float], t: Targets) -> tuple[str, str]:
    durable = {name: r[f"{KEYS[name]}_durable_s"] for name in RECIPES}
    best = min(durable, key=durable.__getitem__)
    ratio = durable[best] / r["pe_commit_s"]
    return ("fastest DCP to durable", f"{durable[best] * 1e3:8.0f} ms   = {ratio:.2f}x pe commit ({best}) "
            + t.check("commit vs best DCP", ratio, at_least=1.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-millions", type=float, default=50.0)
    p.add_argument("--width", type=int, default=4096, help="width of the model's Linear layers (default 4096)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--dcp-writer-threads", type=int, default=1,
                   help="FileSystemWriter thread_count of the configured DCP baselines (default 1, DCP's)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.width < 1 or args.dcp_writer_threads < 1:
        p.error("--repeats, --width and --dcp-writer-threads must be >= 1")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = run(args.params_millions, args.repeats, Path(tmp), args.width, args.dcp_writer_threads)
    wl.print_and_save(report(r), r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
