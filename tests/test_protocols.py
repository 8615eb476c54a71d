"""Every pruning protocol is its own result (issue 29): its folder's name, protocols side by side for one run,
resume, a run with fewer scores adds (issue 31 case 2), an older layout moved, layer_allocation.csv against the
pruned network, and the report's headline per protocol (pairing within one, protocols.csv's verdicts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from axes_pipeline.layout import RunId, RunLayout
from axes_pipeline.models.graph import out_channels
from axes_pipeline.pruning import sweep as prune_sweep
from axes_pipeline.pruning.protocol import Protocol, protocol_of, protocol_settings
from axes_pipeline.pruning.run import run_prune
from axes_pipeline.pruning.settings import Finetune, PruningConfig
from axes_pipeline.pruning.summary import ALLOCATION_COLUMNS
from axes_pipeline.report.protocols import VERDICTS, verdict
from axes_pipeline.runs import read_json

from .helpers import TARGETS, fake_run, make_cfg, prune_settings, report_on

# ------------------------------------------------------------------------------------- naming


def test_the_default_protocol_is_named_default_and_others_say_what_differs():
    assert protocol_of(PruningConfig(), "resnet18").name == "default"
    assert protocol_of(PruningConfig(allocation="global"), "resnet18").name == "default"   # auto resolves to it
    assert protocol_of(PruningConfig(allocation="uniform"), "mobilenetv2").name == "default"
    uni = protocol_of(PruningConfig(allocation="uniform"), "resnet18")
    # the cap is the allocation's own (0.9 for uniform): not tagged a second time
    assert uni.name.startswith("uniform-") and len(uni.name) == len("uniform-") + 6 and "cap" not in uni.name
    assert uni.name.endswith(uni.fingerprint[:6])
    assert protocol_of(PruningConfig(max_fraction={"global": 0.8, "uniform": 0.9, "hybrid": 0.95}),
                       "resnet18").name.startswith("cap-")
    hybrid = protocol_of(PruningConfig(allocation="hybrid", hybrid_counts_from="l1"), "resnet18")
    assert hybrid.name.startswith("hybrid-l1-") and hybrid.settings["hybrid_counts_from"] == "l1"


def test_the_finetune_budget_is_part_of_the_protocol_and_zero_when_off():
    off = [protocol_of(PruningConfig(finetune=Finetune(enabled=False, epochs=e)), "resnet18") for e in (0, 2, 5)]
    off.append(protocol_of(PruningConfig(finetune=Finetune(epochs=0)), "resnet18"))
    assert {p.name for p in off} == {"default"} and off[0].settings["finetune"] is None
    # `-m pruning.finetune.epochs=0,2,5`: three budgets, three protocols (0 is the default's "none")
    on = {e: protocol_of(PruningConfig(finetune=Finetune(epochs=e)), "resnet18") for e in (2, 5)}
    assert on[2].name.startswith("ft2-") and on[5].name.startswith("ft5-")
    assert protocol_of(PruningConfig(finetune=Finetune(enabled=True, epochs=2)), "resnet18") == on[2]


def test_the_schedule_is_part_of_the_protocol():
    it3 = protocol_of(PruningConfig(schedule="iterative"), "resnet18")
    assert it3.name.startswith("iterative3-") and it3.settings["steps"] == 3
    assert protocol_of(PruningConfig(schedule="iterative", steps=2), "resnet18").name.startswith("iterative2-")
    between = protocol_of(PruningConfig(schedule="iterative", finetune=Finetune(epochs=2, between_steps=True)),
                          "resnet18")
    assert between.name.startswith("iterative3ft-ft2-") and between.settings["between_steps"] is True
    # one shot: the steps knob is not part of it (it has none)
    assert protocol_of(PruningConfig(steps=5), "resnet18").name == "default"


def test_scores_are_not_part_of_a_protocol_and_later_knobs_are():
    assert protocol_of(PruningConfig(scores=["l1"]), "vgg16") == protocol_of(PruningConfig(scores=["l2"]), "vgg16")
    s = protocol_settings(PruningConfig(), "resnet18")
    assert s["normalize"] == "minmax" and "hybrid_counts_from" not in s   # only under hybrid
    assert Protocol.of(dict(s, normalize="lamp"), s).name.startswith("global-lamp-")


# ------------------------------------------------------------------------- prune.py, per protocol

FAST = ["pruning.latency=false", "pruning.targets=[0.8,0.6]", "pruning.eval_samples=64"]


def _cfg(run, *extra):
    root, overrides = run
    return make_cfg("prune", [*overrides, *FAST, *extra], root)


def _folder(cfg) -> Path:
    return Path(cfg.paths.run_dir) / "prune" / prune_settings(cfg).protocol.name


def test_two_protocols_coexist_resume_and_fewer_scores_add(run, capsys):
    glob2 = _cfg(run, "pruning.allocation=global", "pruning.scores=[l1,l2]")
    uni = _cfg(run, "pruning.allocation=uniform", "pruning.scores=[l1]")
    g, u = _folder(glob2), _folder(uni)
    assert g != u and g.parent == u.parent and g.name.startswith("targets-") and u.name.startswith("uniform-")
    s1 = run_prune(glob2)
    before = (g / "prune_curves.csv").read_bytes()
    s2 = run_prune(uni)
    assert s1["points_computed_this_run"] == 4 and s2["points_computed_this_run"] == 2
    assert (g / "prune_curves.csv").read_bytes() == before                  # the other protocol untouched
    for folder, want in ((g, {"l1", "l2"}), (u, {"l1"})):
        rec = read_json(folder / "protocol.json")
        assert rec["protocol"] == folder.name and rec["settings"]["allocation"] in ("global", "uniform")
        assert set(pd.read_csv(folder / "prune_curves.csv")["score"]) == want
        assert (folder / "points").is_dir() and (folder / "kept_fraction.png").is_file()
    # the raw scores are shared by the protocols of the checkpoint: one cache, beside the protocol folders
    assert not (g / "scores").exists() and not (u / "scores").exists()
    assert RunLayout.at(RunId("default", "digits", "resnet18", 0.125, 42), run[0]).in_folder(
        Path(glob2.paths.run_dir)).protocol_dirs() == sorted([g, u])

    # the same protocol again with one score: nothing recomputed, and the curves keep l2 (issue 31 case 2)
    capsys.readouterr()
    s3 = run_prune(_cfg(run, "pruning.allocation=global", "pruning.scores=[l1]"))
    assert s3["points_computed_this_run"] == 0 and s3["scores_from_earlier_runs"] == ["l2"]
    curves = pd.read_csv(g / "prune_curves.csv")
    assert set(curves["score"]) == {"l1", "l2"} and len(curves) == 4
    assert set(s3["scores"]) == {"l1", "l2"} and set(read_json(g / "prune_summary.json")["scores"]) == {"l1", "l2"}


def test_a_stored_point_of_other_settings_is_left_out_and_named(run, capsys):
    cfg = _cfg(run, "pruning.scores=[l1,l2]")
    run_prune(cfg)
    folder = _folder(cfg)
    point = json.loads((folder / "points" / "l2__0.8.json").read_text())
    point["fingerprint"]["ckpt_digest"] = "0" * 16                          # made from another checkpoint
    (folder / "points" / "l2__0.8.json").write_text(json.dumps(point))
    capsys.readouterr()
    run_prune(_cfg(run, "pruning.scores=[l1]"))
    out = capsys.readouterr().out
    assert "a stored point of l2" in out and "left out of the curves" in out
    curves = pd.read_csv(folder / "prune_curves.csv")
    assert len(curves[curves.score == "l2"]) == 1                           # l2 @ 0.6 only


def test_layer_allocation_matches_the_pruned_network(run):
    from axes_pipeline.pruning.export import load_pruned

    cfg = _cfg(run, "pruning.scores=[l1]", "pruning.export=true")
    run_prune(cfg)
    folder = _folder(cfg)
    alloc = pd.read_csv(folder / "layer_allocation.csv")
    assert list(alloc.columns) == ALLOCATION_COLUMNS
    assert set(alloc["target"]) == {0.8, 0.6} and (alloc["kept"] <= alloc["channels"]).all()
    for target in (0.8, 0.6):
        model = load_pruned(folder / "models" / f"l1_{target:g}.pt")      # rebuilt from its pruning history
        mods = dict(model.named_modules())
        rows = alloc[alloc["target"] == target]
        assert {r.layer: r.kept for r in rows.itertuples()} == {r.layer: out_channels(mods[r.layer])
                                                                for r in rows.itertuples()}
        assert rows["kept_fraction"].tolist() == pytest.approx((rows["kept"] / rows["channels"]).tolist())
        assert 0.9 < rows["macs_share"].sum() <= 1.0 + 1e-9       # the rest: the classifier (and adds fvcore skips)
        assert list(rows["depth"]) == list(range(len(rows)))


def test_latency_and_fvcore_once_per_architecture(run, monkeypatch):
    calls = {"latency": 0, "fvcore": 0}
    real_fv = prune_sweep.fvcore_macs

    def lat(*a, **k):
        calls["latency"] += 1
        return {"latency_cpu_b1_ms": 1.0}

    def fv(*a, **k):
        calls["fvcore"] += 1
        return real_fv(*a, **k)

    monkeypatch.setattr(prune_sweep, "_BY_ARCHITECTURE", {})
    monkeypatch.setattr(prune_sweep, "latency", lat)
    monkeypatch.setattr(prune_sweep, "fvcore_macs", fv)
    # uniform by a channel fraction: every score prunes the same number of channels per layer at one target
    cfg = _cfg(run, "pruning.allocation=uniform", "pruning.mode=channel_fraction", "pruning.scores=[l1,l2,random]",
               "pruning.random_draws=2", "pruning.latency=true", "pruning.latency_batch_sizes=[1]")
    run_prune(cfg)
    curves = pd.read_csv(_folder(cfg) / "prune_curves.csv")
    alloc = pd.read_csv(_folder(cfg) / "layer_allocation.csv")
    archs = alloc.groupby(["score", "draw", "target"])["kept"].agg(tuple).nunique()
    assert len(curves) == 8 and archs == 2 and calls == {"latency": 2, "fvcore": 2}
    assert curves["latency_reused"].sum() == 6 and (curves["latency_ms"] == 1.0).all()


def test_an_older_flat_layout_is_moved_into_its_protocol_without_recomputing(run, capsys):
    cfg = _cfg(run, "pruning.scores=[l1]")
    run_prune(cfg)
    folder = _folder(cfg)
    stage = folder.parent
    for p in list(folder.iterdir()):                              # as prune.py wrote it before protocols
        if p.name != "protocol.json":
            p.rename(stage / p.name)
    shutil.rmtree(folder)
    capsys.readouterr()
    summary = run_prune(cfg)
    assert "moved the results of the older layout" in capsys.readouterr().out
    assert summary["points_computed_this_run"] == 0
    assert not (stage / "prune_curves.csv").exists() and (folder / "prune_curves.csv").is_file()


def test_prune_multirun_over_allocations_gives_one_folder_each(run):
    from .helpers import run_entry

    root, overrides = run
    res = run_entry("prune.py", "-m", "pruning.allocation=global,uniform", "pruning.scores=[l1]", *overrides, *FAST,
                    f"paths.output_root={root}", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(make_cfg("prune", overrides, root).paths.run_dir)
    names = sorted(p.parent.name for p in (run_dir / "prune").glob("*/prune_curves.csv"))
    assert len(names) == 2 and names[0].startswith("targets-") and names[1].startswith("uniform-")


# ------------------------------------------------------------------------------------- the report


def test_verdict_words():
    assert verdict(0.05, 0.01, 0.09, 0.04, True) == VERDICTS[0]
    assert verdict(0.05, 0.01, 0.09, 0.04, False) == "same sign, CI excludes 0"
    assert verdict(0.05, -0.01, 0.09, 0.04, False) == "same sign, n.s."
    assert verdict(-0.05, -0.09, -0.01, 0.04, False) == "opposite sign"
    assert verdict(0.05, 0.01, 0.09, None, False) == "no reference"


UNIFORM = {"allocation": "uniform", "normalize": "minmax", "mode": "flops", "targets": TARGETS}
HYBRID = {"allocation": "hybrid", "hybrid_counts_from": "l1", "normalize": "minmax", "mode": "flops", "targets": TARGETS}


def _allocation(folder: Path) -> None:
    rows = [{"score": s, "axis": a, "draw": 0, "target": t, "depth": d, "layer": f"conv{d}", "channels": 16,
             "kept": max(1, int(16 * t) - d), "kept_fraction": max(1, int(16 * t) - d) / 16, "macs_share": 0.2}
            for s, a in (("input_capture", "local"), ("task_info", "target"), ("taylor", "baseline"))
            for t in TARGETS for d in range(4)]
    pd.DataFrame(rows).to_csv(folder / "layer_allocation.csv", index=False)


def test_report_pairs_within_a_protocol_and_writes_protocols_csv(tmp_path):
    for s in (1, 2, 3, 4, 5):
        run = fake_run(tmp_path, s, local_gain=0.05)                                       # default: local better
        fake_run(tmp_path, s, local_gain=-0.05, protocol="uniform-aaaaaa", settings=UNIFORM)   # target better
        fake_run(tmp_path, s, local_gain=0.04, protocol="hybrid-l1-bbbbbb", settings=HYBRID)
        for p in ("default", "uniform-aaaaaa"):
            _allocation(run / "prune" / p)
    _, summary = report_on(tmp_path)
    out = tmp_path / "multirun" / "demo" / "report"
    # the page opens on the default protocol, as before
    head = pd.read_csv(out / "headline.csv")
    assert (head.n == 5).all() and head[head.comparison.str.startswith("best local (")].iloc[0]["diff"] > 0
    prot = pd.read_csv(out / "protocols.csv").set_index("protocol")
    assert list(prot.index) == ["default", "hybrid-l1-bbbbbb", "uniform-aaaaaa"] and (prot.seeds == 5).all()
    assert prot.loc["default", "verdict"] == VERDICTS[0]
    assert prot.loc["uniform-aaaaaa", "verdict"] == "opposite sign" and prot.loc["uniform-aaaaaa", "diff"] < 0
    assert prot.loc["hybrid-l1-bbbbbb", "verdict"] == "same sign, CI excludes 0"
    assert prot.loc["uniform-aaaaaa", "counts"] == "uniform" and prot.loc["hybrid-l1-bbbbbb", "counts"] == "l1 counts"
    assert (prot.ci_method == "t").all() and (prot.ci_lo < prot["diff"]).all()
    grid = pd.read_csv(out / "protocol_grid.csv")
    assert set(grid.protocol) == set(prot.index) and {"l1", "input_capture", "task_info"} <= set(grid.score)
    assert (grid.seeds == 5).all()
    assert {f.name for f in out.glob("kept_fraction_*.png")} == {
        "kept_fraction_digits-resnet18-w0.25_default.png", "kept_fraction_digits-resnet18-w0.25_uniform-aaaaaa.png"}
    html = (out / "report.html").read_text()
    assert "Does the answer depend on the allocation?" in html and "opposite sign" in html
    assert html.count("kept fraction: ") >= 2


def test_a_finetune_budget_protocol_reads_its_accuracy_after_the_fine_tune(tmp_path):
    # issue 30: a budget's headline is measured after its fine-tune (before it, the curves are budget 0's)
    budget = {"allocation": "global", "normalize": "minmax", "mode": "flops", "targets": TARGETS,
              "finetune": {"epochs": 2}}
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.05)
        run = fake_run(tmp_path, s, local_gain=0.05, protocol="ft2-cccccc", settings=budget)
        curves = pd.read_csv(run / "prune" / "ft2-cccccc" / "prune_curves.csv")
        # after the fine-tune the target axis recovers more: the sign turns
        gain = curves["axis"].map({"target": 0.1}).fillna(0.0)
        curves["acc_after_ft"] = curves["acc_before_ft"] + gain
        curves["val_acc_after_ft"] = curves["val_acc_before_ft"] + gain
        curves.to_csv(run / "prune" / "ft2-cccccc" / "prune_curves.csv", index=False)
    report_on(tmp_path)
    prot = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "protocols.csv").set_index("protocol")
    assert prot.loc["default", "accuracy"] == "acc_before_ft" and prot.loc["ft2-cccccc", "accuracy"] == "acc_after_ft"
    assert prot.loc["default", "diff"] > 0 > prot.loc["ft2-cccccc", "diff"]
    assert prot.loc["ft2-cccccc", "verdict"] == "opposite sign"


def test_scratch_points_are_compared_with_the_weights_kept_across_seeds(tmp_path):
    # issue 30 item 4: the headline per protocol in one figure; scratch-trained points beside the kept weights
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.05)
        run = fake_run(tmp_path, s, local_gain=0.05, protocol="uniform-aaaaaa", settings=UNIFORM)
        path = run / "prune" / "uniform-aaaaaa" / "prune_curves.csv"
        curves = pd.read_csv(path)
        curves["acc_after_ft"] = curves["acc_before_ft"]
        at = curves["target_flops"].isin([0.7, 0.5, 0.3])
        # from scratch the local axis keeps 0.02 more than its kept-weights margin over the target axis
        curves["acc_scratch"] = (curves["acc_before_ft"] + curves["axis"].map({"local": 0.02}).fillna(0.0)).where(at)
        curves.to_csv(path, index=False)
    report_on(tmp_path)
    out = tmp_path / "multirun" / "demo" / "report"
    prot = pd.read_csv(out / "protocols.csv").set_index("protocol")
    sc = pd.read_csv(out / "protocol_scratch.csv")
    assert list(sc.protocol) == ["uniform-aaaaaa"] and sc.seeds.iloc[0] == 3 and sc.targets.iloc[0] == "0.7 0.5 0.3"
    row = sc.iloc[0]
    assert row.best_local == prot.loc["uniform-aaaaaa", "best_local"]
    assert abs(row.scratch_diff - row.kept_diff - 0.02) < 1e-9 and row.scratch_ci_lo < row.scratch_diff < row.scratch_ci_hi
    assert (out / "headline_protocols.png").is_file()
    html = (out / "report.html").read_text()
    assert "What the scratch comparison means" in html and html.count(">The headline (best local − best target") == 1


def test_a_protocol_of_some_seeds_is_paired_only_over_those(tmp_path):
    for s in (1, 2, 3, 4):
        fake_run(tmp_path, s, local_gain=0.05)
    for s in (5, 6, 7):   # other seeds, pruned under uniform only
        fake_run(tmp_path, s, local_gain=0.05, protocol="uniform-aaaaaa", settings=UNIFORM)
    report_on(tmp_path)
    out = tmp_path / "multirun" / "demo" / "report"
    prot = pd.read_csv(out / "protocols.csv").set_index("protocol")
    assert prot.loc["default", "seeds"] == 4 and prot.loc["uniform-aaaaaa", "seeds"] == 3
    assert (pd.read_csv(out / "headline.csv").n == 4).all()


def test_report_reads_a_run_with_only_another_protocol_and_says_so(tmp_path):
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.05, protocol="uniform-aaaaaa", settings=UNIFORM)
    _, summary = report_on(tmp_path)
    assert any("no seed was pruned under the default protocol" in n for n in summary["notices"])
    assert (pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv").n == 3).all()


def test_report_lists_an_older_layout_with_the_command_that_moves_it(tmp_path):
    run = fake_run(tmp_path, 1, local_gain=0.0)
    for p in list((run / "prune" / "default").iterdir()):
        p.rename(run / "prune" / p.name)
    (run / "prune" / "default").rmdir()
    _, summary = report_on(tmp_path)
    (sk,) = [s for s in summary["skipped"] if s["file"] == "prune/prune_curves.csv"]
    assert "older layout" in sk["reason"] and "python prune.py" in sk["reason"]
