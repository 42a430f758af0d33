"""Learned registration: networks, training from configs (also DDP), checkpoints, inference in world space."""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer, smooth_image

from stnreg import Grid, Image
from stnreg.cli import main
from stnreg.learn import (
    PairDataModule,
    RegistrationNet,
    RegistrationTask,
    load_collection,
    load_paired,
    load_task,
    register_with_model,
)
from stnreg.learn.data import resolve_data_path
from stnreg.nets import UNet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("shape", "level"), [((37, 50), 0), ((37, 50), 1), ((13, 20, 17), 0), ((13, 20, 17), 1)])
def test_unet_any_size(shape, level):
    net = UNet(2, len(shape), len(shape), encoder=(8, 8, 8), decoder=(8, 8, 8), final=(8,), out_level=level)
    out = net(torch.rand(2, 2, *shape))
    assert out.shape == (2, len(shape), *[math.ceil(s / 2**level) for s in shape])
    with pytest.raises(ValueError, match="spatial axes"):
        net(torch.rand(2, 2, *shape, 3))


@pytest.mark.parametrize(
    "stages", [["svf"], ["displacement"], ["affine", "svf"], ["rigid"], ["projective"], ["tps"], ["bspline"]]
)
def test_untrained_network_is_identity_and_trainable(stages):
    torch.manual_seed(0)
    net = RegistrationNet(2, stages, encoder=(8, 8), decoder=(8, 8), final=(8,), loc_channels=(8,), loc_features=8)
    moving, fixed = smooth_image((24, 20), 0, torch.float32), smooth_image((24, 20), 1, torch.float32)
    out = net(moving, fixed)
    assert torch.allclose(out.warped, moving, atol=1e-4)
    ((out.warped - fixed) ** 2).mean().backward()
    # Every stage's network receives a gradient (the identity head's weights start at zero).
    for sub in net.nets:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sub.parameters())


def test_network_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown stage"):
        RegistrationNet(2, ["warp9"])
    with pytest.raises(ValueError, match="power of two"):
        RegistrationNet(2, ["svf"], field_factor=3)
    net = RegistrationNet(2, ["svf"])
    with pytest.raises(ValueError, match="one shape"):
        net(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 17))


def _shift_dataset(path: Path, n: int = 12, shape=(32, 32)) -> Path:
    """Smooth images, each a random translate of one pattern (a learnable registration problem)."""
    base = smooth_image((shape[0] + 5, shape[1] + 5), 3, torch.float32, sigma=3.0)[0, 0].numpy()
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(n):
        dy, dx = rng.integers(0, 6, 2)
        imgs.append(base[dy : dy + shape[0], dx : dx + shape[1]])
    np.save(path, np.stack(imgs).astype(np.float32))
    return path


def _tiny_task(**kw) -> RegistrationTask:
    args = {"ndim": 2, "stages": ["svf"], "encoder": [8, 16], "decoder": [16, 8], "final": [8], "lr": 3e-3}
    return RegistrationTask(**(args | kw))


def _trainer(tmp_path: Path, steps: int) -> L.Trainer:
    # Checkpointing stays on: the training test saves and restores one.
    return quiet_trainer(max_steps=steps, enable_checkpointing=True, default_root_dir=tmp_path, limit_val_batches=0)


def test_training_learns_and_checkpoint_restores(tmp_path):
    data = _shift_dataset(tmp_path / "shifts.npy")
    dm = PairDataModule(str(data), train_index=[0, 10], val_index=[10, 12], batch_size=4)
    L.seed_everything(0)
    task = _tiny_task(regularization={"diffusion": 0.01}, similarity="mse", encoder=[16, 16, 16], decoder=[16, 16, 16])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = float(
            task.objective(task(batch["moving"], batch["fixed"]), batch["moving"], batch["fixed"])["similarity"]
        )
    trainer = _trainer(tmp_path, 60)
    trainer.fit(task, dm)
    with torch.no_grad():
        after = float(
            task.objective(task(batch["moving"], batch["fixed"]), batch["moving"], batch["fixed"])["similarity"]
        )
    assert after < 0.8 * before
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = load_task(ckpt)
    assert restored.hparams.input_shape == [32, 32]
    assert restored.net.config == task.net.config
    task.eval()
    with torch.no_grad():
        assert torch.equal(
            restored(batch["moving"], batch["fixed"]).warped, task(batch["moving"], batch["fixed"]).warped
        )


def test_refinement_improves_and_leaves_weights_alone():
    """Refinement warm-starts instance optimization from the prediction; the network is untouched."""
    torch.manual_seed(0)
    task = _tiny_task(similarity="mse", input_shape=[32, 32]).eval()
    big = smooth_image((40, 40), 0, torch.float32, sigma=3.0)[0]
    grid = Grid((32, 32))
    moving, fixed = Image(big[:, :32, :32], grid), Image(big[:, 3:35, 2:34], grid)
    weights = {k: v.clone() for k, v in task.state_dict().items()}
    plain = register_with_model(task, moving, fixed, progress=False, device="cpu")
    refined = register_with_model(task, moving, fixed, 40, progress=False, device="cpu")
    assert refined.metrics["ncc_after"] > plain.metrics["ncc_after"] + 0.02
    assert refined.settings["refine_steps"] == 40 and refined.timings["refine_s"] > 0
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in weights.items())


def _oblique_grid(shape) -> Grid:
    c, s = math.cos(0.3), math.sin(0.3)
    return Grid(shape, spacing=(0.7, 1.3), origin=(5.0, -3.0), direction=((c, -s), (s, c)))


def test_model_translation_maps_to_world():
    """A network predicting a known normalized translation gives the matching world-space matrix."""
    task = _tiny_task(stages=["translation"], loc_channels=[4], loc_features=4, input_shape=[20, 30])
    t_norm = torch.tensor([0.1, -0.2])
    with torch.no_grad():
        task.net.nets[0][1].bias.copy_(t_norm)
    grid = _oblique_grid((20, 30))
    fixed = Image(smooth_image((20, 30), 0, torch.float32)[0], grid)
    result = register_with_model(task, fixed, fixed, progress=False, device="cpu")
    # Normalized units are half the field of view along each grid axis: x spans 30 px, y 20 px.
    half = torch.tensor([30 * 0.7 / 2, 20 * 1.3 / 2])
    expected = torch.tensor(grid.direction, dtype=torch.float32) @ (t_norm * half)
    assert result.deformable is None
    assert torch.allclose(result.matrix.matrix()[0, :2, 2], expected, atol=1e-4)
    assert torch.allclose(result.matrix.matrix()[0, :2, :2], torch.eye(2), atol=1e-6)


def test_model_affine_init_composes_the_prealignment_before_the_network():
    """With ``affine_init`` the moving image is first aligned by rigid+affine: a copy of the fixed image
    shifted by (3, -2) mm in world comes back as that translation, followed by the network's map
    (here the identity: an untrained displacement network)."""
    task = _tiny_task(stages=["displacement"], input_shape=[32, 40])
    grid = Grid((32, 40), spacing=(1.0, 1.0))
    fixed = Image(smooth_image((32, 40), 0, torch.float32)[0], grid)
    moving = Image(fixed.data, Grid((32, 40), spacing=(1.0, 1.0), origin=(3.0, -2.0)))
    plain = register_with_model(task, moving, fixed, progress=False, device="cpu")
    assert plain.matrix is None
    result = register_with_model(task, moving, fixed, progress=False, device="cpu", affine_init=True)
    m = result.matrix.matrix()[0]
    assert torch.allclose(m[:2, 2], torch.tensor([3.0, -2.0]), atol=0.05), m
    assert torch.allclose(m[:2, :2], torch.eye(2), atol=0.01), m
    assert result.settings["affine_init"] and result.timings["affine_init_s"] > 0


def test_model_field_maps_to_world_and_saves(tmp_path):
    """A constant 2-voxel x displacement from the U-Net is 2 * spacing_x mm along the grid's x axis."""
    task = _tiny_task(stages=["displacement"], input_shape=[20, 30])
    with torch.no_grad():
        task.net.nets[0].out.weight.zero_()
        task.net.nets[0].out.bias.copy_(torch.tensor([2.0, 0.0]))
    grid = _oblique_grid((20, 30))
    fixed = Image(smooth_image((20, 30), 0, torch.float32)[0], grid)
    result = register_with_model(task, fixed, fixed, progress=False, device="cpu")
    disp = result.displacement()
    expected = torch.tensor(grid.direction, dtype=torch.float32) @ torch.tensor([2 * 0.7, 0.0])
    assert torch.allclose(disp[:, 5:15, 5:25].mean((1, 2)), expected, atol=1e-4)
    files = result.save(tmp_path / "out")
    assert (tmp_path / "out" / "deformable.nii.gz").exists() and files


def test_data_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("STNREG_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="STNREG_DATA"):
        resolve_data_path("nowhere/x.npy")
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    with pytest.raises(ValueError, match="expected a stack"):
        load_collection(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="mode must be"):
        PairDataModule(str(tmp_path / "bad.npy"), mode="pairs")
    folder = tmp_path / "imgs"
    folder.mkdir()
    from stnreg.io import write_image

    write_image(folder / "a.nii.gz", Image(torch.rand(1, 10, 12), Grid((10, 12))))
    write_image(folder / "b.nii.gz", Image(torch.rand(1, 11, 12), Grid((11, 12))))
    with pytest.raises(ValueError, match="different sizes"):
        load_collection(folder)
    imgs, labels = load_collection(folder, shape=[8, 8])
    assert imgs.shape == (2, 1, 8, 8) and labels is None and float(imgs.max()) == 1.0


def test_paired_prostate_resampled_in_world(data_dir):
    mov, fix, mlab, flab = load_paired(data_dir / "prostate" / "paired" / "test", label_channels=[0])
    assert mov.shape == fix.shape and mov.shape[2:] == (41, 59, 44)
    assert mlab.shape[1] == 1 and flab.shape[1] == 1
    assert not mov.requires_grad and mov.grad_fn is None


def _write_config(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"""seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path / "runs"}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path / "runs"}, name: csv}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / "ckpt"}, save_last: true}}
model:
  class_path: stnreg.learn.RegistrationTask
  init_args:
    {{ndim: 2, stages: [affine, svf], encoder: [8, 8], decoder: [8, 8], final: [8], loc_channels: [8], loc_features: 8}}
data:
  class_path: stnreg.learn.PairDataModule
  init_args: {{train: {data}, train_index: [0, 8], val_index: [8, 12], batch_size: 2}}
"""
    )
    return cfg


def test_fit_from_config_resume_and_register(tmp_path):
    data = _shift_dataset(tmp_path / "shifts.npy")
    cfg = _write_config(tmp_path, data)
    assert main(["fit", "--config", str(cfg), "--model.init_args.lr", "0.002"]) == 0
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()
    assert torch.load(last, weights_only=False)["hyper_parameters"]["lr"] == 0.002
    # Resume from the checkpoint for more steps.
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "6", "--ckpt_path", str(last)]) == 0
    assert torch.load(last, weights_only=False)["global_step"] == 6
    # The checkpoint alone registers a pair from the command line, with refinement.
    from stnreg.io import write_image

    arr = np.load(data)
    for i in (10, 11):
        write_image(tmp_path / f"im{i}.nii.gz", Image(torch.as_tensor(arr[i])[None], Grid((32, 32))))
    out = tmp_path / "reg"
    assert (
        main(
            [
                "register",
                str(tmp_path / "im10.nii.gz"),
                str(tmp_path / "im11.nii.gz"),
                "-o",
                str(out),
                "--model",
                str(last),
                "--refine",
                "3",
                "-q",
            ]
        )
        == 0
    )
    assert {"warped.nii.gz", "affine.tfm", "deformable.nii.gz", "report.json", "qc.png"} <= {
        p.name for p in out.iterdir()
    }


def test_register_model_cli_errors(tmp_path, capsys):
    bogus = tmp_path / "not.ckpt"
    bogus.write_text("hello")
    img = tmp_path / "a.nii.gz"
    from stnreg.io import write_image

    write_image(img, Image(torch.rand(1, 16, 16), Grid((16, 16))))
    assert main(["register", str(img), str(img), "-o", str(tmp_path / "o"), "--refine", "3"]) == 2
    assert "--refine needs --model" in capsys.readouterr().err
    assert main(["register", str(img), str(img), "-o", str(tmp_path / "o"), "--affine-init"]) == 2
    assert "--affine-init needs --model" in capsys.readouterr().err
    assert main(["register", str(img), str(img), "-o", str(tmp_path / "o"), "--model", str(bogus)]) == 2
    assert "not a stnreg registration checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fit_ddp_two_processes_on_cpu(tmp_path):
    data = _shift_dataset(tmp_path / "shifts.npy")
    cfg = _write_config(tmp_path, data)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stnreg.cli",
            "fit",
            "--config",
            str(cfg),
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GLOBAL_RANK: 1" in proc.stderr + proc.stdout or "world_size=2" in (proc.stderr + proc.stdout).replace(
        " ", ""
    )
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 3


CONFIGS = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_configs_parse(config, capsys):
    """Every config names real classes and arguments (LightningCLI validates it without training)."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: stnreg." in capsys.readouterr().out


def test_pairing_modes_and_augmentation(tmp_path):
    from stnreg.learn.task import random_affine

    data = _shift_dataset(tmp_path / "s.npy", n=6)
    inter = PairDataModule(str(data), train_index=[0, 4], val_index=[4, 6])
    inter.setup("fit")
    assert len(inter.train_set) == 4 * 3 and inter.val_set.pairs == [(0, 1), (1, 0)]
    atlas = PairDataModule(str(data), mode="atlas", atlas=2, train_index=[0, 5])
    atlas.setup("fit")
    assert len(atlas.train_set) == 5 and torch.equal(atlas.train_set[0]["fixed"], atlas.train_set[3]["fixed"])
    assert torch.equal(atlas.train_set[4]["fixed"], atlas.train_set[2]["moving"])
    with pytest.raises(ValueError, match="needs atlas"):
        PairDataModule(str(data), mode="atlas")
    # Augmentation: strength 0 is the identity; otherwise rotations stay within ±10° * strength.
    eye = random_affine(5, 2, 0.0).matrix()
    assert torch.allclose(eye, torch.eye(3).expand(5, 3, 3), atol=1e-6)
    m = random_affine(200, 3, 1.0, torch.Generator().manual_seed(0)).matrix()[:, :3, :3]
    scales = torch.linalg.svdvals(m)
    assert float((scales - 1).abs().max()) < 0.25 and float(m.det().min()) > 0
