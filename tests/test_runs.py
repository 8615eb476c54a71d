"""The shared seams every stage keys and checks its work with: fingerprints and table schemas."""

import numpy as np
import pandas as pd
import pytest

from axes_pipeline.errors import UserError
from axes_pipeline.runs import (
    data_identity,
    file_digest,
    fingerprint,
    flatten,
    json_default,
    read_json,
    settings_diff,
    write_json,
)
from axes_pipeline.tables import DamagedTable, Schema, problems, read_table

SCHEMA = Schema("t.csv", {"layer": "str", "channel": "int", "value": "float", "flag": "bool"},
                finite=("value",), layer="layer")


def test_fingerprint_is_order_free_and_value_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": 1}) != fingerprint({"a": "1"})
    assert len(fingerprint({})) == 16


def test_flatten_is_the_one_dotted_flattener():
    import axes_pipeline.analyses.analyze as analyze
    import axes_pipeline.report.collect as collect
    import axes_pipeline.report.tables as report_tables
    import axes_pipeline.stage as stage

    d = {"capture": {"point": "post", "layers": [1, 2]}, "x": {}, "config": {"a": 1},
         "lesion": {"recovery": {"full_mean": 0.5, "config": 3}, "n_boot": 9}}
    assert flatten(d) == {"capture.point": "post", "capture.layers": [1, 2], "x": {}, "config.a": 1,
                          "lesion.recovery.full_mean": 0.5, "lesion.recovery.config": 3, "lesion.n_boot": 9}
    # skip drops a key at any depth (analyze leaves its config out of the wandb summary)
    assert flatten(d, skip={"config"}) == {"capture.point": "post", "capture.layers": [1, 2], "x": {},
                                            "lesion.recovery.full_mean": 0.5, "lesion.n_boot": 9}
    # every reader of flattened keys uses it: the wandb config and summary, the report's settings and quantities
    assert stage.flatten is flatten and collect.flatten is flatten and analyze.flatten is flatten
    assert report_tables._numeric(d) == {"lesion.recovery.full_mean": 0.5}   # config, n_boot: not summarised


def test_json_default_encodes_numpy_torch_and_paths_like_write_json(tmp_path):
    import json
    from pathlib import Path

    import torch

    from axes_pipeline.runs import plain

    obj = {"f": np.float32(0.5), "i": np.int64(3), "a": np.arange(3), "t": torch.tensor([1.0, 2.0]), "p": Path("/x/y")}
    want = {"f": 0.5, "i": 3, "a": [0, 1, 2], "t": [1.0, 2.0], "p": "/x/y"}
    assert json.loads(json.dumps(obj, default=json_default)) == want
    write_json(tmp_path / "k.json", obj)
    # a stored key and the key it is compared with are encoded alike (a numpy number is a number in both)
    assert read_json(tmp_path / "k.json") == plain(obj) == want


def test_file_digest_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-1")
    assert file_digest(a) == file_digest(b)
    a.write_bytes(b"weights-2 longer")
    assert file_digest(a) != file_digest(b)


def test_data_identity_keeps_what_decides_the_images():
    ident = data_identity({"name": "digits", "image_size": 16, "split_seed": 0, "batch_size": 64,
                           "num_workers": 4, "data_dir": "/x"})
    assert ident == {"data.image_size": 16, "data.name": "digits", "data.split_seed": 0}


def test_settings_diff_names_each_changed_key():
    line = settings_diff({"lr": 0.1, "seed": 1}, {"lr": 0.5, "seed": 1, "wd": 0})
    assert line == "lr: 0.1 -> 0.5, wd: (absent) -> 0"


def _table():
    return pd.DataFrame({"layer": ["a", "a", "b"], "channel": [0, 1, 0], "value": [0.1, 0.2, 0.3],
                         "flag": [True, False, True]})


def test_a_sound_table_passes(tmp_path):
    path = tmp_path / "t.csv"
    _table().to_csv(path, index=False)
    df = read_table(path, SCHEMA, rebuild="python analyze.py", rows_per_layer={"a": 2, "b": 1})
    assert len(df) == 3


@pytest.mark.parametrize("damage, words", [
    (lambda d: d.drop(columns="channel"), "missing column(s) channel"),
    (lambda d: d.assign(value=[0.1, np.nan, 0.3]), "1 NaN/Inf"),
    (lambda d: d.assign(value=["0.1", "oops", "0.3"]), "non-numeric"),
    (lambda d: d.assign(channel=[0, 1.5, 0]), "non-integer"),
    (lambda d: d.assign(flag=[True, "maybe", False]), "non-boolean"),
    (lambda d: d.iloc[:2], "layer b has 0 row(s), 1 expected"),
])
def test_damage_is_named(damage, words):
    found = problems(damage(_table()), SCHEMA, {"a": 2, "b": 1})
    assert any(words in f for f in found), found


def test_damaged_file_is_one_user_error_naming_file_and_command(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("layer,channel,value,flag\na,0,0.1,True\na,1,")   # truncated mid-row
    with pytest.raises(DamagedTable) as err:
        read_table(path, SCHEMA, rebuild="python analyze.py seed=1", rows_per_layer={"a": 2})
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert str(path) in msg and "python analyze.py seed=1" in msg
    with pytest.raises(DamagedTable, match="does not exist"):
        read_table(tmp_path / "missing.csv", SCHEMA, rebuild="x")
