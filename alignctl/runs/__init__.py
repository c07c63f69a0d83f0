"""Run directories and their lineage, without torch: files, locks, parents, resume points, interruption."""
