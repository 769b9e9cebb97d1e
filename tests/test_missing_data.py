"""A stage pointed at data that is not there stops with an error naming the option, before it
starts Ray or opens an MLflow run: nothing is left half-made in run.storage."""

import importlib

import pytest

CASES = [
    ("train_tokenizer", ["--config", "configs/tokenizer/tiny.yaml"], "data.train", "prepare_data"),
    ("pretrain_encoder", ["--config", "configs/pretrain/tiny.yaml"], "data.train", "prepare_data"),
    ("train_generator", ["--config", "configs/generator/tiny.yaml"], "data.train", "encode_tokens"),
]


@pytest.mark.parametrize(("entry", "args", "option", "hint"), CASES, ids=[c[0] for c in CASES])
def test_a_missing_input_names_the_option_and_starts_nothing(tmp_path, entry, args, option, hint):
    main = importlib.import_module(f"pipelines.{entry}").main
    storage = tmp_path / "runs"
    argv = [*args, f"data.train={tmp_path / 'nothing'}", f"run.storage={storage}"]
    with pytest.raises(SystemExit, match=rf"error: {option}: .*nothing.*{hint}"):
        main(argv)
    assert _empty(storage)  # no MLflow store, no run folder (the folder itself may exist)


def _empty(folder) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_encode_checks_its_images_before_starting(tmp_path):
    from pipelines.encode_tokens import main

    storage = tmp_path / "runs"
    argv = [f"encode.images={tmp_path / 'nothing'}", f"encode.output={tmp_path / 'tok'}",
            "encode.tokenizer=builtin:none", f"run.storage={storage}"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"error: encode.images: .*nothing.*prepare_data"):
        main(argv)
    assert _empty(storage) and not (tmp_path / "tok").exists()
