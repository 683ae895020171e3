"""DeepLab models: one base class over variants, plus config defaults and initialisation."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from segment_deeplab.checkpoint import FORMAT, build_initialised, load_init_checkpoint
from segment_deeplab.config import ModelConfig
from segment_deeplab.infer.fold import fold_batch_norm
from segment_deeplab.infer.fold import for_inference as prepare_model
from segment_deeplab.models import ModelError, build_model, deeplab
from segment_deeplab.models.deeplab import default_atrous_rates

SIZES = [(65, 97), (33, 47)]  # odd on purpose: not multiples of any stride


def stretch(x: torch.Tensor, factor: int, size) -> torch.Tensor:
    """Upsampling straight to the target size, ignoring the stride."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def tiny_cfg(variant: str = "resnet_18", **kw) -> ModelConfig:
    base = dict(num_classes=3, aspp_channels=32, decoder_channels=32, low_level_channels=16)
    return ModelConfig(model_variant=variant, **{**base, **kw})


class ModelCase:
    """Each model case sets `variant` (and `decoder_output_stride`); tests come from here."""

    variant = "resnet_18"
    decoder_output_stride: int | None = 4

    def build(self, **kw) -> torch.nn.Module:
        torch.manual_seed(0)
        kw.setdefault("decoder_output_stride", self.decoder_output_stride)
        return build_model(tiny_cfg(self.variant, **kw))

    @pytest.mark.parametrize("size", SIZES)
    def test_forward_shape_any_size(self, size: tuple[int, int]) -> None:
        model = self.build().eval()
        with torch.no_grad():
            y = model(torch.rand(2, 3, *size))
        assert y.shape == (2, 3, *size)
        assert torch.isfinite(y).all()

    def test_backward_reaches_backbone(self) -> None:
        model = self.build().train()
        y = model(torch.rand(2, 3, *SIZES[0]))
        y.logsumexp(1).mean().backward()
        first = next(model.backbone.parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0
        assert model.classifier.weight.grad is not None

    @pytest.mark.parametrize("output_stride", [8, 16, 32])
    def test_feature_stride(self, output_stride: int) -> None:
        model = self.build(output_stride=output_stride).eval()
        assert model.output_stride == output_stride
        assert model.feature_strides[-1] == output_stride
        h, w = SIZES[0]
        with torch.no_grad():
            last = model.backbone(torch.rand(1, 3, h, w))[-1]
        assert last.shape[-2:] == (math.ceil(h / output_stride), math.ceil(w / output_stride))

    @pytest.mark.filterwarnings("ignore:`torch.jit.trace")
    def test_trace_matches_at_another_size(self) -> None:
        model = self.build().eval()
        traced = torch.jit.trace(model, torch.rand(1, 3, *SIZES[0]))
        x = torch.rand(2, 3, *SIZES[1])
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x))

    @pytest.mark.parametrize("output_stride", [16, 32])
    def test_odd_size_stays_aligned(self, output_stride: int, monkeypatch) -> None:
        """An input of no multiple of the stride gets about the logits of the same image
        padded to one (with the mean colour, which normalises to 0) and cut back; resizing
        each map straight to the target size, as before, stretches them and differs 8x more."""
        model = self.build(output_stride=output_stride).eval()
        h, w = SIZES[0]
        x = torch.rand(1, 3, h, w)
        ph, pw = (-h) % output_stride, (-w) % output_stride
        padded = model.mean.expand(1, 3, h + ph, w + pw).clone()
        padded[..., :h, :w] = x
        with torch.no_grad():
            ref = model(padded)[..., :h, :w]
            aligned = model(x)
            monkeypatch.setattr(deeplab, "upsample", stretch)
            stretched = model(x)

        def rel(y: torch.Tensor) -> float:
            return float((y - ref).abs().mean() / ref.abs().mean())

        assert rel(aligned) < 0.1
        assert rel(aligned) < rel(stretched) / 3

    def test_fold_batch_norm_keeps_the_outputs(self) -> None:
        model = self.build().eval()
        folded = fold_batch_norm(model)
        x = torch.rand(2, 3, *SIZES[1])  # another size than any trace would see
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)

        def norms(m: torch.nn.Module) -> int:
            return sum(isinstance(n, torch.nn.BatchNorm2d) for n in m.modules())

        assert norms(folded) < norms(model) / 4  # fused: nearly all convs absorb theirs
        assert norms(model) > 0 and fold_batch_norm(model.train()) is model
        # prepare_model folds the model itself: no second copy of the weights.
        before = norms(model)
        prepared = prepare_model(model, torch.device("cpu"))
        assert prepared is model and norms(model) < before / 4
        with torch.no_grad():
            torch.testing.assert_close(prepared(x), folded(x), rtol=1e-4, atol=1e-4)

    def test_channels_last(self) -> None:
        model = self.build().eval()
        x = torch.rand(1, 3, *SIZES[0])
        with torch.no_grad():
            ref = model(x)
            model = model.to(memory_format=torch.channels_last)
            y = model(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_logit_bias_applies_when_predicting_only() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(logit_bias=[0.0, 5.0, -5.0]))
    x = torch.rand(2, 3, *SIZES[1])
    state = model.state_dict()
    assert "logit_bias" not in state  # it comes from the config, as the architecture does
    plain = build_model(tiny_cfg())
    plain.load_state_dict(state)
    model.train(), plain.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a, plain(x))  # training sees the raw logits
    model.eval(), plain.eval()
    with torch.no_grad():
        diff = model(x) - plain(x)
    torch.testing.assert_close(diff.mean((0, 2, 3)), torch.tensor([0.0, 5.0, -5.0]))
    with pytest.raises(ModelError, match="logit_bias has 2 values for 3 classes"):
        build_model(tiny_cfg(logit_bias=[0.0, 1.0]))


class TestResNet18V3Plus(ModelCase):
    variant = "resnet_18"

    def test_export(self) -> None:
        model = self.build().eval()
        x = torch.rand(1, 3, *SIZES[0])
        exported = torch.export.export(model, (x,))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x))


class TestResNet18V3(ModelCase):
    variant = "resnet_18"
    decoder_output_stride = None


class TestMobileNetV3SmallV3Plus(ModelCase):
    variant = "mobilenet_v3_small"


def test_xception65_forward_shape_and_folding() -> None:
    model = build_model(tiny_cfg("xception_65")).eval()
    x = torch.rand(1, 3, *SIZES[0])
    with torch.no_grad():
        assert model(x).shape == (1, 3, *SIZES[0])
        # timm's xception gives its features through forward hooks, which a torch.fx
        # trace drops: its backbone must stay unfused, and the head still folds.
        folded = fold_batch_norm(model)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert type(folded.backbone) is type(model.backbone)
    assert isinstance(folded.aspp, torch.fx.GraphModule)


# --- TF DeepLab settings and names -------------------------------------------------------


def test_tf_deeplab_defaults() -> None:
    # Tutorial flags: xception_65, atrous_rates 6/12/18, output_stride 16, decoder stride 4.
    model = build_model(ModelConfig(model_variant="xception_65", num_classes=21))
    assert model.timm_name == "xception65"
    assert model.output_stride == 16 and model.feature_strides[-1] == 16
    assert model.atrous_rates == [6, 12, 18]
    assert model.feature_strides[model.low_index] == 4
    assert model.separable  # TF aspp_with_separable_conv / decoder_use_separable_conv
    dilations = [b[0].dilation[0] for b in model.aspp.branches[1:4]]
    assert dilations == [6, 12, 18]
    assert len(model.aspp.branches) == 5  # 1x1 + three atrous + image pooling
    assert model.decoder.project[0].out_channels == 48
    assert default_atrous_rates(8) == [12, 24, 36]
    assert default_atrous_rates(32) == [3, 6, 9]


def test_unknown_variant_suggests_closest() -> None:
    with pytest.raises(ModelError, match="Did you mean 'mobilenet_v3_large'") as e:
        build_model(tiny_cfg("mobilenet_v3_lage"))
    assert "resnet_50" in str(e.value)


def test_any_timm_name_with_tag() -> None:
    model = build_model(tiny_cfg("resnet18.a1_in1k", image_pooling=False, atrous_rates=[]))
    assert len(model.aspp.branches) == 1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"output_stride": 4}, "output_stride"),
        ({"decoder_output_stride": 3}, "decoder_output_stride 3"),
        ({"variant": "legacy_xception"}, "cannot change its output stride"),
    ],
)
def test_bad_settings_explain(kw: dict, match: str) -> None:
    variant = kw.pop("variant", "resnet_18")
    with pytest.raises(ModelError, match=match):
        build_model(tiny_cfg(variant, **kw))


# --- initialisation ------------------------------------------------------------------------


def backbone_equal(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    for key, t in model.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(t, source[key], rtol=0, atol=0)


def test_init_from_timm_state_dict(tmp_path) -> None:
    sd = timm.create_model("resnet18").state_dict()
    torch.save(sd, tmp_path / "timm.pth")
    model = build_model(tiny_cfg())
    summary = load_init_checkpoint(model, tmp_path / "timm.pth")
    backbone_equal(model, sd)
    assert set(summary.skipped) == {"fc.weight", "fc.bias"}
    assert not any(k.startswith("backbone.") for k in summary.missing)


def test_init_from_torchvision_state_dict_in_container(tmp_path) -> None:
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "tv.pth")
    model = build_initialised(tiny_cfg(init_checkpoint=str(tmp_path / "tv.pth")))
    backbone_equal(model, sd)


def test_init_torchvision_mobilenet_by_order(tmp_path) -> None:
    tv = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    torch.save(tv, tmp_path / "mnv3.pt")
    model = build_model(tiny_cfg("mobilenet_v3_small"))
    summary = load_init_checkpoint(model, tmp_path / "mnv3.pt")
    assert summary.by_order
    torch.testing.assert_close(model.backbone.conv_stem.weight, tv["features.0.0.weight"])


def test_init_timm_xception_flattened_names(tmp_path) -> None:
    # timm's features_only xception names 'stem.0' as 'stem_0'; full-model files still fit.
    sd = timm.create_model("xception41").state_dict()
    torch.save(sd, tmp_path / "x41.pth")
    model = build_model(tiny_cfg("xception_41"))
    summary = load_init_checkpoint(model, tmp_path / "x41.pth")
    assert not any(k.startswith("backbone.") for k in summary.missing)
    torch.testing.assert_close(model.backbone.stem_0.conv.weight, sd["stem.0.conv.weight"])


def test_safetensors_round_trip(tmp_path) -> None:
    src = build_model(tiny_cfg())
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    model = build_model(tiny_cfg())
    summary = load_init_checkpoint(model, tmp_path / "m.safetensors")
    assert not summary.missing and not summary.skipped
    for key, t in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], t)


def test_head_reinitialised_for_other_num_classes(tmp_path, capsys) -> None:
    src = build_model(tiny_cfg(num_classes=3))
    ckpt = {"format": FORMAT, "model": src.state_dict(), "config": {}, "classes": []}
    torch.save(ckpt, tmp_path / "best.pt")
    model = build_initialised(tiny_cfg(num_classes=5, init_checkpoint=str(tmp_path / "best.pt")))
    assert "skipped 2" in capsys.readouterr().out
    for key, t in model.state_dict().items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(t, src.state_dict()[key])
    assert model.classifier.weight.shape[0] == 5
    summary = load_init_checkpoint(model, tmp_path / "best.pt", verbose=True)
    assert summary.skipped == ["classifier.weight", "classifier.bias"]
    assert "2 shape mismatch" in str(summary)
    assert "classifier.weight: shape (3, 32, 1, 1) != (5, 32, 1, 1)" in str(summary)


def test_nothing_matches_raises(tmp_path) -> None:
    torch.save({"encoder.foo.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="nothing in other.pt fits"):
        build_initialised(tiny_cfg(init_checkpoint=str(tmp_path / "other.pt")))


def test_other_architecture_raises(tmp_path) -> None:
    # Same names, other widths: most of the backbone would stay random.
    torch.save(timm.create_model("mobilenetv3_large_100").state_dict(), tmp_path / "l.pth")
    with pytest.raises(ModelError, match="backbone tensors of 'mobilenetv3_small_100' fit"):
        load_init_checkpoint(build_model(tiny_cfg("mobilenet_v3_small")), tmp_path / "l.pth")


def test_pretrained_offline_explains(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hf

    # Offline mode and an empty cache: fails at once instead of retrying the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="init_checkpoint=PATH") as e:
        build_model(tiny_cfg(pretrained=True))
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_decoder_convs_one_is_smps_decoder_and_two_is_tf_deeplabs():
    from segment_deeplab.config import ConfigError, load_config

    convs = {}
    for n in (1, 2):
        cfg = ModelConfig(model_variant="mobilenet_v3_small", num_classes=3, decoder_convs=n,
                          aspp_channels=16, decoder_channels=16, low_level_channels=8)  # fmt: skip
        model = build_model(cfg).eval()
        convs[n] = len(model.decoder.fuse)
        with torch.no_grad():
            assert model(torch.rand(1, 3, 64, 80)).shape == (1, 3, 64, 80)
    assert convs == {1: 1, 2: 2}
    with pytest.raises(ConfigError, match="model.decoder_convs"):
        load_config(None, ["model.decoder_convs=3"])


# --- TF DeepLab's mobilenet_v3 head (model.head=lraspp) ------------------------------------


@pytest.mark.parametrize(
    "size, window, stride",
    [((29, 31), (25, 25), (4, 5)), ((9, 11), (5, 6), (4, 5)), ((6, 7), (5, 6), (1, 1))],
)
def test_pooling_windows_are_tfs_valid_average_pool(size, window, stride) -> None:
    from segment_deeplab.models.aspp import image_pool

    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image_pool(x, window, stride), F.avg_pool2d(x, window, stride))
    # A map shorter than the window (TF would fail): that axis is averaged whole.
    short = x[:, :, :3]
    want = F.avg_pool2d(short, (3, window[1]), stride)
    torch.testing.assert_close(image_pool(short, window, stride), want)
    torch.testing.assert_close(image_pool(x, None, stride), x.mean((2, 3), keepdim=True))


def test_lraspp_head_sums_two_logit_maps_at_the_decoder_stride() -> None:
    cfg = ModelConfig(
        model_variant="mobilenet_v3_small_seg", num_classes=3, output_stride=32, head="lraspp",
        decoder_output_stride=8, aspp_channels=16, image_pooling_crop_size=[129, 161],
        image_pooling_stride=[4, 5],
    )  # fmt: skip
    model = build_model(cfg).eval()
    assert type(model).__name__ == "LiteRASPP"
    assert model.decoder.out_channels == 3 and model.classifier.in_channels == 16
    assert model.aspp.window == (5, 6)
    seen = {}
    model.aspp.gate.register_forward_hook(lambda _m, _a, out: seen.update(gate=out.shape))
    for h, w in [(257, 321), (65, 97)]:
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            y = model(x)
            feats = model.backbone((x - model.mean) / model.std)
            low = model.low_level(feats)
            want = deeplab.upsample(model.classifier(model.aspp(feats[-1])), 4, low.shape[-2:])
            want = deeplab.upsample(want + model.decoder(low), 8, (h, w))
        assert y.shape == (1, 3, h, w)
        torch.testing.assert_close(y, want)
    assert seen["gate"][-2:] == (1, 1)  # 65x97 is smaller than the pooling crop: pooled whole
    # It trains: the gate, the branch and both logit convs get gradients.
    model.train()
    model(torch.rand(2, 3, 96, 128)).mean().backward()
    for part in (model.aspp.gate, model.aspp.branch[0], model.decoder, model.classifier):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"head": "fcn"}, "model.head='fcn'"),
        ({"head": "lraspp", "decoder_output_stride": None}, "decoder_output_stride"),
        ({"image_pooling_crop_size": [769]}, "image_pooling_crop_size"),
        ({"image_pooling_stride": [0, 1]}, "image_pooling_stride"),
    ],
)
def test_bad_head_settings_explain(kw: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        build_model(tiny_cfg("mobilenet_v3_small_seg", **kw))


def test_tf_segmentation_mobilenets_have_no_timm_weights() -> None:
    with pytest.raises(ModelError, match="no pretrained weights for 'mobilenetv3_large_seg'"):
        build_model(tiny_cfg("mobilenet_v3_large_seg", pretrained=True))
