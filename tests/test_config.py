"""Config loading and overrides, the shipped configs, schedules and losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segment_deeplab.config import (
    Config,
    ConfigError,
    cpu_recipe,
    load_config,
    save_config,
)
from segment_deeplab.losses import (
    auto_class_weights,
    build_loss,
    cross_entropy,
    prior_logit_bias,
)
from segment_deeplab.train import schedule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_overrides_parse_yaml_values_and_short_keys():
    cfg = load_config(
        None, ["train.lr=0.02", "atrous_rates=[12,24,36]", "decoder_output_stride=null"]
    )
    assert cfg.train.lr == 0.02
    assert cfg.model.atrous_rates == [12, 24, 36]
    assert cfg.model.decoder_output_stride is None


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'model.output_stride'"):
        load_config(None, ["model.output_strid=8"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.lr"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.model_variant=xception_65", "data.crop_size=[321,321]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.model_variant
    assert len(cfg.data.crop_size) == 2


def test_tutorial_config_matches_the_tf_flags():
    cfg = load_config(Path(CONFIGS[0]).parent / "deeplabv3plus_xception65_custom_513.yaml")
    m = cfg.model
    assert (m.model_variant, m.atrous_rates, m.output_stride) == ("xception_65", [6, 12, 18], 16)
    assert m.decoder_output_stride == 4 and cfg.data.crop_size == [513, 513]
    assert cfg.data.batch_size == 1 and cfg.train.steps == 30000


def test_durations():
    assert schedule.parse_duration("90s") == 90
    assert schedule.parse_duration("20m") == 1200
    assert schedule.parse_duration("1h30m") == 5400
    assert schedule.parse_duration("45") == 45
    with pytest.raises(ConfigError, match="20m"):
        schedule.parse_duration("twenty minutes")


def test_poly_schedule_with_warmup():
    tc = load_config(None, ["train.lr=0.1", "train.warmup_steps=4", "train.poly_power=0.9"]).train
    assert schedule.get_lr(tc, 0, 0.0) == pytest.approx(0.025)
    assert schedule.get_lr(tc, 3, 0.03) == pytest.approx(0.1)
    assert schedule.get_lr(tc, 50, 0.5) == pytest.approx(0.1 * 0.5**0.9)
    # a time budget drives the schedule when it is further along than the steps
    assert schedule.progress(10, 100, elapsed=30, budget=60) == 0.5
    assert schedule.progress(10, None, elapsed=90, budget=60) == 1.0
    # min_steps holds a time budget back until that many steps are done
    assert schedule.progress(10, None, elapsed=90, budget=60, min_steps=40) == 0.25
    assert schedule.progress(50, None, elapsed=30, budget=60, min_steps=40) == 0.5
    assert schedule.progress(40, None, elapsed=60, budget=60, min_steps=40) == 1.0


def test_min_steps_goes_with_a_time_budget():
    tc = load_config(None, ["train.steps=10", "train.min_steps=5"]).train
    with pytest.raises(ConfigError, match="--time 2m --min-steps 100"):
        schedule.total_steps(tc, 4)
    with pytest.raises(ConfigError, match="min_steps"):
        load_config(None, ["train.time=2m", "train.min_steps=0"])
    # a length on the command line replaces the file's, min_steps included
    cfg = load_config(None, ["train.time=2m", "train.min_steps=5"])
    assert load_config(None, ["train.steps=3"], base=cfg).train.min_steps is None


def test_batches_are_seeded_sharded_and_resumable():
    full = schedule.EpochBatchSampler(20, 2, seed=3, rank=0, world=1)
    full.set_epoch(1)
    batches = list(full)
    again = schedule.EpochBatchSampler(20, 2, seed=3)
    again.set_epoch(1, start_batch=4)
    assert list(again) == batches[4:]
    other = schedule.EpochBatchSampler(20, 2, seed=4)
    other.set_epoch(1)
    assert list(other) != batches
    r0, r1 = (schedule.EpochBatchSampler(20, 2, seed=3, rank=r, world=2) for r in (0, 1))
    for s in (r0, r1):
        s.set_epoch(1)
    seen = [i for b in list(r0) + list(r1) for i, _ in b]
    assert len(seen) == len(set(seen)) == 20
    with pytest.raises(ConfigError, match="fewer than one batch"):
        schedule.EpochBatchSampler(3, 4, seed=0)


def test_losses_honour_the_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))
    target[0, :2] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert cross_entropy(logits, target, 255) == pytest.approx(ref.item())
    # top-k keeps the hardest pixels: its mean is at least the plain mean
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    valid = int((target != 255).sum())
    top = per_pixel.flatten().topk(valid // 4).values.mean()
    assert cross_entropy(logits, target, 255, top_k_percent=0.25) == pytest.approx(top.item())
    tc = load_config(None, ["train.loss=ce+dice"]).train
    assert build_loss(tc, 3, 255)(logits, target) > ref
    all_ignored = torch.full_like(target, 255)
    tc = load_config(None, ["train.loss=dice"]).train
    assert build_loss(tc, 3, 255)(logits, all_ignored) == 0


def test_auto_class_weights_favour_rare_classes():
    w = auto_class_weights([900, 90, 10])
    assert w[0] < w[1] < w[2]
    assert sum(w) / 3 == pytest.approx(1.0)
    tc = load_config(None, ["train.class_weights=auto"]).train
    with pytest.raises(ConfigError, match="deeplab prepare"):
        build_loss(tc, 3, 255, class_pixels=None)


def test_prior_correction_takes_the_weights_shift_back_out():
    """Weighted cross-entropy is minimised by probabilities proportional to w_c p_c: a
    logit bias of -log w_c turns those back into p_c, and prior_correction scales it."""
    p = torch.tensor([0.7, 0.2, 0.1])  # true class probabilities at one pixel
    w = [0.5, 1.0, 4.0]
    tc = load_config(None, [f"train.class_weights={w}"]).train
    # logits trained with the weights converge to log(w_c p_c) + const
    logits = (torch.tensor(w) * p).log()
    bias = torch.tensor(prior_logit_bias(tc, 3, None))
    assert (logits + bias).softmax(0) == pytest.approx(p, abs=1e-5)
    assert (logits).softmax(0).argmax() == 2 and (logits + bias).softmax(0).argmax() == 0
    half = load_config(None, [f"train.class_weights={w}", "train.prior_correction=0.5"]).train
    assert prior_logit_bias(half, 3, None) == pytest.approx((bias / 2).tolist(), abs=1e-5)
    for off in ([], ["train.class_weights=[1,1,1]", "train.prior_correction=0"]):
        assert prior_logit_bias(load_config(None, off).train, 3, None) is None
    with pytest.raises(ConfigError, match="prior_correction"):
        prior_logit_bias(load_config(None, ["train.prior_correction=-1"]).train, 3, None)


def test_cpu_recipe_is_the_shipped_camvid_config():
    shipped = load_config(CONFIGS[0].parent / "deeplabv3plus_resnet18_camvid_256.yaml")
    recipe = cpu_recipe()
    assert shipped == recipe  # read from that one file
    # a config file replaces the recipe; overrides apply on top of either
    assert load_config(None, ["train.lr=0.1"], base=recipe).train.optimizer == "adamw"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr=abc", "config key 'train.lr' must be a number, got 'abc'"),
        ("data.batch_size=2.5", "config key 'data.batch_size' must be an integer"),
        ("train.compile=3", "config key 'train.compile' must be true or false"),
        ("model.atrous_rates=[6,x]", "key 'model.atrous_rates' must be a list of integers"),
        ("crop_size=256", "config key 'data.crop_size' must be a list of integers"),
        ("data.batch_size=0", "config key 'data.batch_size' must be at least 1, got 0"),
        ("train.lr=-1", "config key 'train.lr' must be positive"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_key(override, named):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert named in str(e.value)


def test_values_are_typed_from_yaml_files_flags_and_overrides(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float field takes it as the number it spells.
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-4\n  steps: 100\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.weight_decay=1e-05"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 1e-5
    (tmp_path / "bad.yaml").write_text("data:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match="'data.batch_size' must be an integer, got 'eight'"):
        load_config(tmp_path / "bad.yaml")
    # Flags arrive as typed values, never as text parsed back; a length given there
    # replaces the file's length.
    flags = {"train.time": "5m", "data.crop_size": [96, 128]}
    cfg = load_config(tmp_path / "c.yaml", values=flags)
    assert (cfg.train.steps, cfg.train.time, cfg.data.crop_size) == (None, "5m", [96, 128])
    assert load_config(None, values={"train.time": 90}).train.time == "90"
