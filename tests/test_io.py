import gzip
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from stnreg import Affine, Grid
from stnreg.image import Image
from stnreg.io import ImageReadError, read_image, read_transform, write_displacement, write_image, write_transform


def _geometry_image(shape=(6, 7, 8)):
    data = torch.rand(1, *shape)
    rot = sitk.VersorTransform((0.1, 0.9, 0.2), 0.4).GetMatrix()
    return Image(data, Grid(shape, (0.7, 1.1, 1.3), (4.0, -20.0, 7.5), rot), "geom")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_image_round_trip_keeps_geometry(tmp_path, suffix):
    img = _geometry_image()
    path = write_image(tmp_path / f"a{suffix}", img)
    back = read_image(path)
    torch.testing.assert_close(back.data.float(), img.data)
    assert back.grid.shape == img.grid.shape
    np.testing.assert_allclose(back.grid.spacing, img.grid.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.grid.origin, img.grid.origin, atol=1e-4)
    np.testing.assert_allclose(back.grid.direction, img.grid.direction, atol=1e-5)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_png_and_vector_channels(tmp_path):
    rgb = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    img = read_image(tmp_path / "c.png")
    assert img.data.shape == (3, 12, 10) and img.ndim == 2
    write_image(tmp_path / "g.png", Image(img.data[:1].float() + 0.4, img.grid))
    assert read_image(tmp_path / "g.png").data.dtype == torch.uint8


def test_4d_label_file_becomes_channels(tmp_path):
    arr = np.zeros((3, 5, 6, 7), dtype=np.float32)
    arr[0, 1:3, 2:4, 3:5] = 1
    img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arr])
    sitk.WriteImage(img, str(tmp_path / "lab.nii.gz"))
    lab = read_image(tmp_path / "lab.nii.gz", label=True)
    assert lab.data.shape == (3, 5, 6, 7) and lab.data.dtype == torch.int64 and lab.ndim == 3


def test_bad_files_name_the_file_and_problem(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    txt = tmp_path / "text.nii.gz"
    txt.write_text("not an image")
    with pytest.raises(ImageReadError, match="text.nii.gz: cannot read"):
        read_image(txt)
    good = write_image(tmp_path / "good.nii.gz", _geometry_image((20, 20, 20)))
    raw = gzip.decompress(good.read_bytes())
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(ImageReadError, match="trunc.nii.gz"):
        read_image(trunc)
    nan = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ImageReadError, match="nan.nii.gz: contains NaN"):
        read_image(tmp_path / "nan.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(tmp_path / "sing.mha"))
    raw = (tmp_path / "sing.mha").read_bytes()
    (tmp_path / "sing.mha").write_bytes(raw.replace(b"TransformMatrix = 1 0 0 0 1 0", b"TransformMatrix = 1 0 0 1 0 0"))
    with pytest.raises(ImageReadError, match=r"sing.mha: .*(singular|determinant)"):
        read_image(tmp_path / "sing.mha")
    floats = tmp_path / "f.nii.gz"
    write_image(floats, Image(torch.full((1, 3, 3, 3), 0.5), Grid((3, 3, 3))))
    with pytest.raises(ImageReadError, match="non-integer"):
        read_image(floats, label=True)


def test_writes_are_protected_and_atomic(tmp_path):
    img = _geometry_image()
    path = write_image(tmp_path / "in.nii.gz", img)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite an input"):
        write_image(path, Image(img.data * 2, img.grid), protect=[path])
    assert path.read_bytes() == before


def test_matrix_transform_file_round_trip(tmp_path):
    t = Affine(3, params=torch.tensor([[[1.02, 0.05, 0.0, 3.0], [-0.04, 0.98, 0.02, -2.0], [0.0, 0.03, 1.01, 5.0]]]))
    write_transform(tmp_path / "a.tfm", t)
    itk = sitk.ReadTransform(str(tmp_path / "a.tfm"))
    p = [1.0, 2.0, 3.0]
    want = torch.tensor(itk.TransformPoint(p), dtype=torch.float64)
    got = t(torch.tensor([[p]], dtype=torch.float32))[0, 0].double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    back = read_transform(tmp_path / "a.tfm")
    torch.testing.assert_close(back.matrix().float(), t.matrix(), atol=1e-6, rtol=0)
    # A centred ITK transform reads back to the same point map.
    centred = sitk.AffineTransform(2)
    centred.SetMatrix([math.cos(0.3), -math.sin(0.3), math.sin(0.3), math.cos(0.3)])
    centred.SetCenter([10.0, -4.0])
    centred.SetTranslation([1.0, 2.0])
    sitk.WriteTransform(centred, str(tmp_path / "c.tfm"))
    mine = read_transform(tmp_path / "c.tfm")
    q = [3.0, 7.0]
    torch.testing.assert_close(
        mine(torch.tensor([[q]]).double())[0, 0], torch.tensor(centred.TransformPoint(q)).double(), atol=1e-6, rtol=0
    )


def test_displacement_field_is_an_itk_transform(tmp_path):
    grid = _geometry_image().grid
    field = torch.randn(3, *grid.shape) * 0.5
    write_displacement(tmp_path / "u.nii.gz", field, grid)
    itk = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(tmp_path / "u.nii.gz")), sitk.sitkVectorFloat64))
    idx = (2, 3, 4)  # x, y, z index
    world = grid.index_to_world()[:3] @ torch.tensor([*idx, 1.0], dtype=torch.float64)
    moved = torch.tensor(itk.TransformPoint(world.tolist()), dtype=torch.float64)
    torch.testing.assert_close(moved - world, field[:, idx[2], idx[1], idx[0]].double(), atol=1e-5, rtol=0)
    mine = read_transform(tmp_path / "u.nii.gz")
    torch.testing.assert_close(mine(world.float().view(1, 1, 3))[0, 0].double(), moved, atol=1e-4, rtol=0)
