"""sites: six scanner profiles that change grid, storage and intensities but keep the anatomy; demo heads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.sites import SITES, SiteProfile, demo_heads, random_subject, simulate_site


def volume_ml(mask: sitk.Image) -> float:
    return float((sitk.GetArrayViewFromImage(mask) != 0).sum()) * float(np.prod(mask.GetSpacing())) / 1000.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def brain_histogram(image: sitk.Image, mask: sitk.Image, bins: int = 32) -> np.ndarray:
    """Histogram (sums to 1) of brain intensities scaled by the head's 99.5th percentile."""
    a = sitk.GetArrayViewFromImage(image).astype(np.float32)
    top = np.percentile(a[a > 0], 99.5)
    h, _ = np.histogram(np.clip(a[sitk.GetArrayViewFromImage(mask) != 0] / top, 0, 1), bins=bins, range=(0, 1))
    return h / h.sum()


@pytest.fixture(scope="module")
def head():
    image, mask = demo_heads()["colin27"]
    return sitk.ReadImage(str(image)), sitk.ReadImage(str(mask))


@pytest.fixture(scope="module")
def scanned(head):
    return {name: simulate_site(*head, name, seed=0) for name in SITES}


def test_demo_heads_ship_four_heads_in_their_orientations():
    heads = demo_heads()
    assert sorted(heads) == ["colin27", "itk_kmeans", "mni152_nlin6asym", "robex_atlas"]
    total = 0
    for name, (ip, mp) in heads.items():
        im, mk = sitk.ReadImage(str(ip)), sitk.ReadImage(str(mp))
        assert im.GetPixelID() == sitk.sitkUInt8 and mk.GetSize() == im.GetSize()
        assert np.allclose(mk.GetDirection(), im.GetDirection()) and np.allclose(mk.GetOrigin(), im.GetOrigin())
        assert set(np.unique(sitk.GetArrayViewFromImage(mk))) == {0, 1}
        assert 900 < volume_ml(mk) < 2100, name
        total += ip.stat().st_size + mp.stat().st_size
    assert total < 4.2e6
    d = np.array(sitk.ReadImage(str(heads["itk_kmeans"][0])).GetDirection()).reshape(3, 3)
    assert not np.allclose(np.abs(d), np.eye(3))  # the permuted-axes head stays permuted


@pytest.mark.slow
def test_grid_storage_and_orientation_follow_the_profile(scanned):
    for name, (image, mask) in scanned.items():
        p = SITES[name]
        assert np.allclose(image.GetSpacing(), p.spacing_mm), name
        assert image.GetSize() == tuple(int(round(f / s)) for f, s in zip(p.fov_mm, p.spacing_mm))
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        assert code == p.orientation, name
        a = sitk.GetArrayViewFromImage(image)
        assert a.dtype == np.dtype(p.dtype) and a.min() >= 0 and a.max() <= p.storage_max
        assert mask.GetPixelID() == sitk.sitkUInt8 and mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetOrigin(), image.GetOrigin())


@pytest.mark.slow
def test_anatomy_is_kept(head, scanned):
    for name, (image, mask) in scanned.items():
        assert abs(volume_ml(mask) / volume_ml(head[1]) - 1.0) < 0.15, name
        back = sitk.Resample(mask, head[1], sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        assert dice(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(head[1])) > 0.95, name


@pytest.mark.slow
def test_sites_differ_from_each_other(scanned):
    hist = {name: brain_histogram(*scanned[name]) for name in SITES}
    for a, b in itertools.combinations(SITES, 2):
        assert np.abs(hist[a] - hist[b]).sum() > 0.15, (a, b)


@pytest.mark.slow
def test_deterministic_per_seed(head, scanned):
    a1, m1 = scanned["siemens3"]
    a2, m2 = simulate_site(*head, "siemens3", seed=0)
    a3, _ = simulate_site(*head, "siemens3", seed=1)
    assert np.array_equal(sitk.GetArrayViewFromImage(a1), sitk.GetArrayViewFromImage(a2))
    assert np.array_equal(sitk.GetArrayViewFromImage(m1), sitk.GetArrayViewFromImage(m2))
    assert a1.GetOrigin() == a2.GetOrigin()
    assert not np.array_equal(sitk.GetArrayViewFromImage(a1), sitk.GetArrayViewFromImage(a3))


@pytest.mark.slow
def test_severity_scales_the_shift(head, scanned):
    ref = brain_histogram(*scanned["ge3"])
    dist = []
    for severity in (0.0, 1.0, 2.0):
        out = scanned["philips3"] if severity == 1.0 else simulate_site(*head, "philips3", 0, severity=severity)
        dist.append(np.abs(brain_histogram(*out) - ref).sum())
    assert dist[0] < dist[1] < dist[2]


def test_unknown_site_and_custom_profile(head):
    with pytest.raises(ConvLoRASegError, match="unknown site"):
        simulate_site(*head, "toshiba7", seed=0)
    custom = SiteProfile("tiny", "a coarse test site", (3.0, 3.0, 3.0), "PIL", (180.0, 240.0, 240.0), 1.0,
                         gamma=1.0, gm_wm_contrast=0.0, bias=0.0, noise=0.0, storage_max=255.0, dtype="uint8")
    image, mask = simulate_site(*head, custom, seed=0)
    assert image.GetSize() == (60, 80, 80) and image.GetSpacing() == (3.0, 3.0, 3.0)


def test_random_subject_moves_anatomy_plausibly(head):
    image, mask = head
    s1, m1 = random_subject(image, mask, seed=1)
    s2, m2 = random_subject(image, mask, seed=1)
    s3, m3 = random_subject(image, mask, seed=2)
    a0, a1, a3 = (sitk.GetArrayViewFromImage(m) for m in (mask, m1, m3))
    assert np.array_equal(a1, sitk.GetArrayViewFromImage(m2))
    assert np.array_equal(sitk.GetArrayViewFromImage(s1), sitk.GetArrayViewFromImage(s2))
    assert s1.GetSize() == image.GetSize() and np.allclose(s1.GetDirection(), image.GetDirection())
    assert 0.75 < dice(a0, a1) < 0.99 and dice(a1, a3) < 0.99
    assert abs(volume_ml(m1) / volume_ml(mask) - 1.0) < 0.3


@pytest.mark.slow
def test_more_masks_follow_the_same_deformation_and_grid(head):
    image, mask = head
    s, m, m_again = random_subject(image, mask, seed=1, also=(mask,))
    assert np.array_equal(sitk.GetArrayViewFromImage(m), sitk.GetArrayViewFromImage(m_again))
    a, am, am_again = simulate_site(s, m, "siemens3", seed=0, also=(m_again,))
    assert np.array_equal(sitk.GetArrayViewFromImage(am), sitk.GetArrayViewFromImage(am_again))
    a2, _ = simulate_site(s, m, "siemens3", seed=0)
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(a2))  # image unchanged
