"""The quickstart job, on the sample photos installed with the package."""

from __future__ import annotations

from pathlib import Path

from conftest import SAMPLES

from vqgan_datasets.jobs.demo import DEMO_IMAGES, DEMO_MODEL, demo


def test_demo_runs_the_quickstart_job(tmp_path, tiny_model_dir):
    result = demo(tmp_path / "out", model=tiny_model_dir, progress=False)
    assert result["tokens"]["rows_out"] == len(list(SAMPLES.glob("*.jpg"))) == 6
    assert Path(result["preview"]).is_file()
    assert len(list((tmp_path / "out" / "decoded").glob("*.png"))) == result["tokens"]["rows_out"]


def test_the_demo_data_is_package_data():
    """Inside the package folder, where the wheel's package-data globs pick them up."""
    package = Path(__file__).resolve().parents[2] / "vqgan_datasets"
    assert DEMO_MODEL.parent.parent == DEMO_IMAGES.parent.parent == package
    assert sorted(p.name for p in DEMO_MODEL.iterdir()) == ["config.json", "model.safetensors"]
    assert DEMO_IMAGES == SAMPLES and len(list(DEMO_IMAGES.glob("*.jpg"))) == 6
