"""scripts/bench_real.py, the real-model tier of `make bench`: its FLOPs and MFU (worked by hand on a small
config), its cases and the order the sides run in, and the table it writes. Nothing is trained here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A small grouped-query config: d 8, 2 layers, MLP 16, 2 heads of 4, 1 kv head, vocab 10.
SMALL = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 10}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses need it while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real():
    try:
        yield _load("alignctl_bench_real_script", ROOT / "scripts" / "bench_real.py")
    finally:
        sys.modules.pop("alignctl_bench_real_script", None)


@pytest.fixture(scope="module")
def bench():
    try:
        yield _load("alignctl_bench_script_real", ROOT / "scripts" / "bench.py")
    finally:
        sys.modules.pop("alignctl_bench_script_real", None)


def test_matmul_params_count_grouped_query_attention_and_the_head(real):
    # per layer: q and o 2·8·(2·4) = 128, k and v 2·8·(1·4) = 64, MLP 3·8·16 = 384 -> 576; two layers 1152
    assert real.matmul_params(SMALL, "sft") == 1152 + 8 * 10  # the output layer, d x vocab
    assert real.matmul_params(SMALL, "reward") == 1152 + 8  # the score head, d x 1
    smollm2 = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
               "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
    assert real.matmul_params(smollm2, "sft") == 134_479_872  # SmolLM2-135M: its tied embedding counted once


def test_step_flops_by_hand(real):
    tokens, seq = 100, 20  # attention, trained: 12·L·d·s·T = 12·2·8·20·100 = 384,000; forward 4·2·8·20·100 = 128,000
    case = {c.name: c for c in real.REAL_CASES}
    assert real.step_flops(SMALL, case["real-sft"], tokens, seq) == 6 * 1232 * 100 + 384_000 == 1_123_200
    assert real.step_flops(SMALL, case["real-sft-lora"], tokens, seq) == 4 * 1232 * 100 + 384_000 == 876_800
    assert real.step_flops(SMALL, case["real-reward-lora"], tokens, seq) == 4 * 1160 * 100 + 384_000 == 848_000
    # DPO: + the reference forward, 2·N·T + 128,000; GRPO: + the generation forward, the same count
    assert real.step_flops(SMALL, case["real-dpo-lora"], tokens, seq) == 876_800 + 246_400 + 128_000 == 1_251_200
    assert real.step_flops(SMALL, case["real-grpo-lora"], tokens, seq) == 1_251_200
    assert real.mfu(1_251_200, 0.001, 2.5) == pytest.approx(0.50048)  # 1.2512 GFLOP/s of 2.5


def test_cases_and_the_order_sides_run_in(real):
    assert [c.name for c in real.REAL_CASES] == ["real-sft", "real-sft-lora", "real-reward-lora", "real-dpo-lora", "real-grpo-lora"]
    assert [c.lora for c in real.REAL_CASES] == [False, True, True, True, True]
    dpo = next(c for c in real.REAL_CASES if c.name == "real-dpo-lora")
    assert real.sides(dpo) == ["alignctl", "alignctl+share_prompt", "alignctl+padded", "trl-fp32", "trl-bf16"]
    assert dict(dpo.variants) == {"share_prompt": ("recipe.share_prompt=true",), "padded": ("recipe.padding_free=false",)}
    sft = real.REAL_CASES[0]
    assert real.run_order(sft, 0) == ["alignctl", "trl-fp32", "trl-bf16"]
    assert real.run_order(sft, 1) == ["trl-bf16", "trl-fp32", "alignctl"]
    assert real.run_order(sft, 2) == real.run_order(sft, 0)
    assert real.TRL_SIDES == {"trl-fp32": False, "trl-bf16": True}


def _side(step: float, process: float, rss: float, mfu_bf16: float = 0.1) -> dict:
    return {"step_seconds": step, "process_seconds": process, "peak_rss_mib": rss, "mfu_fp32": 0.5, "mfu_bf16": mfu_bf16,
            "first_loss": 1.0, "final_loss": 0.5, "allocator": "system"}


def test_ratios_and_targets_against_trls_faster_run(real):
    row = {"case": "real-sft-lora", "sides": {
        "alignctl": _side(0.5, 30.0, 600.0, mfu_bf16=0.61), "trl-fp32": _side(2.0, 60.0, 1000.0), "trl-bf16": _side(1.5, 50.0, 1200.0)}}
    real.add_ratios(row)
    figures = row["sides"]["alignctl"]
    assert figures["ratios"]["trl-fp32"] == pytest.approx({"step": 4.0, "whole": 2.0, "rss": 0.6})
    assert figures["ratios"]["trl-bf16"] == pytest.approx({"step": 3.0, "whole": 50 / 30, "rss": 0.5})
    assert figures["targets"] == {"against": "trl-bf16", "step": True, "whole": True, "rss": True, "mfu": True}
    assert "ratios" not in row["sides"]["trl-fp32"]


def test_markdown_table_columns_from_a_fabricated_report(real):
    row = {"case": "real-dpo-lora", "sides": {
        "alignctl": _side(1.0, 40.0, 900.0), "alignctl+share_prompt": _side(1.2, 42.0, 800.0),
        "trl-fp32": _side(3.0, 90.0, 2000.0), "trl-bf16": _side(2.5, 80.0, 1900.0)}}
    real.add_ratios(row)
    report = {"command": "python scripts/bench.py --tier real", "machine": "x86_64, Linux", "threads": 2, "steps": 12,
              "batch_size": 4, "max_length": 128, "num_generations": 4, "max_new_tokens": 32, "reps": 3,
              "peak_fp32": 150.0, "peak_bf16": 1500.0, "alignctl_precision": "bf16 autocast",
              "versions": {"torch": "2.x", "trl": "1.16.0"}, "rows": [row]}
    lines = real.markdown_real(report).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    assert [c.strip() for c in lines[header].strip("|").split("|")] == real.COLUMNS == [
        "case", "run", "s/step", "step ×TRL fp32 / bf16", "process s", "process ×TRL fp32 / bf16", "peak RSS MiB",
        "RSS ×TRL fp32 / bf16", "MFU of fp32 / bf16 peak", "loss first / last", "targets"]
    assert lines[header + 1] == "|" + "---|" * len(real.COLUMNS)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]]
    assert [cells[1] for cells in body] == ["alignctl", "alignctl+share_prompt", "trl-fp32", "trl-bf16"]
    assert all(len(cells) == len(real.COLUMNS) for cells in body)
    assert body[0] == ["real-dpo-lora", "alignctl", "1.000", "3.00 / 2.50", "40.0", "2.25 / 2.00", "900", "0.45 / 0.47",
                       "50.0 % / 10.0 %", "1.0000 / 0.5000", "step ✓ whole ✓ rss ✓ mfu ✗"]
    assert body[2][3] == body[2][10] == "—"  # TRL's rows carry no ratios
    assert "matmul peak 150 GFLOP/s float32, 1500 GFLOP/s bf16" in lines[0] and "Versions: torch 2.x, trl 1.16.0." in lines[1]


def test_the_performance_page_has_the_real_tiers_markers_apart_from_the_tiny_ones(tmp_path, real, bench):
    markers = (real.REAL_START, real.REAL_END)
    bench.check_doc(bench.PERFORMANCE_DOC, markers)
    bench.check_doc(bench.PERFORMANCE_DOC)
    page = tmp_path / "performance.md"
    page.write_text(f"{bench.TABLE_START}\ntiny\n{bench.TABLE_END}\nmiddle\n{real.REAL_START}\nold\n{real.REAL_END}\nend\n")
    bench.update_doc("| real |\n", page, markers)
    assert page.read_text() == f"{bench.TABLE_START}\ntiny\n{bench.TABLE_END}\nmiddle\n{real.REAL_START}\n| real |\n{real.REAL_END}\nend\n"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no <!-- bench-real:start -->"):
        bench.check_doc(page, markers)


def test_cli_refuses_an_unknown_real_case_before_measuring(bench):
    with pytest.raises(SystemExit, match="unknown case real-nope"):
        bench.main(["--tier", "real", "--real-cases", "real-nope"])


def test_matmul_peak_takes_a_dtype_and_a_shape(bench):
    assert bench.matmul_peak_gflops(1, "bfloat16", (16, 8, 24)) > 0
    assert bench.matmul_peak_gflops(1, "float32", (16, 8, 24)) > 0
