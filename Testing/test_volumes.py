"""volumes: reading refusals, atomic writing, the working-grid round trip and the Slicer matrix conversion."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.grid import WorkingGrid
from ConvLoRASegLib import volumes as V

HEADS = Path("/work/shared/data/heads")


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_ellipsoid() -> tuple:
    """An ellipsoid head-like image and its mask on an oblique, flipped, permuted, anisotropic grid."""
    direction = _rotation(0.25, -0.15, 0.35) @ np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float)
    spacing = np.array([1.2, 0.9, 2.5])
    size = np.array([150, 190, 64])
    origin = np.array([30.0, -20.0, 10.0])
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    idx = np.stack([i, j, k], -1).astype(float)
    centre = (size - 1) / 2.0
    phys = (idx - centre) * spacing @ direction.T  # mm relative to the centre
    r = np.sqrt((phys[..., 0] / 60) ** 2 + (phys[..., 1] / 75) ** 2 + (phys[..., 2] / 55) ** 2)
    mask = (r <= 1.0).astype(np.uint8)
    img = np.where(r <= 1.0, 100.0 + 20 * np.cos(phys[..., 0] / 7), np.where(r <= 1.15, 40.0, 0.0))
    out = []
    for a in (img.astype(np.float32), mask):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing(spacing.tolist())
        im.SetDirection(direction.ravel().tolist())
        im.SetOrigin(origin.tolist())
        out.append(im)
    return out[0], out[1]


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    return 2.0 * float((x & y).sum()) / float(x.sum() + y.sum())


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-9)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-12))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small(a: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(a.astype(np.float32))


# -------------------------------------------------------------------------------------------------- reading

def test_read_refuses_missing_file(tmp_path):
    with pytest.raises(ConvLoRASegError, match="no such file"):
        V.read_image(tmp_path / "nothing.nii.gz")


def test_read_refuses_non_image(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_text("hello, not an image")
    with pytest.raises(ConvLoRASegError, match="not an image"):
        V.read_image(p)


def test_read_refuses_folder_without_dicom(tmp_path):
    with pytest.raises(ConvLoRASegError, match="DICOM"):
        V.read_image(tmp_path)


def test_read_refuses_2d(tmp_path):
    p = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(20, 30).astype(np.float32)), str(p))
    with pytest.raises(ConvLoRASegError, match="not a 3D volume"):
        V.read_image(p)
    p1 = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(small(np.random.rand(1, 20, 30)), str(p1))
    with pytest.raises(ConvLoRASegError, match="not a 3D volume"):
        V.read_image(p1)


def test_read_4d_refused_unless_first_volume(tmp_path):
    a = np.stack([np.full((6, 7, 8), t + 1.0) for t in range(3)])
    a[:, 0, 0, 0] = 0  # not constant
    p = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(a.astype(np.float32), isVector=False), str(p))
    assert V.image_info(p).dimension == 4
    with pytest.raises(ConvLoRASegError, match="4D with 3 volumes"):
        V.read_image(p)
    im = V.read_image(p, first_volume=True)
    assert im.GetDimension() == 3 and im.GetSize() == (8, 7, 6)
    assert float(sitk.GetArrayViewFromImage(im).max()) == 1.0  # volume 0


def test_read_refuses_vector_pixels(tmp_path):
    p = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(5, 6, 7, 3).astype(np.float32), isVector=True), str(p))
    with pytest.raises(ConvLoRASegError, match="3 components"):
        V.read_image(p)


@pytest.mark.parametrize("value, word", [(0.0, "empty"), (7.0, "constant")])
def test_read_refuses_empty_and_constant(tmp_path, value, word):
    p = tmp_path / "flat.mha"
    sitk.WriteImage(small(np.full((5, 6, 7), value)), str(p))
    with pytest.raises(ConvLoRASegError, match=word):
        V.read_image(p)


def test_read_refuses_nan(tmp_path):
    a = np.random.rand(5, 6, 7)
    a[2, 3, 4] = np.nan
    p = tmp_path / "nan.nrrd"  # ITK's NIfTI writer does not keep NaN
    sitk.WriteImage(small(a), str(p))
    with pytest.raises(ConvLoRASegError, match="NaN"):
        V.read_image(p)


def test_read_gives_float32_and_leaves_file_untouched(tmp_path):
    p = tmp_path / "u8.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.randint(0, 255, (8, 9, 10)).astype(np.uint8)), str(p))
    before = sha(p)
    im = V.read_image(p)
    assert im.GetPixelID() == sitk.sitkFloat32
    assert sha(p) == before


def _cut(path: Path, fraction: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) * 2 // 3
    data[at:at + 40] = bytes(b ^ 0xFF for b in data[at:at + 40])
    path.write_bytes(bytes(data))


def _noisy(shape=(20, 24, 22)) -> sitk.Image:
    return small(np.random.default_rng(0).uniform(1, 100, shape))


# the data file SimpleITK writes for each (name, compressed): the header itself, or a detached file
FORMATS = [("a.nii.gz", True, "a.nii.gz"), ("a.nii", False, "a.nii"), ("a.nrrd", True, "a.nrrd"),
           ("a.nrrd", False, "a.nrrd"), ("a.mha", True, "a.mha"), ("a.mha", False, "a.mha"),
           ("a.nhdr", True, "a.raw.gz"), ("a.mhd", True, "a.zraw"), ("a.mhd", False, "a.raw")]


@pytest.mark.parametrize("name,compressed,data", FORMATS)
def test_read_refuses_a_file_cut_short(tmp_path, name, compressed, data):
    """SimpleITK reads a cut .nii.gz or .nii without a word, the missing voxels zero: the reader refuses it."""
    path = tmp_path / name
    sitk.WriteImage(_noisy(), str(path), compressed)
    assert V.read_image(path).GetSize() == (22, 24, 20)
    _cut(tmp_path / data)
    before = sha(tmp_path / data)
    with pytest.raises(ConvLoRASegError, match=f"^{name} is truncated: "):
        V.read_image(path)
    assert sha(tmp_path / data) == before


@pytest.mark.parametrize("name,data", [("a.nii.gz", "a.nii.gz"), ("a.nrrd", "a.nrrd"), ("a.mha", "a.mha"),
                                       ("a.mhd", "a.zraw")])
def test_read_refuses_damaged_compressed_data(tmp_path, name, data):
    """A damaged gzip/zlib stream fails its checksum (SimpleITK reads a .nii.gz or .mha with one as noise)."""
    path = tmp_path / name
    sitk.WriteImage(_noisy(), str(path), True)
    _damage(tmp_path / data)
    with pytest.raises(ConvLoRASegError, match=f"^{name} is (corrupt|truncated): "):
        V.read_image(path)


def test_read_accepts_what_is_whole(tmp_path):
    """A plain NIfTI named .nii.gz (SimpleITK reads it), two gzip members, and zero padding after the stream."""
    import gzip

    plain = tmp_path / "plain.nii"
    sitk.WriteImage(_noisy(), str(plain), False)
    (tmp_path / "plain.nii.gz").write_bytes(plain.read_bytes())
    data = plain.read_bytes()
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    (tmp_path / "padded.nii.gz").write_bytes(gzip.compress(data) + bytes(16))
    for name in ("plain.nii.gz", "two.nii.gz", "padded.nii.gz"):
        assert V.read_image(tmp_path / name).GetSize() == (22, 24, 20), name


def test_a_stream_with_all_its_bytes_but_too_few_voxels_is_refused(tmp_path):
    """A whole gzip stream of a NIfTI whose voxels were cut before compression: fewer bytes than the header says."""
    import gzip

    plain = tmp_path / "a.nii"
    sitk.WriteImage(_noisy(), str(plain), False)
    (tmp_path / "a.nii.gz").write_bytes(gzip.compress(plain.read_bytes()[:-500]))
    with pytest.raises(ConvLoRASegError, match="holds .* of the 42,240 bytes"):
        V.read_image(tmp_path / "a.nii.gz")


def test_label_images_are_read_as_stored_and_scans_refused(tmp_path):
    mask = sitk.GetImageFromArray((np.random.default_rng(0).random((20, 24, 22)) > 0.5).astype(np.uint8))
    sitk.WriteImage(mask, str(tmp_path / "m.nii.gz"))
    got = V.read_label_image(tmp_path / "m.nii.gz")
    assert got.GetPixelID() == sitk.sitkUInt8
    sitk.WriteImage(sitk.Image(22, 24, 20, sitk.sitkUInt8), str(tmp_path / "empty.nii.gz"))
    assert V.read_label_image(tmp_path / "empty.nii.gz").GetSize() == (22, 24, 20)  # an empty mask is a mask
    sitk.WriteImage(sitk.Cast(_noisy() * 10, sitk.sitkInt16), str(tmp_path / "t1.nii.gz"))
    with pytest.raises(ConvLoRASegError, match="t1.nii.gz is not a label image: .* distinct values"):
        V.read_label_image(tmp_path / "t1.nii.gz")
    sitk.WriteImage(_noisy() / 100.0, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(ConvLoRASegError, match="prob.nii.gz is not a label image: it has non-integer values"):
        V.read_label_image(tmp_path / "prob.nii.gz")
    _cut(tmp_path / "m.nii.gz")
    with pytest.raises(ConvLoRASegError, match="truncated"):
        V.read_label_image(tmp_path / "m.nii.gz")


def test_check_intensities_flags_ct():
    a = np.full((6, 6, 6), -1000.0)
    a[2:4, 2:4, 2:4] = 1500.0
    assert any("CT" in w for w in V.check_intensities(small(a)))
    assert V.check_intensities(small(np.random.rand(6, 6, 6) * 800)) == []
    labels = np.zeros((6, 6, 6))
    labels[2:4] = 1
    assert any("mask" in w for w in V.check_intensities(small(labels)))


# -------------------------------------------------------------------------------------------------- writing

def test_write_refuses_existing_and_overwrites_on_request(tmp_path):
    p = tmp_path / "out.nii.gz"
    V.write_image(small(np.ones((3, 4, 5))), p)
    with pytest.raises(ConvLoRASegError, match="exists"):
        V.write_image(small(np.zeros((3, 4, 5))), p)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(p))).max() == 1
    V.write_image(small(np.full((3, 4, 5), 2.0)), p, overwrite=True)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(p))).max() == 2
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_formats(tmp_path, suffix):
    im = small(np.random.rand(3, 4, 5))
    im.SetSpacing([0.5, 1.5, 2.0])
    out = V.write_image(im, tmp_path / f"x{suffix}")
    back = sitk.ReadImage(str(out))
    assert np.allclose(back.GetSpacing(), [0.5, 1.5, 2.0])
    assert sorted(os.listdir(tmp_path)) == [f"x{suffix}"]


def test_write_refuses_bad_targets(tmp_path):
    im = small(np.ones((3, 4, 5)))
    with pytest.raises(ConvLoRASegError, match="does not exist"):
        V.write_image(im, tmp_path / "missing" / "out.nii.gz")
    with pytest.raises(ConvLoRASegError, match="file type"):
        V.write_image(im, tmp_path / "out.png")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConvLoRASegError, match="does not exist"):
        V.write_image(im, tmp_path / "a_file" / "out.nii.gz")


def test_write_is_atomic_when_the_writer_fails(tmp_path, monkeypatch):
    p = tmp_path / "keep.nrrd"
    V.write_image(small(np.ones((3, 4, 5))), p)
    before = sha(p)

    def broken(image, name, *args):
        Path(name).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(V.sitk, "WriteImage", broken)
    with pytest.raises(ConvLoRASegError, match="disk full"):
        V.write_image(small(np.zeros((3, 4, 5))), p, overwrite=True)
    assert sha(p) == before
    assert sorted(os.listdir(tmp_path)) == ["keep.nrrd"]


# ---------------------------------------------------------------------------------------------- orientation

def test_canonical_direction_matches_dicomorient():
    img, _ = oblique_ellipsoid()
    can = V.canonical(img)
    assert np.allclose(V.canonical_direction(img), np.array(can.GetDirection()).reshape(3, 3))
    d = np.array(can.GetDirection()).reshape(3, 3)
    assert np.all(np.argmax(np.abs(d), axis=0) == [0, 1, 2]) and np.all(np.diag(d) > 0)


def test_sagittal_slices_have_a_fixed_layout():
    """A bright blob left-anterior-superior of the centre lands at high N, top rows, left columns."""
    for code in ("RAS", "PIL", "LPS"):
        a = np.zeros((40, 40, 40), np.float32)
        a[5:35, 5:35, 5:35] = 1.0
        im = small(a)
        im.SetSpacing([2.0, 2.0, 2.0])
        blob = sitk.Image(im)
        pt = np.array([20.0, -20.0, 20.0]) + np.array(im.TransformContinuousIndexToPhysicalPoint([19.5] * 3))
        idx = im.TransformPhysicalPointToIndex(pt.tolist())
        blob[idx] = 5.0
        blob = sitk.DICOMOrient(blob, code)
        vs = V.to_slices(blob, WorkingGrid(spacing_mm=2.0, slice_size=64, normalisation="minmax"))
        n, h, w = np.unravel_index(np.argmax(vs.slices), vs.slices.shape)
        assert n > vs.slices.shape[0] // 2 and h < 32 and w < 32, code


# ---------------------------------------------------------------------------------------- slices round trip

def _round_trip(img: sitk.Image, mask: sitk.Image, grid: WorkingGrid) -> sitk.Image:
    vs = V.to_slices(img, grid)
    assert vs.slices.dtype == np.float32 and vs.slices.shape[1:] == (grid.slice_size, grid.slice_size)
    assert vs.slices.min() >= 0.0 and vs.slices.max() <= 1.0
    assert same_geometry(vs.native, img)
    ms = V.mask_to_slices(mask, vs)
    assert ms.dtype == np.uint8 and ms.shape == vs.slices.shape
    probs = V.to_native(ms.astype(np.float32), vs)
    assert probs.GetPixelID() == sitk.sitkFloat32 and same_geometry(probs, img)
    out = V.to_mask(probs)
    assert out.GetPixelID() == sitk.sitkUInt8 and same_geometry(out, img)
    return out


@pytest.mark.parametrize("name", ["itk_kmeans", "robex_atlas"])
def test_round_trip_real_head(name):
    path = HEADS / name / "image.nii.gz"
    if not path.exists():
        pytest.skip("shared heads not available")
    before = sha(path)
    img = V.read_image(path)
    mask = sitk.ReadImage(str(HEADS / name / "mask.nii.gz"))
    out = _round_trip(img, mask, WorkingGrid(spacing_mm=2.0, slice_size=128))
    assert dice(out, mask) > 0.97
    assert sha(path) == before


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial"])
def test_round_trip_oblique_flipped_anisotropic(axis):
    img, mask = oblique_ellipsoid()
    out = _round_trip(img, mask, WorkingGrid(spacing_mm=2.0, slice_size=128, axis=axis, normalisation="minmax"))
    assert dice(out, mask) > 0.97


def test_padding_is_zero_and_percentile_ignores_it():
    img, _ = oblique_ellipsoid()
    vs = V.to_slices(img, WorkingGrid(spacing_mm=2.0, slice_size=160, normalisation="percentile"))
    assert np.all(vs.slices[:, :3, :] == 0) and np.all(vs.slices[:, :, :3] == 0)
    assert 0.95 < vs.slices.max() <= 1.0  # the range comes from the native voxels; resampling smooths the top


def test_postprocess_keeps_largest_component_and_fills_holes():
    m = np.zeros((20, 20, 20), np.uint8)
    m[2:12, 2:12, 2:12] = 1
    m[5:8, 5:8, 5:8] = 0       # enclosed hole
    m[15:18, 15:18, 15:18] = 1  # small island
    out = V.postprocess(m)
    assert out.dtype == np.uint8
    assert out[6, 6, 6] == 1 and out[16, 16, 16] == 0 and out.sum() == 1000
    assert V.postprocess(np.zeros((4, 4, 4))).sum() == 0



def test_detach_leaks_cuts_what_hangs_on_a_thin_bridge_and_keeps_the_brain():
    """A 'brain' ball with a 'scalp' blob joined by a 2-voxel bridge: the largest component keeps the blob;
    detach_leaks removes blob and bridge and leaves every voxel of the ball as predicted."""
    z, y, x = np.mgrid[:48, :48, :64]
    brain = ((z - 24) ** 2 + (y - 24) ** 2 + (x - 22) ** 2) <= 14 ** 2
    blob = ((z - 24) ** 2 + (y - 24) ** 2 + (x - 54) ** 2) <= 6 ** 2
    bridge = (abs(z - 24) <= 1) & (abs(y - 24) <= 1) & (x >= 30) & (x <= 54)
    probs = np.where(brain | blob | bridge, 0.9, 0.05).astype(np.float32)
    assert V.postprocess(probs >= 0.5)[24, 24, 54] == 1  # today's step keeps the leak
    out = V.detach_leaks(probs, 2.0, 4.0)
    assert out.dtype == np.float32 and out.shape == probs.shape
    kept = out >= 0.5
    assert not kept[blob].any() and kept[brain].all()
    assert not kept[bridge & (x >= 40)].any()
    np.testing.assert_array_equal(out[brain], probs[brain])
    assert V.detach_leaks(probs, 2.0, 0.0) is probs
    empty = np.zeros((8, 8, 8), np.float32)
    assert V.detach_leaks(empty, 2.0, 4.0) is empty
    # fragments (an untrained model, noise): the largest core would keep less than half: left as it is
    rng = np.random.default_rng(0)
    noise = (rng.random((40, 40, 40)) < 0.55).astype(np.float32)
    noise[:6, :6, :6] = 1.0  # one small solid piece: the only core the erosion leaves
    assert V.detach_leaks(noise, 2.0, 4.0) is noise

def test_brain_mask_on_the_native_box_equals_the_whole_grid():
    """brain_mask resamples only the box around the working voxels >= 0.5: the same mask as resampling,
    thresholding and post-processing the input's whole grid, on an oblique, flipped, anisotropic grid, with a
    mask touching the working grid's edge, and for no brain at all."""
    img, mask = oblique_ellipsoid()
    vs = V.to_slices(img, WorkingGrid(spacing_mm=2.0, slice_size=128, normalisation="minmax"))
    rng = np.random.default_rng(1)
    base = V.mask_to_slices(mask, vs).astype(np.float32)
    soft = np.clip(base * 0.8 + rng.random(base.shape).astype(np.float32) * 0.3, 0, 1)
    edge = soft.copy()
    edge[:, :6, 40:80] = 0.9  # touches the working grid's border
    for probs in (soft, edge, np.zeros_like(soft)):
        for post in (True, False):
            ref = probs if not post else V.detach_leaks(probs, 2.0, V.LEAK_RADIUS_MM)
            whole = V.to_mask(V.to_native(ref, vs), 0.5, postprocess=post)
            boxed = V.brain_mask(probs, vs, 0.5, postprocess=post)
            assert same_geometry(boxed, img) and boxed.GetPixelID() == sitk.sitkUInt8
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(boxed), sitk.GetArrayViewFromImage(whole))
    assert sitk.GetArrayViewFromImage(V.brain_mask(soft, vs)).sum() > 0.5 * sitk.GetArrayViewFromImage(mask).sum()


def test_threaded_antialias_is_scipys_filter_bit_for_bit():
    rng = np.random.default_rng(2)
    a = rng.random((110, 100, 96)).astype(np.float32)  # > 1 M voxels: the threaded path
    before = a.copy()
    from scipy import ndimage
    for sigma in ((0.5, 0.5, 0.5), (0.0, 0.5, 1.0), (1.5, 0.0, 0.0)):
        np.testing.assert_array_equal(V._gaussian_threaded(a, sigma), ndimage.gaussian_filter(a, sigma, truncate=3.0))
    np.testing.assert_array_equal(a, before)


# --------------------------------------------------------------------------------------------------- memory

def test_check_memory_refuses_huge_header_before_reading(tmp_path):
    hdr = tmp_path / "huge.nhdr"
    hdr.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4000 4000 4000\nspacings: 1 1 1\n"
                   "encoding: raw\nendian: little\ndata file: huge.raw\n")
    (tmp_path / "huge.raw").write_bytes(b"")  # 256 GB announced, nothing there: only the header may be read
    info = V.image_info(hdr)
    assert info.size == (4000, 4000, 4000) and info.bytes_per_component == 4
    with pytest.raises(ConvLoRASegError, match=r"needs about \d+(\.\d)? GB, only"):
        V.check_memory(hdr, WorkingGrid())
    small_img = small(np.random.rand(10, 10, 10))
    need = V.check_memory(small_img, WorkingGrid())
    assert 0 < need < 100e6
    with pytest.raises(ConvLoRASegError, match="needs about"):
        V.check_memory(small_img, WorkingGrid(), limit_bytes=1000)


# --------------------------------------------------------------------------------------------------- Slicer

def test_ijk_to_ras_round_trip_oblique_flipped():
    img, _ = oblique_ellipsoid()
    m = V.ijk_to_ras(img)
    # index -> RAS by the matrix equals SimpleITK's LPS point with x, y negated
    ijk = [7, 11, 13]
    lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
    assert np.allclose((m @ np.array(ijk + [1.0]))[:3], lps * [-1, -1, 1])
    arr = V.array_from_image(img)
    back = V.image_from_array(arr, m)
    assert same_geometry(back, img) and np.array_equal(sitk.GetArrayViewFromImage(back), arr)
    assert np.allclose(V.ijk_to_ras(back), m)


def test_image_from_array_refuses_shear():
    m = np.eye(4)
    m[0, 1] = 0.5
    with pytest.raises(ConvLoRASegError, match="sheared"):
        V.image_from_array(np.zeros((3, 4, 5), np.float32), m)


# ------------------------------------------------------------------------------------------------ streaming

def test_read_dicom_series_folder(tmp_path):
    """A folder of single-slice DICOM files is read as one volume with its spacing and slice count."""
    vol = (np.random.rand(6, 10, 12) * 1000).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.shape[0]):
        sl = sitk.GetImageFromArray(vol[k])
        sl.SetSpacing([0.8, 0.9])
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.3"), ("0020|000e", "1.2.3.4"),
                           ("0020|0032", f"0\\0\\{2.5 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(k + 1)), ("0028|0030", "0.9\\0.8")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"s{k:03d}.dcm"))
        writer.Execute(sl)
    info = V.image_info(tmp_path)
    assert info.size == (12, 10, 6)
    im = V.read_image(tmp_path)
    assert im.GetSize() == (12, 10, 6)
    assert np.allclose(im.GetSpacing(), [0.8, 0.9, 2.5], atol=1e-3)
    assert np.allclose(sitk.GetArrayViewFromImage(im), vol)


# ---------------------------------------------------------------------------------------- head-centred grid

def _head_phantom(extra_below_mm: float = 0.0, shift_ap_mm: float = 0.0) -> sitk.Image:
    """A 4 mm "head" (ellipsoid 150 x 190 x 170 mm, a bright inner "brain") inside a field of view that reaches
    ``extra_below_mm`` further down (a neck-like cylinder fills it) and is shifted front-back by ``shift_ap_mm``."""
    sp = 4.0
    nz = int((220 + extra_below_mm) / sp)
    size = (48, 64, nz)  # x: L-R, y: P-A ... as LPS array axes (x, y, z)
    zz, yy, xx = np.mgrid[0:nz, 0:size[1], 0:size[0]].astype(float) * sp
    top = nz * sp - 20.0  # vertex 20 mm below the top of the field of view
    cz, cy, cx = top - 85.0, size[1] * sp / 2 + shift_ap_mm, size[0] * sp / 2
    head = ((xx - cx) / 75) ** 2 + ((yy - cy) / 95) ** 2 + ((zz - (top - 85)) / 85) ** 2 <= 1
    brain = ((xx - cx) / 60) ** 2 + ((yy - cy) / 80) ** 2 + ((zz - cz) / 65) ** 2 <= 1
    neck = (((xx - cx) / 45) ** 2 + ((yy - cy) / 45) ** 2 <= 1) & (zz < top - 150)
    a = np.where(brain, 100.0, np.where(head | neck, 40.0, 0.0)).astype(np.float32)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing([sp] * 3)
    img.SetOrigin([-cx, -cy, -cz])  # the brain's centre at the physical origin, whatever the FOV
    return img


def test_head_centre_ignores_the_field_of_view():
    """More neck or an off-centre head does not move the centre: it stays on the brain (within a voxel)."""
    for extra, shift in ((0.0, 0.0), (80.0, 0.0), (0.0, 40.0), (120.0, -30.0)):
        c = V.head_centre(_head_phantom(extra, shift))
        assert np.all(np.abs(c) <= 6.0), (extra, shift, c)


def test_working_slices_do_not_move_with_the_field_of_view():
    """The brain lands on the same working-grid pixels with and without a neck and an off-centre head
    (with the image-centred grid of before, 80 mm more neck moved it by 20 pixels)."""
    grid = WorkingGrid(spacing_mm=4.0, slice_size=64, normalisation="minmax")

    def brain_box(img):
        s = V.to_slices(img, grid).slices
        hw = np.argwhere((s > 0.9).any(0))
        return hw.min(0), hw.max(0)

    ref = brain_box(_head_phantom())
    for extra, shift in ((80.0, 0.0), (0.0, 40.0), (120.0, -30.0)):
        lo, hi = brain_box(_head_phantom(extra, shift))
        assert np.abs(lo - ref[0]).max() <= 1 and np.abs(hi - ref[1]).max() <= 1, (extra, shift)


def test_head_centre_is_the_same_for_a_file_round_trip_and_any_axis_order():
    """Spacing noise in the 16th digit, another pixel type or flipped axes (a Slicer node vs its saved file) must
    not move the centre: the working grid, and so the mask, would differ."""
    img = _head_phantom(40.0, 10.0)
    ref = V.head_centre(img)
    noisy = sitk.Cast(img, sitk.sitkInt16)
    noisy.SetSpacing([s * (1 + 2e-16) for s in img.GetSpacing()])
    for variant in (noisy, sitk.DICOMOrient(img, "RAI"), sitk.DICOMOrient(noisy, "PIL")):
        assert np.allclose(V.head_centre(variant), ref, atol=1e-6)


def test_partial_volume_targets_put_the_surface_between_working_voxels():
    """A sphere on a 1.7 mm grid, taken to the 2 mm working grid (which cannot line up with it) and back: the 0/1
    target moves its surface by up to half a working voxel (surface Dice at 1 mm about 0.91 here, about 0.71 on
    the real 2 mm heads, whose grid is offset from the working grid); the partial-volume fractions keep it."""
    from ConvLoRASegLib.metrics import surface_dice

    sp, n = 1.7, 55
    k, j, i = np.mgrid[:n, :n, :n]
    r = sp * np.sqrt((k - n / 2 + 0.3) ** 2 + (j - n / 2 - 0.6) ** 2 + ((i - n / 2 + 0.2) * 1.1) ** 2)
    truth = r < 31.0
    img, mask = small(np.where(truth, 0.8, np.where(r < 40.0, 0.4, 0.0))), small(truth)
    for im in (img, mask):
        im.SetSpacing((sp, sp, sp))
        im.SetOrigin((0.3, 0.7, 1.1))
    vs = V.to_slices(img, WorkingGrid(spacing_mm=2.0, slice_size=64, normalisation="minmax"))
    hard = V.mask_to_slices(mask, vs)
    soft = V.mask_to_slices(mask, vs, partial_volume=True)
    assert hard.dtype == np.uint8 and soft.dtype == np.float32 and soft.shape == hard.shape
    assert soft.min() >= 0.0 and soft.max() <= 1.0 and np.count_nonzero((soft > 0.05) & (soft < 0.95)) > 0
    back = {name: sitk.GetArrayFromImage(V.to_native(t.astype(np.float32), vs)) >= 0.5
            for name, t in (("hard", hard), ("soft", soft))}
    sd = {name: surface_dice(b, truth, (sp, sp, sp), 1.0) for name, b in back.items()}
    assert sd["soft"] > 0.99 and sd["soft"] > sd["hard"] + 0.05, sd
