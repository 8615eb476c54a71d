"""wandb dashboards, read back from the offline run files of a tiny demo (train -> analyze -> prune ->
report): every stage's config is the full flattened config, and the artifact records link the four
stages (each consumer records its producer's artifact under the same name and manifest digest)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from .helpers import TINY, inputs, make_cfg

BLOCK = 32768   # wandb's run file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """The protobuf Records of one offline ``run-*.wandb`` file (wandb ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:        # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:                       # zero fill at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        chunk += data[pos:pos + length]
        pos += length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(chunk)
            yield rec
            chunk = b""


#: how long :func:`complete_records` waits for wandb's service to finish writing a run file
WRITE_WAIT_S = 60.0


def complete_records(path: Path) -> list:
    """The records of a finished run's file, once it ends with wandb's ``exit`` record.

    ``run.finish()`` returns before wandb's service process has written the file's last partial
    block: read at once, a file can end at a 32 KiB boundary with every later record missing (seen
    in CI, and here in 2 of 30 runs whose sizes put the tail in a new block)."""
    deadline = time.monotonic() + WRITE_WAIT_S
    while True:
        records = list(read_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {WRITE_WAIT_S:g} s"
        time.sleep(0.1)


def read_run(folder: Path) -> dict:
    """config keys, artifacts (name, type, digest, used) and summary keys of one offline run."""
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    config, artifacts, summary = {}, [], set()
    for rec in complete_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({u.key: u.value_json for u in rec.run.config.update})
        elif kind == "config":
            config.update({u.key: u.value_json for u in rec.config.update})
        elif kind == "artifact":
            a = rec.artifact
            artifacts.append((a.name, a.type, a.digest, a.use_after_commit))
        elif kind == "summary":
            summary.update(u.key or u.nested_key[0] for u in rec.summary.update)
    return {"config": config, "artifacts": artifacts, "summary": summary}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The four stages of a one-seed demo with logger=wandb (offline), on tiny settings."""
    from axes_pipeline.analyses.analyze import run_analysis
    from axes_pipeline.pruning.run import run_prune
    from axes_pipeline.report.build import run_report
    from axes_pipeline.tasks import run_task
    from axes_pipeline.training.train import run_training

    root = tmp_path_factory.mktemp("dash")
    base = [o for o in TINY if not o.startswith("logger=")] + ["logger=wandb", "trainer.max_epochs=1", "name=dash"]
    cfgs = {"train": make_cfg("train", base, root)}
    run_task(run_training, cfgs["train"])
    # prune keys the axes on the same settings as analyze: with equal ones it reads analyze's table
    axes = ["capture.n_cal=200", "capture.samples_per_image=4", "graphs.null_shuffles=1", "gradients.enabled=false",
            "plots=false"]
    cfgs["analyze"] = make_cfg("analyze", [*base, *axes], root)
    run_analysis(cfgs["analyze"])
    cfgs["prune"] = make_cfg("prune", [*base, *axes, "pruning.scores=[input_capture,task_info]", "pruning.targets=[0.9,0.7]",
                                       "pruning.latency=false", "pruning.fvcore_check=false"], root)
    run_prune(cfgs["prune"])
    run = inputs(cfgs["train"]).run.dir
    cfgs["report"] = make_cfg("report", [*base, f"report.runs=[{run}]", "report.n_boot=200",
                                         f"report.out={root / 'report'}"], root)
    run_report(cfgs["report"])
    (protocol,) = [p.parent for p in (run / "prune").glob("*/protocol.json")]   # the folder prune wrote
    folders = {"train": run, "analyze": run / "analyze", "prune": protocol, "report": root / "report"}
    return cfgs, {stage: read_run(f) for stage, f in folders.items()}


def test_every_stage_logs_the_full_flattened_config(demo):

    cfgs, runs = demo
    for stage, rec in runs.items():
        want = set(inputs(cfgs[stage]).tracked.config) | {"experiment", "stage"}
        assert want <= set(rec["config"]), (stage, sorted(want - set(rec["config"]))[:10])
    for key in ("capture.point", "metrics.sigma0"):
        assert key in runs["analyze"]["config"]
    assert "pruning.allocation" in runs["prune"]["config"]
    assert runs["prune"]["config"]["pruning.allocation"].strip('"') == cfgs["prune"].pruning.allocation


def test_artifacts_link_the_four_stages(demo):
    from axes_pipeline.tracking import ARTIFACT_KINDS

    _, runs = demo
    ours = {t for t, _ in ARTIFACT_KINDS.values()}   # (wandb also logs each Table as a run_table artifact)
    logged = {stage: {(n, t, d) for n, t, d, u in r["artifacts"] if t in ours and not u} for stage, r in runs.items()}
    used = {stage: {(n, t, d) for n, t, d, u in r["artifacts"] if u} for stage, r in runs.items()}
    (ckpt,) = logged["train"]
    (axes,) = logged["analyze"]
    (curves,) = logged["prune"]
    assert ckpt[0] == "checkpoint-dash-digits-resnet18-w0.125-seed42" and ckpt[1] == "model"
    assert axes[1] == "axes" and curves[1] == "prune-curves"
    # a consumer's record carries its producer's name, type and digest: the same artifact version
    assert used["analyze"] == {ckpt}
    assert used["prune"] == {ckpt, axes}
    assert used["report"] == {ckpt, axes, curves}
    assert [(n, t) for n, t, _ in logged["report"]] == [("report-dash", "report")]


def test_charts_and_stable_summary_names(demo):
    _, runs = demo
    assert {"train/test_acc", "train/val_acc"} <= runs["train"]["summary"]
    assert "analyze/depth_profile_table" in runs["analyze"]["summary"]
    assert any(k.startswith("analyze/ix_vs_it/") for k in runs["analyze"]["summary"])
    assert "prune/curves_chart_table" in runs["prune"]["summary"]
    assert "report/headline_chart_table" in runs["report"]["summary"]
    assert "report/headline_ci_table" in runs["report"]["summary"]         # the CI beside the bars
    assert any(k.startswith("headline/") and k.endswith("/diff") for k in runs["report"]["summary"])
