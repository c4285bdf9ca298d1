"""The zoo: real architectures (torchvision, timm, Hugging Face) with random weights.

Nothing is downloaded: every model is built from code, the transformers ones from small
configs written here. torchvision 0.28's wheel is a CUDA build whose C++ ops do not load
against a CPU torch; its pure-Python model code only needs the two op schemas it
registers (`torchvision::nms`, `torchvision::qnms`), so `register_torchvision_ops` defines
them with torch.library before torchvision (and timm/transformers, which import it) loads.
"""

from __future__ import annotations

import torch

_LIB = None


def register_torchvision_ops() -> None:
    """Define torchvision's op schemas once, so `import torchvision` works without its C++ ops."""
    global _LIB
    if _LIB is not None:
        return
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - already defined (e.g. a working build)
        _LIB = True
        return
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _img(size=64):
    return torch.randn(1, 3, size, size)


def _ids(vocab=100, n=8):
    return torch.randint(0, vocab, (1, n))


# --------------------------------------------------------------------------- torchvision


def _tv(name, size=64, **kw):
    def build():
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, **kw), _img(size)

    return build


def _tv_resnext():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10), _img()


def _tv_resnet50():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10), _img()


def _tv_densenet():
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10), _img()


def _tv_vgg():
    from torch import nn
    from torchvision.models.vgg import VGG, make_layers

    m = VGG(make_layers([16, "M", 32, "M", 64, "M"], batch_norm=True), num_classes=10)
    m.avgpool = nn.AdaptiveAvgPool2d(2)
    m.classifier = nn.Sequential(nn.Linear(256, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return m, _img()


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=10), _img()


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    ), _img(32)


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.0, num_classes=10), _img()


def _tv_maxvit():
    from torchvision.models.maxvit import MaxVit

    m = MaxVit(
        input_size=(64, 64),
        stem_channels=16,
        partition_size=2,
        block_channels=[32, 64],
        block_layers=[1, 1],
        head_dim=16,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
    return m, _img()


def _tv_efficientnet():
    import torchvision.models as tvm

    return tvm.efficientnet_b0(weights=None, num_classes=10), _img()


# --------------------------------------------------------------------------- timm


def _timm(name, size=64, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw), _img(size)

    return build


def _timm_mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64), _img(32)


_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4}


# --------------------------------------------------------------------------- transformers

_TEXT = {
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 32,
}


def _hf(model_cls, config_cls, inputs=_ids, **cfg):
    def build():
        import transformers as tf

        config = getattr(tf, config_cls)(**cfg)
        model = getattr(tf, model_cls)(config)
        return model, inputs()

    return build


_DEC = dict(_TEXT, num_key_value_heads=2, use_cache=False, tie_word_embeddings=False)
_HFVIS = {
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}

MODELS = {
    # torchvision (20)
    "tv_resnet18": _tv("resnet18", num_classes=10),
    "tv_resnet50": _tv_resnet50,
    "tv_resnext": _tv_resnext,
    "tv_mobilenet_v2": _tv("mobilenet_v2", num_classes=10),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small", num_classes=10),
    "tv_mobilenet_v3_large": _tv("mobilenet_v3_large", num_classes=10),
    "tv_efficientnet_b0": _tv_efficientnet,
    "tv_shufflenet_v2": _tv("shufflenet_v2_x0_5", num_classes=10),
    "tv_squeezenet": _tv("squeezenet1_1", num_classes=10),
    "tv_densenet": _tv_densenet,
    "tv_vgg_bn": _tv_vgg,
    "tv_alexnet": _tv("alexnet", num_classes=10),
    "tv_googlenet": _tv("googlenet", num_classes=10, aux_logits=False, init_weights=True),
    "tv_mnasnet": _tv("mnasnet0_5", num_classes=10),
    "tv_regnet_x": _tv("regnet_x_400mf", num_classes=10),
    "tv_regnet_y": _tv("regnet_y_400mf", num_classes=10),
    "tv_convnext": _tv_convnext,
    "tv_vit": _tv_vit,
    "tv_swin": _tv_swin,
    "tv_maxvit": _tv_maxvit,
    # timm (11)
    "timm_vit": _timm("vit_tiny_patch16_224", 32, **_VIT),
    "timm_deit": _timm("deit_tiny_patch16_224", 32, **_VIT),
    "timm_resnet18d": _timm("resnet18d"),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilenetv3": _timm("mobilenetv3_small_100"),
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_levit": _timm("levit_128s", 64, img_size=64),
    "timm_regnetx": _timm("regnetx_002"),
    "timm_mixer": _timm_mixer,
    "timm_swin": _timm(
        "swin_tiny_patch4_window7_224", 64, img_size=64, window_size=4, embed_dim=32, depths=(1, 1), num_heads=(2, 4)
    ),
    "timm_ghostnet": _timm("ghostnet_100"),
    # transformers (16)
    "hf_bert": _hf("BertModel", "BertConfig", **_TEXT),
    "hf_roberta": _hf("RobertaModel", "RobertaConfig", **dict(_TEXT, max_position_embeddings=40)),
    "hf_electra": _hf("ElectraModel", "ElectraConfig", **dict(_TEXT, embedding_size=32)),
    "hf_distilbert": _hf(
        "DistilBertModel",
        "DistilBertConfig",
        vocab_size=100,
        dim=64,
        n_layers=2,
        n_heads=4,
        hidden_dim=128,
        max_position_embeddings=32,
    ),
    "hf_albert": _hf("AlbertModel", "AlbertConfig", **dict(_TEXT, embedding_size=32)),
    "hf_gpt2": _hf(
        "GPT2Model",
        "GPT2Config",
        vocab_size=100,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "hf_t5_encoder": _hf(
        "T5EncoderModel",
        "T5Config",
        vocab_size=100,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        use_cache=False,
    ),
    "hf_llama": _hf("LlamaModel", "LlamaConfig", **_DEC),
    "hf_mistral": _hf("MistralModel", "MistralConfig", **dict(_DEC, sliding_window=None)),
    "hf_qwen2": _hf("Qwen2Model", "Qwen2Config", **_DEC),
    "hf_vit": _hf("ViTModel", "ViTConfig", lambda: _img(32), **_HFVIS),
    "hf_swin": _hf(
        "SwinModel",
        "SwinConfig",
        _img,
        image_size=64,
        patch_size=4,
        embed_dim=32,
        depths=[1, 1],
        num_heads=[2, 4],
        window_size=4,
    ),
    "hf_mobilenet_v2": _hf("MobileNetV2Model", "MobileNetV2Config", _img, image_size=64, depth_multiplier=0.35),
    "hf_mobilevit": _hf(
        "MobileViTModel",
        "MobileViTConfig",
        _img,
        image_size=64,
        hidden_sizes=[32, 48, 64],
        neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160],
        num_attention_heads=2,
    ),
    "hf_resnet": _hf(
        "ResNetModel", "ResNetConfig", _img, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]
    ),
    "hf_convnext": _hf("ConvNextModel", "ConvNextConfig", _img, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
}


def build(name: str, seed: int = 0):
    """(model in eval mode, example input) for zoo model `name`, random weights from `seed`."""
    register_torchvision_ops()
    torch.manual_seed(seed)
    model, x = MODELS[name]()
    return model.eval(), x
