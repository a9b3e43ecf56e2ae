"""export/checkpoints.py: checkpoints as their owners save them, recognised from their keys; users' ONNX files; the
booster and the model card checked before anything is written.

The reference networks here are written from the layouts they copy (jakeoung/Unet_pytorch `model.py`: `Net(useBN)`
built of `add_conv_stage` and `upsample` Sequentials; torchvision's VGG: `features`, `avgpool`, `classifier` with
Linear at 0, 3 and 6), not from export/models.py, so a checkpoint they save is one their owners would have. Channel
counts are small (the UNet's first stage 2, the VGG's 4) to keep every test fast; the sizes are read from the tensors.
"""
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from export import checkpoints as ck  # noqa: E402
from export.models import vgg19_bn_features  # noqa: E402
from runtime.errors import UserError  # noqa: E402


# -- reference networks ---------------------------------------------------------------------------------------------

def _stage(c_in, c_out, use_bn):
    if use_bn:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
                             nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1), nn.ReLU())


def _up(c_in, c_out):
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.ReLU())


class RefNet(nn.Module):
    """jakeoung/Unet_pytorch's `Net(useBN)` with its channel counts divided by 32 / c."""

    def __init__(self, use_bn=False, c=2):
        super().__init__()
        a, b, d, e, f = c, 2 * c, 4 * c, 8 * c, 16 * c
        self.conv1, self.conv2, self.conv3 = _stage(1, a, use_bn), _stage(a, b, use_bn), _stage(b, d, use_bn)
        self.conv4, self.conv5 = _stage(d, e, use_bn), _stage(e, f, use_bn)
        self.conv4m, self.conv3m = _stage(f, e, use_bn), _stage(e, d, use_bn)
        self.conv2m, self.conv1m = _stage(d, b, use_bn), _stage(b, a, use_bn)
        self.conv0 = nn.Sequential(nn.Conv2d(a, 1, 3, 1, 1), nn.Sigmoid())
        self.max_pool = nn.MaxPool2d(2)
        self.upsample54, self.upsample43, self.upsample32, self.upsample21 = _up(f, e), _up(e, d), _up(d, b), _up(b, a)

    def forward(self, x):
        c1 = self.conv1(x)
        c2 = self.conv2(self.max_pool(c1))
        c3 = self.conv3(self.max_pool(c2))
        c4 = self.conv4(self.max_pool(c3))
        c5 = self.conv5(self.max_pool(c4))
        m4 = self.conv4m(torch.cat((self.upsample54(c5), c4), 1))
        m3 = self.conv3m(torch.cat((self.upsample43(m4), c3), 1))
        m2 = self.conv2m(torch.cat((self.upsample32(m3), c2), 1))
        return self.conv0(self.conv1m(torch.cat((self.upsample21(m2), c1), 1)))


class RefVGG(nn.Module):
    """torchvision's VGG layout (`vgg19_bn` features at a width), its classifier Fc1 -> Fc2 -> classes."""

    def __init__(self, width=1 / 16, fc1=24, fc2=40, classes=4, in_channels=3):
        super().__init__()
        self.features = vgg19_bn_features(width, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        last = max(1, round(512 * width))
        self.classifier = nn.Sequential(nn.Linear(last * 49, fc1), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(fc1, fc2), nn.ReLU(True), nn.Dropout(), nn.Linear(fc2, classes))

    def fc2(self, x):
        """The ReLU'd Fc2 output: what the booster scores."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:5](x)


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine terms, so a BN left out or misplaced changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def main_py_save(model, path, **kw):
    """As jakeoung's main.py saves each epoch: {'epoch', 'state_dict', 'loss'}."""
    torch.save({"epoch": 25, "state_dict": model.state_dict(), "loss": 0.0123}, path, **kw)


def _x(channels=1, n=2, size=64, seed=1):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# -- UNet checkpoints -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_bn,legacy", [(True, False), (False, True), (False, False), (True, True)])
def test_jakeoung_checkpoints_load_with_and_without_batchnorm_and_run_as_the_reference(tmp_path, use_bn, legacy):
    torch.manual_seed(3)
    ref = randomize_bn(RefNet(use_bn))
    path = tmp_path / "checkpoint.tar"
    main_py_save(ref, path, _use_new_zipfile_serialization=not legacy)
    net = ck.load_network(path, "unet", "--unet")
    assert net.architecture == ("unet-jakeoung-bn-leakyrelu" if use_bn else "unet-jakeoung-relu")
    assert net.width == 2 / 32 and net.source["container"] == "state_dict"
    assert net.source["serialization"] == ("legacy" if legacy else "zip")
    kinds = {type(m) for m in net.model.modules()}
    if use_bn:
        assert nn.BatchNorm2d in kinds and nn.LeakyReLU in kinds
    else:
        assert nn.BatchNorm2d not in kinds and nn.LeakyReLU not in kinds and nn.ReLU in kinds
    x = _x()
    with torch.no_grad():
        assert torch.equal(net.model(x), ref(x))


def test_module_prefixes_are_dropped_wherever_they_stand(tmp_path):
    ref = randomize_bn(RefNet(True))
    torch.save(nn.DataParallel(ref).state_dict(), tmp_path / "dp.pt")   # DataParallel: module.conv1.0.weight ...
    net = ck.load_network(tmp_path / "dp.pt", "unet", "--unet")
    assert net.source["module_prefix"] is True
    with torch.no_grad():
        assert torch.equal(net.model(_x()), ref(_x()))

    torch.save({"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "lightning.ckpt")
    net = ck.load_network(tmp_path / "lightning.ckpt", "unet", "--unet")   # a wrapper's own first component
    assert net.source["prefix_removed"] == "model."
    with torch.no_grad():
        assert torch.equal(net.model(_x()), ref(_x()))

    vgg = randomize_bn(RefVGG())
    vgg.features = nn.DataParallel(vgg.features)          # PyTorch's ImageNet example: features.module.0.weight
    sd = vgg.state_dict()
    assert "features.module.0.weight" in sd
    torch.save({"epoch": 90, "arch": "vgg19_bn", "state_dict": sd, "best_acc1": torch.tensor(71.0),
                "optimizer": torch.optim.SGD(vgg.parameters(), lr=0.1, momentum=0.9).state_dict()},
               tmp_path / "imagenet.pth.tar")
    got = ck.load_network(tmp_path / "imagenet.pth.tar", "vgg", "--vgg")
    x = _x(3, size=224)
    with torch.no_grad():
        assert torch.equal(got.model.forward_features(x), vgg.fc2(x))


def test_an_old_batchnorm_checkpoint_without_num_batches_tracked_and_half_weights_loads(tmp_path):
    ref = randomize_bn(RefNet(True))
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in ref.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    net = ck.load_network(tmp_path / "old.pt", "unet", "--unet")
    assert all(p.dtype == torch.float32 for p in net.model.parameters())
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
    with torch.no_grad():
        assert torch.equal(net.model(_x()), ref(_x()))


def test_plain_values_kept_beside_the_weights_do_not_stop_the_load(tmp_path):
    import argparse
    ref = RefNet(False)
    torch.save({"state_dict": ref.state_dict(), "best_iou": np.float64(0.91), "step": np.int64(1200),
                "args": argparse.Namespace(useBN=False, lr=2e-4)}, tmp_path / "run.tar")
    assert ck.load_network(tmp_path / "run.tar", "unet", "--unet").architecture == "unet-jakeoung-relu"


# -- VGG checkpoints ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [False, True])
def test_torchvision_keyed_vgg_loads_with_or_without_its_last_layer_sizes_from_the_tensors(tmp_path, cut):
    torch.manual_seed(5)
    ref = randomize_bn(RefVGG(fc1=24, fc2=40, in_channels=1))
    if cut:
        ref.classifier = ref.classifier[:-1]        # cut at Fc2: classifier.0 and classifier.3 only
    sd = ref.state_dict()
    assert ("classifier.6.weight" in sd) != cut
    torch.save(sd, tmp_path / "vgg.pth")
    net = ck.load_network(tmp_path / "vgg.pth", "vgg", "--vgg")
    assert net.source["layout"] == "vgg-torchvision"
    assert (net.features, net.channels, net.source["fc1"]) == (40, 1, 24)
    assert (net.model.head is None) == cut and net.architecture == "vgg19_bn-fc2-40"
    x = _x(1, size=224)
    with torch.no_grad():
        assert torch.equal(net.model.forward_features(x), ref.fc2(x))
        if not cut:
            assert torch.equal(net.model(x), ref.classifier(torch.flatten(ref.features(x), 1)))


def test_the_projects_own_keys_still_load(tmp_path):
    from export.models import VGG19BN
    own = randomize_bn(VGG19BN(1 / 16, in_channels=3, fc1=32))
    torch.save(own.state_dict(), tmp_path / "own.pt")
    net = ck.load_network(tmp_path / "own.pt", "vgg", "--vgg")
    assert net.source["layout"] == "vgg-project" and net.features == 1024 and net.model.head is not None
    x = _x(3, n=1, size=224)
    with torch.no_grad():
        assert torch.equal(net.model.forward_features(x), own.forward_features(x))


# -- refusals ---------------------------------------------------------------------------------------------------

def _one_sentence(text):
    assert "\n" not in text and "Traceback" not in text and "..." not in text
    return text


def test_a_checkpoint_that_fits_nothing_names_the_closest_family_and_keys_in_full(tmp_path):
    sd = RefNet(False).state_dict()
    sd["decoder_extra_projection.weight"] = sd.pop("conv3m.2.weight")
    sd["decoder_extra_projection.bias"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "odd.tar")
    with pytest.raises(UserError) as e:
        ck.load_network(tmp_path / "odd.tar", "unet", "--unet")
    msg = _one_sentence(str(e.value))
    assert "closest is the jakeoung/Unet_pytorch UNet without BatchNorm" in msg
    assert "missing conv3m.2.weight;" in msg
    assert "unexpected decoder_extra_projection.weight, decoder_extra_projection.bias" in msg

    many = {f"encoder.block{i}.conv.weight": torch.zeros(1) for i in range(8)}
    torch.save(many, tmp_path / "other.pt")
    with pytest.raises(UserError) as e:
        ck.load_network(tmp_path / "other.pt", "vgg", "--vgg")
    msg = _one_sentence(str(e.value))
    assert "does not fit the vgg architecture" in msg
    assert "encoder.block0.conv.weight, encoder.block1.conv.weight, encoder.block2.conv.weight and 5 more" in msg


def test_a_network_given_in_the_other_slot_is_named(tmp_path):
    torch.save(RefVGG().state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(UserError, match=r"does not fit the unet architecture: it is VGG-19-BN with torchvision "
                                        r"keys .*; give it as --vgg$"):
        ck.load_network(tmp_path / "vgg.pt", "unet", "--unet")


def test_a_whole_pickled_model_is_refused_without_running_its_pickle(tmp_path):
    torch.save(RefNet(False), tmp_path / "model.pt")
    with pytest.raises(UserError, match=r"holds a Python object of .*RefNet besides tensors .* save model.state_dict"):
        ck.load_network(tmp_path / "model.pt", "unet", "--unet")


def test_sizes_that_do_not_fit_one_another_and_unreadable_files_get_one_sentence(tmp_path):
    sd = RefNet(False).state_dict()
    sd["conv2.0.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        ck.load_network(tmp_path / "bad.pt", "unet", "--unet")
    assert "'conv2.0.weight' is [4, 3, 3, 3] where its other tensors make it [4, 2, 3, 3]" in _one_sentence(
        str(e.value))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="is not a checkpoint torch.load can read"):
        ck.load_network(tmp_path / "junk.pt", "unet", "--unet")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(UserError, match="no state dict of tensors"):
        ck.load_network(tmp_path / "meta.pt", "vgg", "--vgg")


# -- the booster ------------------------------------------------------------------------------------------------

def make_booster(path, features=16, classes=4, objective="multi:softprob"):
    xgb = pytest.importorskip("xgboost")
    rng = np.random.default_rng(0)
    x = rng.random((40, features)).astype(np.float32)
    params = {"objective": objective, "max_depth": 2, "nthread": 1}
    if objective.startswith("multi:"):
        params["num_class"] = classes
    y = np.arange(40) % (classes if objective.startswith("multi:") else 2)
    xgb.train(params, xgb.DMatrix(x, label=y), 2).save_model(str(path))
    return path


def test_the_booster_is_checked_for_objective_classes_and_features(tmp_path):
    booster, info = ck.check_booster(make_booster(tmp_path / "ok.json", 16), 4)
    assert info == {"objective": "multi:softprob", "num_class": 4, "num_features": 16, "trees": 8}
    ck.check_features(info, 16, "ok.json", "the VGG")
    with pytest.raises(UserError, match=r"takes 16 features but the VGG gives 1024 \(its Fc2 width\)"):
        ck.check_features(info, 1024, "ok.json", "the VGG")
    assert ck.check_booster(make_booster(tmp_path / "max.ubj", objective="multi:softmax"), 4)[1]["objective"] == \
        "multi:softmax"
    with pytest.raises(UserError, match="predicts 3 classes but the bundle grades 4"):
        ck.check_booster(make_booster(tmp_path / "three.json", classes=3), 4)
    with pytest.raises(UserError, match="has objective binary:logistic"):
        ck.check_booster(make_booster(tmp_path / "bin.json", objective="binary:logistic"), 4)
    (tmp_path / "broken.json").write_text('{"learner": {"attributes": ')
    with pytest.raises(UserError) as e:
        ck.check_booster(tmp_path / "broken.json", 4)
    assert "is not an XGBoost model XGBoost can load" in _one_sentence(str(e.value))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="neither .json nor .ubj"):
        ck.check_booster(tmp_path / "model.bin", 4)


# -- the model card ---------------------------------------------------------------------------------------------

def test_the_card_comes_from_json_or_yaml_with_name_and_version_from_the_options(tmp_path):
    from export.card import read_card
    (tmp_path / "card.yaml").write_text(
        "name: Kidney IFTA (site A)\nversion: 1.2\nauthors: Dr. A\nlicence: CC-BY-4.0\n"
        "changelog:\n  '1.2': retrained on 2023 scans\nreferences:\n  - doi:10.1101/2020.08.17.20176958\n"
        "disclaimer: research use only\n")
    card = read_card(tmp_path / "card.yaml", None, None, "fallback")
    assert card == {"name": "Kidney IFTA (site A)", "version": "1.2", "license": "CC-BY-4.0",
                    "disclaimer": "research use only", "authors": ["Dr. A"],
                    "references": ["doi:10.1101/2020.08.17.20176958"], "changelog": {"1.2": "retrained on 2023 scans"}}
    (tmp_path / "card.json").write_text(json.dumps({"name": "x", "intended_use": "research"}))
    card = read_card(tmp_path / "card.json", "ifta-site-b", "3.0.0", "fallback")
    assert (card["name"], card["version"], card["intended_use"]) == ("ifta-site-b", "3.0.0", "research")
    assert read_card(None, None, None, "my-bundle") == {"name": "my-bundle", "version": "unversioned"}
    (tmp_path / "typo.json").write_text(json.dumps({"name": "x", "autors": ["me"]}))
    with pytest.raises(UserError, match="has field 'autors', which a model card does not have"):
        read_card(tmp_path / "typo.json", None, None, "x")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML near line"):
        read_card(tmp_path / "bad.yaml", None, None, "x")


# -- users' ONNX files ------------------------------------------------------------------------------------------

def torchscript_export(module, path, shape, input_name, output_names, dynamic=True):
    """How many users export: torch.onnx.export's TorchScript path with their own names and dynamic_axes."""
    axes = {n: {0: "batch"} for n in [input_name, *output_names]} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.rand(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=output_names, dynamic_axes=axes)
    return path


class Fc2(nn.Module):
    def __init__(self, vgg, logits=False):
        super().__init__()
        self.vgg, self.logits = vgg, logits

    def forward(self, x):
        f = self.vgg.fc2(x)
        return (f, self.vgg.classifier[6](f)) if self.logits else f


def test_a_users_onnx_files_are_checked_and_their_names_kept(tmp_path):
    unet = torchscript_export(RefNet(True), tmp_path / "u.onnx", (1, 1, 224, 224), "input.1", ["output"])
    got = ck.inspect_onnx(unet, "unet", "--unet-onnx", 224)
    assert (got.input_name, got.output_name, got.channels) == ("input.1", "output", 1)
    vgg = torchscript_export(Fc2(RefVGG(fc2=40)), tmp_path / "v.onnx", (1, 3, 224, 224), "x", ["fc2"])
    got = ck.inspect_onnx(vgg, "vgg", "--vgg-onnx", 224, {"kind": "meanstd", "mean": [0.5], "std": [0.25]})
    assert (got.input_name, got.output_name, got.channels, got.features) == ("x", "fc2", 3, 40)
    two = torchscript_export(Fc2(RefVGG(fc2=40), logits=True), tmp_path / "two.onnx", (1, 3, 224, 224), "x",
                             ["features", "logits"])
    assert ck.inspect_onnx(two, "vgg", "--vgg-onnx", 224).output_name == "features"


def test_a_users_onnx_that_the_runtime_cannot_feed_or_read_is_refused(tmp_path):
    one = torchscript_export(RefNet(False), tmp_path / "one.onnx", (1, 1, 224, 224), "image", ["mask"],
                             dynamic=False)
    assert ck.inspect_onnx(one, "unet", "--unet-onnx", 224).static_batch   # a static batch of 1 is taken
    fixed = torchscript_export(RefNet(False), tmp_path / "fixed.onnx", (2, 1, 224, 224), "image", ["mask"],
                               dynamic=False)
    with pytest.raises(UserError, match="has a fixed batch of 2; the runtime feeds one frame at a time"):
        ck.inspect_onnx(fixed, "unet", "--unet-onnx", 224)

    class Logits(nn.Module):   # a UNet exported without its sigmoid
        def __init__(self):
            super().__init__()
            self.net = RefNet(False)

        def forward(self, x):
            return self.net.conv0[0](self.net.conv1(x)) - 5.0
    raw = torchscript_export(Logits(), tmp_path / "raw.onnx", (1, 1, 224, 224), "image", ["mask"])
    with pytest.raises(UserError, match=r"not probabilities in \[0, 1\].*export the network with its sigmoid"):
        ck.inspect_onnx(raw, "unet", "--unet-onnx", 224)
    two = torchscript_export(Fc2(RefVGG(), logits=True), tmp_path / "two.onnx", (1, 3, 224, 224), "x",
                             ["fc2", "logits"])
    with pytest.raises(UserError, match="has outputs fc2, logits; the runtime reads one"):
        ck.inspect_onnx(two, "vgg", "--vgg-onnx", 224)
    wrong = torchscript_export(RefNet(False), tmp_path / "small.onnx", (1, 1, 64, 64), "image", ["mask"])
    with pytest.raises(UserError, match="is 64x64; the runtime feeds 224x224"):
        ck.inspect_onnx(wrong, "unet", "--unet-onnx", 224)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="is not an ONNX model onnx can read"):
        ck.inspect_onnx(tmp_path / "junk.onnx", "vgg", "--vgg-onnx", 224)
