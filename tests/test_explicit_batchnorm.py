"""ExplicitBatchNorm (the written-out batch normalisation of `--batchnorm custom` and the lab) saves
and loads under safe_mode, and a file saved under its old name, MyBatchNorm, still loads."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.layers import ExplicitBatchNorm  # noqa: E402


def _model_with_explicit_bn():
    inputs = keras.Input((4, 4, 3))
    outputs = ExplicitBatchNorm(momentum=0.5, epsilon=1e-5, name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 3)).astype("float32")
    model(x, training=True)                                  # running statistics off their init
    return model, x


def _rename_layer_class(path, old: str, new: str, target):
    """Copy the .keras zip at `path` to `target` with the layer's class renamed in config.json."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                text = data.decode()
                assert f'"{old}"' in text and f"calibrated_cifar>{old}" in text
                data = text.replace(old, new).encode()
            dst.writestr(item, data)
    return target


@pytest.mark.parametrize("saved_name", ["ExplicitBatchNorm", "MyBatchNorm"])
def test_explicit_batchnorm_loads_under_safe_mode_by_its_name_and_the_old_one(tmp_path, saved_name):
    model, x = _model_with_explicit_bn()
    path = tmp_path / "bn.keras"
    model.save(path)
    if saved_name != "ExplicitBatchNorm":
        path = _rename_layer_class(path, "ExplicitBatchNorm", saved_name, tmp_path / "old.keras")
        with zipfile.ZipFile(path) as z:
            assert "ExplicitBatchNorm" not in json.dumps(json.loads(z.read("config.json")))
    loaded = keras.saving.load_model(path, safe_mode=True)
    bn = loaded.get_layer("bn")
    assert isinstance(bn, ExplicitBatchNorm)
    np.testing.assert_allclose(bn.running_mean.numpy(), model.get_layer("bn").running_mean.numpy())
    np.testing.assert_allclose(loaded(x, training=False).numpy(), model(x, training=False).numpy(),
                               rtol=1e-6, atol=1e-6)
