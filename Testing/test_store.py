"""Model and adapter files: safetensors only, SHA-256 bound, atomic, and the per-user adapter store."""

import re
from pathlib import Path

import pytest
import torch

from ConvLoRASegLib import store
from ConvLoRASegLib.convlora import adapter_state, inject_convlora, lora_layers
from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.grid import WorkingGrid
from ConvLoRASegLib.model import ConvLoRASegModel

LIB = Path(__file__).resolve().parents[1] / "ConvLoRASegLib"


def _model(seed=0):
    torch.manual_seed(seed)
    m = ConvLoRASegModel(grid=WorkingGrid(3.0, 64), info={"note": "test"})
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.normal_(0, 0.1)
    return m.eval()


def _adapter(model):
    site = _model()
    site.load_state_dict(model.state_dict())
    inject_convlora(site.unet, "init_path")
    for layer in lora_layers(site).values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    return adapter_state(site)


def test_model_round_trip_exact_and_fp16(tmp_path):
    m = _model()
    sha = store.save_model(m, tmp_path / "m.safetensors")
    assert m.sha256 == sha and re.fullmatch(r"[0-9a-f]{64}", sha)
    loaded = store.load_model(tmp_path / "m.safetensors")
    assert loaded.sha256 == sha and loaded.grid == m.grid and loaded.info["note"] == "test"
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
        store.save_model(m, tmp_path / "h.safetensors", dtype=torch.float16)
        half = store.load_model(tmp_path / "h.safetensors")
        assert torch.allclose(half(x), m(x), atol=5e-2)
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (tmp_path / "m.safetensors").stat().st_size


def test_refusals(tmp_path):
    m = _model()
    path = tmp_path / "m.safetensors"
    store.save_model(m, path)
    with pytest.raises(ConvLoRASegError, match="exists"):
        store.save_model(m, path)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ConvLoRASegError, match="corrupt"):
        store.load_model(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(ConvLoRASegError, match="junk.safetensors is not a .safetensors file: a model file"):
        store.load_model(tmp_path / "junk.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:500])
    with pytest.raises(ConvLoRASegError, match="not a readable"):
        store.load_model(tmp_path / "cut.safetensors")
    torch.save(m.state_dict(), tmp_path / "m.pth")
    with pytest.raises(ConvLoRASegError, match="import-checkpoint"):
        store.load_model(tmp_path / "m.pth")
    with pytest.raises(ConvLoRASegError, match="not found"):
        store.load_model(tmp_path / "missing.safetensors")


def test_adapter_bound_to_base_model(tmp_path):
    m = _model()
    store.save_model(m, tmp_path / "m.safetensors")
    info = store.save_adapter(m, _adapter(m), tmp_path / "a.safetensors", name="site", method="convlora-adabn",
                              mode="fast", rank=2, alpha=2, placement="init_path", details={"score": 0.9})
    assert info.base_sha256 == m.sha256 and info.score == pytest.approx(0.9) and info.rank == 2
    got, tensors = store.load_adapter(m, tmp_path / "a.safetensors")
    assert "init_path.0.lora_A" in tensors and got.name == "site"
    other = _model(seed=1)
    store.save_model(other, tmp_path / "o.safetensors")
    with pytest.raises(ConvLoRASegError, match="another base model"):
        store.load_adapter(other, tmp_path / "a.safetensors")
    with pytest.raises(ConvLoRASegError, match="expected model"):
        store.load_model(tmp_path / "a.safetensors")
    n_params = sum(p.numel() for p in m.parameters())
    assert info.trainable_params < info.stored_values < 0.01 * n_params
    assert info.bytes < 0.01 * (tmp_path / "m.safetensors").stat().st_size * 2


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    m = _model()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        store.save_model(m, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_adapter_store_lifecycle(tmp_path):
    m = _model()
    store.save_model(m, tmp_path / "m.safetensors")
    store.save_adapter(m, _adapter(m), tmp_path / "a.safetensors", name="siemens3", method="convlora-adabn",
                       mode="fast", rank=2, alpha=2, placement="init_path")
    s = store.AdapterStore(tmp_path / "store")
    assert s.list(m.sha256) == []
    s.add(tmp_path / "a.safetensors")
    s.add(tmp_path / "a.safetensors", name="copy two")
    assert sorted(i.name for i in s.list(m.sha256)) == ["copy two", "siemens3"]
    s.rename(m.sha256, "copy two", "philips3")
    assert s.find(m.sha256, "philips3").name == "philips3"
    out = s.export(m.sha256, "philips3", tmp_path / "exported.safetensors")
    assert store.read_adapter_info(out).name == "philips3"
    s.delete(m.sha256, "philips3")
    assert [i.name for i in s.list(m.sha256)] == ["siemens3"]
    with pytest.raises(ConvLoRASegError, match="no adapter named"):
        s.find(m.sha256, "philips3")
    with pytest.raises(ConvLoRASegError, match="invalid adapter name"):
        s.add(tmp_path / "a.safetensors", name="../escape")
    # "source" is the unadapted model's key in every score table (selection.SOURCE): an adapter of that name would
    # overwrite the source model's score in choose_adapter / the per-scan check
    for reserved in ("source", "Source", " source "):
        with pytest.raises(ConvLoRASegError, match="reserved"):
            s.add(tmp_path / "a.safetensors", name=reserved)
        with pytest.raises(ConvLoRASegError, match="reserved"):
            s.rename(m.sha256, "siemens3", reserved)
    assert [i.name for i in s.list(m.sha256)] == ["siemens3"]
    assert store.check_adapter_name("source 2") == "source 2"


def test_user_store_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVLORASEG_HOME", str(tmp_path / "x"))
    assert store.user_store_dir() == tmp_path / "x"
    assert store.AdapterStore().root == tmp_path / "x"


def test_no_pickle_anywhere_in_the_library():
    for py in list(LIB.rglob("*.py")) + list((LIB.parent / "ConvLoRASeg").rglob("*.py")):
        text = py.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, py
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{py}: {call}"


def test_activate_adapter_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    import os

    from ConvLoRASegLib import segment

    m = _model()
    store.save_model(m, tmp_path / "m.safetensors")
    path = tmp_path / "a.safetensors"
    store.save_adapter(m, _adapter(m), path, name="site", method="convlora-adabn", mode="fast", rank=2, alpha=2,
                       placement="init_path")
    reads = []
    real = segment.load_adapter
    monkeypatch.setattr(segment, "load_adapter", lambda *a: reads.append(a) or real(*a))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        first = segment.activate_adapter(m, path)
        out_a = m(x)
        segment.activate_adapter(m, None)
        again = segment.activate_adapter(m, path)
        assert len(reads) == 1 and again.name == first.name == "site"
        assert torch.equal(m(x), out_a)
        # the file is replaced by another adapter: read again, the old tensors dropped
        os.replace(tmp_path / "a.safetensors", tmp_path / "old.safetensors")
        store.save_adapter(m, _adapter(_model(seed=3)), path, name="site2", method="convlora-adabn", mode="fast",
                           rank=2, alpha=4, placement="init_path")
        new = segment.activate_adapter(m, path)
        out_new = m(x)
        assert len(reads) == 2 and new.name == "site2" and not torch.equal(out_new, out_a)
        assert len(m.adapters.names) == 1
        segment.activate_adapter(m, tmp_path / "old.safetensors")  # the first adapter, under its new name
        assert torch.equal(m(x), out_a)
        segment.activate_adapter(m, path)  # each adapter keeps its own alpha / r (2 for site2, 1 for the other)
        assert torch.equal(m(x), out_new) and len(reads) == 3
    with pytest.raises(ConvLoRASegError, match="not found"):
        segment.activate_adapter(m, tmp_path / "missing.safetensors")
