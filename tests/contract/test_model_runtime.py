"""The model-runtime contract (``workers.runtime.ModelRuntime``), one suite run on every runtime of
``workers.runtime.RUNTIMES``, each on the tiny model its builder in ``artifacts`` registers: loaded from a
version folder of the library, the manifest mapped onto columns and views, the manifest's outputs for every row
(a batch of one and a big one), a broken model failing at load (its warm-up), a changed artifact or an option
the runtime does not take refused before it is opened."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamscore import fastpath
from streamscore.settings import WorkerSettings
from streamscore.workers.library import ModelError
from streamscore.workers.runtime import RUNTIMES, ModelRuntime, load_model

from .artifacts import REGISTER, VIEWS, expected

CPU = WorkerSettings(device="cpu")


@pytest.fixture(params=sorted(RUNTIMES))
def runtime_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def register(runtime_name: str, models_dir: Path) -> Callable[..., Path]:
    if runtime_name not in REGISTER:
        pytest.fail(f"runtime {runtime_name!r} is registered but tests/contract/artifacts.py has no tiny model for "
                    "it: add its builder to REGISTER", pytrace=False)
    builder = REGISTER[runtime_name]
    return lambda version="1", **manifest: builder(models_dir, version, runtime=runtime_name, **manifest)


def test_every_registered_runtime_has_a_tiny_model() -> None:
    assert set(REGISTER) == set(RUNTIMES)
    for name, runtime in RUNTIMES.items():
        assert issubclass(runtime, ModelRuntime) and runtime.runtime == name


def test_a_version_folder_loads_with_its_manifest_mapped(runtime_name: str, register: Callable[..., Path],
                                                         models_dir: Path) -> None:
    register("1")
    register("2")
    model = load_model(models_dir, "tiny", VIEWS, CPU)
    assert isinstance(model, RUNTIMES[runtime_name])
    assert (model.name, model.version, model.manifest.runtime) == ("tiny", "2", runtime_name), "the newest version"
    assert model.path == models_dir / "tiny" / "2" / model.manifest.artifact
    assert model.columns == [fastpath.InputColumn(True, -1, 0), fastpath.InputColumn(False, 0, 1),
                             fastpath.InputColumn(True, -1, 1)]
    assert model.views == [VIEWS["card"]]
    assert model.decode_spec == fastpath.DecodeSpec(("card_id",), (fastpath.RequestFeature("amount"),
                                                                    fastpath.RequestFeature("hour", 1, 12.0)))
    assert isinstance(model.provider, str) and model.provider
    assert load_model(models_dir, "tiny", VIEWS, CPU, version="1").version == "1"


@pytest.mark.parametrize("rows", [1, 1000])
def test_run_gives_the_manifest_outputs_one_row_per_input(register: Callable[..., Path], models_dir: Path,
                                                          rows: int) -> None:
    register()
    model = load_model(models_dir, "tiny", VIEWS, CPU)
    inputs = np.random.default_rng(rows).normal(size=(rows, 3)).astype(np.float32)
    outputs = model.run(inputs)
    assert list(outputs) == ["logits", "p"]
    assert outputs["logits"].shape == (rows, 2) and outputs["p"].shape == (rows,)
    reference = expected(inputs)
    for name, values in outputs.items():
        np.testing.assert_allclose(values, reference[name], rtol=1e-5, atol=1e-6)


def test_a_model_that_answers_the_wrong_number_of_rows_fails_at_load(register: Callable[..., Path],
                                                                     models_dir: Path) -> None:
    register(model={"one_row": True})
    with pytest.raises(ModelError, match=r"returned 1 rows of 'logits' for 8 inputs"):
        load_model(models_dir, "tiny", VIEWS, CPU)


def test_a_changed_artifact_is_refused_before_it_is_opened(register: Callable[..., Path], models_dir: Path) -> None:
    folder = register()
    artifact = folder / "model.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    with pytest.raises(ModelError, match=r"refusing .*: its sha256 is [0-9a-f]{64} but the manifest says"):
        load_model(models_dir, "tiny", VIEWS, CPU)


def test_an_option_the_runtime_does_not_take_is_refused(runtime_name: str, register: Callable[..., Path],
                                                        models_dir: Path) -> None:
    register(runtime_options={"no_such_option": 1})
    with pytest.raises(ModelError, match=r"field 'runtime_options' has \['no_such_option'\]") as refusal:
        load_model(models_dir, "tiny", VIEWS, CPU)
    assert "\n" not in str(refusal.value) and runtime_name in str(refusal.value)
