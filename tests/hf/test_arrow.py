"""hf_arrow.py: what the adapters rely on in `datasets` (batch kinds, writing Arrow arrays into a
LazyBatch, push_to_hub's helpers) and the Arrow conversions, without a model. A `datasets`
upgrade that breaks one of these internals fails here first."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from datasets import (
    Dataset,
    DatasetDict,
    DatasetInfo,
    Features,
    Image,
    List,
    SplitDict,
    SplitInfo,
    Value,
)
from PIL import Image as PILImage

from vqgan_datasets.hf import arrow as hf_arrow


def _png(color: int = 0) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (4, 4), (color, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> Dataset:
    return Dataset.from_dict(
        {"image": [{"bytes": _png(i), "path": None} for i in range(3)], "id": ["a", "b", "c"]},
        features=Features({"image": Image(), "id": Value("string")}),
    )


def _kinds_seen(dataset, **map_kwargs) -> set[str]:
    seen: set[str] = set()

    def look(batch):
        seen.add(hf_arrow.batch_kind(batch))
        return {}

    out = dataset.map(look, batched=True, **map_kwargs)
    if not hasattr(out, "cache_files"):  # a stream maps lazily
        list(out)
    return seen


def test_batch_kinds_of_each_map(images):
    assert _kinds_seen(images) == {"lazy"}
    assert _kinds_seen(images.with_format("arrow")) == {"table"}
    assert _kinds_seen(images.with_format("numpy")) == {"dict"}
    assert _kinds_seen(images.to_iterable_dataset()) == {"dict"}
    assert _kinds_seen(images, input_columns=["image"]) == {"column"}
    with pytest.raises(TypeError, match="batched=True"):
        images.map(lambda row: hf_arrow.batch_kind(row) and {})


def test_lazy_batch_reads_arrow_and_takes_arrow_arrays(images):
    """The one-liner's mechanics: the image column read undecoded from the batch's table, then
    deleted, and a fixed_size_list stored in the batch keeps its type in the output."""
    seen = []

    def tokenize(batch):
        table = hf_arrow.arrow_table(batch, "lazy")
        seen.extend(hf_arrow.arrow_images(table["image"]))
        assert hf_arrow.column_names(batch, "lazy") == ["image", "id"]
        codes = np.arange(len(table) * 4, dtype=np.uint16).reshape(-1, 4)
        hf_arrow.set_lazy_columns(batch, drop=["image"],
                                  columns={"tokens": hf_arrow.fixed_size_list(codes)})
        return {}

    out = images.map(tokenize, batched=True)
    assert [s["bytes"] for s in seen] == [_png(i) for i in range(3)]
    assert out.column_names == ["id", "tokens"]
    assert out.data.schema.field("tokens").type == pa.list_(pa.uint16(), 4)
    assert out.features["tokens"] == List(Value("uint16"), length=4)


def test_check_batched_refuses_single_rows():
    for row in ("a.jpg", b"bytes", {"bytes": b"", "path": None}, PILImage.new("RGB", (1, 1))):
        with pytest.raises(TypeError, match="batched=True"):
            hf_arrow.check_batched(row, "image")
    with pytest.raises(TypeError, match="column 'tokens' holds one row"):
        hf_arrow.check_batched([1, 2, 3], "tokens", row_is_list=True)
    hf_arrow.check_batched([[1, 2, 3]], "tokens", row_is_list=True)
    hf_arrow.check_batched(["a.jpg"], "image")


def test_arrow_images_of_each_storage():
    struct = pa.array([{"bytes": b"x", "path": None}, None])
    assert hf_arrow.arrow_images(struct) == [{"bytes": b"x", "path": None}, None]
    assert hf_arrow.arrow_images(pa.array([b"x"], pa.binary())) == [b"x"]
    assert hf_arrow.arrow_images(pa.array(["a.png"])) == ["a.png"]
    nested = pa.list_(pa.list_(pa.list_(pa.uint8())))
    pixels = hf_arrow.arrow_images(pa.array([[[[1, 2, 3]]], None], nested))
    assert pixels[0].dtype == np.uint8 and pixels[0].shape == (1, 1, 3) and pixels[1] is None


def test_inputs_paths_and_keys():
    class Tensor:
        def numpy(self):
            return np.zeros(2)

        def __array__(self, dtype=None, copy=None):
            return self.numpy()

    assert isinstance(hf_arrow.as_input(Tensor()), np.ndarray)
    assert hf_arrow.as_input(b"x") == b"x" and hf_arrow.as_input(None) is None
    assert hf_arrow.path_of({"bytes": None, "path": "/a.jpg"}) == "/a.jpg"
    assert hf_arrow.path_of("b.png") == "b.png" and hf_arrow.path_of(b"x") is None
    table = pa.table({"id": ["x", "y"], "__key__": ["k0", "k1"]})
    assert hf_arrow.key_values(table, lazy=True) == ("__key__", ["k0", "k1"])
    assert hf_arrow.key_values({"key": ["a"], "id": ["b"]}, lazy=False) == ("key", ["a"])
    assert hf_arrow.key_values({"label": [1]}, lazy=False) is None
    ok = np.array([True, False, True])
    assert hf_arrow.take([1, 2, 3], ok) == [1, 3]
    np.testing.assert_array_equal(hf_arrow.take(np.array([1, 2, 3]), ok), [1, 3])
    assert hf_arrow.take(pa.array([1, 2, 3]), ok).to_pylist() == [1, 3]


def test_tokens_to_arrow_and_back():
    codes = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.uint16)
    column = hf_arrow.fixed_size_list(codes, pa.array([False, True, False]))
    assert column.type == pa.list_(pa.uint16(), 2) and column.to_pylist()[1] is None
    present, valid = hf_arrow.arrow_codes(pa.chunked_array([column]))
    np.testing.assert_array_equal(present, codes[[0, 2]])
    assert valid.tolist() == [True, False, True]
    present, valid = hf_arrow.arrow_codes(pa.array([[7, 8], None]))  # variable-length lists
    np.testing.assert_array_equal(present, [[7, 8]])
    with pytest.raises(ValueError, match="different lengths"):
        hf_arrow.arrow_codes(pa.array([[1, 2], [3]]))
    assert hf_arrow.arrow_codes(pa.array([None], pa.list_(pa.int32())))[0].shape == (0, 0)
    present, valid = hf_arrow.python_codes([[1, 2], None])
    np.testing.assert_array_equal(present, [[1, 2]])
    assert valid.tolist() == [True, False]
    assert hf_arrow.python_codes([None])[0].shape == (0, 0)


def test_image_array_is_image_storage():
    array = hf_arrow.image_array([PILImage.new("RGB", (2, 2)), None])
    assert array.type == Image().pa_type
    assert array[0].as_py()["bytes"].startswith(b"\x89PNG") and array[1].as_py() is None


def test_datasets_features_and_info(images):
    assert hf_arrow.features_of(images) == images.features
    both = DatasetDict(train=images, test=images)
    assert hf_arrow.features_of(both) == images.features
    assert hf_arrow.features_of(DatasetDict()) is None
    assert hf_arrow.is_unformatted_dataset(images) and hf_arrow.is_unformatted_dataset(both)
    assert not hf_arrow.is_unformatted_dataset(images.with_format("numpy"))
    assert not hf_arrow.is_unformatted_dataset(images.to_iterable_dataset())
    assert hf_arrow.is_map_style(both) and not hf_arrow.is_map_style(images.to_iterable_dataset())
    assert hf_arrow.decodes_images(Image()) and not hf_arrow.decodes_images(Image(decode=False))
    assert not hf_arrow.decodes_images(Value("string"))
    assert hf_arrow.infos(images) == [images.info]
    assert len(hf_arrow.infos(both)) == 2
    info = DatasetInfo()
    assert hf_arrow.infos(info) == [info]
    with pytest.raises(TypeError, match="expected a Dataset"):
        hf_arrow.infos(object())


def test_push_to_hub_helpers(images, tmp_path):
    assert hf_arrow.parse_size("500MB") == 500 * 10**6 and hf_arrow.parse_size(1000) == 1000
    assert hf_arrow.estimate_nbytes(images) > 0
    path = tmp_path / "a.png"
    path.write_bytes(_png(9))
    linked = Dataset.from_dict({"image": [str(path)]}, features=Features({"image": Image()}))
    embedded = hf_arrow.embed_storage(linked).with_format(None)
    assert embedded.data.column("image").to_pylist()[0]["bytes"] == _png(9)
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=1, num_examples=3))
    info = DatasetInfo(features=images.features, splits=splits)
    data = hf_arrow.card_data(info, ["train"]).to_dict()
    assert data["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert data["dataset_info"]["splits"][0]["name"] == "train"


def test_token_rows_give_lengths_and_values():
    lengths, flat = hf_arrow.token_rows(pa.array([[1, 2], None, [3]]), arrow=True)
    assert lengths.tolist() == [2, -1, 1] and flat.tolist() == [1, 2, 3]
    fixed = hf_arrow.fixed_size_list(np.array([[1, 2], [3, 4]], np.uint16), pa.array([True, False]))
    lengths, flat = hf_arrow.token_rows(pa.chunked_array([fixed]), arrow=True)
    assert lengths.tolist() == [-1, 2] and flat.tolist() == [3, 4]
    lengths, flat = hf_arrow.token_rows([[1, 2], None, np.array([[3, 4]])], arrow=False)
    assert lengths.tolist() == [2, -1, 2] and flat.tolist() == [1, 2, 3, 4]
    assert hf_arrow.token_rows([None], arrow=False)[1].size == 0


def test_write_parquet_is_to_parquet_plus_schema_metadata(images, tmp_path):
    import pyarrow.parquet as pq

    ours, theirs = tmp_path / "ours.parquet", tmp_path / "theirs.parquet"
    hf_arrow.write_parquet(images, ours, {"vqgan_datasets": '{"columns": {}}'})
    images.to_parquet(str(theirs))
    assert pq.read_table(ours).equals(pq.read_table(theirs))
    assert pq.read_schema(ours).metadata[b"vqgan_datasets"] == b'{"columns": {}}'
    assert pq.read_schema(ours).metadata[b"huggingface"] == pq.read_schema(theirs).metadata[b"huggingface"]
    hf_arrow.write_parquet(images.select([]), tmp_path / "empty.parquet", {})
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0


def test_stream_files_finds_the_parquet_behind_a_stream(images, tmp_path):
    from datasets import load_dataset

    images.to_parquet(str(tmp_path / "a.parquet"))
    stream = load_dataset("parquet", data_files=str(tmp_path / "*.parquet"), split="train",
                          streaming=True)
    assert hf_arrow.stream_files(stream) == [str(tmp_path / "a.parquet")]
    assert hf_arrow.stream_files(stream.map(lambda r: r).shuffle(seed=0)) == [str(tmp_path / "a.parquet")]
    assert hf_arrow.stream_files(images.to_iterable_dataset()) == []
    assert hf_arrow.stream_files(images) == []


def test_torch_chw_and_decoded_files():
    torch = pytest.importorskip("torch")
    chw = torch.zeros((3, 5, 7), dtype=torch.uint8)
    assert hf_arrow.as_input(chw).shape == (5, 7, 3)
    assert hf_arrow.as_input(torch.zeros((3, 5, 3))).shape == (3, 5, 3)  # HWC already: kept
    assert hf_arrow.is_decoded_file(PILImage.open(io.BytesIO(_png())))
    assert not hf_arrow.is_decoded_file(PILImage.new("RGB", (1, 1)))
    assert not hf_arrow.is_decoded_file(b"bytes")


def test_arrow_images_read_nested_lists_with_the_columns_own_dtype():
    pixels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    uint8 = Dataset.from_dict({"image": [pixels, None]}).data.table["image"]
    out = hf_arrow.arrow_images(uint8)
    assert out[0].dtype == np.uint8 and np.array_equal(out[0], pixels) and out[1] is None
    floats = Dataset.from_dict({"image": [(pixels / 255).tolist()]}).data.table["image"]
    assert hf_arrow.arrow_images(floats)[0].dtype == np.float64
    ragged = [[[0.5]], [[0.5], [0.5]]]
    table = pa.table({"image": pa.array([ragged], pa.list_(pa.list_(pa.list_(pa.float64()))))})
    assert hf_arrow.arrow_images(table["image"]) == [ragged]  # left for load_image to name
    ints = Dataset.from_dict({"image": [[[[300, 0, 0]]]]}).data.table["image"]  # int64 leaves
    assert hf_arrow.arrow_images(ints) == [[[[300, 0, 0]]]]  # never wrapped into uint8


def test_an_empty_split_saves_and_loads(tmp_path):
    features = Features({"image": Image(), "n": Value("int32")})
    empty = Dataset.from_dict({"image": [], "n": []}, features=features)
    empty.save_to_disk(str(tmp_path / "theirs"))  # datasets writes no data file for 0 rows
    assert not list((tmp_path / "theirs").glob("*.arrow"))
    loaded = hf_arrow.load_from_disk(tmp_path / "theirs")
    assert len(loaded) == 0 and loaded.features == features
    hf_arrow.save_to_disk(DatasetDict({"a": empty, "b": empty}), tmp_path / "ours")
    both = hf_arrow.load_from_disk(tmp_path / "ours")
    assert set(both) == {"a", "b"} and both["b"].features == features
    from datasets import load_from_disk

    assert len(load_from_disk(str(tmp_path / "ours"))["a"]) == 0  # datasets reads it too
    empty = hf_arrow.empty_split(Dataset.from_dict({"x": [1]}).select([]), features)
    assert len(empty) == 0 and empty.features == features
