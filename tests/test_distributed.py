"""handsoff.utils.distributed: one process-group set-up, torn down on every way out."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import torch.distributed as dist

from handsoff.utils.distributed import Ranks, broadcast, device_for, gather, process_group

RANK_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch.distributed as dist
    from handsoff.errors import Terminated
    from handsoff.utils.distributed import process_group

    out = Path(sys.argv[1])
    try:
        with process_group("cpu") as ranks:
            if ranks.rank == 1:
                raise SystemExit(3)  # one rank fails: torchrun sends SIGTERM to the others
            deadline = time.time() + 120
            while time.time() < deadline:  # rank 0 is busy in Python, as generation is
                time.sleep(0.05)
    except Terminated:
        out.write_text(f"terminated; group still initialized: {dist.is_initialized()}")
        raise
""")


def test_single_process_is_rank_0_of_1_and_sets_nothing_up():
    with process_group("cpu") as ranks:
        assert ranks == Ranks() and ranks.main
        assert not dist.is_initialized()
        assert broadcast(ranks, {"a": 1}) == {"a": 1} and gather(ranks, 5) == [5]
    assert device_for("cpu", ranks) == torch.device("cpu")


def test_sigterm_from_torchrun_tears_the_group_down(tmp_path):
    script, marker = tmp_path / "rank.py", tmp_path / "rank0.txt"
    script.write_text(RANK_SCRIPT)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(script), str(marker)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert marker.read_text() == "terminated; group still initialized: False", done.stderr[-2000:]


def test_a_torchrun_rank_ends_without_finalizing_but_keeps_its_status_and_output(tmp_path):
    """Under torchrun (WORLD_SIZE > 1) the CLI ends with os._exit, so no gloo worker can be made to
    abort by a finalizing interpreter; the exit status and everything printed still come through."""
    script = textwrap.dedent("""
        import atexit, sys
        from handsoff.cli import main
        atexit.register(lambda: print("finalized", flush=True))  # skipped: no interpreter finalization
        print("before", end="")  # unflushed on purpose
        code = main(["bench", "--train", sys.argv[1], "--test", sys.argv[1], "--task", "seg",
                     "--out", sys.argv[2]])
        print("not reached")
    """)
    env = {**__import__("os").environ, "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "missing"), str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "before" and "missing: no such folder" in done.stderr
    alone = subprocess.run([sys.executable, "-c", script, str(tmp_path / "missing"), str(tmp_path / "r.json")],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0 and alone.stdout.endswith("not reached\nfinalized\n")
