"""The token Parquet written and read without Ray: parts, markers, manifest, stale parts."""

import numpy as np
import pytest

from reptok_core import storage
from reptok_core.formats import tokens


def _inputs(folder, sizes):
    for i, n in enumerate(sizes):
        (folder / f"in-{i}.parquet").write_bytes(b"x" * n)
    return [str(folder / f"in-{i}.parquet") for i in range(len(sizes))]


def test_plan_names_change_with_what_shapes_the_parts(tmp_path):
    files = _inputs(tmp_path, [3, 5])
    plan = tokens.plan_parts(files, "tok-a", flip=False)
    assert [p["input"] for p in plan] == files
    assert [p["part"][:11] for p in plan] == ["part-00000-", "part-00001-"]
    assert tokens.plan_parts(files, "tok-a", flip=False) == plan
    for other in (
        tokens.plan_parts(files, "tok-b", flip=False),
        tokens.plan_parts(files, "tok-a", flip=True),
        tokens.plan_parts(_inputs(tmp_path, [3, 6]), "tok-a", flip=False),
    ):
        assert {p["part"] for p in other}.isdisjoint(p["part"] for p in plan)


def test_parts_and_manifest_round_trip(tmp_path):
    uri = str(tmp_path / "tokens")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(10, 4)).astype(np.float32)
    ids = [f"r{i:02d}" for i in range(10)]
    labels = [i % 3 for i in range(7)] + [None] * 3
    captions = [None] * 5 + [f"c{i}" for i in range(5)]
    tokens.write_part(uri, "part-00000-f", ids[:6], labels[:6], captions[:6], z[:6], -z[:6])
    assert tokens.part_done(uri, "part-00000-f") and not tokens.part_done(uri, "part-00001-f")
    tokens.write_part(uri, "part-00001-f", ids[6:], labels[6:], captions[6:], z[6:], -z[6:])
    with pytest.raises(FileNotFoundError, match="not a finished token Parquet"):
        tokens.load_tokens(uri)  # no manifest yet: nothing is readable

    parts = ["part-00000-f", "part-00001-f"]
    manifest = tokens.write_manifest(uri, parts, "images/", True, {"tokenizer": "t"})
    assert manifest["format"] == tokens.FORMAT and manifest["tokenizer"] == "t"
    assert (manifest["rows"], manifest["dim"], manifest["num_classes"]) == (10, 4, 3)
    assert manifest["captioned_rows"] == 5 and manifest["parts"] == [f"{p}.parquet" for p in parts]
    np.testing.assert_allclose(manifest["mean"], z.mean(0), atol=1e-6)
    np.testing.assert_allclose(manifest["std"], z.std(0, ddof=1), atol=1e-6)
    assert tokens.read_manifest(uri) == manifest

    data = tokens.load_tokens(uri)
    assert data["id"] == ids and data["caption"] == captions
    assert data["label"].tolist() == [0, 1, 2, 0, 1, 2, 0, -1, -1, -1]
    np.testing.assert_array_equal(data["token"], z)
    np.testing.assert_array_equal(data["token_flip"], -z)
    assert tokens.load_tokens(uri, limit=3)["id"] == ids[:3]

    # A part of an earlier plan goes, with its marker; the current parts stay.
    tokens.write_part(uri, "part-00000-old", ids[:2], labels[:2], captions[:2], z[:2])
    assert tokens.remove_stale(uri, parts) == 2
    assert {f.rsplit("/", 1)[-1] for f in storage.list_files(uri, ".parquet")} == {
        f"{p}.parquet" for p in parts
    }
    assert tokens.load_tokens(uri)["id"] == ids
