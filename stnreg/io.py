"""Images and transforms to and from disk, in the formats ITK, SimpleITK and ANTs read.

Everything goes through SimpleITK, so world coordinates are ITK's physical space (LPS for
medical images): NIfTI's RAS affine is converted on read and write exactly as ITK and ANTs do.

* Images: NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd``), NRRD (``.nrrd``,
  ``.nhdr``), and 2D PNG / JPEG / TIFF / BMP. Writes are atomic (a temporary file in the same
  folder, then a rename) and never replace a file in ``protect``.
* Matrix transforms: ITK transform files (``.tfm``, ``.txt``, ``.mat``, ``.h5``) holding an
  ``AffineTransform`` that maps fixed (output) points to moving (input) points.
* Deformable transforms: an ITK displacement field image, vectors in mm in physical space, on the
  fixed grid (``T(x) = x + u(x)``), readable as ``sitk.DisplacementFieldTransform`` and by ANTs.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .coords import Grid
from .errors import InputError
from .image import Image
from .transforms.base import Composite, Transform
from .transforms.dense import Displacement
from .transforms.matrix import Affine, MatrixTransform

__all__ = [
    "IMAGE_SUFFIXES",
    "TRANSFORM_SUFFIXES",
    "ImageInfo",
    "ImageReadError",
    "displacement_to_sitk",
    "grid_from_sitk",
    "image_info",
    "read_image",
    "read_transform",
    "to_sitk",
    "write_displacement",
    "write_image",
    "write_transform",
]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TRANSFORM_SUFFIXES = (".tfm", ".txt", ".mat", ".h5", ".hdf5")


class ImageReadError(InputError):
    """A file that cannot be used as an image; the message names the file and the problem."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(IMAGE_SUFFIXES + TRANSFORM_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def grid_from_sitk(img: sitk.Image, ndim: int | None = None) -> Grid:
    """The :class:`Grid` of a SimpleITK image, keeping its first ``ndim`` axes."""
    n = img.GetDimension()
    d = ndim or n
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(n, n)[:d, :d]
    size = list(img.GetSize())[:d]
    return Grid(tuple(reversed(size)), img.GetSpacing()[:d], img.GetOrigin()[:d], direction.tolist())


def _reason(err: BaseException) -> str:
    """One short line from an ITK/nibabel exception (ITK's carry source paths and several lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "ERROR:" in ln:
            ln = ln.split("ERROR:", 1)[1]
            ln = ln.split("):", 1)[-1] if ln.lstrip().startswith(("Image", "MetaImage", "Nifti")) else ln
            return " ".join(ln.split())[:160]
    return " ".join(" ".join(lines or [type(err).__name__]).split())[:160]


def _read_nifti(path: Path) -> tuple[np.ndarray, Grid, int]:
    """NIfTI pixels through nibabel, geometry through ITK's header reader.

    ITK's NIfTI reader silently zero-fills truncated data and turns NaN into 0; nibabel reports
    both. ITK still defines the geometry, so world coordinates are the ones ITK and ANTs use.

    Returns:
        ``(array (C, *spatial) in array order, grid, spatial rank)``.
    """
    import nibabel as nib

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        arr = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as err:  # ITK and nibabel raise many types for broken files
        raise ImageReadError(f"{path}: cannot read as an image (truncated or corrupt: {_reason(err)})") from None
    n = reader.GetDimension()
    if n > 4 or (n == 4 and reader.GetNumberOfComponents() > 1):
        shape = "x".join(str(v) for v in arr.shape)
        raise ImageReadError(
            f"{path}: a {arr.ndim}D image ({shape}); stnreg reads 2D or 3D images, with channels as vector "
            "components or as a 4th axis"
        )
    # Vector images keep all ITK axes as space; a 4th scalar axis (4D label files) becomes channels.
    spatial = n if reader.GetNumberOfComponents() > 1 else min(n, 3)
    size = arr.shape[:spatial]
    arr = arr.reshape(*size, -1)
    arr = np.moveaxis(arr, -1, 0)
    arr = np.ascontiguousarray(np.transpose(arr, (0, *range(spatial, 0, -1))))
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(n, n)[:spatial, :spatial]
    grid = Grid(tuple(reversed(size)), reader.GetSpacing()[:spatial], reader.GetOrigin()[:spatial], direction.tolist())
    return arr, grid, spatial


def read_image(path: str | os.PathLike, label: bool = False) -> Image:
    """Read an image file into an :class:`Image` with data ``(C, *spatial)``.

    Vector pixels (RGB, multi-component) and a 4th axis (as in 4D label files) become channels.
    ``label=True`` keeps integer data and checks that it is integral.

    Raises:
        ImageReadError: missing, unreadable or truncated file, unsupported dimension, NaN or
            infinite values, an empty image, or a singular direction matrix.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a folder, not an image file")
    grid: Grid | None = None
    if _suffix(p) in (".nii", ".nii.gz"):
        try:
            arr, grid, dim = _read_nifti(p)
        except ValueError as err:
            if isinstance(err, ImageReadError):
                raise
            raise ImageReadError(f"{p}: {err}") from None
    else:
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as err:
            raise ImageReadError(f"{p}: cannot read as an image ({_reason(err)})") from None
        dim = img.GetDimension()
        arr = sitk.GetArrayFromImage(img)
        if img.GetNumberOfComponentsPerPixel() > 1:
            arr = np.moveaxis(arr, -1, 0)
        elif dim == 4:
            dim = 3
        else:
            arr = arr[None]
    if dim not in (2, 3):
        raise ImageReadError(f"{p}: {dim}D images are not supported (2D or 3D, optionally with channels)")
    if arr.size == 0:
        raise ImageReadError(f"{p}: the image is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ImageReadError(f"{p}: contains NaN or infinite values")
    if grid is None:
        try:
            grid = grid_from_sitk(img, dim)
        except ValueError as err:
            raise ImageReadError(f"{p}: {err}") from None
    if label:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.array_equal(arr, np.round(arr)):
                raise ImageReadError(f"{p}: label map holds non-integer values")
            arr = arr.astype(np.int64)
        data = torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64))
    else:
        data = torch.from_numpy(np.ascontiguousarray(arr))
        if data.dtype in (torch.uint16, torch.uint32, torch.uint64):
            data = data.to(torch.int64)
    return Image(data, grid, str(p))


def to_sitk(image: Image) -> sitk.Image:
    """A SimpleITK image with the same pixels and geometry (channels become vector components)."""
    arr = image.data.detach().cpu().numpy()
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.shape[0] == 1:
        img = sitk.GetImageFromArray(arr[0])
    else:
        img = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1), isVector=True)
    return _with_geometry(img, image)


def _with_geometry(img: sitk.Image, image: Image) -> sitk.Image:
    img.SetSpacing(image.grid.spacing)
    img.SetOrigin(image.grid.origin)
    img.SetDirection([v for row in image.grid.direction for v in row])
    return img


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, protect: Iterable[str | os.PathLike], writer) -> Path:
    path = Path(path)
    guarded = {Path(p).resolve() for p in protect}
    if path.resolve() in guarded:
        raise FileExistsError(f"{path}: refusing to overwrite an input file")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; a result gets the mode any new file of the user's would (0666 - umask).
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclass(frozen=True)
class ImageInfo:
    """An image file's geometry from its header alone: what :func:`read_image` would return, unread.

    Attributes:
        shape: spatial shape in array order ``(H, W)`` / ``(D, H, W)``.
        channels: number of channels (vector components, or the 4th axis of a 4D scalar file).
        spacing, origin, direction: as :class:`~stnreg.coords.Grid` (x, y, z order), rounded for comparison.
        layout: how the file stores channels: ``"axis"`` for a 4th image axis of scalars (4D NIfTI label
            files), else ``"vector"`` (vector components, or one channel); see :func:`write_image`.
    """

    shape: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    layout: str

    @property
    def ndim(self) -> int:
        return len(self.shape)


def image_info(path: str | os.PathLike) -> ImageInfo:
    """Check that ``path`` is a 2D/3D image (+ channels) and return its geometry, without reading pixels.

    Raises:
        ImageReadError: missing file, a folder, not an image, or an unsupported number of dimensions.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a folder, not an image file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(f"{p}: cannot read as an image ({_reason(err)})") from None
    n, comps, size = reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize()
    spatial = n - 1 if n == 4 and comps == 1 else n
    if spatial not in (2, 3) or (n == 4 and comps > 1):
        shape = "x".join(str(v) for v in size) + (f" x {comps} components" if comps > 1 else "")
        raise ImageReadError(
            f"{p}: a {n}D image ({shape}); stnreg reads 2D or 3D images, with channels as vector components "
            "or as a 4th axis"
        )
    channels = comps if spatial == n else size[3]

    def rnd(v: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(round(float(x), 4) for x in v)

    d = np.asarray(reader.GetDirection()).reshape(n, n)[:spatial, :spatial]
    return ImageInfo(
        tuple(reversed(size[:spatial])),
        channels,
        rnd(reader.GetSpacing()[:spatial]),
        rnd(reader.GetOrigin()[:spatial]),
        rnd(tuple(d.ravel())),
        "vector" if spatial == n else "axis",
    )


def write_image(
    path: str | os.PathLike, image: Image, protect: Iterable[str | os.PathLike] = (), channels: str = "vector"
) -> Path:
    """Write ``image`` atomically; 8-bit formats (PNG/JPEG/BMP) get values clipped to 0-255.

    ``channels``: several channels of a 3D image become vector components (``"vector"``) or a 4th
    image axis (``"axis"``, as 4D label files store them; see :attr:`ImageInfo.layout`).
    """
    if channels not in ("vector", "axis"):
        raise ValueError(f"channels must be 'vector' or 'axis', got {channels!r}")
    img = to_sitk(image)
    if channels == "axis" and image.data.shape[0] > 1 and image.ndim == 3:
        arr = image.data.detach().cpu().numpy()
        img = sitk.JoinSeries([_with_geometry(sitk.GetImageFromArray(a), image) for a in arr])
    if _suffix(Path(path)) in (".png", ".jpg", ".jpeg", ".bmp") and img.GetPixelID() not in (sitk.sitkUInt8,):
        img = sitk.Cast(sitk.Clamp(sitk.Round(img), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)
    return _atomic_write(Path(path), protect, lambda tmp: sitk.WriteImage(img, tmp, useCompression=True))


def _sitk_affine(t: MatrixTransform, index: int = 0) -> sitk.AffineTransform:
    m = t.matrix()[index].detach().double().cpu()
    d = t.ndim
    if t.projective:
        raise ValueError("projective transforms have no ITK file form; resample with stnreg.apply instead")
    out = sitk.AffineTransform(d)
    out.SetMatrix(m[:d, :d].reshape(-1).tolist())
    out.SetTranslation(m[:d, d].tolist())
    return out


def write_transform(path: str | os.PathLike, transform: MatrixTransform, protect: Iterable = ()) -> Path:
    """Write a world-space matrix transform as an ITK ``AffineTransform`` file (fixed -> moving points)."""
    itk = _sitk_affine(transform)
    return _atomic_write(Path(path), protect, lambda tmp: sitk.WriteTransform(itk, tmp))


def displacement_to_sitk(field: torch.Tensor, grid: Grid) -> sitk.Image:
    """A ``(d, *shape)`` displacement in mm (``x, y, z`` components) as an ITK vector image."""
    arr = np.moveaxis(field.detach().double().cpu().numpy(), 0, -1)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection([v for row in grid.direction for v in row])
    return img


# Displacement fields in NIfTI are written here rather than by ITK's writer, which took 4.4 s to
# gzip a 1 mm brain's field (173 MB of float64) into 67 MB. zlib at level 1 took 2.5 s (71 MB), and
# with its run-length strategy (matches of repeated bytes only: the zero low bytes of float32
# values widened to float64) 1.6 s for 90 MB (one run, one thread); the file is an ordinary gzip
# stream either way. The bytes inside are the ones ITK writes: its own header (written for a
# one-voxel image of the same geometry, the sizes patched in) and the same component-major float64
# payload; tests/test_outputs.py compares them byte for byte.
GZIP_LEVEL = 1
GZIP_STRATEGY = zlib.Z_RLE
_NIFTI1_DIM_OFFSET = 40  # int16 dim[8] in the 348-byte NIfTI-1 header
_CHUNK_VALUES = 2**20  # values converted and compressed at a time (8 MB of float64)


def _nifti_field_header(grid: Grid, components: int) -> bytes | None:
    """ITK's NIfTI-1 header and extension flag (352 bytes) for a float64 vector image of ``components``
    components on ``grid``; ``None`` where ITK would write another format (NIfTI-2 for sizes over
    32767) or the header is not the NIfTI-1 layout expected here."""
    sizes = list(reversed(grid.shape))
    if max(sizes) > 32767:
        return None
    tiny = sitk.Image([1] * grid.ndim, sitk.sitkVectorFloat64, components)
    tiny.SetSpacing(grid.spacing)
    tiny.SetOrigin(grid.origin)
    tiny.SetDirection([v for row in grid.direction for v in row])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "header.nii")
        sitk.WriteImage(tiny, path, useCompression=False)
        with open(path, "rb") as f:
            header = bytearray(f.read(352))
    # ITK writes the machine's byte order; sizeof_hdr (348) tells which it is.
    order = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    dims = struct.unpack_from(f"{order}8h", header, _NIFTI1_DIM_OFFSET)
    nifti1 = struct.unpack(f"{order}i", header[:4])[0] == 348 and header[344:348] == b"n+1\0"
    if not nifti1 or dims[1 : 1 + grid.ndim] != (1,) * grid.ndim:
        return None
    struct.pack_into(f"{order}{grid.ndim}h", header, _NIFTI1_DIM_OFFSET + 2, *sizes)
    return bytes(header)


def _write_nifti_field(path: str, field: torch.Tensor, header: bytes, compress: bool) -> None:
    """Header, then the field ``(d, *shape)`` as float64 component by component (NIfTI's order: the
    vector component is the slowest axis, ``x`` the fastest, as in the tensor), gzipped or not."""
    flat = field.detach().cpu().reshape(-1)
    pack = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8, GZIP_STRATEGY) if compress else None
    with open(path, "wb") as f:
        f.write(pack.compress(header) if pack else header)
        for start in range(0, flat.numel(), _CHUNK_VALUES):
            chunk = flat[start : start + _CHUNK_VALUES].numpy().astype(np.float64, copy=False)
            f.write(pack.compress(chunk) if pack else chunk.tobytes())
        if pack:
            f.write(pack.flush())


def write_displacement(path: str | os.PathLike, field: torch.Tensor, grid: Grid, protect: Iterable = ()) -> Path:
    """Write a displacement field ``(d, *shape)`` in mm on ``grid`` as an ITK displacement field image
    (float64 vectors, what ``sitk.DisplacementFieldTransform`` takes); ``.nii.gz`` is gzipped at
    :data:`GZIP_LEVEL` with :data:`GZIP_STRATEGY`."""
    path = Path(path)
    suffix = _suffix(path)
    header = _nifti_field_header(grid, field.shape[0]) if suffix in (".nii", ".nii.gz") else None
    if header is not None:
        return _atomic_write(path, protect, lambda tmp: _write_nifti_field(tmp, field, header, suffix == ".nii.gz"))
    img = displacement_to_sitk(field, grid)
    return _atomic_write(path, protect, lambda tmp: sitk.WriteImage(img, tmp, useCompression=True))


def _read_one_transform(path: Path) -> Transform:
    if _suffix(path) in TRANSFORM_SUFFIXES:
        try:
            itk = sitk.ReadTransform(str(path))
        except RuntimeError:
            raise ImageReadError(f"{path}: cannot read as an ITK transform file") from None
        if itk.GetName() == "CompositeTransform":
            itk = sitk.CompositeTransform(itk)
            parts = [itk.GetNthTransform(i) for i in range(itk.GetNumberOfTransforms())]
            return Composite([_from_sitk_transform(t, path) for t in parts])
        return _from_sitk_transform(itk, path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ImageReadError(
            f"{path}: cannot read as a transform (an ITK transform file {', '.join(TRANSFORM_SUFFIXES)}, a "
            f"displacement field image, or a 'stnreg register' output folder): {_reason(err)}"
        ) from None
    if img.GetNumberOfComponentsPerPixel() != img.GetDimension():
        raise ImageReadError(f"{path}: not a displacement field (needs {img.GetDimension()} vector components)")
    grid = grid_from_sitk(img)
    arr = np.moveaxis(sitk.GetArrayFromImage(img), -1, 0)
    field = torch.from_numpy(np.ascontiguousarray(arr)).float().unsqueeze(0)
    return Displacement(grid.shape, params=field, domain=grid.world_to_normalized())


def _from_sitk_transform(itk: sitk.Transform, path: Path) -> Transform:
    d = itk.GetDimension()
    if itk.GetName() == "DisplacementFieldTransform":
        field = sitk.DisplacementFieldTransform(itk).GetDisplacementField()
        grid = grid_from_sitk(field)
        arr = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)
        return Displacement(
            grid.shape, params=torch.from_numpy(arr.copy()).float()[None], domain=grid.world_to_normalized()
        )
    try:
        affine = sitk.AffineTransform(d)
        affine.SetMatrix(itk.GetMatrix())
        affine.SetTranslation(itk.GetTranslation())
        affine.SetCenter(itk.GetCenter())
    except (RuntimeError, AttributeError):
        raise ImageReadError(f"{path}: ITK transform type {itk.GetName()} is not supported") from None
    m = torch.eye(d + 1, dtype=torch.float64)
    m[:d, :d] = torch.tensor(affine.GetMatrix(), dtype=torch.float64).reshape(d, d)
    c = torch.tensor(affine.GetCenter(), dtype=torch.float64)
    m[:d, d] = torch.tensor(affine.GetTranslation(), dtype=torch.float64) + c - m[:d, :d] @ c
    return Affine.from_matrix(m.unsqueeze(0))


def read_transform(path: str | os.PathLike) -> Transform:
    """Read an ITK transform file, a displacement field image, or a ``stnreg register`` output folder.

    A folder is read through its ``report.json``: the files under ``"transform"`` form a
    :class:`Composite` in ITK ``CompositeTransform`` order (the last one is applied first).
    """
    p = Path(path)
    if p.is_dir():
        import json

        report = p / "report.json"
        if not report.exists():
            raise ImageReadError(f"{p}: a folder must be a 'stnreg register' output with a report.json")
        files = json.loads(report.read_text())["transform"]
        parts = [_read_one_transform(p / f) for f in files]
        return parts[0] if len(parts) == 1 else Composite(parts)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    return _read_one_transform(p)
