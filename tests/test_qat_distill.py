"""The VGG's QAT loss (export.fake_quant.qat_finetune's `vgg_loss`): distillation of the FP32 VGG's Fc2 features.

Structure and behaviour only, on an untrained tiny VGG and phantom frames: the loss is 0 exactly when the features
agree, the teacher is the FP32 network as given and stays frozen, the option reaches the fine-tuning (with
distillation the grades play no part), and misuse is refused. No figure depends on trained weights."""
import numpy as np
import pytest
import torch

from export.fake_quant import distillation_loss, fold_batch_norm, prepare_qat, qat_finetune, qdq_placement
from export.models import UNet, VGG19BN, VGGFeaturesAndLogits
from runtime.graph import Graph
from runtime.phantom import KidneyPhantom

SIZE = 224   # the VGG's feature stack ends at 7x7 here, as in the bundle


def _frames(count: int, seed: int):
    images, grades = [], []
    for i in range(count):
        f = KidneyPhantom(grade=1 + (seed + i) % 4, seed=seed + i, height=SIZE, width=SIZE).frame(i)
        images.append(f.image.astype(np.float32) * np.float32(1 / 255))
        grades.append(f.grade - 1)
    return np.stack(images)[:, None], np.array(grades, dtype=np.int64)


@pytest.fixture(scope="module")
def vgg_case():
    torch.manual_seed(0)
    model = VGG19BN(width=1 / 32, in_channels=1)
    images, grades = _frames(8, seed=5)
    for m in model.modules():                       # the frames' own BatchNorm statistics (see tests/test_qat.py)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images[:4]))
    model.eval()
    graph = Graph(size=SIZE)
    placement = qdq_placement(model, [images[i:i + 1] for i in range(2)], graph)
    x = torch.from_numpy(images[4:8])
    return {"model": model, "graph": graph, "placement": placement, "x": x, "y": torch.from_numpy(grades[4:8])}


def _weights(qat) -> dict:
    return {k: v.detach().clone() for k, v in qat.float_model().state_dict().items()}


def _distance(a: dict, b: dict) -> float:
    return float(sum((a[k].double() - b[k].double()).abs().sum() for k in a))


def test_distillation_loss_is_zero_only_when_the_features_agree():
    torch.manual_seed(1)
    t = torch.rand(5, 16) + 0.1
    assert float(distillation_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(3.0 * t, t)) == pytest.approx(0.0, abs=1e-6)   # the direction is what counts
    other = t.clone()
    other[2] = torch.flip(other[2], [0])
    assert float(distillation_loss(other, t)) > 1e-4
    # mean of 1 - cosine over the rows
    cos = torch.nn.functional.cosine_similarity(other, t, dim=1)
    assert float(distillation_loss(other, t)) == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    # no gradient reaches the teacher
    s, tt = other.clone().requires_grad_(True), t.clone().requires_grad_(True)
    distillation_loss(s, tt).backward()
    assert tt.grad is None and s.grad is not None and float(s.grad.abs().sum()) > 0


def test_the_teacher_is_the_fp32_vgg_as_given_and_stays_frozen(vgg_case):
    model, x = vgg_case["model"], vgg_case["x"]
    with torch.no_grad():
        expected = VGGFeaturesAndLogits(model).eval()(x)[0]
    seen = []

    def loss_fn(out, y, teacher):
        seen.append(teacher[0].detach().clone())
        assert not teacher[0].requires_grad
        return distillation_loss(out[0], teacher[0])

    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat = qat_finetune(model, [(x, vgg_case["y"])], epochs=3, lr=1e-3, placement=vgg_case["placement"],
                       graph=vgg_case["graph"], vgg_loss="distill", loss_fn=loss_fn)
    assert len(seen) == 3
    scale = float(expected.abs().max())
    for t in seen:   # the FP32 network's features (folded BatchNorm: equal up to float rounding), every step
        assert float((t - expected).abs().max()) <= 1e-4 * scale
    assert all(torch.equal(t, seen[0]) for t in seen[1:])
    # the student moved, the model given (the teacher) did not
    assert _distance(_weights(qat), fold_batch_norm(model).state_dict()) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert float((qat(x)[0] - expected).abs().max()) > 0


def test_distillation_ignores_the_grades_and_cross_entropy_does_not(vgg_case):
    model, x, y = vgg_case["model"], vgg_case["x"], vgg_case["y"]
    other = (y + 1) % 4                                      # every grade changed

    def tuned(loss, labels):
        torch.manual_seed(0)
        qat = qat_finetune(model, [(x, labels)], epochs=2, lr=1e-3, placement=vgg_case["placement"],
                           graph=vgg_case["graph"], vgg_loss=loss)
        return _weights(qat)

    ce = _distance(tuned("ce", y), tuned("ce", other))
    distill = _distance(tuned("distill", y), tuned("distill", other))
    mixed = _distance(tuned("distill+ce", y), tuned("distill+ce", other))
    assert ce > 0 and mixed > 0
    assert distill <= 1e-3 * ce


def test_distillation_keeps_the_calibrated_activation_scales_and_cross_entropy_follows_the_data(vgg_case):
    """With distillation the scales stay those the placement's min-max calibration starts from (the weights learn to
    them); with cross-entropy, or with observe_epochs given, the observers follow the fine-tuning batches (other
    frames than the calibration's, so their ranges differ)."""
    pl = vgg_case["placement"]

    def scales(loss, **kw):
        torch.manual_seed(0)
        qat = qat_finetune(vgg_case["model"], [(vgg_case["x"], vgg_case["y"])], epochs=2, lr=1e-3, placement=pl,
                           graph=vgg_case["graph"], vgg_loss=loss, **kw)
        return {t: float(fq.scale) for t, fq in qat.activation_quantizers().items()}

    start = prepare_qat(vgg_case["model"], pl, vgg_case["graph"])       # the scales the placement's frames set
    calibrated = {t: float(fq.scale) for t, fq in start.activation_quantizers().items()}
    assert scales("distill") == pytest.approx(calibrated, rel=1e-6)
    for observed in (scales("ce"), scales("distill", observe_epochs=1)):
        assert any(v != pytest.approx(calibrated[t], rel=1e-3) for t, v in observed.items())


def test_misuse_is_refused(vgg_case):
    with pytest.raises(ValueError, match="vgg_loss"):
        qat_finetune(vgg_case["model"], [(vgg_case["x"], vgg_case["y"])], epochs=1, lr=1e-3,
                     placement=vgg_case["placement"], graph=vgg_case["graph"], vgg_loss="mse")
    with pytest.raises(ValueError, match="UNet"):
        qat_finetune(UNet(width=1 / 16), [], epochs=1, lr=1e-3, placement=vgg_case["placement"],
                     vgg_loss="distill")


def test_qat_networks_distills_by_default_and_ships_the_fp32_vgg(vgg_case, tmp_path):
    """train --qat / calibrate --qat's phase: distillation by default, and the VGG that ships beside the INT8 file is
    the FP32 VGG it was distilled from (folded); with cross-entropy, the fine-tuned float weights ship."""
    from export.qat import qat_networks
    model = vgg_case["model"]
    images = (vgg_case["x"][:, 0].numpy() * 255).round().astype(np.uint8)
    labels = vgg_case["y"].numpy()
    common = dict(unet_images=None, unet_masks=None, vgg_images=images, vgg_labels=labels, graph=vgg_case["graph"],
                  vgg_epochs=1, lr=1e-3, calibration_frames=2, log=lambda m: None, networks=("vgg",))
    fp32 = fold_batch_norm(model).state_dict()
    distilled = qat_networks(None, model, out_dir=tmp_path / "distill", **common)
    assert distilled["qat"]["settings"]["vgg"]["loss"] == "distill"
    assert distilled["qat"]["settings"]["vgg"]["activation_scales"] == "calibration"
    assert (tmp_path / "distill" / "vgg.int8.onnx").is_file()
    shipped = distilled["vgg"].state_dict()
    assert set(shipped) == set(fp32) and all(torch.equal(shipped[k], fp32[k]) for k in fp32)
    assert _distance(distilled["finetuned"]["vgg"].state_dict(), fp32) > 0     # the INT8 side did train
    ce = qat_networks(None, model, out_dir=tmp_path / "ce", vgg_loss="ce", **common)
    assert ce["qat"]["settings"]["vgg"]["loss"] == "ce"
    assert ce["qat"]["settings"]["vgg"]["activation_scales"] == "observed"
    observed = qat_networks(None, model, out_dir=tmp_path / "observed", activation_scales="observed", **common)
    assert observed["qat"]["settings"]["vgg"]["activation_scales"] == "observed"
    with pytest.raises(ValueError, match="activation_scales"):
        qat_networks(None, model, out_dir=tmp_path / "bad", activation_scales="frozen", **common)
    assert _distance(ce["vgg"].state_dict(), fp32) > 0
    assert _distance(ce["vgg"].state_dict(), ce["finetuned"]["vgg"].state_dict()) == 0
