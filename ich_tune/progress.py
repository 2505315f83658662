"""Progress bars on stderr (tqdm): long jobs (preprocessing, reading a folder, predicting): signs of life."""

from __future__ import annotations

import sys

from tqdm import tqdm

BAR = "{desc} [{bar:24}] {n_fmt}/{total_fmt}{unit}, {rate_noinv_fmt}, {elapsed} elapsed, {remaining} left"


def bar(total: int, label: str, unit: str = "images") -> tqdm:
    """`label [####....] done/total unit, rate, elapsed, left`: redrawn in place on a terminal;
    elsewhere (a log file, a Ray worker's output, which Ray forwards line by line) a line of its
    own at every tenth of the way."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=label, unit=f" {unit}", ascii=".#", file=sys.stderr, mininterval=0.2,
                    bar_format=BAR)
    return tqdm(total=total, desc=label, unit=f" {unit}", ascii=".#", file=sys.stderr, mininterval=0,
                miniters=max(1, total // 10), bar_format=BAR + "\n")
