"""ImageDataset and ShardDataset share one skip-the-bad-file loop (``load`` / ``load_checked``, the
training loader's path): an unlabelled view of a labelled shard folder gives label -1, as a folder
does (the corrupt-member case: ``tests/test_shards.py::test_corrupt_member_is_named_and_skipped``)."""

from __future__ import annotations

from pathlib import Path

from cellssl.config import DataConfig
from cellssl.data.datasets import ShardDataset, build_dataset
from cellssl.data.shards import write_shards
from conftest import make_image_folder


def _shards(tmp_path: Path) -> Path:
    src = make_image_folder(tmp_path / "src", n_per_class=4, size=8, classes=("a", "b"))
    write_shards(build_dataset(DataConfig(), src), tmp_path / "shards", 3)
    return tmp_path / "shards"


def test_unlabelled_shards_give_label_minus_one_like_a_folder(tmp_path: Path) -> None:
    shards = _shards(tmp_path)
    folder = build_dataset(DataConfig(), tmp_path / "src", labelled=False)
    ds = ShardDataset(shards, labelled=False)
    assert ds.load_checked(0)[1] == folder.load_checked(0)[1] == -1
    assert ds.load(0)[1] == -1
    assert ShardDataset(shards).load_checked(7)[1] == 1  # labelled: the stored class
