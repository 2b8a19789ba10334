"""The fine-tuning preset of `nfnets train --init-from` (paper App. A.4-A.5, nfnets.finetune)."""

import pytest
import torch
from test_pretrained import serve_release

from nfnets.finetune import FINETUNE_PRESET, PAPER_BATCH, PAPER_LR
from nfnets.train import DIGITS_MODEL_ARGS, TrainConfig, train


def test_paper_values_are_pinned():
    # paper App. A.5: lr 0.1 at batch 2048, 5,000 warm-up of 15,000 steps, WD 1e-5,
    # dropout 0.25, stochastic depth 0.1
    assert (PAPER_LR, PAPER_BATCH) == (0.1, 2048)
    assert (FINETUNE_PRESET["weight_decay"], FINETUNE_PRESET["drop_rate"],
            FINETUNE_PRESET["stochdepth_rate"], FINETUNE_PRESET["lr"]) == (1e-5, 0.25, 0.1, 0.1)


def test_init_from_a_released_name_selects_the_preset_without_network():
    cfg = TrainConfig(data="/data/flowers", init_from="nfnet_f1").resolved()
    assert cfg.model == "nfnet_f1"  # the weights' model, since --model was not given
    assert (cfg.weight_decay, cfg.drop_rate, cfg.stochdepth_rate) == (1e-5, 0.25, 0.1)
    assert (cfg.epochs, cfg.batch_size, cfg.augment, cfg.lr) == (10, 64, "none", 0.1)
    assert isinstance(cfg.epochs, int) and isinstance(cfg.batch_size, int)
    assert cfg.warmup_epochs == pytest.approx(10 / 3)  # the paper's third of the run
    assert (cfg.train_size, cfg.test_size, cfg.clipping) == (224, 320, 0.01)
    # flags the user gives win; the warm-up follows their run length
    mine = TrainConfig(data="/d", init_from="F0", batch_size=16, epochs=30, lr=0.05,
                       weight_decay=0.0).resolved()
    assert (mine.batch_size, mine.epochs, mine.lr, mine.weight_decay) == (16, 30, 0.05, 0.0)
    assert mine.warmup_epochs == pytest.approx(10)
    hub = TrainConfig(data="/d", init_from="hf-hub:timm/dm_nfnet_f3.dm_in1k").resolved()
    assert hub.model == "nfnet_f3"
    # without --init-from, the ImageNet recipe
    assert TrainConfig(data="/d", model="nfnet_f0").resolved().weight_decay == 2e-5


def test_train_init_from_a_released_name_downloads_and_loads_all_but_the_head(
        tmp_path, monkeypatch):
    _, source, server = serve_release(tmp_path, monkeypatch, DIGITS_MODEL_ARGS, 1000)
    try:
        cfg = TrainConfig(out=str(tmp_path / "run"), init_from="nfnet_f0", epochs=1,
                          batch_size=128, train_size=16, lr=0.0, warmup_epochs=0.5,
                          progress=False, stop_at_step=1)
        train(cfg)
    finally:
        server.stop()
    assert server.requests == 1
    # lr 0: the saved weights are the released ones, but for the new 10-class head
    run = tmp_path / "run"
    saved = _latest_weights(run)
    for key, value in source.state_dict().items():
        if key.startswith("fc."):
            assert saved[key].shape[0] == 10
        else:
            torch.testing.assert_close(saved[key], value, msg=key)


def _latest_weights(run):
    from nfnets.checkpoint import list_checkpoints, load_checkpoint

    return load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["model"]


def test_init_from_a_run_or_file_takes_its_architecture(tmp_path):
    import nfnets
    from nfnets.weights import save_weights

    run = tmp_path / "run"
    run.mkdir()
    model = nfnets.create_model("nfnet_f0", num_classes=5, drop_rate=0.0, **DIGITS_MODEL_ARGS)
    save_weights(model, run / "model.safetensors")
    for source in (run, run / "model.safetensors"):
        cfg = TrainConfig(data="/d", init_from=str(source), train_size=32).resolved()
        assert cfg.model == "nfnet_f0"
        assert cfg.model_args == {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in DIGITS_MODEL_ARGS.items()}
        assert cfg.drop_rate == 0.25  # the preset's, not the file's
    # flags win over what the file records
    cfg = TrainConfig(data="/d", init_from=str(run), model_args={"group_width": 8}).resolved()
    assert cfg.model_args["group_width"] == 8


def test_init_from_a_run_in_progress_or_its_checkpoint_takes_the_runs_architecture(tmp_path):
    import json

    from nfnets.pretrained import weights_architecture

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    recorded = {**DIGITS_MODEL_ARGS, "num_classes": 5, "drop_rate": 0.0, "stochdepth_rate": 0.0}
    (run / "config.json").write_text(json.dumps({"model": "nfnet_f1", "model_kwargs": recorded}))
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in DIGITS_MODEL_ARGS.items()}
    # no model.safetensors yet: the run's config.json tells, for the run and its checkpoints
    for source in (run, run / "checkpoints" / "step_00000004.pt",
                   run / "checkpoints" / "step_00000004.dcp"):
        assert weights_architecture(str(source)) == ("nfnet_f1", expected), source
        cfg = TrainConfig(data="/d", init_from=str(source), train_size=32).resolved()
        assert (cfg.model, cfg.model_args) == ("nfnet_f1", expected)
        assert cfg.drop_rate == 0.25  # the preset's, not the run's
    (run / "config.json").write_text("{not json")  # damaged: --model decides
    assert weights_architecture(str(run)) is None
    assert weights_architecture(str(tmp_path / "elsewhere" / "step_00000004.pt")) is None
