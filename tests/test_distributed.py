"""Data-parallel calibration on torch.distributed (gloo, 2 processes on this CPU): the statistics every
rank saw, combined, equal one process's; torchrun quantize writes the checkpoint one process writes."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lowbit.observers import InputStats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank, port, rows, out):
    from lowbit.engine.distributed import reduce_stats

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stats = {}
        for name, batches in rows.items():
            mine = batches[rank]
            if mine:  # "b" is seen by rank 0 only: an expert no token of rank 1's share reached
                stats[name] = InputStats.empty(mine[0].shape[1], hessian=True)
                for x in mine:
                    stats[name].add(x)
        reduce_stats(stats)
        if rank == 1:
            torch.save({n: (s.H, s.abs_mean, s.abs_max, s.lo, s.hi, s.tokens) for n, s in stats.items()}, out)
    finally:
        dist.destroy_process_group()


def test_statistics_combine_across_ranks_as_one_process_sees_them(tmp_path):
    torch.manual_seed(0)
    a = [torch.randn(37, 16), torch.randn(50, 16), torch.randn(13, 16)]
    b = [torch.randn(20, 8)]
    rows = {"a": [a[:2], a[2:]], "b": [b, []]}
    mp.spawn(_reduce_worker, args=(_free_port(), rows, str(tmp_path / "r1.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "r1.pt")
    for name, batches in (("a", a), ("b", b)):
        ref = InputStats.empty(batches[0].shape[1], hessian=True)
        for x in batches:
            ref.add(x)
        H, mean, amax, lo, hi, tokens = got[name]
        assert tokens == ref.tokens
        torch.testing.assert_close(H, ref.H, rtol=1e-5, atol=1e-6)  # a sum in another order: float rounding
        torch.testing.assert_close(mean, ref.abs_mean, rtol=1e-5, atol=1e-6)
        assert torch.equal(amax, ref.abs_max) and torch.equal(lo, ref.lo) and torch.equal(hi, ref.hi)  # exact


def _quantize(out, method, nproc, text):
    args = ["quantize", "stories260K", "--method", method, "--group-size", "32", "--calib", str(text),
            "--nsamples", "24", "--seqlen", "64", "--out", str(out), "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lowbit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "lowbit", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_torchrun_two_processes_write_the_one_process_checkpoint(stories_dir, tmp_path, method):
    """24 windows in 3 batches of 8 (rank 0 takes two, rank 1 one): RTN bit-identical; GPTQ's Hessians
    differ from one process's by float rounding only, so its codes agree but for a rare rounding tie."""
    from lowbit.assets import asset

    text = asset("text", "tinystories_dev.txt")
    if not text.exists():
        pytest.skip(f"{text} is absent")
    one, two = _quantize(tmp_path / "one", method, 1, text), _quantize(tmp_path / "two", method, 2, text)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    if method == "rtn":
        assert all(torch.equal(a[k], b[k]) for k in a)
        return
    codes = [k for k in a if k.endswith("qweight")]
    agree = sum((a[k] == b[k]).sum().item() for k in codes) / sum(a[k].numel() for k in codes)
    assert agree > 0.999, agree
    for k in a:
        if k.endswith("scales"):
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2e-3, atol=1e-6)


def test_methods_that_score_their_own_share_are_refused(tmp_path):
    from lowbit.assets import asset

    text = asset("text", "tinystories_dev.txt")
    if not text.exists():
        pytest.skip(f"{text} is absent; set LOWBIT_ASSETS to the shared assets folder")
    r = _quantize(tmp_path / "awq", "awq", 2, text)
    assert r.returncode != 0 and "awq cannot run data-parallel yet" in r.stderr
    shutil.rmtree(tmp_path / "awq", ignore_errors=True)
