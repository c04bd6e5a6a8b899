#!/usr/bin/env python3
"""The chain resolver (issue 8): the mapper and block_status on a three-layer chain.

Builds, in a fresh temporary directory (removed unless --keep):
  base  SIZE, `qemu-img create -o preallocation=metadata` (host order = guest order)
  mid   SIZE over base, --writes random qemu-io writes (4 KiB to 128 KiB) and zero writes
  top   2*SIZE over mid, empty: its second half lies past the backing file's end
and times, in CPU seconds (min of --repeat), `map_extents` (the mapper), `block_status` over the
whole image, and `block_status` 1 MiB at a time (a library caller asking small ranges).

    python -m bench.chain_bench                     # 16 GiB base, 4000 writes
    python -m bench.chain_bench --size 4G --writes 1000
"""
from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import qcow2kit
from qcow2kit.image import block_status
from qcow2kit.mapping import map_extents
from qcow2kit.units import qemu_strtosz

T = TypeVar("T")


def parse_size(text: str) -> int:
    return qemu_strtosz(text)[0]


def _cpu(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """``fn()``'s result and its least CPU time over ``repeat`` runs."""
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return min(times), out


def build(d: Path, size: int, writes: int, seed: int) -> Path:
    def run(*argv: str, stdin: str | None = None) -> None:
        subprocess.run(argv, cwd=d, check=True, input=stdin, text=True,
                       stdout=subprocess.DEVNULL)

    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "base.qcow2",
        str(size))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2",
        str(size))
    rng = random.Random(seed)
    cmds = []
    for i in range(writes):
        cmds.append(f"write -P {i % 250 + 1} {rng.randrange(0, size, 4096)} "
                    f"{rng.choice((4096, 65536, 131072))}")
        if i % 7 == 0:
            cmds.append(f"write -z {rng.randrange(0, size, 65536)} 65536")
    run("qemu-io", "-f", "qcow2", "mid.qcow2", stdin="\n".join(cmds) + "\n")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2",
        str(2 * size))
    return d / "top.qcow2"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16G")
    ap.add_argument("--writes", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="chain-bench-", dir=args.workdir))
    try:
        top = build(d, parse_size(args.size), args.writes, args.seed)
        with qcow2kit.open(top) as img:
            t_map, ext = _cpu(lambda: map_extents(img), args.repeat)
            t_whole, n_whole = _cpu(lambda: sum(1 for _ in block_status(img, 0, img.size)),
                                    args.repeat)

            def chunks() -> int:
                return sum(1 for pos in range(0, img.size, 1 << 20)
                           for _ in block_status(img, pos, 1 << 20))
            t_chunks, n_chunks = _cpu(chunks, 1)
        print(f"chain {args.size} base, {args.writes} writes in mid, top {2 * parse_size(args.size)}"
              f" bytes ({d if args.keep else 'removed'})")
        print(f"  map_extents              {t_map:8.3f} s CPU  {len(ext):>9,} extents")
        print(f"  block_status, one call   {t_whole:8.3f} s CPU  {n_whole:>9,} statuses")
        print(f"  block_status, 1 MiB each {t_chunks:8.3f} s CPU  {n_chunks:>9,} statuses")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
