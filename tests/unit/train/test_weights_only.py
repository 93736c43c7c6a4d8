"""Loading a checkpoint never runs code (pipeline/train/weights_only.py).

A pickle payload planted in a checkpoint file, with complete.json's digests rewritten to match,
is refused in one line naming the file on resume, on `alum export` and on
`checkpoint.init_from`; and DeepSpeed's own loaders read weights-only, so a file the check
did not see would still not run. The payload only creates a marker file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import RUN, pretrain, run_alum


class Payload:
    """Unpickled, it opens `marker` for writing, creating it: what a hostile file would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant(path: Path, marker: Path) -> None:
    """Add a payload to a checkpoint file and record the file's new digest in complete.json."""
    from pipeline.train.integrity import digest

    state = torch.load(path, weights_only=False)  # the reference run's own file
    state["notes"] = Payload(marker)
    torch.save(state, path)
    complete = path.parent / "complete.json"
    record = json.loads(complete.read_text())
    record["files"][path.name] = digest(path)
    complete.write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_checkpoint_that_would_run_code_is_refused_on_resume_export_and_init_from(
    reference, tmp_path, train_shards, bert_tokenizer
):
    _, uninterrupted = reference
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    tampered = run_dir / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "the-payload-ran"
    plant(tampered, marker)
    refused = (
        f"{tampered}: refused: loading it would call io.open, which no checkpoint holds "
        "(a file from elsewhere or edited); it was not loaded"
    )

    resumed = pretrain(run_dir, train_shards, bert_tokenizer, *RUN, "train.max_steps=9", world=1)
    assert resumed.returncode == 2 and resumed.stderr.strip().splitlines()[-1] == f"pretrain: error: {refused}", (
        resumed.stderr[-3000:]
    )
    exported = run_alum("export", "--run-dir", run_dir, "--out", tmp_path / "hf")
    assert exported.returncode == 2 and exported.stderr.strip().splitlines() == [f"alum export: error: {refused}"], (
        exported.stderr[-3000:]
    )
    initialised = pretrain(
        tmp_path / "new", train_shards, bert_tokenizer, *RUN, f"checkpoint.init_from={run_dir}", world=1
    )
    assert (
        initialised.returncode == 2 and initialised.stderr.strip().splitlines()[-1] == f"pretrain: error: {refused}"
    ), initialised.stderr[-3000:]
    assert not marker.exists()


def _deepspeed_loaders():
    """Three of DeepSpeed 0.19.8's torch.load(weights_only=False) calls: the engine's, ds_to_universal's,
    zero_to_fp32's."""
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils import zero_to_fp32

    return {
        "engine": lambda path: TorchCheckpointEngine().load(str(path)),
        "ds_to_universal": lambda path: ds_to_universal._load_universal_checkpoint_info_stage3([str(path)]),
        "zero_to_fp32": lambda path: zero_to_fp32.parse_model_states([str(path)]),
    }


@pytest.mark.parametrize("loader", ["engine", "ds_to_universal", "zero_to_fp32"])
def test_deepspeeds_own_loaders_read_weights_only(loader, tmp_path, monkeypatch):
    """What `enforce` guarantees beyond the check: DeepSpeed passes weights_only=False, and is overruled."""
    from pipeline.train import weights_only

    monkeypatch.delenv(weights_only.FORCE, raising=False)  # the switch is undone after the test
    marker = tmp_path / "the-payload-ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "notes": Payload(marker)}, path)
    weights_only.enforce()
    with pytest.raises(Exception, match="Weights only load failed"):
        _deepspeed_loaders()[loader](path)
    assert not marker.exists()


def test_the_check_names_the_first_file_that_would_run_code(tmp_path):
    from pipeline.train import weights_only

    torch.save({"module": {"w": torch.zeros(2)}}, tmp_path / "a.pt")
    assert weights_only.refusal(tmp_path) is None
    (tmp_path / "universal").mkdir()
    torch.save({"notes": Payload(tmp_path / "the-payload-ran")}, tmp_path / "universal" / "fp32.pt")
    assert weights_only.refusal(tmp_path).startswith(
        f"{tmp_path / 'universal' / 'fp32.pt'}: refused: loading it would call io.open,"
    )
    (tmp_path / "b.pt").write_bytes(b"not a zip")
    assert weights_only.refusal(tmp_path).startswith(f"{tmp_path / 'b.pt'}: not a checkpoint file torch can read (")
    assert not (tmp_path / "the-payload-ran").exists()
