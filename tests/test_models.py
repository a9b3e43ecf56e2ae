"""The two networks: checkpoint compatibility (state_dict keys and shapes), output shapes, width scaling."""
import pytest
import torch

from export.models import UNet, VGG19BN, VGGFeaturesAndLogits, scaled

# jakeoung/Unet_pytorch model.py, Net(useBN=True): modules in registration order, (out, in) channels per stage.
UNET_STAGES = [("conv1", 32, 1), ("conv2", 64, 32), ("conv3", 128, 64), ("conv4", 256, 128), ("conv5", 512, 256),
               ("conv4m", 256, 512), ("conv3m", 128, 256), ("conv2m", 64, 128), ("conv1m", 32, 64)]
UNET_UPSAMPLE = [("upsample54", 512, 256), ("upsample43", 256, 128), ("upsample32", 128, 64), ("upsample21", 64, 32)]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def reference_unet_keys() -> dict[str, tuple]:
    """Every key of the reference checkpoint with its shape, in order: conv-BN-LeakyReLU x2 per stage
    (Sequential indices 0,1 and 3,4), the sigmoid head conv0.0, then the bias-free ConvTranspose upsamplers."""
    keys = {}
    for name, c_out, c_in in UNET_STAGES:
        for conv, bn, first_in in ((0, 1, c_in), (3, 4, c_out)):
            keys[f"{name}.{conv}.weight"] = (c_out, first_in, 3, 3)
            keys[f"{name}.{conv}.bias"] = (c_out,)
            for k in BN_KEYS:
                keys[f"{name}.{bn}.{k}"] = () if k == "num_batches_tracked" else (c_out,)
    keys["conv0.0.weight"] = (1, 32, 3, 3)
    keys["conv0.0.bias"] = (1,)
    for name, c_in, c_out in UNET_UPSAMPLE:
        keys[f"{name}.0.weight"] = (c_in, c_out, 4, 4)  # ConvTranspose2d weight is (in, out, k, k)
    return keys


def test_unet_state_dict_is_the_reference_checkpoint_layout():
    with torch.device("meta"):
        sd = UNet(width=1.0).state_dict()
    expected = reference_unet_keys()
    assert len(expected) == 132
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert tuple(sd["conv4m.0.weight"].shape) == (256, 512, 3, 3)  # upsampled 256 + skip 256 in
    assert tuple(sd["upsample54.0.weight"].shape) == (512, 256, 4, 4)


def test_unet_loads_a_reference_shaped_checkpoint_strictly():
    torch.manual_seed(0)
    ckpt = {k: (torch.tensor(7) if not s else torch.randn(s)) for k, s in reference_unet_keys().items()}
    model = UNet(width=1.0)
    assert model.load_state_dict(ckpt, strict=True).missing_keys == []
    assert torch.equal(model.conv3[4].running_var, ckpt["conv3.4.running_var"])
    assert torch.equal(model.upsample21[0].weight, ckpt["upsample21.0.weight"])


def test_unet_full_width_maps_224_image_to_224_probability_mask():
    model = UNet(width=1.0).eval()
    assert sum(p.numel() for p in model.parameters()) == 9_854_145
    with torch.no_grad():
        out = model(torch.rand(1, 1, 224, 224))
    assert out.shape == (1, 1, 224, 224)
    assert out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_unet_width_scales_every_channel_count_with_a_floor_of_one():
    sd = UNet(width=0.25).state_dict()
    assert sd["conv1.0.weight"].shape == (8, 1, 3, 3)
    assert sd["conv5.3.weight"].shape == (128, 128, 3, 3)
    assert sd["conv4m.0.weight"].shape == (64, 128, 3, 3)
    assert sd["upsample21.0.weight"].shape == (16, 8, 4, 4)
    assert sd["conv0.0.weight"].shape == (1, 8, 3, 3)
    tiny = UNet(width=1 / 64).state_dict()  # 32/64 rounds to 0 -> 1 channel
    assert tiny["conv1.0.weight"].shape == (1, 1, 3, 3)
    assert tiny["conv5.0.weight"].shape == (8, 4, 3, 3)
    assert list(tiny) == list(sd)
    with torch.no_grad():
        assert UNet(width=1 / 16).eval()(torch.rand(3, 1, 224, 224)).shape == (3, 1, 224, 224)


# torchvision vgg19_bn: config E, conv positions in `features` (each conv is followed by BN at +1, ReLU at +2).
VGG_CONV_INDICES = [0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49]
VGG_CONV_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]


def torchvision_vgg19_bn_feature_keys() -> list[str]:
    keys = []
    for i in VGG_CONV_INDICES:
        keys += [f"features.{i}.weight", f"features.{i}.bias"]
        keys += [f"features.{i + 1}.{k}" for k in BN_KEYS]
    return keys


def test_vgg_feature_keys_are_torchvision_vgg19_bn():
    with torch.device("meta"):
        sd = VGG19BN(width=1.0, in_channels=3).state_dict()
    expected = torchvision_vgg19_bn_feature_keys()
    assert len(expected) == 16 * 7
    assert [k for k in sd if k.startswith("features.")] == expected
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.7.weight"].shape == (128, 64, 3, 3)
    assert sd["features.49.weight"].shape == (512, 512, 3, 3)
    assert sd["features.50.running_var"].shape == (512,)
    assert [k for k in sd if not k.startswith("features.")] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"]
    assert sd["fc1.weight"].shape == (4096, 512 * 7 * 7)
    assert sd["fc2.weight"].shape == (1024, 4096)
    assert sd["head.weight"].shape == (4, 1024)


def test_vgg_width_scales_convs_and_fc1_but_keeps_the_1024_feature_vector():
    with torch.device("meta"):
        sd = VGG19BN(width=0.0625, in_channels=1, fc1=300).state_dict()
    assert [tuple(sd[f"features.{i}.weight"].shape)[0] for i in VGG_CONV_INDICES] == [
        scaled(c, 0.0625) for c in VGG_CONV_CHANNELS]
    assert sd["features.0.weight"].shape == (4, 1, 3, 3)
    assert sd["fc1.weight"].shape == (300, 32 * 49)
    assert sd["fc2.weight"].shape == (1024, 300)
    with torch.device("meta"):
        assert VGG19BN(width=0.0625).state_dict()["fc1.weight"].shape == (256, 32 * 49)


def test_vgg_returns_logits_and_fc2_features_and_the_export_wrapper_returns_both():
    torch.manual_seed(0)
    model = VGG19BN(width=1 / 16, in_channels=3).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        f2, l2 = VGGFeaturesAndLogits(model)(x)
    assert logits.shape == (2, 4) and feats.shape == (2, 1024)
    assert feats.min() >= 0  # ReLU'd Fc2
    assert torch.equal(f2, feats)
    assert torch.allclose(l2, logits, atol=1e-6)
    assert not VGGFeaturesAndLogits(model).training and VGGFeaturesAndLogits(model.train()).training


@pytest.mark.parametrize("size", [224, 256])
def test_vgg_pools_to_7x7_whatever_the_input_side(size):
    model = VGG19BN(width=1 / 32, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, size, size)).shape == (1, 4)
