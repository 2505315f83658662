"""The synthetic RSNA-layout generator: files, tags, labels, quirks, determinism, label rates."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ich_tune.data import synthetic
from ich_tune.data.dicom import DicomError, read_header, read_hu
from ich_tune.data.labels import CLASSES, read_labels
from ich_tune.data.phantom import HU_MAX, HU_MIN, SUBTYPES, random_bleed, random_head, render_slice
from ich_tune.data.rsna import RSNA_RATES
from ich_tune.data.synthetic import ENCODINGS, MARKER, encode, generate, plan

# RSNA's "ID_<hex>" UIDs are not valid DICOM UIDs; pydicom warns on every read, as with real data
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

SMALL = dict(studies=6, slices=8, size=64, seed=3, positive_rate=0.4, quirk_rate=0.15)
ROW = re.compile(r"ID_[0-9a-f]{9}_(" + "|".join(CLASSES) + r")")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out, **SMALL)


@pytest.fixture(scope="module")
def images() -> list[synthetic.Image]:
    return plan(**SMALL)


def files(out: Path, folder: str) -> list[Path]:
    return sorted((out / folder).glob("*.dcm"))


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_layout_and_csv_formats(dataset):
    out, summary = dataset
    train, test = files(out, "stage_2_train"), files(out, "stage_2_test")
    assert len(train) == summary["train_images"] == 6 * 8
    assert len(test) == summary["test_images"] == 1 * 8  # default test_studies: max(1, 6 // 10)
    assert not list(out.glob("*.partial"))

    rows = csv_rows(out / "stage_2_train.csv")
    assert rows[0] == ["ID", "Label"]
    assert all(ROW.fullmatch(r[0]) and r[1] in ("0", "1") for r in rows[1:])
    per_image = Counter(r[0].rsplit("_", 1)[0] for r in rows[1:])
    assert set(per_image) == {p.stem for p in train}
    assert set(per_image.values()) <= {6, 12}  # 12: a duplicated image
    for image in per_image:
        subtypes = [r[0].rsplit("_", 1)[1] for r in rows[1:] if r[0].startswith(image + "_")]
        assert Counter(subtypes) == Counter(CLASSES * (per_image[image] // 6))

    submission = csv_rows(out / "stage_2_sample_submission.csv")
    assert submission[0] == ["ID", "Label"]
    assert len(submission) - 1 == 6 * len(test)
    assert {r[0].rsplit("_", 1)[0] for r in submission[1:]} == {p.stem for p in test}
    assert {r[1] for r in submission[1:]} == {"0.5"}
    assert all(ROW.fullmatch(r[0]) for r in submission[1:])


def test_dicom_tags_read_back_with_pydicom(dataset):
    out, _ = dataset
    series = defaultdict(list)
    for path in files(out, "stage_2_train") + files(out, "stage_2_test"):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.Modality == "CT"
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == path.stem
        assert re.fullmatch(r"ID_[0-9a-f]{8}", ds.PatientID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.StudyInstanceUID)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.HighBit) == (1, 16, ds.BitsStored - 1)
        assert ds.BitsStored in (12, 16) and ds.PixelRepresentation in (0, 1)
        assert ds.RescaleSlope == 1
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.PixelSpacing[0] == ds.PixelSpacing[1]
        assert 180 < ds.PixelSpacing[0] * ds.Columns < 260  # one field of view at any matrix
        assert ds.SliceThickness == synthetic.SLICE_MM
        if path.stem not in dataset[1]["truncated"]:
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        series[ds.SeriesInstanceUID].append((int(ds.InstanceNumber),
                                             float(ds.ImagePositionPatient[2])))
    for slices in series.values():
        z = [position for _, position in sorted(slices)]
        assert len(z) == 8 and np.all(np.diff(z) == synthetic.SLICE_MM)


def test_headers_group_slices_by_study_and_patient(dataset, images):
    out, _ = dataset
    for image in images:
        header = read_header(out / f"stage_2_{image.split}" / f"{image.id}.dcm")
        assert header.image_id == image.id
        assert header.patient_id == image.study.patient
        assert header.study_uid == image.study.uid
        assert header.series_uid == image.study.series


def test_files_hold_the_rendered_hu_under_every_encoding(dataset, images):
    out, summary = dataset
    seen = Counter()
    for image in images:
        if image.truncated:
            continue
        hu, _ = image.render()
        np.testing.assert_array_equal(read_hu(out / f"stage_2_{image.split}" / f"{image.id}.dcm"),
                                      hu)
        seen[image.encoding] += 1
        seen["size"] += image.size != SMALL["size"]
        seen["multi_window"] += image.multi_window
    assert set(ENCODINGS) <= set(seen)
    assert seen["size"] > 0 and seen["multi_window"] > 0
    assert {k: v for k, v in summary["quirks"].items() if k in ENCODINGS} == {
        k: sum(i.encoding == k for i in images) for k in ENCODINGS if k != "plain"}


def test_quirk_tags_look_like_rsna(dataset, images):
    out, _ = dataset
    for image in images:
        if image.truncated:
            continue
        ds = pydicom.dcmread(out / f"stage_2_{image.split}" / f"{image.id}.dcm")
        bits, signed, intercept = ENCODINGS[image.encoding]
        assert (ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept) == (bits, signed,
                                                                                intercept)
        assert (ds.Rows, ds.Columns) == (image.size, image.size)
        multi = isinstance(ds.WindowCenter, pydicom.multival.MultiValue)
        assert multi == image.multi_window == isinstance(ds.WindowWidth,
                                                         pydicom.multival.MultiValue)
        if image.encoding == "wrapped12":  # read naively, air comes out as bright as bone
            naive = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
            assert naive.max() > 3000 and naive.min() >= 0
    sizes = {i.size for i in images}
    assert sizes <= {SMALL["size"], SMALL["size"] * 3 // 4, SMALL["size"] * 5 // 4}


def test_wrapped_12_bit_encoding_is_inverted_by_the_known_fix():
    hu = np.arange(HU_MIN, HU_MAX + 1, dtype=np.float32)
    stored = encode(hu, "wrapped12")
    assert stored.dtype == np.uint16 and stored.max() < 4096
    fixed = stored.astype(np.int32) + 1000
    fixed[fixed >= 4096] -= 4096
    np.testing.assert_array_equal(fixed - 1000, hu)
    for name, (bits, signed, intercept) in ENCODINGS.items():
        if name != "wrapped12":
            stored = encode(hu, name)
            assert stored.dtype == (np.int16 if signed else np.uint16)
            assert stored.max() < 2**bits
            np.testing.assert_array_equal(stored.astype(np.float32) + intercept, hu)


def test_exactly_one_truncated_file_and_read_hu_refuses_it(dataset, images):
    out, summary = dataset
    cut = [i for i in images if i.truncated]
    assert len(cut) == 1 and cut[0].split == "train"
    assert summary["truncated"] == [cut[0].id]
    with pytest.raises(DicomError, match="truncated"):
        read_hu(out / "stage_2_train" / f"{cut[0].id}.dcm")
    assert cut[0].id in set(read_labels(out / "stage_2_train.csv").ids)


def test_duplicated_csv_rows_are_consistent(dataset):
    out, summary = dataset
    rows = csv_rows(out / "stage_2_train.csv")[1:]
    repeated = [row for row, n in Counter(map(tuple, rows)).items() if n > 1]
    assert len(repeated) == 6 * summary["quirks"]["duplicated_images"] > 0
    labels = read_labels(out / "stage_2_train.csv")  # refuses conflicting duplicates
    assert labels.duplicate_rows == len(repeated)


def test_labels_are_exactly_the_drawn_bleeds(dataset, images):
    out, _ = dataset
    labels = read_labels(out / "stage_2_train.csv")
    y = dict(zip(labels.ids.tolist(), labels.y.tolist(), strict=True))
    for image in images:
        if image.split != "train":
            continue
        _, masks = image.render()
        drawn = [int(masks[kind].any()) for kind in SUBTYPES]
        assert y[image.id] == [*drawn, max(drawn)]
    assert labels.y[:, -1].any() and not labels.y[:, -1].all()


def test_bleeds_are_brighter_than_brain_and_inside_the_skull():
    rng = np.random.default_rng(0)
    for kind in SUBTYPES:
        head = random_head(rng)
        bleed = random_bleed(kind, 10, 14, rng)
        hu, masks = render_slice(head, (bleed,), 12, 24, 128)
        clean, _ = render_slice(head, (), 12, 24, 128)
        mask = masks[kind]
        assert mask.sum() >= 6, kind
        assert 45 < hu[mask].mean() < 95 and abs(hu[mask].mean() - bleed.hu) < 3, kind
        assert clean[mask].mean() < bleed.hu - 10, kind  # it replaced darker tissue
        changed = (hu != clean) & ~mask
        if kind == "intraparenchymal":  # only a darker rim of oedema, unlabelled
            assert changed.any() and hu[changed].mean() < clean[changed].mean()
        else:
            assert not changed.any(), kind
        assert not any(masks[k].any() for k in SUBTYPES if k != kind)


def test_a_bleed_shrunk_to_nothing_is_neither_drawn_nor_labelled():
    rng = np.random.default_rng(1)
    head = random_head(rng)
    bleed = random_bleed("intraventricular", 0, 24, rng)  # ventricles: middle slices only
    for z in (0, 23):
        hu, masks = render_slice(head, (bleed,), z, 24, 64)
        np.testing.assert_array_equal(hu, render_slice(head, (), z, 24, 64)[0])
        assert not masks["intraventricular"].any()
    assert render_slice(head, (bleed,), 12, 24, 64)[1]["intraventricular"].any()


def test_head_cross_section_is_widest_in_the_middle_slices():
    head = random_head(np.random.default_rng(2))
    inside = [(render_slice(head, (), z, 24, 64)[0] > -500).sum() for z in (0, 11, 23)]
    assert inside[1] > inside[0] and inside[1] > inside[2]


def test_render_is_pure_and_size_independent_in_shape():
    rng = np.random.default_rng(3)
    head, bleed = random_head(rng), random_bleed("subdural", 2, 8, rng)
    a, masks_a = render_slice(head, (bleed,), 5, 12, 96)
    b, masks_b = render_slice(head, (bleed,), 5, 12, 96)
    np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(masks_a[k], masks_b[k]) for k in SUBTYPES)
    assert a.dtype == np.float32 and a.min() >= HU_MIN and a.max() <= HU_MAX
    np.testing.assert_array_equal(a, np.rint(a))
    big, masks_big = render_slice(head, (bleed,), 5, 12, 120)
    assert big.shape == (120, 120) and masks_big["subdural"].any()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    args = dict(studies=3, slices=4, size=32, quirk_rate=0.3, positive_rate=0.5)

    def snapshot(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                if p.is_file()}

    generate(tmp_path / "a", seed=7, **args)
    generate(tmp_path / "b", seed=7, **args)
    generate(tmp_path / "c", seed=8, **args)
    a, b, c = (snapshot(tmp_path / name) for name in "abc")
    assert a == b
    assert a["stage_2_train.csv"] != c["stage_2_train.csv"]
    assert not set(a) & set(c) - {"stage_2_train.csv", "stage_2_sample_submission.csv", MARKER}


def test_quirk_rate_zero_writes_plain_files(tmp_path):
    summary = generate(tmp_path, studies=3, slices=6, size=48, quirk_rate=0.0)
    assert summary["truncated"] == [] and summary["quirks"] == {
        "size": 0, "multi_window": 0, "truncated": 0, "duplicated_images": 0}
    for path in files(tmp_path, "stage_2_train") + files(tmp_path, "stage_2_test"):
        ds = pydicom.dcmread(path)
        assert (ds.Rows, ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept) == (
            48, 16, 0, -1024)
        assert not isinstance(ds.WindowCenter, pydicom.multival.MultiValue)
        read_hu(path)
    assert read_labels(tmp_path / "stage_2_train.csv").duplicate_rows == 0


def test_quirks_leave_anatomy_and_labels_unchanged():
    plain, quirky = plan(**{**SMALL, "quirk_rate": 0.0}), plan(**SMALL)
    assert [(i.id, i.study, i.z) for i in plain] == [(i.id, i.study, i.z) for i in quirky]


def test_interrupted_generation_leaves_no_labels_csv(tmp_path, monkeypatch):
    generate(tmp_path, studies=2, slices=2, size=32)
    assert (tmp_path / "stage_2_train.csv").exists()
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) > 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_dicom", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, studies=2, slices=2, size=32, seed=1)
    assert not (tmp_path / "stage_2_train.csv").exists()


def test_image_ids_are_unique_and_rsna_shaped():
    images = plan(studies=30, slices=10, size=32)
    ids = [i.id for i in images]
    assert len(set(ids)) == len(ids) == 33 * 10
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}", i) for i in ids)


def test_some_patients_have_two_studies_and_none_crosses_the_split():
    images = plan(studies=20, slices=2, size=32, test_studies=4)
    studies = {i.study.uid: i.study for i in images}
    per_patient = Counter(s.patient for s in studies.values())
    assert 2 in per_patient.values() and max(per_patient.values()) == 2
    split_of = defaultdict(set)
    for image in images:
        split_of[image.study.patient].add(image.split)
    assert all(len(splits) == 1 for splits in split_of.values())
    for patient, count in per_patient.items():
        if count == 2:
            first, second = (s for s in studies.values() if s.patient == patient)
            assert (first.head.a, first.head.sulci) == (second.head.a, second.head.sulci)
            assert first.head.cx != second.head.cx and first.uid != second.uid


def rendered_rates(**args) -> dict[str, float]:
    images = [i for i in plan(**args) if i.split == "train"]
    y = []
    for image in images:
        _, masks = image.render()
        drawn = [masks[kind].any() for kind in SUBTYPES]
        y.append([*drawn, any(drawn)])
    return dict(zip(CLASSES, np.mean(y, axis=0).tolist(), strict=True))


def test_label_rates_follow_rsna_by_default():
    rates = rendered_rates(studies=60, slices=24, size=48, quirk_rate=0.0)
    assert rates["any"] == pytest.approx(0.144, abs=0.02)
    for kind, target in RSNA_RATES.items():
        assert rates[kind] == pytest.approx(target, rel=0.35, abs=0.004), kind
    assert sum(rates[k] for k in SUBTYPES) > rates["any"]  # subtypes co-occur, as in RSNA


def test_positive_rate_keeps_the_mix_and_epidural_shows_up():
    rates = rendered_rates(studies=40, slices=24, size=48, quirk_rate=0.0, positive_rate=0.4)
    assert rates["any"] == pytest.approx(0.4, abs=0.03)
    assert 0 < rates["epidural"] < rates["intraventricular"] < rates["subdural"]
    none = plan(studies=5, slices=6, size=32, positive_rate=0.0)
    assert not any(i.study.bleeds for i in none)
