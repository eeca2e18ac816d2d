"""Bad training data: every case exits 2 with one line naming the file and sample, before any model is
built and with nothing written (table-driven cases through the stage CLI, hypothesis properties on the
loaders)."""

import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm_kd.cli import main
from mllm_kd.config import DataConfig
from mllm_kd.data.datasets import WdsDataset, count_wds_samples
from mllm_kd.data.encoding import ImageProcessor
from mllm_kd.data.records import load_llava_json
from mllm_kd.errors import DataError

# mllm_kd silences PIL's warning (its own error names the image); pytest resets filters per test
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]
GOOD = {"id": "good", "image": "ok.png", "conversations": CONV}


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB pixels and holds none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture
def images(tmp_path, smoke_data) -> Path:
    folder = tmp_path / "img"
    folder.mkdir()
    ok = next((smoke_data / "data" / "images").glob("*.png"))
    shutil.copy(ok, folder / "ok.png")
    (folder / "text.png").write_text("this is a caption, not a picture")
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))  # 900 M pixels: over PIL's hard limit
    (folder / "big.png").write_bytes(png_header(10000, 10000))  # 100 M pixels: over MAX_IMAGE_PIXELS
    (folder / "cut.png").write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    (folder / "dir.png").mkdir()
    return folder


def _sample(**fields):
    return json.dumps([GOOD, {"id": "bad-1", **fields}]).encode()


# (name, the data file's bytes, what the one error line must say besides the file's path)
DATA_CASES = [
    ("torn-json", b'[{"id": "a", "conversations": [', ["not valid JSON"]),
    ("zero-byte-file", b"", ["not valid JSON"]),
    ("not-utf8", b'[{"id": "\xff\xfe"}]', ["not UTF-8"]),
    ("object-not-list", json.dumps(GOOD).encode(), ["must hold a JSON list"]),
    ("empty-list", b"[]", ["holds no samples"]),
    ("sample-not-object", json.dumps([GOOD, 7]).encode(), ["sample #1", "JSON object"]),
    ("conversations-string", _sample(conversations="hi"), ["sample #1", "'bad-1'", "conversations"]),
    ("empty-conversations", _sample(conversations=[]), ["'bad-1'", "conversations"]),
    ("no-conversations", _sample(image="ok.png"), ["'bad-1'", "conversations"]),
    ("value-int", _sample(conversations=[{"from": "human", "value": 3}, CONV[1]]), ["'bad-1'", "turn 0"]),
    ("unknown-role", _sample(conversations=[{"from": "bot", "value": "x"}, CONV[1]]), ["'bad-1'", "turn 0"]),
    ("turn-not-object", _sample(conversations=["hi", CONV[1]]), ["'bad-1'", "turn 0"]),
    (
        "human-last",
        _sample(conversations=[*CONV, {"from": "human", "value": "?"}]),
        ["'bad-1'", "human turn"],
    ),
    ("image-int", _sample(image=5, conversations=CONV), ["'bad-1'", "'image' must be a path"]),
    ("image-list-int", _sample(image=["ok.png", 2], conversations=CONV), ["'bad-1'", "'image'"]),
    ("placeholders", _sample(image=["ok.png", "ok.png"], conversations=CONV), ["'bad-1'", "placeholders"]),
    ("image-missing", _sample(image="gone.png", conversations=CONV), ["'bad-1'", "gone.png does not exist"]),
    ("image-is-dir", _sample(image="dir.png", conversations=CONV), ["'bad-1'", "dir.png does not exist"]),
    ("not-an-image", _sample(image="text.png", conversations=CONV), ["'bad-1'", "text.png is corrupt"]),
    ("zero-byte-image", _sample(image="empty.png", conversations=CONV), ["'bad-1'", "empty (0 bytes)"]),
    ("decompression-bomb", _sample(image="bomb.png", conversations=CONV), ["'bad-1'", "bomb.png"]),
    (
        "huge-image",
        _sample(image="big.png", conversations=CONV),
        ["'bad-1'", "10000x10000", "MAX_IMAGE_PIXELS"],
    ),
    ("truncated-png", _sample(image="cut.png", conversations=CONV), ["'bad-1'", "cut.png is corrupt"]),
]


@pytest.mark.parametrize("content, expected", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_exits_2_naming_file_and_sample(capsys, tmp_path, smoke_data, images, content, expected):
    data = tmp_path / "train.json"
    data.write_bytes(content)
    run = tmp_path / "run"
    argv = ["--config", str(SMOKE), f"run_dir={run}", f"data_dir={smoke_data}/data"]
    argv += [f"data.path={data}", f"data.image_folder={images}"]
    code = main(["teacher_pt"], "test", "test", argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert str(data) in lines[0]
    for text in expected:
        assert text in lines[0]
    assert not run.exists(), "a refused stage wrote into its run directory"


# ------------------------------------------------------------------------------------------ WebDataset
def _shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, entries in samples.items():
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_that_are_not_tar_files_are_named(tmp_path):
    for name, content in (("empty.tar", b""), ("text.tar", b"not a tar archive at all" * 40)):
        shard = tmp_path / name
        shard.write_bytes(content)
        with pytest.raises(DataError, match=f"shard {shard} is not a readable tar file"):
            count_wds_samples(str(shard))


@pytest.mark.parametrize(
    "entries, expected",
    [
        ({"json": b"[1, 2]"}, "must be a JSON object"),
        ({"json": b"\xff\xfe{}"}, "no valid 'json' entry"),
        ({"json": b'{"id": '}, "no valid 'json' entry"),
        ({"png": b"\x89PNG"}, "no valid 'json' entry"),
        ({"json": json.dumps({"conversations": CONV}).encode(), "png": b""}, "empty (0 bytes)"),
        (
            {"json": json.dumps({"conversations": CONV}).encode(), "png": png_header(30000, 30000)},
            "cannot read",
        ),
        ({"json": json.dumps({"conversations": CONV}).encode(), "png": b"GIF89a"}, "cannot read image"),
    ],
    ids=["json-list", "json-not-utf8", "json-torn", "no-json", "empty-image", "bomb", "not-an-image"],
)
def test_webdataset_bad_samples_name_shard_and_key(tmp_path, entries, expected):
    shard = _shard(tmp_path / "s-0.tar", {"bad-7": entries})
    cfg = DataConfig(format="wds", path=str(shard), on_error="raise")
    ds = WdsDataset(cfg, encoder=None, images=ImageProcessor(32, [0.5] * 3, [0.5] * 3))
    with pytest.raises(DataError) as err:
        next(iter(ds))
    assert str(shard) in str(err.value) and "'bad-7'" in str(err.value) and expected in str(err.value)


def test_image_processor_refuses_bombs_and_empty_bytes():
    images = ImageProcessor(32, [0.5] * 3, [0.5] * 3)
    for data, expected in ((b"", "empty"), (png_header(10000, 10000), "MAX_IMAGE_PIXELS")):
        with pytest.raises(DataError, match=expected):
            images.load(data, "question 3")


# ------------------------------------------------------------------------------------------ properties
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
TURN = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {
            "from": st.sampled_from(["human", "gpt", "system"]) | JSON,
            "value": st.sampled_from(["<image>\nq", "a", "<image>", ""]) | JSON,
        }
    ),
)
RECORD = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"id": JSON, "conversations": st.lists(TURN, max_size=4) | JSON},
        optional={
            "image": st.sampled_from(["ok.png", "text.png", "empty.png", "big.png", "gone.png", "dir.png"])
            | st.lists(st.sampled_from(["ok.png", "cut.png"]), max_size=2)
            | JSON
        },
    ),
)


@FAST
@given(records=st.lists(RECORD, max_size=4) | JSON)
def test_property_any_json_data_file_is_loaded_or_named(tmp_path, images, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    try:
        loaded = load_llava_json(DataConfig(path=str(path), image_folder=str(images)))
    except DataError as e:
        assert str(path) in str(e)
        return
    assert loaded == records and isinstance(records, list) and records


@FAST
@given(content=st.binary(max_size=64))
def test_property_any_bytes_as_a_data_file_are_loaded_or_named(tmp_path, content):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    try:
        load_llava_json(DataConfig(path=str(path)))
    except DataError as e:
        assert str(path) in str(e)


@FAST
@given(content=st.binary(max_size=256))
def test_property_any_bytes_as_an_image_decode_or_are_named(content):
    images = ImageProcessor(8, [0.5] * 3, [0.5] * 3)
    try:
        x = images.load(content, "sample 'p'")
    except DataError as e:
        assert "sample 'p'" in str(e)
        return
    assert x.shape == (3, 8, 8)
