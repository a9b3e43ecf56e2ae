"""The UNet's QAT loss (export.fake_quant.qat_finetune's `unet_loss`): distillation of the FP32 UNet's probability map.

Structure and behaviour only, on an untrained tiny UNet and phantom frames: the loss is 0 exactly when the maps
agree, the teacher is the FP32 network (as given, or `teacher=`) and stays frozen, with distillation the label masks
play no part and the fake-quant output moves toward the teacher's map (with the recipe's MSE, toward the labels),
`qat_networks` ships the FP32 UNet it distilled from, and misuse is refused. Every figure compared is derived in the
test from the same run, none from trained weights or CPU INT8 kernels."""
import copy
import inspect

import numpy as np
import pytest
import torch

from export.fake_quant import fold_batch_norm, mask_distillation_loss, prepare_qat, qat_finetune, qdq_placement
from export.models import UNet, VGG19BN
from export.recipe import TrainConfig
from runtime.graph import Graph
from runtime.phantom import KidneyPhantom

SIZE = 64   # a UNet side must be a multiple of 16
# copy.deepcopy of the traced model copies torch.export's tree specs, which torch 2.13 flags as deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _frames(count: int, seed: int):
    images, masks = [], []
    for i in range(count):
        f = KidneyPhantom(grade=1 + (seed + i) % 4, seed=seed + i, height=SIZE, width=SIZE).frame(i)
        images.append(f.image.astype(np.float32) * np.float32(1 / 255))
        masks.append(f.mask.astype(np.float32))
    return np.stack(images)[:, None], np.stack(masks)[:, None]


def _settled(model, x: np.ndarray):
    """The frames' own BatchNorm statistics (see tests/test_qat.py: otherwise the untrained outputs are flat)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(x))
    return model.eval()


@pytest.fixture(scope="module")
def unet_case():
    torch.manual_seed(0)
    images, masks = _frames(8, seed=11)
    model = _settled(UNet(width=1 / 16), images[:4])
    graph = Graph(size=SIZE)
    placement = qdq_placement(model, [images[i:i + 1] for i in range(2)], graph)
    # A teacher whose map is far from the labels and from the student's start: the same network, its last
    # convolution's bias raised by 2 (every probability moves up).
    teacher = fold_batch_norm(model)
    with torch.no_grad():
        teacher.conv0[0].bias += 2.0
    x, y = torch.from_numpy(images[4:8]), torch.from_numpy(masks[4:8])
    prepared = prepare_qat(model, placement, graph)     # traced once; each fine-tuning starts from a copy
    return {"model": model, "graph": graph, "placement": placement, "teacher": teacher, "x": x, "y": y,
            "images": images, "masks": masks, "prepared": prepared}


def _weights(qat) -> dict:
    return {k: v.detach().clone() for k, v in qat.float_model().state_dict().items()}


def _distance(a: dict, b: dict) -> float:
    return float(sum((a[k].double() - b[k].double()).abs().sum() for k in a))


def _tune(c, loss, labels=None, teacher=None, epochs=2, lr=1e-3, loss_fn=None):
    """qat_finetune from a fresh copy of the prepared fake-quant model (its teacher by default: the FP32 UNet)."""
    torch.manual_seed(0)
    batches = [(c["x"][i:i + 2], (c["y"] if labels is None else labels)[i:i + 2]) for i in (0, 2)]
    return qat_finetune(copy.deepcopy(c["prepared"]), batches, epochs=epochs, lr=lr, placement=c["placement"], graph=c["graph"],
                        unet_loss=loss, teacher=teacher, loss_fn=loss_fn)


def test_mask_distillation_loss_is_the_mse_to_the_teacher_and_zero_only_when_the_maps_agree():
    torch.manual_seed(1)
    t = torch.rand(2, 1, 8, 8)
    assert float(mask_distillation_loss(t.clone(), t)) == 0.0
    s = t.clone()
    s[1, 0, 3, 4] += 0.5
    assert float(mask_distillation_loss(s, t)) == pytest.approx(0.25 / t.numel(), rel=1e-5)
    s, tt = s.requires_grad_(True), t.clone().requires_grad_(True)
    mask_distillation_loss(s, tt).backward()
    assert tt.grad is None and float(s.grad.abs().sum()) > 0


def test_the_teacher_is_the_fp32_unet_as_given_and_stays_frozen(unet_case):
    c = unet_case
    with torch.no_grad():
        expected = c["model"](c["x"][:2])
    seen = []

    def loss_fn(out, y, teacher):
        assert not teacher.requires_grad and teacher.shape == out.shape
        seen.append(teacher.detach().clone())
        return mask_distillation_loss(out, teacher)

    before = {k: v.clone() for k, v in c["model"].state_dict().items()}
    batches = [(c["x"][i:i + 2], c["y"][i:i + 2]) for i in (0, 2)]
    qat = qat_finetune(c["model"], batches, epochs=2, lr=1e-3, placement=c["placement"], graph=c["graph"],
                       unet_loss="distill", loss_fn=loss_fn)            # the FP32 UNet as given: its own teacher
    assert len(seen) == 4                                     # 2 epochs x 2 batches, one teacher pass each
    for t in seen[::2]:     # the FP32 UNet's map on the first batch (folded BatchNorm: equal up to float rounding)
        assert float((t - expected).abs().max()) <= 1e-5
    assert torch.equal(seen[0], seen[2])
    assert _distance(_weights(qat), fold_batch_norm(c["model"]).state_dict()) > 0          # the student moved
    assert all(torch.equal(before[k], v) for k, v in c["model"].state_dict().items())      # the teacher did not


def test_distillation_ignores_the_label_masks_and_mse_does_not(unet_case):
    c = unet_case
    other = 1.0 - c["y"]                                       # every pixel's label flipped
    mse = _distance(_weights(_tune(c, "mse", epochs=1)), _weights(_tune(c, "mse", labels=other, epochs=1)))
    distill = _distance(_weights(_tune(c, "distill", epochs=1)),
                        _weights(_tune(c, "distill", labels=other, epochs=1)))
    assert mse > 0
    assert distill <= 1e-6 * mse


def test_the_distilled_fake_quant_map_moves_toward_the_teacher_and_mse_toward_the_labels(unet_case):
    c = unet_case
    x, y = c["x"], c["y"]
    with torch.no_grad():
        target = c["teacher"](x)
    start = copy.deepcopy(c["prepared"])          # the fake-quant model before any step
    start.observe(False)
    distilled = _tune(c, "distill", teacher=c["teacher"], epochs=2, lr=5e-3)
    labelled = _tune(c, "mse", teacher=c["teacher"], epochs=2, lr=5e-3)   # `teacher` unused with the labels' loss

    def dist(qat, ref):
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(qat(x), ref))

    d0_t, d0_y = dist(start, target), dist(start, y)
    d_t, d_y = dist(distilled, target), dist(distilled, y)
    m_t, m_y = dist(labelled, target), dist(labelled, y)
    assert d_t < 0.85 * d0_t and d_y > d0_y      # toward the teacher's map, away from the labels
    assert m_y < d0_y and m_t > d0_t             # the recipe's loss: toward the labels, away from the teacher
    assert d_t < 0.8 * m_t and m_y < 0.8 * d_y   # each loss pulls toward its own target, not the other's


def test_qat_networks_ships_the_fp32_unet_it_distilled_from(unet_case, tmp_path):
    from export.qat import qat_networks
    c = unet_case
    images = (c["images"][:4, 0] * 255).round().astype(np.uint8)
    masks = c["masks"][:4, 0].astype(np.uint8)
    common = dict(vgg_images=None, vgg_labels=None, graph=c["graph"], unet_images=images, unet_masks=masks,
                  unet_epochs=1, lr=1e-3, calibration_frames=2, log=lambda m: None, networks=("unet",))
    fp32 = fold_batch_norm(c["model"]).state_dict()
    distilled = qat_networks(c["model"], None, out_dir=tmp_path / "distill", unet_loss="distill", **common)
    assert distilled["qat"]["settings"]["unet"]["loss"] == "distill"
    assert (tmp_path / "distill" / "unet.int8.onnx").is_file()
    shipped = distilled["unet"].state_dict()
    assert set(shipped) == set(fp32) and all(torch.equal(shipped[k], fp32[k]) for k in fp32)
    assert _distance(distilled["finetuned"]["unet"].state_dict(), fp32) > 0     # the INT8 side did train
    # With the labels' MSE the fine-tuned float weights ship, the ones the INT8 file was exported from.
    labelled = qat_networks(c["model"], None, out_dir=tmp_path / "mse", unet_loss="mse", **common)
    assert labelled["qat"]["settings"]["unet"]["loss"] == "mse"
    shipped = labelled["unet"].state_dict()
    tuned = labelled["finetuned"]["unet"].state_dict()
    assert all(torch.equal(shipped[k], tuned[k]) for k in tuned) and _distance(shipped, fp32) > 0
    # Distillation is the recipe's default (`train --qat`, `calibrate --qat`); the bare fine-tuning step keeps the
    # labels' MSE, the UNet's training loss.
    assert inspect.signature(qat_networks).parameters["unet_loss"].default == "distill"
    assert inspect.signature(qat_finetune).parameters["unet_loss"].default == "mse"
    assert TrainConfig().qat_unet_loss == "distill"


def test_misuse_is_refused(unet_case):
    c = unet_case
    with pytest.raises(ValueError, match="unet_loss"):
        _tune(c, "bce")
    with pytest.raises(ValueError, match="VGG"):
        qat_finetune(VGG19BN(width=1 / 32, in_channels=1), [], epochs=1, lr=1e-3, placement=c["placement"],
                     unet_loss="distill")
    with pytest.raises(ValueError, match="UNet teacher"):
        _tune(c, "distill", teacher=VGG19BN(width=1 / 32, in_channels=1))
