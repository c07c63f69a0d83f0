"""Regenerate the built-in task's shipped splits (alignctl/tasks/data/*.jsonl).

Deterministic: the same seed always writes the same bytes, and a test checks that the shipped files
match. Usage: python scripts/make_task_data.py [--seed 0] [--out alignctl/tasks/data]
"""

import argparse
from pathlib import Path

from alignctl.tasks.arithmetic import DATA_DIR, write_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    for name, path in write_splits(args.out, args.seed).items():
        print(f"{name:16s} {sum(1 for _ in path.open()):6d} rows  {path}")


if __name__ == "__main__":
    main()
