"""reptok_core/prepare + pipelines/prepare_data.py: sources, bad inputs, idempotence, kill-and-re-run, S3, built-ins.

Most tests run the shard worker in this process (`executor=inline`, no Ray) because it is the
same code a Ray task runs; the `slow` ones go through Ray Data on the session cluster and a real
S3-compatible server (moto) on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import prepare_data as pdata
from reptok_core import prepare as prep
from reptok_core import storage
from reptok_core.config import load_config
from reptok_core.images import decode_rgb, prepare_array, prepare_bytes, stable_id
from reptok_core.prepare import builtin_datasets

REPO = Path(__file__).resolve().parents[1]
RES = 32


# ------------------------------------------------------------------ fixtures and helpers


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _good_images() -> dict[str, bytes]:
    """One image per awkward mode/format; every one must be kept."""
    rgba = np.dstack([_noise(60, 50, 1), np.full((60, 50), 128, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "cats/rgb.jpg": _enc(Image.fromarray(_noise(90, 120, 0)), "JPEG", quality=90),
        "cats/grey.png": _enc(Image.fromarray(_noise(40, 40, 2)[..., 0]), "PNG"),
        "cats/rgba.png": _enc(Image.fromarray(rgba, "RGBA"), "PNG"),
        "cats/cmyk.jpg": _enc(Image.new("CMYK", (48, 64), (10, 200, 30, 5)), "JPEG"),
        "dogs/palette.gif": _enc(Image.fromarray(_noise(50, 70, 3)).quantize(16), "GIF"),
        "dogs/deep.png": _enc(
            Image.fromarray((np.arange(2500).reshape(50, 50) * 26).astype(np.uint16)), "PNG"
        ),
        "dogs/rotated.jpg": _enc(Image.fromarray(_noise(40, 80, 4)), "JPEG", exif=exif),
        "dogs/big.webp": _enc(Image.fromarray(_noise(500, 700, 5)), "WEBP", quality=90),
        "cats/panorama.png": _enc(Image.fromarray(_noise(40, 160, 12)), "PNG"),  # 4:1 is kept
    }


def _bad_images() -> dict[str, tuple[bytes | None, str]]:
    """Every bad-input kind a folder can hold -> (bytes, expected reason); None = dangling link."""
    png = _enc(Image.fromarray(_noise(60, 60, 6)), "PNG")
    jpg = _enc(Image.fromarray(_noise(60, 60, 7)), "JPEG")
    broken = bytearray(png)
    broken[broken.find(b"IDAT") + 50] ^= 0xFF
    return {
        "cats/empty.jpg": (b"", "empty_file"),
        "cats/notes.jpg": (b"this is a text file, not a JPEG\n", "not_an_image"),
        "dogs/half.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "dogs/broken.png": (bytes(broken), "corrupt"),
        "dogs/bomb.png": (_enc(Image.new("L", (3000, 3000), 9), "PNG"), "too_many_pixels"),
        "dogs/tiny.png": (_enc(Image.fromarray(_noise(8, 8, 8)), "PNG"), "too_small"),
        # Degenerate shapes, rejected by the default image.min_size / image.max_aspect_ratio.
        "dogs/dot.png": (_enc(Image.fromarray(_noise(1, 1, 9)), "PNG"), "too_small"),
        "cats/sliver.png": (
            _enc(Image.fromarray(_noise(2, 4000, 10)), "PNG"),
            "extreme_aspect_ratio",
        ),
        "cats/banner.png": (
            _enc(Image.fromarray(_noise(40, 200, 11)), "PNG"),
            "extreme_aspect_ratio",
        ),
        "cats/gone.jpg": (None, "unreadable"),
    }


BAD_SETTINGS = ["image.max_pixels=1000000"]  # min_size and max_aspect_ratio: the defaults


def write_folder(root: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """An ImageNet-layout folder with good images, every bad kind and ignorable clutter."""
    good, bad = _good_images(), _bad_images()
    for rel, data in good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel, (data, _) in bad.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            p.symlink_to(root / "no-such-file.jpg")
        else:
            p.write_bytes(data)
    (root / "cats" / ".DS_Store").write_bytes(b"\0\0")
    (root / "cats" / "readme.txt").write_text("not an input")
    return good, {rel: reason for rel, (_, reason) in bad.items()}


def cfg_of(*overrides: str) -> prep.PrepareConfig:
    return load_config(
        prep.PrepareConfig, None, ["progress_s=0", f"image.resolution={RES}", *overrides]
    )


def read_rows(output: str) -> pa.Table:
    files = [u for u in storage.list_files(output, suffix=".parquet")]
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(u))) for u in files]
    return pa.concat_tables(tables) if tables else pa.table({})


def read_rejects(output: str) -> dict[str, str]:
    out = {}
    for u in storage.list_files(storage.join(output, "rejects"), suffix=".jsonl"):
        for line in storage.read_bytes(u).decode().splitlines():
            r = json.loads(line)
            out[r["key"]] = r["reason"]
    return out


def read_manifest(output: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(output, "_manifest.json")))


def check_folder_output(output: str, good: dict[str, bytes], bad: dict[str, str]) -> None:
    """Every good image kept with the right label and exact pixels; every bad one rejected."""
    rows = read_rows(output)
    assert rows.num_rows == len(good)
    assert rows.schema.field("image").type == pa.binary()
    assert rows.schema.field("height").type == pa.int32()
    by_source = {r["source"]: r for r in rows.to_pylist()}
    assert set(by_source) == set(good)
    for rel, data in good.items():
        r = by_source[rel]
        assert r["id"] == stable_id(rel)
        assert r["label"] == (0 if rel.startswith("cats/") else 1)
        assert (r["height"], r["width"]) == (RES, RES)
        expected = prepare_bytes(data, RES)
        np.testing.assert_array_equal(decode_rgb(r["image"]), expected, err_msg=rel)
    assert read_rejects(output) == bad
    m = read_manifest(output)
    assert m["rows"] == len(good) and m["class_names"] == ["cats", "dogs"]
    assert m["rejected"] == len(bad)
    assert m["rejected_by_reason"] == {r: list(bad.values()).count(r) for r in bad.values()}
    assert m["ignored_files"] == 2  # .DS_Store and readme.txt


# ------------------------------------------------------------------ planning (no Ray)


def test_plan_folder_layouts(tmp_path):
    good, bad = write_folder(tmp_path)
    plan = prep.plan_source(cfg_of("source.kind=folder", f"source.uri={tmp_path}").source)
    assert plan.class_names == ["cats", "dogs"]
    assert {it["key"] for it in plan.items} == set(good) | set(bad)
    assert [it["id"] for it in plan.items] == sorted(it["id"] for it in plan.items)
    flat = prep.plan_source(
        cfg_of("source.kind=folder", f"source.uri={tmp_path}/cats", "source.limit=3").source
    )
    assert flat.class_names is None and len(flat.items) == 3
    assert all(it["label"] is None for it in flat.items)


def test_shard_names_are_deterministic_and_settings_dependent():
    items = [{"key": f"k{i}", "id": stable_id(f"k{i}")} for i in range(10)]
    a = prep.make_shards(items, 4, "fp1")
    assert [len(s["items"]) for s in a] == [4, 4, 2]
    assert [s["name"] for s in a] == [s["name"] for s in prep.make_shards(items, 4, "fp1")]
    assert a[0]["name"] != prep.make_shards(items, 4, "fp2")[0]["name"]
    assert a[0]["name"] != prep.make_shards(items[1:], 4, "fp1")[0]["name"]
    assert prep.fingerprint(cfg_of()) != prep.fingerprint(cfg_of("image.resolution=64"))
    assert prep.fingerprint(cfg_of()) == prep.fingerprint(cfg_of("output.uri=elsewhere"))


def test_val_split_is_stable_and_close_to_fraction():
    ids = [stable_id(str(i)) for i in range(20000)]
    val = [i for i in ids if prep.in_val_split(i, 0.1)]
    assert 0.09 < len(val) / len(ids) < 0.11
    assert val == [i for i in ids if prep.in_val_split(i, 0.1)]
    assert not any(prep.in_val_split(i, 0.0) for i in ids)


# ------------------------------------------------------------------ sources, inline


def test_manifest_source_bad_rows_duplicates_captions(tmp_path):
    good, bad = write_folder(tmp_path / "img")
    rows = [(f"img/{rel}", f"a photo of {rel}", rel.split("/")[0]) for rel in good]
    rows += [(f"img/{rel}", "bad", "cats") for rel in bad]
    rows += [(f"img/{next(iter(good))}", "again", "cats"), ("img/missing.jpg", "x", "dogs")]
    lines = ["path,caption,label"] + [",".join(r) for r in rows]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    man = pdata.run(
        cfg_of(
            "executor=inline",
            "source.kind=manifest",
            f"source.uri={tmp_path}/captions.csv",
            f"output.uri={out}",
            *BAD_SETTINGS,
        )
    )
    table = read_rows(out)
    got = {r["source"]: r for r in table.to_pylist()}
    assert set(got) == {f"img/{rel}" for rel in good}
    for rel, data in good.items():
        r = got[f"img/{rel}"]
        assert r["caption"] == f"a photo of {rel}"
        assert r["label"] == (0 if rel.startswith("cats") else 1)  # string labels -> sorted ids
        np.testing.assert_array_equal(decode_rgb(r["image"]), prepare_bytes(data, RES))
    rejects = read_rejects(out)
    expected = {f"img/{rel}": reason for rel, reason in bad.items()}
    expected["img/missing.jpg"] = "unreadable"
    dup_key = f"img/{next(iter(good))}"
    assert rejects.pop(dup_key) == "duplicate_id"  # the second listing; the first is kept
    assert rejects == expected
    assert man["class_names"] == ["cats", "dogs"]
    assert man["rejected_by_reason"]["duplicate_id"] == 1
    assert man["rejected_by_reason"]["unreadable"] == 2


def test_jsonl_manifest_and_jpeg_output(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(_enc(Image.fromarray(_noise(64, 64, 9)), "PNG"))
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(img), "caption": "noise"}) + "\n")
    out = str(tmp_path / "out")
    pdata.run(
        cfg_of(
            "executor=inline",
            "source.kind=manifest",
            f"source.uri={tmp_path}/m.jsonl",
            f"output.uri={out}",
            "image.format=jpeg",
        )
    )
    (row,) = read_rows(out).to_pylist()
    assert row["image"][:2] == b"\xff\xd8" and row["caption"] == "noise" and row["label"] is None


def test_parquet_source_with_hf_image_structs(tmp_path):
    imgs = [_enc(Image.fromarray(_noise(40, 40, s)), "PNG") for s in range(5)]
    cells = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(imgs)] + [
        None,
        {"bytes": b"junk", "path": "x"},
    ]
    table = pa.table(
        {
            "image": cells,
            "label": [0, 1, 1, 0, 1, 0, 1],
            "text": [f"t{i}" for i in range(7)],
        }
    )
    hf = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["neg", "pos"]}}}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()})
    (tmp_path / "src").mkdir()
    pq.write_table(table, tmp_path / "src" / "train-0.parquet", row_group_size=3)
    out = str(tmp_path / "out")
    man = pdata.run(
        cfg_of(
            "executor=inline",
            "source.kind=parquet",
            f"source.uri={tmp_path}/src",
            "source.caption_column=text",
            f"output.uri={out}",
        )
    )
    rows = sorted(read_rows(out).to_pylist(), key=lambda r: r["source"])
    assert [r["source"] for r in rows] == [f"train-0.parquet#{i}" for i in range(5)]
    assert [r["label"] for r in rows] == [0, 1, 1, 0, 1]
    assert [r["caption"] for r in rows] == [f"t{i}" for i in range(5)]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(decode_rgb(r["image"]), prepare_bytes(imgs[i], RES))
    assert man["class_names"] == ["neg", "pos"]
    assert read_rejects(out) == {
        "train-0.parquet#5": "no_image",
        "train-0.parquet#6": "not_an_image",
    }


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_webdataset_source(tmp_path):
    a, b, c = (_enc(Image.fromarray(_noise(50, 50, s)), "JPEG") for s in (10, 11, 12))
    (tmp_path / "wds").mkdir()
    _tar(
        tmp_path / "wds" / "shard-000.tar",
        {
            "s/000.jpg": a,
            "s/000.txt": b"a red thing",
            "s/000.cls": b"3",
            "s/001.png": _enc(Image.open(io.BytesIO(b)), "PNG"),
            "s/001.json": json.dumps({"caption": "json cap", "label": 1}).encode(),
            "s/002.txt": b"caption without image",
        },
    )
    _tar(tmp_path / "wds" / "shard-001.tar", {"s/003.jpg": c, "s/000.jpg": c})  # s/000 again
    out = str(tmp_path / "out")
    pdata.run(
        cfg_of(
            "executor=inline",
            "source.kind=webdataset",
            f"source.uri={tmp_path}/wds",
            f"output.uri={out}",
        )
    )
    rows = {r["source"]: r for r in read_rows(out).to_pylist()}
    assert set(rows) == {"s/000", "s/001", "s/003"}
    assert (rows["s/000"]["caption"], rows["s/000"]["label"]) == ("a red thing", 3)
    assert (rows["s/001"]["caption"], rows["s/001"]["label"]) == ("json cap", 1)
    np.testing.assert_array_equal(
        decode_rgb(rows["s/000"]["image"]), prepare_bytes(a, RES)
    )  # first wins
    np.testing.assert_array_equal(decode_rgb(rows["s/003"]["image"]), prepare_bytes(c, RES))
    assert read_rejects(out) == {"s/002": "no_image", "s/000": "duplicate_id"}


# ------------------------------------------------------------------ built-in datasets


def test_fashion_mnist_reader_counts_and_names(tmp_path):
    x, y = builtin_datasets.load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10
    xt, yt = builtin_datasets.load_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and np.bincount(yt).tolist() == [1000] * 10
    assert builtin_datasets.FASHION_MNIST_CLASSES[9] == "Ankle boot"
    # A given folder with un-gzipped files reads the same.
    import gzip

    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = Path(builtin_datasets.FASHION_MNIST_DIR) / f"{name}.gz"
        (tmp_path / name).write_bytes(gzip.decompress(src.read_bytes()))
    x2, y2 = builtin_datasets.load_fashion_mnist("test", str(tmp_path))
    np.testing.assert_array_equal(x2, xt)
    np.testing.assert_array_equal(y2, yt)
    with pytest.raises(FileNotFoundError, match="train-images"):
        builtin_datasets.load_fashion_mnist("train", str(tmp_path))


def test_emoji_enumeration_and_rendering():
    cps = builtin_datasets.emoji_codepoints()
    assert len(cps) > 1000 and len(set(cps)) == len(cps)
    assert 0x1F600 in cps and 0x200D not in cps and ord("1") not in cps
    assert builtin_datasets.emoji_caption(0x1F600) == "grinning face"
    rgba = builtin_datasets.render_emoji(0x1F600)
    assert rgba.shape[2] == 4 and rgba[..., 3].max() == 255
    rgb = prepare_array(rgba, 64)
    centre = rgb[24:40, 24:40].reshape(-1, 3).mean(0)
    assert centre[0] > 150 and centre[2] < 120  # a yellow face, not white paper
    assert (rgb[0, 0] == 255).all()  # transparent corner -> white


# ------------------------------------------------------------------ idempotence (inline)


def test_rerun_skips_and_cleans_stale_files(tmp_path):
    out = tmp_path / "out"
    args = [
        "executor=inline",
        "source.kind=fashion-mnist",
        "source.split=test",
        "source.limit=300",
        "output.shard_rows=100",
        f"output.uri={out}",
    ]
    first = pdata.run(cfg_of(*args))
    ids = read_rows(str(out)).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 300 and first["run"]["shards_processed"] == 3
    files = sorted(p.name for p in out.rglob("*.parquet"))

    second = pdata.run(cfg_of(*args))
    assert second["run"]["shards_skipped"] == 3 and second["run"]["shards_processed"] == 0
    assert sorted(p.name for p in out.rglob("*.parquet")) == files

    # A run killed mid-way leaves: a shard without marker, temp files, files of other settings.
    markers = sorted((out / "_shards").iterdir())
    markers[1].unlink()
    (out / "part-00007-deadbeef0000-0.parquet").write_bytes(b"stale")
    (out / "part-00000-deadbeef0000-0.parquet.tmp-123").write_bytes(b"partial")
    (out / "notes.txt").write_text("the user's own file stays")
    (out / "_manifest.json").unlink()
    third = pdata.run(cfg_of(*args))
    assert third["run"]["shards_processed"] == 1 and third["run"]["stale_files_removed"] == 2
    assert sorted(p.name for p in out.rglob("*.parquet")) == files
    assert (out / "notes.txt").exists() and not list(out.rglob("*.tmp-*"))
    assert sorted(read_rows(str(out)).column("id").to_pylist()) == sorted(ids)

    # Other settings into the same output: refused unless overwrite=true.
    with pytest.raises(prep.PrepareError, match="other settings"):
        pdata.run(cfg_of(*args, "image.resolution=16"))
    pdata.run(cfg_of(*args, "image.resolution=16", "output.overwrite=true"))
    rows = read_rows(str(out))
    assert rows.num_rows == 300 and set(rows.column("height").to_pylist()) == {16}


# ------------------------------------------------------------------ CLI and exit codes


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli_help_and_exit_codes(tmp_path):
    # In-process main() for speed; one real subprocess for --help proves the script entry works.
    r = _cli("--help")
    assert r.returncode == 0 and "source.kind" in r.stdout and "output.val_fraction" in r.stdout
    assert pdata.main(["source.kind=nope"]) == 2
    assert pdata.main(["no_such_option=1"]) == 2
    (tmp_path / "afile").write_text("x")
    assert (
        pdata.main(["executor=inline", "source.kind=emoji", f"output.uri={tmp_path}/afile/out"])
        == 2
    )
    # Nothing usable -> 1, rejects written, no manifest.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    assert (
        pdata.main(
            [
                "executor=inline",
                "source.kind=folder",
                f"source.uri={tmp_path}/bad",
                f"output.uri={out}",
            ]
        )
        == 1
    )
    assert read_rejects(str(out)) == {"x.jpg": "not_an_image"}
    assert not (out / "_manifest.json").exists()
    assert (
        pdata.main(
            [
                "executor=inline",
                "source.kind=folder",
                f"source.uri={tmp_path}/none",
                f"output.uri={out}",
            ]
        )
        == 1
    )


# ------------------------------------------------------------------ end to end on Ray + S3


@pytest.mark.slow
def test_folder_to_s3_with_bad_inputs_and_rerun(tmp_path, ray_cluster, s3_bucket):
    good, bad = write_folder(tmp_path / "src")
    out = f"{s3_bucket}/prepared/run1"
    args = [
        "source.kind=folder",
        f"source.uri={tmp_path}/src",
        f"output.uri={out}",
        "output.shard_rows=5",
        *BAD_SETTINGS,
    ]
    man = pdata.run(cfg_of(*args))
    shards = -(-(len(good) + len(bad)) // 5)  # every input, good or bad, is in a shard
    assert shards == 4 and man["run"]["shards_processed"] == shards
    check_folder_output(out, good, bad)
    files = storage.list_files(out)
    man2 = pdata.run(cfg_of(*args))
    assert man2["run"]["shards_skipped"] == shards and man2["run"]["shards_processed"] == 0
    assert storage.list_files(out) == files
    check_folder_output(out, good, bad)


@pytest.mark.slow
def test_s3_sources_split_and_builtins(tmp_path, ray_cluster, s3_bucket):
    # fashion-mnist idx files and an image folder, both read from S3.
    fm = f"{s3_bucket}/raw/fashion-mnist"
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        storage.write_bytes_atomic(
            f"{fm}/{name}", (Path(builtin_datasets.FASHION_MNIST_DIR) / name).read_bytes()
        )
    out = tmp_path / "fm"
    man = pdata.run(
        cfg_of(
            "source.kind=fashion-mnist",
            f"source.uri={fm}",
            "source.split=test",
            "source.limit=1500",
            "output.shard_rows=500",
            "output.val_fraction=0.2",
            f"output.uri={out}",
        )
    )
    assert man["rows"] == 1500 and man["class_names"] == list(
        builtin_datasets.FASHION_MNIST_CLASSES
    )
    train, val = read_rows(str(out / "train")), read_rows(str(out / "val"))
    assert train.num_rows + val.num_rows == 1500 and 200 < val.num_rows < 400
    assert all(prep.in_val_split(i, 0.2) for i in val.column("id").to_pylist())
    assert man["splits"]["val"]["rows"] == val.num_rows
    xt, yt = builtin_datasets.load_fashion_mnist("test")
    for r in train.slice(0, 20).to_pylist():
        idx = int(r["source"].rsplit("/", 1)[1])
        assert r["label"] == int(yt[idx])
        np.testing.assert_array_equal(decode_rgb(r["image"]), prepare_array(xt[idx], RES))

    good = _good_images()
    for rel, data in good.items():
        storage.write_bytes_atomic(f"{s3_bucket}/raw/folder/{rel}", data)
    out2 = tmp_path / "folder"
    man = pdata.run(
        cfg_of("source.kind=folder", f"source.uri={s3_bucket}/raw/folder", f"output.uri={out2}")
    )
    rows = {r["source"]: r for r in read_rows(str(out2)).to_pylist()}
    assert set(rows) == set(good) and man["class_names"] == ["cats", "dogs"]
    for rel, data in good.items():
        np.testing.assert_array_equal(decode_rgb(rows[rel]["image"]), prepare_bytes(data, RES))

    out3 = f"{s3_bucket}/emoji"
    man = pdata.run(cfg_of("source.kind=emoji", f"output.uri={out3}", "output.shard_rows=400"))
    n = len(builtin_datasets.emoji_codepoints())
    assert man["rows"] == n and man["rejected"] == 0 and man["run"]["shards"] == -(-n // 400)
    caps = dict(
        zip(*[read_rows(out3).column(c).to_pylist() for c in ("source", "caption")], strict=True)
    )
    assert caps["emoji/U+1F600"] == "grinning face" and len(caps) == n


@pytest.mark.slow
def test_kill_and_rerun_ends_with_exact_ids(tmp_path, ray_cluster):
    out = tmp_path / "out"
    args = [
        "source.kind=fashion-mnist",
        "source.limit=4000",
        "output.shard_rows=100",
        "image.resolution=64",
        f"output.uri={out}",
        "progress_s=1",
    ]
    env = {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "prepare_data.py"), *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "_shards").is_dir() and len(list((out / "_shards").glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, mid-run
    proc.wait()
    done_before = len(list((out / "_shards").glob("*.json")))
    assert not (out / "_manifest.json").exists() and 2 <= done_before < 40
    time.sleep(2)  # let Ray reap the dead job's tasks before re-running

    cfg = cfg_of(*args)
    man = pdata.run(cfg)
    expected = {it["id"] for it in prep.plan_source(cfg.source).items}
    ids = read_rows(str(out)).column("id").to_pylist()
    assert len(ids) == len(expected) == 4000 and set(ids) == expected
    assert man["rows"] == 4000 and man["run"]["shards_skipped"] >= done_before
    assert len(list((out / "_shards").glob("*.json"))) == 40


def test_vae_latent_column_with_a_tiny_vae(tmp_path):
    """The optional vae_latent column, with a tiny random AutoencoderKL saved like a hub model."""
    from diffusers import AutoencoderKL

    from reptok_core.models.latent_space import SDVAESpace

    tiny = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=16)  # fmt: skip
    AutoencoderKL(**tiny).save_pretrained(tmp_path / "vae")
    out = tmp_path / "out"
    args = ["executor=inline", "source.kind=fashion-mnist", "source.split=test", "source.limit=6"]
    man = pdata.run(
        cfg_of(
            *args,
            "image.resolution=16",
            "vae.enabled=true",
            f"vae.model={tmp_path / 'vae'}",
            f"output.uri={out}",
        )
    )
    rows = read_rows(str(out))
    assert man["vae_latent"]["shape"] == [4, 8, 8]
    assert rows.schema.field("vae_latent").type == pa.list_(pa.float32(), 256)
    space = SDVAESpace.from_pretrained(str(tmp_path / "vae"), sample=False)
    r = rows.slice(0, 1).to_pylist()[0]
    x = decode_rgb(r["image"])[None]
    expected = prep.encode_vae_latents(x, space).ravel()
    np.testing.assert_allclose(np.asarray(r["vae_latent"]), expected, rtol=1e-4, atol=1e-5)
