"""The GPU benchmark script must not rot: its tiny CPU mode runs end to end and prints its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_bench_train_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train.py"),
        "--model-size",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--shapes",
        "fixed,mixed",
        "--recipes",
        "stock_fp32base,stock,lora_kit,nogc",
        "--mixed-grad-accum",
        "1",
        "--ckpt-dir",
        str(tmp_path / "ckpt"),
        "--json-out",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    data = json.loads(last)
    assert data == json.loads(out.read_text())
    assert {"device", "precision", "versions", "results", "ratios"} <= set(data)
    assert len(data["results"]) == 8
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert {
            "shape",
            "recipe",
            "tokens_per_s",
            "median_step_s",
            "peak_gib",
            "losses",
            "micro_batch",
            "grad_accum",
        } <= set(r)
        assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0 and r["loss_finite"]
    assert {"fixed/lora_kit", "mixed/lora_kit", "fixed/lora_kit vs stock_fp32base"} <= set(data["ratios"])
    fp32base = [r for r in data["results"] if r["recipe"] == "stock_fp32base"]
    assert fp32base and all(r["base_dtypes"] == ["torch.float32"] for r in fp32base)
    # gradient checkpointing as measured: the first decoder layer runs twice per micro-batch (the forward, then its
    # recompute in the backward) where it is on, once where it is off (nogc), every micro-batch of the step
    for r in data["results"]:
        ckpt, on = r["checkpointing"], r["recipe"] != "nogc"
        mb = ckpt["micro_batches"]
        assert mb == r["grad_accum"] and ckpt["runs"]["layer"]["forward"] == mb, r
        assert ckpt["runs"]["checkpointed"] == {"forward": mb if on else 0, "recompute": mb if on else 0}, r
        assert ckpt["recomputes_per_micro_batch"] == (1.0 if on else 0.0) and ckpt["active"] is on, r
        assert ckpt["expected"] is on and ckpt["layer_flag"] == repr(on), r
    assert "WARNING: gradient checkpointing" not in proc.stdout


def test_peak_breakdown_replays_the_allocation_trace():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    mib = 2**20

    def frames(module):
        return [
            {"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": f"/env/site-packages/peft/{module}.py", "line": 7, "name": "forward"},
        ]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * mib, "frames": frames("a")},
        {"action": "alloc", "addr": 2, "size": 300 * mib, "frames": frames("b")},  # the peak: 1 GiB + 400 MiB
        {"action": "free_completed", "addr": 2, "size": 300 * mib},
        {"action": "alloc", "addr": 3, "size": 50 * mib, "frames": frames("a")},
        {"action": "free_completed", "addr": 99, "size": 10 * mib},
    ]  # allocated before recording began
    report = bench_train.peak_breakdown({"device_traces": [trace]}, before_recording=1024 * mib)
    assert report["peak_gib"] == round((1024 + 400) * mib / 2**30, 3)
    alive = {row["where"]: row for row in report["allocated_during_training_alive_at_peak"]}
    assert alive == {
        "peft/b.py:7 forward": {"gib": round(300 / 1024, 3), "tensors": 1, "where": "peft/b.py:7 forward"},
        "peft/a.py:7 forward": {"gib": round(100 / 1024, 3), "tensors": 1, "where": "peft/a.py:7 forward"},
    }


def test_idle_gaps_sums_the_gpu_waits_by_the_kernels_on_either_side():
    import types

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    def event(start, end, name, device=1):
        return types.SimpleNamespace(
            time_range=types.SimpleNamespace(start=start, end=end), name=name, device_type=device
        )

    events = [
        event(0, 10, "decode"),
        event(100, 200, "matmul"),  # 90 us after decode
        event(150, 160, "overlapping"),  # inside matmul: no gap
        event(300, 310, "decode"),  # 100 us after matmul
        event(400, 410, "matmul"),  # 90 us after decode
        event(410, 415, "norm"),  # back to back: no gap
        event(0, 1000, "a host op", device=0),  # not a kernel
    ]
    text = bench_train.idle_gaps(events, 1, min_us=20)
    lines = text.strip().splitlines()
    assert lines[0].startswith("GPU idle in gaps over 20 us: 0.3 ms in all")
    assert "0.2 ms      2 gaps  after decode  before matmul" in lines[1]
    assert "0.1 ms      1 gaps  after matmul  before decode" in lines[2]
    assert len(lines) == 3


def test_cold_compile_gives_each_recipe_subprocess_empty_compiler_caches(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared_cache"))
    monkeypatch.setattr(bench_train.tempfile, "tempdir", str(tmp_path))  # the fresh caches go under tmp_path
    argv = ["--model-size", "tiny", "--steps", "1", "--warmup", "1", "--ckpt-dir", str(tmp_path / "ckpt")]
    for cold in (False, True):
        args = bench_train.parse_args(argv + (["--cold-compile"] if cold else []))
        bench_train.ensure_checkpoint(args, "fp32")
        runs = [bench_train.run_in_subprocess(args, "fixed", recipe, argv) for recipe in ("stock", "stock")]
        assert all(r["status"] == "ok" for r in runs), runs
        caches = [r["inductor_cache_dir"] for r in runs]
        if cold:  # a new folder per recipe, none of them the caller's
            assert len(set(caches)) == 2 and str(tmp_path / "shared_cache") not in caches
            assert all(Path(c).parent.parent == tmp_path for c in caches)
        else:  # without the flag the recipes inherit the caller's cache
            assert caches == [str(tmp_path / "shared_cache")] * 2


def test_unsloth_recipe_is_skipped_with_its_reason_when_no_site_folder_is_named(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    monkeypatch.delenv("UNSLOTH_SITE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    argv = ["--model-size", "tiny", "--recipes", "unsloth", "--ckpt-dir", str(tmp_path / "ckpt")]
    assert bench_train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "# unsloth recipe skipped: no --unsloth-site and no UNSLOTH_SITE" in printed
    out = json.loads(printed.strip().splitlines()[-1])
    assert out["results"] == [] and out["vs_unsloth"] is None
    assert "UNSLOTH_SITE" in out["skipped"]["unsloth"]
    # a named folder without Unsloth in it stops the run before any recipe trains
    with pytest.raises(SystemExit, match="holds no unsloth package"):
        bench_train.main(argv + ["--unsloth-site", str(tmp_path)])


def test_unsloth_worker_imports_unsloth_first_from_its_own_site_and_reports_a_failure(tmp_path, monkeypatch):
    """The worker's path starts with the named site folder, imports unsloth before transformers/peft/trl (Unsloth
    patches them as it is imported), and an Unsloth that cannot train comes back as an error result with its text."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    site = tmp_path / "site"
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text(
        "import sys\n"
        f"open({str(tmp_path / 'imported_before.txt')!r}, 'w').write("
        "' '.join(m for m in ('transformers', 'peft', 'trl') if m in sys.modules))\n"
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    argv = ["--model-size", "tiny", "--steps", "1", "--warmup", "1", "--ckpt-dir", str(tmp_path / "ckpt")]
    args = bench_train.parse_args(argv + ["--unsloth-site", str(site)])
    bench_train.ensure_checkpoint(args, "fp32")
    res = bench_train.run_in_subprocess(args, "fixed", "unsloth", argv + ["--unsloth-site", str(site)])
    assert (tmp_path / "imported_before.txt").read_text() == ""
    assert res["status"] == "error" and "FastLanguageModel" in res["error"], res
    assert "Traceback" in res["log_tail"]
    env = bench_train.unsloth_env(str(site), "/normal/site")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(site), "/normal/site"]


def test_unsloth_recipe_imports_a_transformers_its_requirement_admits(tmp_path):
    """A PYTHONPATH folder whose transformers Unsloth's wheel does not admit is replaced, on the unsloth recipe's path
    only, by a view of it without transformers, so the next admitted one (a later folder, or the interpreter's own) is
    the one imported; the folder's other packages stay reachable."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    def folder(name, transformers=None, others=("peft",)):
        path = tmp_path / name
        for package in others:
            (path / package).mkdir(parents=True)
        if transformers:
            (path / "transformers").mkdir(parents=True)
            (path / f"transformers-{transformers}.dist-info").mkdir()
        return str(path)

    site = folder("usite", others=("unsloth", "trl"))
    meta = Path(site) / "unsloth-2026.10.9.dist-info" / "METADATA"
    meta.parent.mkdir()
    meta.write_text(
        "Name: unsloth\nRequires-Dist: transformers!=5.0.0,<=5.17.0,>=4.52.4\n"
        'Requires-Dist: transformers>=5.20; extra == "future"\n'
    )
    new, old = folder("site523", "5.23.0"), folder("site517", "5.17.0", others=())
    assert bench_train.unsloth_transformers_requirement(site) == "!=5.0.0,<=5.17.0,>=4.52.4"

    def path_of(pythonpath, mode="supported", own="5.23.0"):
        return bench_train.unsloth_path(site, pythonpath, mode, own=lambda: own)

    folders, chosen = path_of(os.pathsep.join([new, old]))
    assert folders[0] == site and folders[2] == old and folders[1] not in (new, old)
    assert sorted(p.name for p in Path(folders[1]).iterdir()) == ["peft"]  # all of site523 but its transformers
    assert chosen["version"] == "5.17.0" and chosen["source"] == old and chosen["hidden"] == [new]
    # the interpreter's own, where it is the admitted one (the GPU machine: 5.23 in the usual site, 5.17 its own)
    folders, chosen = path_of(new, own="5.17.0")
    assert len(folders) == 2 and folders[1] != new and chosen["source"] == "interpreter" and chosen["admitted"]
    # --unsloth-transformers path, an admitted one first, or none admitted anywhere: the path as it is
    assert path_of(os.pathsep.join([new, old]), "path")[0] == [site, new, old]
    assert path_of(os.pathsep.join([old, new]))[0] == [site, old, new]
    folders, chosen = path_of(new)
    assert folders == [site, new] and chosen["admitted"] is False and "<=5.17.0" in chosen["note"]
    env = bench_train.unsloth_env(site, os.pathsep.join([new, old]))
    assert env["PYTHONPATH"].split(os.pathsep)[2] == old


def test_table_flags_a_recipe_whose_checkpointing_is_off_where_it_asked_for_it(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    def run(recipe, active, expected=True):
        ckpt = {"active": active, "expected": expected, "recomputes_per_micro_batch": float(active)}
        return {
            "shape": "fixed",
            "recipe": recipe,
            "status": "ok",
            "micro_batch": 2,
            "grad_accum": 1,
            "tokens_per_s": 1.0,
            "peak_gib": 1.0,
            "checkpointing": ckpt,
        }

    results = [run("stock", True), run("nogc", False, expected=False), run("unsloth", False)]
    bench_train.print_table(results, bench_train.summarize(results))
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("fixed")}
    assert rows["stock"][-3] == "on" and rows["nogc"][-3] == "off" and rows["unsloth"][-3] == "OFF!"
    bench_train.print_table(results, {})
    assert (
        "WARNING: gradient checkpointing is not what the recipe asked for in fixed/unsloth" in capsys.readouterr().out
    )


def test_vs_unsloth_summary_divides_lora_kit_by_unsloth_per_shape():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    def run(shape, recipe, tokens_per_s, peak_gib, real_tokens_per_step, mb, ga, **extra):
        return {
            "shape": shape,
            "recipe": recipe,
            "status": "ok",
            "tokens_per_s": tokens_per_s,
            "peak_gib": peak_gib,
            "real_tokens_per_step": real_tokens_per_step,
            "micro_batch": mb,
            "grad_accum": ga,
            **extra,
        }

    unsloth_versions = {"unsloth": "2026.10.9", "trl": "1.15.0"}
    results = [
        run("fixed", "stock", 6000.0, 5.8, 4096, 2, 1),
        run("fixed", "lora_kit", 8000.0, 5.6, 4096, 2, 1),
        run("fixed", "unsloth", 6400.0, 7.0, 4096, 2, 1, versions=unsloth_versions),
        run("fixed", "lora_kit_offload", 7040.0, 4.9, 4096, 2, 1),
        # two lora_kit repeats: the mean of their tokens/s, the higher of their peaks
        run("mixed", "lora_kit", 8600.0, 7.3, 8187, 4, 1),
        run("mixed", "lora_kit", 8800.0, 7.4, 8189, 4, 1),
        {"shape": "mixed", "recipe": "unsloth", "status": "error", "error": "exit 1", "log_tail": "Traceback ..."},
    ]
    summary = bench_train.vs_unsloth_summary(results, {"name": "NVIDIA H200"}, "bf16", {"trl": "1.16.0"})
    assert summary["fixed"]["speed_ratio"] == 1.25 and summary["fixed"]["memory_ratio"] == 0.8
    assert summary["fixed"]["unsloth"] == {
        "tokens_per_s": 6400.0,
        "real_tokens_per_step": 4096.0,
        "peak_gib": 7.0,
        "micro_batch": 2,
        "grad_accum": 1,
    }
    assert summary["fixed"]["variants"]["lora_kit_offload"]["speed_ratio"] == 1.1
    assert summary["fixed"]["variants"]["lora_kit_offload"]["memory_ratio"] == 0.7
    assert summary["fixed"]["variants"]["lora_kit_offload"]["peak_gib"] == 4.9 and "variants" not in summary["mixed"]
    assert summary["mixed"]["speed_ratio"] is None and summary["mixed"]["memory_ratio"] is None
    assert summary["mixed"]["lora_kit"]["tokens_per_s"] == 8700.0 and summary["mixed"]["lora_kit"]["peak_gib"] == 7.4
    assert summary["mixed"]["lora_kit"]["real_tokens_per_step"] == 8188.0
    assert summary["mixed"]["unsloth"]["error"] == "exit 1"
    assert summary["device"] == "NVIDIA H200" and summary["precision"] == "bf16"
    assert summary["versions"] == {"unsloth recipe": unsloth_versions, "other recipes": {"trl": "1.16.0"}}
    ratios = bench_train.summarize(results)
    assert ratios["fixed/lora_kit vs unsloth"] == {"tokens_per_s": 1.25, "peak": 0.8}
    assert ratios["fixed/unsloth"] == {"tokens_per_s": round(6400 / 6000, 3), "peak": round(7.0 / 5.8, 3)}
    assert bench_train.vs_unsloth_summary(results[:2], {"name": "cpu"}, "fp32", {}) is None


def test_bench_memory_tiny_cpu(tmp_path):
    """bench_memory.py's grid and auto-fit plumbing: every point trains in its own process and is recorded."""
    out = tmp_path / "out"
    common = ["--tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--parallel", "2"]
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    script = str(ROOT / "benchmarks" / "bench_memory.py")
    for extra in (["--points", "0,8"], ["--autofit", "15"]):
        proc = subprocess.run(
            [sys.executable, script, *common, *extra], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    grid = json.loads((out / "memory_grid.json").read_text())["points"]
    assert [p["index"] for p in grid] == [0, 8] and all("error" not in p for p in grid)
    assert grid[1]["levers"].startswith("packing")  # the packing point really packed
    assert all(p["last_loss"] > 0 and p["estimated_gib"] > 0 for p in grid)
    fitted = json.loads((out / "memory_autofit.json").read_text())["points"]
    assert len(fitted) == 3 and all(p["budget_gib"] == 15.0 and p["steps"] == 20 for p in fitted)


def test_checkpoints_are_written_tensor_by_tensor_and_float8_files_load_as_the_float16_values_rounded(tmp_path):
    """The 70B shape's files only fit the GPU machine's disk in float8; transformers must cast them back as it loads."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    import lora_kit

    loaded = {}
    for storage in ("float16", "float8"):
        folder = bench_memory.build_checkpoint(tmp_path / storage, "tiny", storage)
        assert bench_memory.build_checkpoint(tmp_path / storage, "tiny", storage) == folder  # built once
        model, _ = lora_kit.load_model(str(folder), "none")
        loaded[storage] = {name: p.detach().float() for name, p in model.named_parameters()}
    assert loaded["float16"].keys() == loaded["float8"].keys() and len(loaded["float8"]) == 21
    for name, value in loaded["float16"].items():
        assert torch.equal(loaded["float8"][name], value.to(torch.float8_e4m3fn).float()), name
    norm = loaded["float8"]["model.norm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    assert 0.015 < loaded["float16"]["model.layers.0.mlp.up_proj.weight"].std() < 0.025


def test_reload_report_reads_batch_arithmetic_as_a_near_tie_from_the_generated_ids(tmp_path):
    # bf16 random weights, as on the GPU: answers generated alone and in a padded batch part where the top two logits
    # nearly tie. Read from the ids generated, every such parting is a near tie; read from the decoded text tokenized
    # again (which garbled answers do not survive), some look like a different adapter.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import check_reload_report

    from lora_kit import load_tokenizer

    tok = load_tokenizer("embedded")
    model = check_reload_report.random_llama(tok, hidden=512, layers=4)
    counts = check_reload_report.compare(model, tok, check_reload_report.chat_prompts(16, tmp_path), new_tokens=48)
    parted = counts["prompts"] - counts["alone_equals_batched"]
    assert parted >= 4, counts  # the check has partings to read
    assert counts["verdicts_from_ids"] == {"near tie": parted}, counts
    assert counts["text_tokenizes_back_to_ids"] < counts["prompts"], counts
    assert counts["verdicts_from_retokenized_text"].get("more than", 0) >= 1, counts  # what the ids fix
