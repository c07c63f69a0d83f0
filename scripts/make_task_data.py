"""Regenerate the built-in tasks' shipped splits (alignctl/data/tasks/data/ and alignctl/data/tasks/chat_data/, and
the tool-use variant's SFT split in alignctl/data/tasks/tools_data/).

Deterministic: the same seed always writes the same bytes, and a test checks that the shipped files
match. Usage: python scripts/make_task_data.py [--seed 0]
"""

import argparse

from alignctl.data.tasks import arithmetic, arithmetic_tools, chat_arithmetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for task in (arithmetic, chat_arithmetic, arithmetic_tools):
        for name, path in task.write_splits(task.DATA_DIR, args.seed).items():
            print(f"{name:16s} {sum(1 for _ in path.open()):6d} rows  {path}")


if __name__ == "__main__":
    main()
