"""Training data: conversation encoding, collation, overflow, preflight validation, sampling and
WebDataset shards. Uses the generated synthetic data set (8 images, its own BPE tokenizer)."""

from __future__ import annotations

import copy
import io
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm_kd.config import DataConfig
from mllm_kd.data.datasets import (
    Collator,
    EpochSampler,
    LlavaJsonDataset,
    WdsDataset,
    approx_length,
    build_train_data,
    count_wds_samples,
    length_grouped_order,
)
from mllm_kd.data.encoding import ConversationEncoder, ImageProcessor, SampleSkipped
from mllm_kd.data.records import load_llava_json
from mllm_kd.data_prep.synthetic import make_synthetic
from mllm_kd.errors import ConfigError, DataError
from mllm_kd.losses import IGNORE_INDEX
from mllm_kd.model.tokenization import IMAGE_TOKEN, image_token_id, load_tokenizer

N_VIS = 4
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth"), n_images=8)


@pytest.fixture(scope="module")
def tok(synth):
    return load_tokenizer(synth / "tokenizer")


@pytest.fixture(scope="module")
def instruct(synth) -> list[dict]:
    return json.loads((synth / "instruct.json").read_text())


@pytest.fixture
def images() -> ImageProcessor:
    return ImageProcessor(size=32, mean=MEAN, std=STD)


def encoder(tok, template: str, n_vis: int = N_VIS, system_prompt: str | None = None) -> ConversationEncoder:
    return ConversationEncoder(tok, template, n_vis, image_token_id(tok), system_prompt)


def label_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of supervised positions; every supervised label must equal its input id."""
    spans: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            prev = False
            continue
        assert lab == i
        if not prev:
            spans.append([])
        spans[-1].append(lab)
        prev = True
    return spans


def image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of <image> ids."""
    runs: list[tuple[int, int]] = []
    for pos, i in enumerate(ids):
        if i != image_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pos, 1))
    return runs


MULTI_IMAGE = [
    {"from": "human", "value": f"Compare {IMAGE_TOKEN} with {IMAGE_TOKEN} please."},
    {"from": "gpt", "value": "The first is red."},
    {"from": "human", "value": "And the shape?"},
    {"from": "gpt", "value": "a circle"},
]


# ------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("system_prompt", [None, "Be brief.", ""])
def test_chat_template_labels(tok, instruct, system_prompt):
    enc = encoder(tok, "chat", system_prompt=system_prompt)
    assert enc.template == "chat"
    img = image_token_id(tok)
    for conv in (instruct[0]["conversations"], MULTI_IMAGE):
        ids, labels = enc(conv)
        assert len(ids) == len(labels)
        answers = [t["value"] for t in conv if t["from"] == "gpt"]
        spans = label_spans(ids, labels)
        assert [tok.decode(s) for s in spans] == [a + "<|im_end|>\n" for a in answers]
        # The whole sequence is the chat template's rendering with each <image> expanded.
        # "" is an empty system turn (it replaces a template's default system prompt); None is none
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        assert (tok.decode(ids).count("<|im_start|>system") == 1) == (system_prompt is not None)
        messages += [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv
        ]
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(ids) == rendered.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_VIS)
        n_placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
        runs = image_runs(ids, img)
        assert [n for _, n in runs] == [N_VIS] * n_placeholders
        for start, n in runs:
            assert labels[start : start + n] == [IGNORE_INDEX] * n


def test_plain_template_labels(tok, instruct):
    enc = encoder(tok, "plain")
    conv = instruct[0]["conversations"]
    ids, labels = enc(conv)
    eos = tok.eos_token
    expected = "".join(
        f"USER: {h['value']}\nASSISTANT: {g['value']}{eos}\n" for h, g in zip(conv[::2], conv[1::2])
    ).replace(IMAGE_TOKEN, IMAGE_TOKEN * N_VIS)
    assert tok.decode(ids) == expected
    assert [tok.decode(s) for s in label_spans(ids, labels)] == [t["value"] + eos for t in conv[1::2]]
    img = image_token_id(tok)
    assert ids.count(img) == N_VIS
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == img)

    with_system = encoder(tok, "plain", system_prompt="You see shapes.")
    ids_s, labels_s = with_system(conv)
    assert tok.decode(ids_s) == "You see shapes.\n\n" + expected
    assert [tok.decode(s) for s in label_spans(ids_s, labels_s)] == [t["value"] + eos for t in conv[1::2]]


def test_plain_template_multi_image(tok):
    ids, labels = encoder(tok, "plain", n_vis=3)(MULTI_IMAGE)
    runs = image_runs(ids, image_token_id(tok))
    assert [n for _, n in runs] == [3, 3]
    assert all(labels[s + k] == IGNORE_INDEX for s, n in runs for k in range(n))
    assert [tok.decode(s) for s in label_spans(ids, labels)] == [
        "The first is red.<|im_end|>",
        "a circle<|im_end|>",
    ]


def test_caption_template(tok, synth):
    rec = json.loads((synth / "captions.json").read_text())[0]
    conv = rec["conversations"]
    ids, labels = encoder(tok, "caption")(conv)
    caption = conv[1]["value"].strip() + tok.eos_token
    assert tok.decode(ids) == IMAGE_TOKEN * N_VIS + caption  # the instruction is dropped
    assert ids[:N_VIS] == [image_token_id(tok)] * N_VIS
    assert labels[:N_VIS] == [IGNORE_INDEX] * N_VIS
    assert [tok.decode(s) for s in label_spans(ids, labels)] == [caption]
    assert "Describe" not in tok.decode(ids)


def test_template_auto(tok):
    assert encoder(tok, "auto").template == "chat"
    plain_tok = copy.deepcopy(tok)
    plain_tok.chat_template = None
    enc = encoder(plain_tok, "auto")
    assert enc.template == "plain"
    ids, _ = enc(MULTI_IMAGE)
    assert tok.decode(ids).startswith("USER: Compare ")
    with pytest.raises(DataError, match="no chat template"):
        encoder(plain_tok, "chat")
    with pytest.raises(ConfigError, match=r"data\.template"):
        DataConfig(template="llava")


def test_image_processor_values(images):
    im = Image.new("RGB", (20, 12), (10, 128, 250))
    x = images(im)
    assert x.shape == (3, 32, 32)
    assert x.dtype == torch.float32
    for c, v in enumerate((10, 128, 250)):
        torch.testing.assert_close(x[c], torch.full((32, 32), (v / 255 - MEAN[c]) / STD[c]))
    gray = images(Image.new("L", (32, 32), 128))  # converted to RGB
    assert gray.shape == (3, 32, 32)


# ------------------------------------------------------------------------------------- collator
def json_data(synth: Path, **kw) -> DataConfig:
    return DataConfig(path=str(synth / "instruct.json"), image_folder=str(synth / "images"), **kw)


def test_collator_pads_right(tok, synth, instruct, images):
    data = build_train_data(json_data(synth), tok, N_VIS, image_token_id(tok), images)
    ds = data.dataset
    text_idx = next(i for i, r in enumerate(instruct) if "image" not in r)
    items = [ds[0], ds[text_idx], ds[1]]
    assert items[1]["pixel_values"] is None
    assert items[0]["pixel_values"].shape == (1, 3, 32, 32)
    lengths = [len(x["input_ids"]) for x in items]
    assert len(set(lengths)) > 1
    pad = tok.pad_token_id
    batch = Collator(pad_token_id=pad)(items)
    T = max(lengths)
    assert batch["skipped"] == 0
    assert batch["ids"] == [instruct[0]["id"], instruct[text_idx]["id"], instruct[1]["id"]]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for b, (x, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][b, :n], x["input_ids"])
        assert torch.equal(batch["labels"][b, :n], x["labels"])
        assert (batch["input_ids"][b, n:] == pad).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
    # Images in batch order, the text-only sample contributing none.
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert not torch.equal(items[0]["pixel_values"], items[2]["pixel_values"])
    assert int((batch["input_ids"] == image_token_id(tok)).sum()) == 2 * N_VIS

    text_only = Collator(pad)([ds[text_idx]])
    assert text_only["pixel_values"] is None


def test_collator_drops_skipped(caplog):
    item = {
        "id": "a",
        "input_ids": torch.tensor([5, 6]),
        "labels": torch.tensor([-100, 6]),
        "pixel_values": None,
    }
    with caplog.at_level(logging.WARNING, logger="mllm_kd.data"):
        batch = Collator(0)([SampleSkipped("sample 'b' is too long"), item])
    assert batch["skipped"] == 1
    assert batch["ids"] == ["a"]
    assert batch["input_ids"].tolist() == [[5, 6]]
    assert "sample 'b' is too long" in caplog.text
    empty = Collator(0)([SampleSkipped("x")])
    assert empty == {"skipped": 1, "ids": []}


# ------------------------------------------------------------------------------------- overflow
def test_overflow_skip_and_raise(tok, synth, instruct, images):
    img = image_token_id(tok)
    n_vis = 16
    full = build_train_data(json_data(synth), tok, n_vis, img, images).dataset[0]
    L = len(full["input_ids"])
    span = image_runs(full["input_ids"].tolist(), img)[0]

    # Exactly max_length fits, uncut.
    fits = build_train_data(json_data(synth, max_length=L), tok, n_vis, img, images).dataset[0]
    assert torch.equal(fits["input_ids"], full["input_ids"])

    sid = instruct[0]["id"]
    # One token too long, or a limit that would cut through the visual span: skipped, never truncated.
    for max_length in (L - 1, span[0] + n_vis // 2):
        ds = build_train_data(json_data(synth, max_length=max_length), tok, n_vis, img, images).dataset
        item = ds[0]
        assert isinstance(item, SampleSkipped)
        assert f"{sid!r}" in str(item)
        assert f"needs {L} tokens" in str(item)
        assert f"max_length={max_length}" in str(item)

    ds = build_train_data(json_data(synth, max_length=L - 1), tok, n_vis, img, images).dataset
    text_idx = next(i for i, r in enumerate(instruct) if "image" not in r)
    batch = Collator(tok.pad_token_id)([ds[0], ds[text_idx]])
    assert batch["skipped"] == 1
    assert batch["ids"] == [instruct[text_idx]["id"]]
    assert batch["pixel_values"] is None

    ds = build_train_data(
        json_data(synth, max_length=L - 1, on_overflow="raise"), tok, n_vis, img, images
    ).dataset
    with pytest.raises(DataError, match=re.escape(f"sample {sid!r} needs {L} tokens")):
        ds[0]
    assert not isinstance(ds[text_idx], SampleSkipped)


# ------------------------------------------------------------------------------------ preflight
GOOD_CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a circle"}]


@pytest.fixture
def data_dir(tmp_path, synth) -> Path:
    (tmp_path / "img").mkdir()
    shutil.copy(synth / "images" / "00000.png", tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"this is not a png at all \x00\x01\x02" * 10)
    return tmp_path


def write_json(data_dir: Path, records) -> Path:
    path = data_dir / "data.json"
    path.write_text(json.dumps(records))
    return path


def preflight(data_dir: Path, records, **kw):
    path = write_json(data_dir, records)
    return load_llava_json(DataConfig(path=str(path), image_folder=str(data_dir / "img"), **kw))


def test_preflight_accepts_good_records(data_dir):
    recs = [
        {"id": "good", "image": "ok.png", "conversations": GOOD_CONV},
        {
            "id": "two",
            "image": ["ok.png", "ok.png"],
            "conversations": [
                {"from": "human", "value": "<image> vs <image>"},
                {"from": "gpt", "value": "same"},
            ],
        },
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
    ]
    assert preflight(data_dir, recs) == recs
    assert preflight(data_dir, recs, max_samples=2) == recs[:2]


def test_preflight_missing_and_invalid_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=re.escape(f"data file {missing} does not exist")):
        load_llava_json(DataConfig(path=str(missing)))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", ')
    with pytest.raises(DataError, match=re.escape(f"data file {bad} is not valid JSON")):
        load_llava_json(DataConfig(path=str(bad)))
    bad.write_text('{"id": "a"}')
    with pytest.raises(DataError, match="must hold a JSON list"):
        load_llava_json(DataConfig(path=str(bad)))
    with pytest.raises(DataError, match=r"data\.path is not set"):
        load_llava_json(DataConfig())


@pytest.mark.parametrize(
    ("conversations", "image", "message"),
    [
        ([{"value": "<image> hi"}, {"from": "gpt", "value": "a"}], "ok.png", "turn 0 is malformed"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], None, "turn 0 is malformed"),
        (
            [{"from": [], "value": "<image> hi"}, {"from": "gpt", "value": "a"}],
            "ok.png",
            "turn 0 is malformed",
        ),
        (
            [{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image> hi"}],
            "ok.png",
            "turn 0 is from 'gpt'; turns must alternate",
        ),
        (
            [
                {"from": "human", "value": "<image>"},
                {"from": "human", "value": "b"},
                {"from": "gpt", "value": "c"},
            ],
            "ok.png",
            "turn 1 is from 'human'",
        ),
        (
            [
                {"from": "human", "value": "<image> a"},
                {"from": "gpt", "value": "b"},
                {"from": "human", "value": "c"},
            ],
            "ok.png",
            "ends with a human turn",
        ),
        ([], "ok.png", "has no 'conversations' list"),
        (
            [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "b"}],
            "ok.png",
            "has 2 <image> placeholders but 1 images",
        ),
        (
            [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "b"}],
            "ok.png",
            "has 0 <image> placeholders but 1 images",
        ),
        (
            [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "b"}],
            None,
            "has 1 <image> placeholders but 0 images",
        ),
        (
            [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "b <image>"}],
            ["ok.png", "ok.png"],
            "placeholder in an answer",
        ),
    ],
)
def test_preflight_malformed_conversation(data_dir, conversations, image, message):
    bad = {"id": "bad-7", "conversations": conversations}
    if image is not None:
        bad["image"] = image
    recs = [{"id": "good", "image": "ok.png", "conversations": GOOD_CONV}, bad]
    path = data_dir / "data.json"
    with pytest.raises(DataError) as err:
        preflight(data_dir, recs)
    msg = str(err.value)
    assert str(path) in msg
    assert "sample #1" in msg
    assert "'bad-7'" in msg
    assert message in msg


def test_preflight_non_object_record(data_dir):
    with pytest.raises(DataError, match=r"sample #0: a sample must be a JSON object, got list"):
        preflight(data_dir, [["not", "a", "dict"]])


def test_preflight_non_string_image_field(data_dir):
    bad = {"id": "bad-img", "image": 123, "conversations": GOOD_CONV}
    with pytest.raises(DataError, match="'bad-img'"):
        preflight(data_dir, [bad])


@pytest.mark.parametrize("verify_images", [True, False])
def test_preflight_missing_image(data_dir, verify_images):
    recs = [
        {"id": "good", "image": "ok.png", "conversations": GOOD_CONV},
        {"id": "lost", "image": "gone.png", "conversations": GOOD_CONV},
    ]
    with pytest.raises(DataError) as err:
        preflight(data_dir, recs, verify_images=verify_images)
    msg = str(err.value)
    assert str(data_dir / "data.json") in msg
    assert "'lost'" in msg
    assert f"image {data_dir / 'img' / 'gone.png'} does not exist" in msg


def test_preflight_corrupt_image(data_dir):
    recs = [
        {"id": "good", "image": "ok.png", "conversations": GOOD_CONV},
        {"id": "broken", "image": "bad.png", "conversations": GOOD_CONV},
    ]
    with pytest.raises(DataError) as err:
        preflight(data_dir, recs)
    msg = str(err.value)
    assert str(data_dir / "data.json") in msg
    assert "'broken'" in msg
    assert f"image {data_dir / 'img' / 'bad.png'} is corrupt" in msg
    # verify_images=False: existence only, so the corrupt file passes preflight.
    assert preflight(data_dir, recs, verify_images=False) == recs


def test_preflight_truncated_png(data_dir):
    data = (data_dir / "img" / "ok.png").read_bytes()
    (data_dir / "img" / "cut.png").write_bytes(data[: len(data) // 2])
    recs = [{"id": "cut", "image": "cut.png", "conversations": GOOD_CONV}]
    with pytest.raises(DataError, match=r"'cut'.*cut\.png is corrupt"):
        preflight(data_dir, recs)


def test_image_folder_defaults_to_json_dir(data_dir):
    shutil.copy(data_dir / "img" / "ok.png", data_dir / "here.png")
    path = write_json(data_dir, [{"id": "x", "image": "here.png", "conversations": GOOD_CONV}])
    assert len(load_llava_json(DataConfig(path=str(path)))) == 1


# ------------------------------------------------------------------------------------ on_error
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_corrupt_image_at_getitem(tok, data_dir, images, on_error):
    recs = [
        {"id": "good", "image": "ok.png", "conversations": GOOD_CONV},
        {"id": "later-bad", "image": "bad.png", "conversations": GOOD_CONV},
    ]
    path = write_json(data_dir, recs)
    cfg = DataConfig(
        path=str(path), image_folder=str(data_dir / "img"), verify_images=False, on_error=on_error
    )
    data = build_train_data(cfg, tok, N_VIS, image_token_id(tok), images)
    ds = data.dataset
    assert isinstance(ds, LlavaJsonDataset)
    assert data.num_samples == 2
    good = ds[0]
    assert good["id"] == "good"
    assert good["pixel_values"].shape == (1, 3, 32, 32)
    bad_path = str(data_dir / "img" / "bad.png")
    if on_error == "skip":
        item = ds[1]
        assert isinstance(item, SampleSkipped)
        assert "'later-bad'" in str(item)
        assert bad_path in str(item)
        assert Collator(tok.pad_token_id)([ds[0], item])["skipped"] == 1
    else:
        with pytest.raises(DataError, match=re.escape(bad_path)):
            ds[1]
    # An image deleted after preflight is reported the same way.
    (data_dir / "img" / "ok.png").unlink()
    if on_error == "skip":
        assert isinstance(ds[0], SampleSkipped)
    else:
        with pytest.raises(DataError, match="'good'"):
            ds[0]


# ------------------------------------------------------------------------------------- sampler
def test_epoch_sampler_deterministic():
    a, b = EpochSampler(20, seed=3), EpochSampler(20, seed=3)
    assert list(a) == list(b)
    assert sorted(a) == list(range(20))
    assert list(a) != list(range(20))
    first = list(a)
    a.epoch = 1
    assert list(a) != first
    b.epoch = 1
    assert list(a) == list(b)
    assert list(EpochSampler(20, seed=4)) != first
    assert list(EpochSampler(20, seed=3, shuffle=False)) == list(range(20))


def test_epoch_sampler_resume():
    s = EpochSampler(17, seed=1)
    s.epoch = 2
    full = list(s)
    s.start = 5
    assert list(s) == full[5:]
    assert len(s) == 12
    s.start = 17
    assert list(s) == []
    assert len(s) == 0


@pytest.mark.parametrize(("n", "world"), [(12, 3), (12, 4), (8, 2), (5, 1)])
def test_epoch_sampler_partition(n, world):
    shares = [list(EpochSampler(n, seed=0, rank=r, world_size=world)) for r in range(world)]
    assert all(len(s) == n // world for s in shares)
    assert sorted(i for s in shares for i in s) == list(range(n))
    # `start` counts positions consumed by all ranks: after one index per rank each rank goes on
    s = EpochSampler(n, seed=0, rank=world - 1, world_size=world)
    s.start = world
    assert list(s) == shares[-1][1:]


def test_epoch_sampler_resume_on_another_world_size():
    # 2 ranks consumed 4 positions each; 4 ranks go on with the rest of the same permutation
    full = list(EpochSampler(16, seed=3))
    before = [list(EpochSampler(16, seed=3, rank=r, world_size=2))[:4] for r in range(2)]
    after = []
    for r in range(4):
        s = EpochSampler(16, seed=3, rank=r, world_size=4)
        s.start = 8
        after.append(list(s))
    assert sorted(i for part in before + after for i in part) == list(range(16))
    assert sorted(i for part in after for i in part) == sorted(full[8:])


def test_epoch_sampler_uneven_split_pads():
    shares = [list(EpochSampler(10, seed=0, rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in shares] == [3, 3, 3, 3]
    assert set().union(*shares) == set(range(10))


def _padding(orders: list[list[int]], lengths: list[int], batch: int) -> float:
    real = padded = 0
    for order in orders:
        for i in range(0, len(order), batch):
            chunk = [lengths[j] for j in order[i : i + batch]]
            real, padded = real + sum(chunk), padded + max(chunk) * len(chunk)
    return 1 - real / padded


def test_length_grouped_order_runs_of_one_modality_longest_first():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (103,), generator=g).tolist()
    image = [i % 7 != 0 for i in range(103)]
    order = torch.randperm(103, generator=g).tolist()
    out = length_grouped_order(order, lengths, image, 8, torch.Generator().manual_seed(5))
    assert sorted(out) == list(range(103))
    full_runs = (sum(image) // 8) + ((103 - sum(image)) // 8)
    for k in range(full_runs):
        run = out[8 * k : 8 * k + 8]
        assert len({image[i] for i in run}) == 1
        assert [lengths[i] for i in run] == sorted((lengths[i] for i in run), reverse=True)
    again = length_grouped_order(order, lengths, image, 8, torch.Generator().manual_seed(5))
    assert out == again


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_sampler_grouped_by_length_pads_less_and_resumes(world):
    g = torch.Generator().manual_seed(1)
    n, batch = 400, 4
    lengths = (torch.rand(n, generator=g) ** 3 * 1000 + 10).long().tolist()

    def sampler(rank, grouped=True):
        return EpochSampler(
            n, seed=2, rank=rank, world_size=world, lengths=lengths if grouped else None, batch_size=batch
        )

    grouped = [list(sampler(r)) for r in range(world)]
    plain = [list(sampler(r, grouped=False)) for r in range(world)]
    assert sorted(i for part in grouped for i in part) == list(range(n))
    assert 3 * _padding(grouped, lengths, batch) < _padding(plain, lengths, batch)
    # every step's micro-batches (one per rank, side by side) come from one sorted run: similar lengths
    first = [lengths[i] for part in grouped for i in part[:batch]]
    assert max(first) - min(first) < 0.2 * max(first)
    # resume after 3 micro-batches per rank: the same order goes on
    for r in range(world):
        s = sampler(r)
        s.start = 3 * batch * world
        assert list(s) == grouped[r][3 * batch :]
    # another epoch, another order; the same epoch, the same order
    s = sampler(0)
    s.epoch = 1
    assert list(s) != grouped[0]
    assert list(sampler(0)) == grouped[0]


def test_group_by_length_refuses_webdataset_and_counts_words(synth, tok, images):
    with pytest.raises(ConfigError, match="group_by_length"):
        build_train_data(
            DataConfig(format="wds", path="x-{0..1}.tar", group_by_length=True), tok, N_VIS, 0, images
        )
    rec = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat is it"}, {"value": "a red ball"}],
    }
    assert approx_length(rec, 16) == 4 + 3 + 16
    data = build_train_data(
        json_data(synth, group_by_length=True), tok, N_VIS, image_token_id(tok), images, batch_size=2
    )
    assert data.sampler.lengths is not None and len(data.sampler.lengths) == data.num_samples
    assert sorted(data.sampler.indices()) == list(range(data.num_samples))


# ----------------------------------------------------------------------------------- webdataset
def write_shards(out: Path, synth: Path, records: list[dict]) -> str:
    import webdataset as wds

    halves = [records[: len(records) // 2], records[len(records) // 2 :]]
    for k, part in enumerate(halves):
        with wds.TarWriter(str(out / f"shard-{k:05d}.tar")) as sink:
            for rec in part:
                sample = {
                    "__key__": rec["id"],
                    "json": json.dumps({"id": rec["id"], "conversations": rec["conversations"]}).encode(),
                }
                if "image" in rec:
                    sample["png"] = (synth / "images" / rec["image"]).read_bytes()
                sink.write(sample)
    return str(out / "shard-{00000..00001}.tar")


@pytest.fixture
def wds_records(instruct) -> list[dict]:
    text = next(r for r in instruct if "image" not in r)
    return [instruct[0], instruct[1], instruct[2], text, instruct[3]]


def test_webdataset_matches_json(tok, synth, tmp_path, images, wds_records):
    pattern = write_shards(tmp_path, synth, wds_records)
    img = image_token_id(tok)
    data = build_train_data(DataConfig(format="wds", path=pattern), tok, N_VIS, img, images)
    assert isinstance(data.dataset, WdsDataset)
    assert data.sampler is None
    assert data.num_samples == len(wds_records) == count_wds_samples(pattern)
    got = list(data.dataset)
    assert [x["id"] for x in got] == [r["id"] for r in wds_records]

    ref_path = tmp_path / "ref.json"
    ref_path.write_text(json.dumps(wds_records))
    ref_cfg = DataConfig(path=str(ref_path), image_folder=str(synth / "images"))
    ref = build_train_data(ref_cfg, tok, N_VIS, img, images).dataset
    for i, x in enumerate(got):
        y = ref[i]
        assert x["id"] == y["id"]
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["labels"], y["labels"])
        if y["pixel_values"] is None:
            assert x["pixel_values"] is None
        else:
            assert torch.equal(x["pixel_values"], y["pixel_values"])
    assert sum(x["pixel_values"] is None for x in got) == 1

    batch = Collator(tok.pad_token_id)(got)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


def test_webdataset_max_samples_resume_and_world(tok, synth, tmp_path, images, wds_records):
    pattern = write_shards(tmp_path, synth, wds_records)
    img = image_token_id(tok)
    data = build_train_data(DataConfig(format="wds", path=pattern, max_samples=3), tok, N_VIS, img, images)
    assert data.num_samples == 3
    assert [x["id"] for x in data.dataset] == [r["id"] for r in wds_records[:3]]
    data.dataset.skip = 2
    assert [x["id"] for x in data.dataset] == [wds_records[2]["id"]]

    two = build_train_data(DataConfig(format="wds", path=pattern), tok, N_VIS, img, images, world_size=2)
    assert two.num_samples == 3  # ceil(5 / 2)

    with pytest.raises(DataError, match=r"shard .*shard-00002\.tar does not exist"):
        build_train_data(
            DataConfig(format="wds", path=str(tmp_path / "shard-{00000..00002}.tar")), tok, N_VIS, img, images
        )
    with pytest.raises(DataError, match=r"data\.path is not set"):
        build_train_data(DataConfig(format="wds"), tok, N_VIS, img, images)


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_webdataset_bad_samples(tok, tmp_path, images, on_error):
    import webdataset as wds

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    with wds.TarWriter(str(tmp_path / "shard-00000.tar")) as sink:
        sink.write(
            {
                "__key__": "good",
                "json": json.dumps({"id": "good", "conversations": GOOD_CONV}).encode(),
                "png": buf.getvalue(),
            }
        )
        sink.write(
            {
                "__key__": "corrupt",
                "json": json.dumps({"id": "corrupt", "conversations": GOOD_CONV}).encode(),
                "png": b"garbage bytes",
            }
        )
        sink.write(
            {"__key__": "noimg", "json": json.dumps({"id": "noimg", "conversations": GOOD_CONV}).encode()}
        )
    cfg = DataConfig(format="wds", path=str(tmp_path / "shard-00000.tar"), on_error=on_error)
    ds = build_train_data(cfg, tok, N_VIS, image_token_id(tok), images).dataset
    if on_error == "skip":
        items = list(ds)
        assert items[0]["id"] == "good"
        assert isinstance(items[1], SampleSkipped)
        assert "'corrupt'" in str(items[1])
        assert "cannot read image" in str(items[1])
        assert isinstance(items[2], SampleSkipped)
        assert "1 <image> placeholders but 0 images" in str(items[2])
    else:
        with pytest.raises(DataError, match=r"'corrupt'.*cannot read image"):
            list(ds)
