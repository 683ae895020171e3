"""Reference outputs of TF DeepLab's network (tensorflow/models research/deeplab), with random
weights, for checking a PyTorch port against it.

The network is rebuilt here in TensorFlow graph mode with plain tf.compat.v1 ops (no tf_slim),
following deeplab/model.py, deeplab/core/{feature_extractor,xception,resnet_v1_beta,utils}.py
and slim's nets/resnet_utils.py and nets/mobilenet/{mobilenet,mobilenet_v2,mobilenet_v3,
conv_blocks}.py,
with slim's variable names, so the checkpoint it writes has the names and shapes of TF
DeepLab's own checkpoints.

    python tests/tf_deeplab_reference.py OUT_DIR --variant xception_65 --num-classes 5 \
        --output-stride 16 --sizes 65x97 129x161 [--decoder-output-stride 4 | none]

The mobilenet_v3_*_seg variants get the head of TF DeepLab's mobilenet_v3 model zoo
(aspp_convs_filters=128, aspp_with_squeeze_and_excitation, image_se_uses_qsigmoid,
aspp_with_concat_projection=0, decoder_use_sum_merge, decoder_output_is_logits, decoder at
output stride 8), with --image-pooling-crop-size / --image-pooling-stride for the gate's
pooling windows. TF needs static shapes there; here the gate is resized to the features'
size, which is TF's resize_height/width for DeepLab's crop sizes (k * output_stride + 1),
and squeeze-excite pools with reduce_mean, which is its avg_pool over the whole map.

OUT_DIR gets model.ckpt.{index,data-*} (a V2 checkpoint, no meta graph), variables.json
(config, and every variable's name and shape in creation order) and reference.npz: per size
HxW, `image_HxW` (1, H, W, 3) uint8, `logits_HxW` (1, H, W, C) as DeepLab's predict_labels
makes them (logits at the logits stride, resized to the image with align_corners=True), and
the inner tensors `logits_os_HxW` (before that resize), `features_HxW` (backbone output),
`aspp_HxW` (concat_projection output) and, with a decoder, `low_level_HxW` (the decoder's
end point) and `decoder_HxW` (decoder_conv1 output), all NHWC float32.

The random weights are seeded: kernels He-normal, biases ~ N(0, 0.1), and batch norm gamma ~
U(0.5, 1.5), beta ~ N(0, 0.2), moving mean ~ N(0, 0.1) and moving variance ~ U(0.5, 1.5), the
last two then scaled per layer so that activations stay near unit scale through the network
(xception_65's 65 layers and residual sums included): a second copy of the graph, whose batch
norms use the layer input's mean square q (over the reference images, one value per layer) as
moving_mean * sqrt(q) and moving_variance * q, is run first, and those become the saved moving
statistics. A per-layer scalar (rather than per-channel batch statistics) keeps the random
network well conditioned: a small change of the input changes the output by about as much, not
more, so the rounding differences of another framework stay small.

Inputs are fed as DeepLab feeds them: float 0..255, batch 1, any size (crop_size = None: image
pooling is a global mean and the decoder and logit sizes follow the input). With DeepLab's
crop sizes (k * output_stride + 1) this is the same network as one built for that crop size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

tf1 = tf.compat.v1

# Batch norm epsilons: xception_arg_scope(batch_norm_epsilon=1e-3) as feature_extractor calls it;
# slim's default 1e-3 for MobilenetV2 (training_scope sets only decay); 1e-5 in ASPP and the
# decoder (model.py), which TF 1.x's fused batch norm raised to its minimum 1.001e-5.
XCEPTION_EPS, MOBILENET_EPS, HEAD_EPS = 1e-3, 1e-3, 1.001e-5
RESNET_EPS = 1.001e-5  # resnet_arg_scope(batch_norm_epsilon=1e-5), fused
MEAN_RGB = [123.15, 115.90, 103.06]  # feature_extractor._MEAN_RGB (resnet_v1_50/101)
RESNET_UNITS = {"resnet_v1_50": [3, 4, 6, 3], "resnet_v1_101": [3, 4, 23, 3]}
RESNET_END_POINT = "block1/unit_2/bottleneck_v1/conv3"
# feature_extractor.networks_to_feature_maps[variant][DECODER_END_POINTS].
DECODER_END_POINTS = {
    "xception_65": {
        4: "xception_65/entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise",
        8: "xception_65/entry_flow/block3/unit_1/xception_module/separable_conv2_pointwise",
        16: "xception_65/exit_flow/block1/unit_1/xception_module/separable_conv2_pointwise",
    },
    "xception_41": {
        4: "xception_41/entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise",
        8: "xception_41/entry_flow/block3/unit_1/xception_module/separable_conv2_pointwise",
        16: "xception_41/exit_flow/block1/unit_1/xception_module/separable_conv2_pointwise",
    },
    "xception_71": {
        4: "xception_71/entry_flow/block3/unit_1/xception_module/separable_conv2_pointwise",
        8: "xception_71/entry_flow/block5/unit_1/xception_module/separable_conv2_pointwise",
        16: "xception_71/exit_flow/block1/unit_1/xception_module/separable_conv2_pointwise",
    },
    **{
        v: {4: f"{v.removesuffix('_beta')}/{RESNET_END_POINT}"}
        for v in ("resnet_v1_50", "resnet_v1_50_beta", "resnet_v1_101", "resnet_v1_101_beta")
    },
    "mobilenet_v2": {
        4: "layer_4/depthwise_output",
        8: "layer_7/depthwise_output",
        16: "layer_14/depthwise_output",
    },
    "mobilenet_v3_large_seg": {
        4: "layer_4/depthwise_output",
        8: "layer_7/depthwise_output",
        16: "layer_13/depthwise_output",
    },
    "mobilenet_v3_small_seg": {
        4: "layer_2/depthwise_output",
        8: "layer_4/depthwise_output",
        16: "layer_9/depthwise_output",
    },
}
# (scope, depth_list, skip_connection_type, activation_fn_in_separable_conv, units, stride)
XCEPTION_EXIT = [
    ("exit_flow/block1", [728, 1024, 1024], "conv", False, 1, 2),
    ("exit_flow/block2", [1536, 1536, 2048], "none", True, 1, 1),
]
XCEPTION_65_BLOCKS = [
    ("entry_flow/block1", [128, 128, 128], "conv", False, 1, 2),
    ("entry_flow/block2", [256, 256, 256], "conv", False, 1, 2),
    ("entry_flow/block3", [728, 728, 728], "conv", False, 1, 2),
    ("middle_flow/block1", [728, 728, 728], "sum", False, 16, 1),
    *XCEPTION_EXIT,
]
XCEPTION_BLOCKS = {
    "xception_41": [
        *XCEPTION_65_BLOCKS[:3],
        ("middle_flow/block1", [728] * 3, "sum", False, 8, 1),
        *XCEPTION_EXIT,
    ],  # fmt: skip
    "xception_65": XCEPTION_65_BLOCKS,
    "xception_71": [
        ("entry_flow/block1", [128, 128, 128], "conv", False, 1, 2),
        ("entry_flow/block2", [256, 256, 256], "conv", False, 1, 1),
        ("entry_flow/block3", [256, 256, 256], "conv", False, 1, 2),
        ("entry_flow/block4", [728, 728, 728], "conv", False, 1, 1),
        ("entry_flow/block5", [728, 728, 728], "conv", False, 1, 2),
        ("middle_flow/block1", [728, 728, 728], "sum", False, 16, 1),
        *XCEPTION_EXIT,
    ],
}
# mobilenet_v2.V2_DEF spec after the first conv: (expansion, num_outputs, stride).
MOBILENET_V2_SPEC = [(1, 16, 1), (6, 24, 2), (6, 24, 1)] + [(6, 32, 2)] + [(6, 32, 1)] * 2
MOBILENET_V2_SPEC += [(6, 64, 2)] + [(6, 64, 1)] * 3 + [(6, 96, 1)] * 3
MOBILENET_V2_SPEC += [(6, 160, 2)] + [(6, 160, 1)] * 2 + [(6, 320, 1)]  # ends at layer_18


def hard_swish(x):
    """mobilenet_v3.hard_swish."""
    return x * tf.nn.relu6(x + np.float32(3)) * np.float32(1.0 / 6.0)


def q_sigmoid(x):
    """deeplab/core/utils.q_sigmoid, and mobilenet_v3's squeeze-excite gate."""
    return tf.nn.relu6(x + 3) * 0.16667


_R, _H = tf.nn.relu, hard_swish
# mobilenet_v3.V3_LARGE / V3_SMALL after the first conv, as feature_extractor's *_seg
# variants change them (the last stage and final conv at half width): (expansion,
# num_outputs, kernel, stride, activation, squeeze-excite); then the final 1x1 conv.
MOBILENET_V3_SPEC = {
    "mobilenet_v3_large_seg": (
        [(1, 16, 3, 1, _R, False), (4, 24, 3, 2, _R, False), (3, 24, 3, 1, _R, False)]
        + [(3, 40, 5, 2, _R, True)]
        + [(3, 40, 5, 1, _R, True)] * 2
        + [(6, 80, 3, 2, _H, False), (2.5, 80, 3, 1, _H, False)]
        + [(184 / 80, 80, 3, 1, _H, False)] * 2
        + [(6, 112, 3, 1, _H, True)] * 2
        + [(3, 80, 5, 2, _H, True)]
        + [(6, 80, 5, 1, _H, True)] * 2,
        480,
    ),
    "mobilenet_v3_small_seg": (
        [(1, 16, 3, 2, _R, True), (72 / 16, 24, 3, 2, _R, False), (88 / 24, 24, 3, 1, _R, False)]
        + [(4, 40, 5, 2, _H, True)]
        + [(6, 40, 5, 1, _H, True)] * 2
        + [(3, 48, 5, 1, _H, True)] * 2
        + [(3, 48, 5, 2, _H, True)]
        + [(6, 48, 5, 1, _H, True)] * 2,
        288,
    ),
}


def scale_dimension(dim, scale):
    """deeplab/core/utils.scale_dimension for a scalar int32 tensor."""
    return tf.cast((tf.cast(dim, tf.float32) - 1.0) * scale + 1.0, tf.int32)


def resize_bilinear(x, size):
    return tf1.image.resize_bilinear(x, size, align_corners=True)


def fixed_padding(x, kernel_size, rate=1):
    """xception.fixed_padding / resnet_utils.conv2d_same's explicit padding."""
    pad_total = kernel_size + (kernel_size - 1) * (rate - 1) - 1
    beg = pad_total // 2
    return tf.pad(x, [[0, 0], [beg, pad_total - beg], [beg, pad_total - beg], [0, 0]])


def make_divisible(v, divisor, min_value=None):
    """mobilenet._make_divisible."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return int(new_v + divisor if new_v < 0.9 * v else new_v)


class Net:
    """Slim-like layers. Variables are made with tf1.get_variable under the same scopes as
    slim's, so their names match; their values are drawn here and loaded after init."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.values: dict[str, np.ndarray] = {}  # variable name -> value, in creation order
        self.variables: dict[str, tf1.Variable] = {}
        self.calibrating = False  # building the calibration copy (see the module doc)
        self.bn_stats: list = []  # (moving_mean, moving_variance, mean square of input)
        self.end_points: dict[str, tf.Tensor] = {}

    def var(self, name, shape):
        v = tf1.get_variable(name, shape, tf.float32, tf1.zeros_initializer())
        if v.op.name not in self.values:
            self.variables[v.op.name] = v
            self.values[v.op.name] = self._draw(name, shape).astype(np.float32)
        return v

    def _draw(self, name, shape):
        r = self.rng
        if name == "weights":  # [kh, kw, in, out]; He-normal
            return r.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
        if name == "depthwise_weights":  # [kh, kw, in, 1]: fan-in kh * kw
            return r.normal(0.0, np.sqrt(2.0 / np.prod(shape[:2])), shape)
        if name in ("gamma", "moving_variance"):
            return r.uniform(0.5, 1.5, shape)
        return r.normal(0.0, {"beta": 0.2, "moving_mean": 0.1, "biases": 0.1}[name], shape)

    def batch_norm(self, x, eps):
        """slim.batch_norm(scale=True, center=True), is_training=False."""
        c = x.shape[-1]
        with tf1.variable_scope("BatchNorm"):
            beta, gamma = self.var("beta", [c]), self.var("gamma", [c])
            mean = self.var("moving_mean", [c])
            variance = self.var("moving_variance", [c])
        if self.calibrating:  # the layer's mean square scales the drawn moving statistics
            q = tf.reduce_mean(tf.square(x))
            self.bn_stats.append((mean, variance, q))
            return tf.nn.batch_normalization(x, mean * tf.sqrt(q), variance * q, beta, gamma, eps)
        y, _, _ = tf1.nn.fused_batch_norm(x, gamma, beta, mean, variance, eps, is_training=False)
        return y

    def conv2d(self, x, filters, k, scope, stride=1, rate=1, padding="SAME", eps=None,
               act=tf.nn.relu, bias=False):  # fmt: skip
        """slim.conv2d: `weights` [k, k, in, out], then BatchNorm (no biases) or biases."""
        with tf1.variable_scope(scope):
            w = self.var("weights", [k, k, x.shape[-1], filters])
            y = tf.nn.convolution(x, w, strides=stride, padding=padding, dilations=rate)
            if eps is not None:
                y = self.batch_norm(y, eps)
            elif bias:
                y = tf.nn.bias_add(y, self.var("biases", [filters]))
            y = act(y) if act else y
            self.end_points[tf1.get_variable_scope().name] = y
            return y

    def depthwise(self, x, scope, stride=1, rate=1, padding="SAME", eps=None, act=tf.nn.relu,
                  k=3):  # fmt: skip
        """slim.separable_conv2d(num_outputs=None, depth_multiplier=1): `depthwise_weights`."""
        with tf1.variable_scope(scope):
            w = self.var("depthwise_weights", [k, k, x.shape[-1], 1])
            s = [1, stride, stride, 1]
            y = tf1.nn.depthwise_conv2d(x, w, s, padding, rate=[rate, rate])
            y = self.batch_norm(y, eps)
            y = act(y) if act else y
            self.end_points[tf1.get_variable_scope().name] = y
            return y

    def split_separable_conv2d(self, x, filters, rate, scope):
        """deeplab/core/utils.split_separable_conv2d inside the ASPP / decoder arg_scope."""
        x = self.depthwise(x, scope + "_depthwise", rate=rate, eps=HEAD_EPS)
        return self.conv2d(x, filters, 1, scope + "_pointwise", eps=HEAD_EPS)

    # ---------------------------------------------------------------- xception_65
    def xception_module(self, x, depths, skip, act_in_sep, stride, rate):
        with tf1.variable_scope("xception_module"):
            residual = x
            for i in range(3):
                s = stride if i == 2 else 1
                if not act_in_sep:  # the original design: ReLU before each separable conv
                    residual = tf.nn.relu(residual)
                act = tf.nn.relu if act_in_sep else None
                name = f"separable_conv{i + 1}"
                if s == 1:  # separable_conv2d_same: SAME unless strided
                    pad = "SAME"
                else:  # use_explicit_padding=True (xception_arg_scope)
                    residual, pad = fixed_padding(residual, 3, rate), "VALID"
                residual = self.depthwise(residual, name + "_depthwise", s, rate, pad,
                                          XCEPTION_EPS, act)  # fmt: skip
                residual = self.conv2d(residual, depths[i], 1, name + "_pointwise",
                                       eps=XCEPTION_EPS, act=act)  # fmt: skip
            if skip == "conv":
                shortcut = self.conv2d(x, depths[-1], 1, "shortcut", stride=stride,
                                       eps=XCEPTION_EPS, act=None)  # fmt: skip
                return residual + shortcut
            return residual + x if skip == "sum" else residual

    def xception(self, x, variant, output_stride):
        with tf1.variable_scope(variant):
            x = fixed_padding(x, 3)  # resnet_utils.conv2d_same, stride 2
            x = self.conv2d(x, 32, 3, "entry_flow/conv1_1", 2, padding="VALID", eps=XCEPTION_EPS)
            x = self.conv2d(x, 64, 3, "entry_flow/conv1_2", eps=XCEPTION_EPS)
            target, current, rate = output_stride // 2, 1, 1  # stack_blocks_dense
            for scope, depths, skip, act_in_sep, units, stride in XCEPTION_BLOCKS[variant]:
                for i in range(units):
                    with tf1.variable_scope(f"{scope}/unit_{i + 1}"):
                        if current == target:  # atrous from here on; multi_grid [1, 1, 1]
                            x = self.xception_module(x, depths, skip, act_in_sep, 1, rate)
                            rate *= stride
                        else:
                            x = self.xception_module(x, depths, skip, act_in_sep, stride, 1)
                            current *= stride
            return x

    # ---------------------------------------------------------------- resnet_v1
    def conv2d_same(self, x, filters, k, stride, rate, scope):
        """resnet_utils.conv2d_same: SAME at stride 1, explicit even padding when strided."""
        if stride == 1:
            return self.conv2d(x, filters, k, scope, rate=rate, eps=RESNET_EPS)
        x = fixed_padding(x, k, rate)
        return self.conv2d(x, filters, k, scope, stride, rate, "VALID", RESNET_EPS)

    def bottleneck(self, x, depth, depth_bottleneck, stride, rate):
        """deeplab/core/resnet_v1_beta.bottleneck."""
        with tf1.variable_scope("bottleneck_v1"):
            if depth == x.shape[-1]:  # resnet_utils.subsample: a strided 1x1 max pool
                shortcut = x if stride == 1 else tf1.nn.max_pool2d(x, 1, stride, "SAME")
            else:
                shortcut = self.conv2d(x, depth, 1, "shortcut", stride=stride, eps=RESNET_EPS,
                                       act=None)  # fmt: skip
            r = self.conv2d(x, depth_bottleneck, 1, "conv1", eps=RESNET_EPS)
            r = self.conv2d_same(r, depth_bottleneck, 3, stride, rate, "conv2")
            r = self.conv2d(r, depth, 1, "conv3", eps=RESNET_EPS, act=None)
            return tf.nn.relu(shortcut + r)

    def resnet_v1(self, x, variant, output_stride):
        """resnet_v1_beta.resnet_v1_{50,101}[_beta]: the stride of blocks 1-3 on their last
        unit, multi_grid [1, 1, 1] in block4, the beta's stem of three 3x3 convs."""
        scope = variant.removesuffix("_beta")
        with tf1.variable_scope(scope):
            if variant.endswith("_beta"):  # root_block_fn_for_beta_variant
                x = self.conv2d_same(x, 64, 3, 2, 1, "conv1_1")
                x = self.conv2d_same(x, 64, 3, 1, 1, "conv1_2")
                x = self.conv2d_same(x, 128, 3, 1, 1, "conv1_3")
            else:
                x = self.conv2d_same(x, 64, 7, 2, 1, "conv1")
            x = tf1.nn.max_pool2d(x, 3, 2, "SAME")  # resnet_arg_scope: SAME pooling
            target, current, rate = output_stride // 4, 1, 1  # stack_blocks_dense
            for b, units in enumerate(RESNET_UNITS[scope], 1):
                base = 64 * 2 ** (b - 1)
                for i in range(units):
                    stride = 2 if b < 4 and i == units - 1 else 1
                    with tf1.variable_scope(f"block{b}/unit_{i + 1}"):
                        if current == target:
                            x = self.bottleneck(x, base * 4, base, 1, rate)
                            rate *= stride
                        else:
                            x = self.bottleneck(x, base * 4, base, stride, 1)
                            current *= stride
            return x

    # ---------------------------------------------------------------- mobilenet_v2
    def mobilenet_v2(self, x, output_stride):
        """mobilenet_v2.mobilenet_base(final_endpoint='layer_18') as feature_extractor calls
        it: use_explicit_padding=False (TF 'SAME' everywhere), relu6, no Conv_1."""
        with tf1.variable_scope("MobilenetV2"):
            x = self.conv2d(x, 32, 3, "Conv", 2, eps=MOBILENET_EPS, act=tf.nn.relu6)
            current, rate = 2, 1
            for i, (expansion, outputs, stride) in enumerate(MOBILENET_V2_SPEC):
                if current == output_stride:
                    layer_stride, layer_rate, rate = 1, rate, rate * stride
                else:
                    layer_stride, layer_rate, current = stride, 1, current * stride
                with tf1.variable_scope("expanded_conv" + (f"_{i}" if i else "")):
                    inputs, depth_in = x, x.shape[-1]
                    inner = make_divisible(depth_in * expansion, 1 if expansion == 1 else 8)
                    if inner > depth_in:
                        x = self.conv2d(x, inner, 1, "expand", eps=MOBILENET_EPS, act=tf.nn.relu6)
                    x = self.depthwise(x, "depthwise", layer_stride, layer_rate, "SAME",
                                       MOBILENET_EPS, tf.nn.relu6)  # fmt: skip
                    self.end_points[f"layer_{i + 2}/depthwise_output"] = x
                    x = self.conv2d(x, outputs, 1, "project", eps=MOBILENET_EPS, act=None)
                    if layer_stride == 1 and outputs == depth_in:
                        x = x + inputs
            return x

    # ---------------------------------------------------------------- mobilenet_v3
    def squeeze_excite(self, x):
        """conv_blocks.squeeze_excite(squeeze_factor=4, relu inside, q_sigmoid gate)."""
        with tf1.variable_scope("squeeze_excite"):
            squeeze = make_divisible(int(x.shape[-1]) / 4, 8)
            pooled = tf.reduce_mean(x, [1, 2], keepdims=True)
            s = self.conv2d(pooled, squeeze, 1, "Conv", act=tf.nn.relu, bias=True)
            return x * self.conv2d(s, int(x.shape[-1]), 1, "Conv_1", act=q_sigmoid, bias=True)

    def mobilenet_v3(self, x, variant, output_stride):
        """mobilenet_v3.mobilenet_base as feature_extractor.mobilenet_v3_*_seg calls it (up
        to layer_17 / layer_13, the final 1x1 conv): SAME padding, batch norm eps 1e-3."""
        spec, final = MOBILENET_V3_SPEC[variant]
        with tf1.variable_scope("MobilenetV3"):
            x = self.conv2d(x, 16, 3, "Conv", 2, eps=MOBILENET_EPS, act=hard_swish)
            current, rate = 2, 1
            for i, (expansion, outputs, k, stride, act, se) in enumerate(spec):
                if current == output_stride:
                    layer_stride, layer_rate, rate = 1, rate, rate * stride
                else:
                    layer_stride, layer_rate, current = stride, 1, current * stride
                with tf1.variable_scope("expanded_conv" + (f"_{i}" if i else "")):
                    inputs, depth_in = x, int(x.shape[-1])
                    inner = make_divisible(depth_in * expansion, 8)  # expand_input_by_factor
                    if inner > depth_in:
                        x = self.conv2d(x, inner, 1, "expand", eps=MOBILENET_EPS, act=act)
                    x = self.depthwise(x, "depthwise", layer_stride, layer_rate, "SAME",
                                       MOBILENET_EPS, act, k)  # fmt: skip
                    self.end_points[f"layer_{i + 2}/depthwise_output"] = x
                    if se:  # expansion_transform, after the depthwise_output end point
                        x = self.squeeze_excite(x)
                    x = self.conv2d(x, outputs, 1, "project", eps=MOBILENET_EPS, act=None)
                    if layer_stride == 1 and outputs == depth_in:
                        x = x + inputs
            return self.conv2d(x, final, 1, "Conv_1", eps=MOBILENET_EPS, act=hard_swish)

    def lraspp(self, features, images, num_classes, variant, decoder_os, depth, pool_crop,
               pool_stride, output_stride):  # fmt: skip
        """extract_features with aspp_with_squeeze_and_excitation (q_sigmoid) and no
        concat projection, then refine_by_decoder with decoder_use_sum_merge and
        decoder_output_is_logits: the logits at the decoder's stride, and inner tensors."""
        if pool_crop:  # image_pooling_crop_size: avg_pool2d(VALID) with image_pooling_stride
            window = [int((c - 1) / output_stride + 1) for c in pool_crop]
            pooled = tf1.nn.avg_pool2d(features, window, pool_stride, "VALID")
        else:
            pooled = tf.reduce_mean(features, [1, 2], keepdims=True)
        gate = self.conv2d(pooled, depth, 1, "image_pooling", act=q_sigmoid, bias=True)
        gate = resize_bilinear(gate, tf.shape(features)[1:3])
        x = self.conv2d(features, depth, 1, "aspp0", eps=HEAD_EPS) * gate
        inner = {"features": features, "aspp": x}
        size = tf.shape(images)[1:3]
        with tf1.variable_scope("decoder"):
            low = self.end_points[DECODER_END_POINTS[variant][decoder_os]]
            inner["low_level"] = low
            projected = self.conv2d(low, num_classes, 1, "feature_projection0", act=None,
                                    bias=True)  # fmt: skip
            hw = [scale_dimension(size[0], 1.0 / decoder_os),
                  scale_dimension(size[1], 1.0 / decoder_os)]  # fmt: skip
            x, projected = resize_bilinear(x, hw), resize_bilinear(projected, hw)
            logits = self.conv2d(x, num_classes, 1, "decoder_conv0", act=None, bias=True)
        return logits + projected, inner

    # ---------------------------------------------------------------- DeepLab head
    def deeplab(self, images, variant, num_classes, output_stride, atrous_rates, decoder_os,
                pooling=None):  # fmt: skip
        """model.multi_scale_logits(image_pyramid=[1.0]) with crop_size=None; returns the
        logits at the logits stride and a dict of inner tensors. `pooling`: (depth, crop,
        stride) of the mobilenet_v3 head."""
        self.end_points = {}
        if variant in ("resnet_v1_50", "resnet_v1_101"):  # _preprocess_subtract_imagenet_mean
            x = images - tf.constant(MEAN_RGB, tf.float32)
        else:
            x = (2.0 / 255.0) * images - 1.0  # _preprocess_zero_mean_unit_range
        if variant.startswith("xception"):
            features = self.xception(x, variant, output_stride)
        elif variant.startswith("resnet"):
            features = self.resnet_v1(x, variant, output_stride)
        elif variant.startswith("mobilenet_v3"):
            features = self.mobilenet_v3(x, variant, output_stride)
            logits, inner = self.lraspp(features, images, num_classes, variant, decoder_os,
                                        *pooling, output_stride)  # fmt: skip
            size = tf.shape(images)[1:3]
            hw = [scale_dimension(size[0], 1.0 / decoder_os),
                  scale_dimension(size[1], 1.0 / decoder_os)]  # fmt: skip
            return resize_bilinear(logits, hw), inner
        else:
            features = self.mobilenet_v2(x, output_stride)
        inner = {"features": features}
        # extract_features: ASPP with batch norm (image pooling, aspp0, aspp1..3, projection)
        pooled = tf.reduce_mean(features, [1, 2], keepdims=True)
        image_feature = self.conv2d(pooled, 256, 1, "image_pooling", eps=HEAD_EPS)
        branches = [resize_bilinear(image_feature, tf.shape(features)[1:3])]
        branches.append(self.conv2d(features, 256, 1, "aspp0", eps=HEAD_EPS))
        for i, rate in enumerate(atrous_rates, 1):
            branches.append(self.split_separable_conv2d(features, 256, rate, f"aspp{i}"))
        x = self.conv2d(tf.concat(branches, 3), 256, 1, "concat_projection", eps=HEAD_EPS)
        inner["aspp"] = x  # concat_projection_dropout is the identity when not training
        size = tf.shape(images)[1:3]
        if decoder_os:  # refine_by_decoder, separable convs, concat merge
            with tf1.variable_scope("decoder"):
                low = self.end_points[DECODER_END_POINTS[variant][decoder_os]]
                inner["low_level"] = low
                projected = self.conv2d(low, 48, 1, "feature_projection0", eps=HEAD_EPS)
                hw = [scale_dimension(size[0], 1.0 / decoder_os),
                      scale_dimension(size[1], 1.0 / decoder_os)]  # fmt: skip
                x = tf.concat([resize_bilinear(x, hw), resize_bilinear(projected, hw)], 3)
                x = self.split_separable_conv2d(x, 256, 1, "decoder_conv0")
                x = self.split_separable_conv2d(x, 256, 1, "decoder_conv1")
                inner["decoder"] = x
        with tf1.variable_scope("logits"):  # get_branch_logits, kernel 1, scope 'semantic'
            logits = self.conv2d(x, num_classes, 1, "semantic", act=None, bias=True)
        logits_os = decoder_os or output_stride
        hw = [scale_dimension(size[0], 1.0 / logits_os), scale_dimension(size[1], 1.0 / logits_os)]
        return resize_bilinear(logits, hw), inner


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--variant", choices=sorted(DECODER_END_POINTS), default="xception_65")
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--output-stride", type=int, choices=[8, 16, 32], default=16)
    p.add_argument("--sizes", nargs="+", default=["65x97", "129x161"], help="HxW ...")
    p.add_argument(
        "--decoder-output-stride",
        default=None,
        help="4, 8, 16 or none (default: 4 for xception and resnet, none for mobilenet_v2, "
        "8 for mobilenet_v3)",
    )
    p.add_argument("--image-pooling-crop-size", default=None, help="H,W (mobilenet_v3 head)")
    p.add_argument("--image-pooling-stride", default="1,1", help="H,W (mobilenet_v3 head)")
    p.add_argument("--aspp-depth", type=int, default=128, help="mobilenet_v3 head's filters")
    p.add_argument(
        "--atrous-rates",
        default=None,
        help="comma-separated or none (default: xception and resnet 6,12,18 at output "
        "stride 16, 12,24,36 at 8; mobilenet_v2 none, as in DeepLab's docs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    xception = not args.variant.startswith("mobilenet")  # and resnet: DeepLab's v3+ recipe
    v3 = args.variant.startswith("mobilenet_v3")
    dos = args.decoder_output_stride or ("4" if xception else "8" if v3 else "none")
    dos = None if dos.lower() == "none" else int(dos)
    if dos not in (None, 4, 8, 16) or (v3 and dos is None):
        p.error("--decoder-output-stride: 4, 8, 16 or none (mobilenet_v3: not none)")
    pool_crop = args.image_pooling_crop_size
    pool_crop = [int(v) for v in pool_crop.split(",")] if pool_crop else None
    pooling = (args.aspp_depth, pool_crop, [int(v) for v in args.image_pooling_stride.split(",")])
    rates = args.atrous_rates
    if rates is None:
        rates = "none" if not xception else ("12,24,36" if args.output_stride == 8 else "6,12,18")
    rates = [] if rates.lower() == "none" else [int(r) for r in rates.split(",")]
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    config = {"variant": args.variant, "num_classes": args.num_classes,
              "output_stride": args.output_stride, "decoder_output_stride": dos,
              "atrous_rates": rates, "seed": args.seed, "sizes": sizes,
              "pooling": pooling if v3 else None}  # fmt: skip

    tf1.disable_eager_execution()
    tf1.reset_default_graph()
    net = Net(args.seed)
    build = (args.variant, args.num_classes, args.output_stride, rates, dos, pooling)
    with tf1.variable_scope(tf1.get_variable_scope(), reuse=tf1.AUTO_REUSE):
        net.calibrating = True
        calib_in = tf1.placeholder(tf.float32, [None, None, None, 3], "calibration_images")
        net.deeplab(calib_in, *build)
        net.calibrating = False
        images = tf1.placeholder(tf.float32, [1, None, None, 3], "images")
        logits_os, inner = net.deeplab(images, *build)
    logits = resize_bilinear(logits_os, tf.shape(images)[1:3])  # predict_labels
    fetch = {"logits": logits, "logits_os": logits_os, **inner}

    session_config = tf1.ConfigProto(intra_op_parallelism_threads=args.threads,
                                     inter_op_parallelism_threads=1)  # fmt: skip
    rng = np.random.default_rng(args.seed + 1)
    inputs = {f"{h}x{w}": rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8) for h, w in sizes}
    with tf1.Session(config=session_config) as sess:
        feed = {v.initial_value: net.values[n] for n, v in net.variables.items()}
        sess.run(tf1.global_variables_initializer(), feed)
        mean_squares = [q for _, _, q in net.bn_stats]
        runs = [sess.run(mean_squares, {calib_in: im.astype(np.float32)}) for im in inputs.values()]
        for (mean, variance, _), q in zip(net.bn_stats, np.mean(runs, 0), strict=True):
            net.values[mean.op.name] = net.values[mean.op.name] * np.float32(np.sqrt(q))
            net.values[variance.op.name] = net.values[variance.op.name] * np.float32(q)
            mean.load(net.values[mean.op.name], sess)
            variance.load(net.values[variance.op.name], sess)

        args.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = str(args.out_dir / "model.ckpt")
        tf1.train.Saver(list(net.variables.values())).save(sess, ckpt, write_meta_graph=False)
        arrays = {}
        for size, image in inputs.items():
            out = sess.run(fetch, {images: image.astype(np.float32)})
            arrays[f"image_{size}"] = image
            arrays.update({f"{k}_{size}": v.astype(np.float32) for k, v in out.items()})

    saved = dict(tf.train.list_variables(ckpt))
    shapes = {n: list(v.shape) for n, v in net.variables.items()}
    assert saved == shapes, "the checkpoint does not hold the graph's variables"
    np.savez(args.out_dir / "reference.npz", **arrays)
    variables = [{"name": n, "shape": s} for n, s in shapes.items()]
    text = json.dumps({"config": config, "variables": variables}, indent=1)
    (args.out_dir / "variables.json").write_text(text + "\n")
    print(f"{len(variables)} variables, {sum(int(np.prod(s)) for s in shapes.values())} values")
    for k in sorted(arrays):
        a = arrays[k]
        print(f"{k}: {a.shape} {a.dtype} min {a.min():.3g} max {a.max():.3g} std {a.std():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
