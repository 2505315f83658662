"""DICOM -> HU: each RSNA quirk on tiny files written here, plus pydicom's own sample files."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from ich_tune.data.dicom import DicomError, SliceHeader, image_id, read_header, read_hu
from ich_tune.errors import DataError

SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped with pydicom


def write_ct(
    path: Path,
    stored,
    *,
    bits_stored: int = 16,
    signed: bool = False,
    intercept: float | None = -1024.0,
    slope: float | None = 1.0,
    photometric: str = "MONOCHROME2",
    syntax=ExplicitVRLittleEndian,
    **elements,
) -> Path:
    """A minimal CT slice file with the given stored values and pixel-module settings."""
    stored = np.asarray(stored, dtype=np.int16 if signed else np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "ID_patient1"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.ImagePositionPatient = [-125.0, -120.5, 37.5]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None:
        ds.RescaleSlope = slope
    ds.PixelData = stored.tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def as_ct_copy(name: str, tmp_path: Path) -> Path:
    """A pydicom sample file relabelled as CT, so that the pixel checks are what gets tested."""
    ds = pydicom.dcmread(SAMPLES / name)
    ds.Modality = "CT"
    out = tmp_path / name
    ds.save_as(out)
    return out


def test_signed_16_bit_rescale(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[0, 1024], [1064, -1000]], signed=True)
    hu = read_hu(path)
    assert hu.dtype == np.float32
    assert hu.tolist() == [[-1024, 0], [40, -2024]]


def test_unsigned_16_bit_with_slope(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[600, 0]], intercept=-1000.0, slope=2.0)
    assert read_hu(path).tolist() == [[200, -1000]]


def test_missing_rescale_means_identity(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[100, 7]], intercept=None, slope=None)
    assert read_hu(path).tolist() == [[100, 7]]


@pytest.mark.parametrize("intercept", [1.0, 0.0, -99.0])
def test_twelve_bit_fix(tmp_path, intercept):
    # stored + 1000, wrapped at 4096, with intercept -1000 (the intercept in the file is ignored)
    stored = [[24, 0, 3095, 3096, 3500, 4095]]
    path = write_ct(tmp_path / "a.dcm", stored, bits_stored=12, intercept=intercept)
    assert read_hu(path).tolist() == [[24, 0, 3095, -1000, -596, -1]]


def test_twelve_bit_fix_keeps_slope(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[24, 3500]], bits_stored=12, intercept=1.0, slope=2.0)
    assert read_hu(path).tolist() == [[(24 + 1000) * 2 - 1000, (3500 + 1000 - 4096) * 2 - 1000]]


@pytest.mark.parametrize(
    ("intercept", "signed", "stored", "expected"),
    [
        (-1024.0, False, [[24, 3500]], [[-1000, 2476]]),  # ordinary 12-bit slice
        (-100.0, False, [[24, 3500]], [[-76, 3400]]),  # intercept not above -100
        (0.0, True, [[-5, 24]], [[-5, 24]]),  # signed
    ],
)
def test_twelve_bit_fix_only_where_it_applies(tmp_path, intercept, signed, stored, expected):
    path = write_ct(tmp_path / "a.dcm", stored, bits_stored=12, signed=signed,
                    intercept=intercept)
    assert read_hu(path).tolist() == expected


def test_monochrome1_keeps_the_rescale(tmp_path):
    stored = [[0, 1024, 2048]]
    mono2 = read_hu(write_ct(tmp_path / "2.dcm", stored))
    mono1 = read_hu(write_ct(tmp_path / "1.dcm", stored, photometric="MONOCHROME1"))
    assert mono1.tolist() == mono2.tolist() == [[-1024, 0, 1024]]  # bone stays dense


def test_multi_valued_window_tags(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[1064]], WindowCenter=[40, 400], WindowWidth=[80, 2000])
    assert pydicom.dcmread(path).WindowCenter == [40, 400]
    assert read_hu(path).tolist() == [[40]]
    assert read_header(path).z == 37.5


def test_any_size_and_non_square(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4000, (430, 436))
    hu = read_hu(write_ct(tmp_path / "a.dcm", stored))
    assert hu.shape == (430, 436)
    np.testing.assert_array_equal(hu, stored - 1024)


def test_gzip_file(tmp_path):
    plain = write_ct(tmp_path / "ID_abc.dcm", [[1024, 1064]])
    packed = tmp_path / "ID_abc.dcm.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_hu(packed).tolist() == [[0, 40]]
    assert read_header(packed) == read_header(plain)


def test_rle_compressed(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 3000, (64, 48))
    path = write_ct(tmp_path / "a.dcm", stored, syntax=RLELossless)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_hu(path), stored - 1024)


def test_truncated_pixel_data(tmp_path):
    path = write_ct(tmp_path / "a.dcm", np.zeros((64, 64)))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DicomError) as caught:
        read_hu(path)
    assert caught.value.reason == "truncated pixel data (expected 8192 bytes, found 7192)"
    assert str(caught.value) == f"{path}: truncated pixel data (expected 8192 bytes, found 7192)"
    assert read_header(path).series_uid == "1.2.3.4.5"  # the header alone is still readable


def test_missing_pixel_data(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[1]])
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(DicomError, match="no pixel data"):
        read_hu(path)


def test_empty_pixel_data(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[1, 2]])
    ds = pydicom.dcmread(path)
    ds.PixelData = b""
    ds.save_as(path)
    with pytest.raises(DicomError) as caught:
        read_hu(path)
    assert caught.value.reason == "truncated pixel data (expected 4 bytes, found 0)"


@pytest.mark.parametrize("content", [b"", b"ID,Label\nID_1_any,0\n", bytes(range(256)) * 4])
def test_not_dicom(tmp_path, content):
    path = tmp_path / "ID_x.dcm"
    path.write_bytes(content)
    for reader in (read_hu, read_header):
        with pytest.raises(DicomError) as caught:
            reader(path)
        assert caught.value.reason.startswith("not a DICOM file")
        assert caught.value.path == path


def test_damaged_gzip(tmp_path):
    plain = write_ct(tmp_path / "a.dcm", np.zeros((32, 32)))
    packed = tmp_path / "a.dcm.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes())[:-20])
    with pytest.raises(DicomError, match="damaged file"):
        read_hu(packed)


def test_missing_file(tmp_path):
    with pytest.raises(DicomError, match="file not found"):
        read_hu(tmp_path / "nope.dcm")


def test_error_type_message_and_pickle():
    err = DicomError(Path("/d/ID_1.dcm"), "no pixel data")
    assert isinstance(err, DataError)
    assert str(err) == "/d/ID_1.dcm: no pixel data"
    back = pickle.loads(pickle.dumps(err))  # crosses process boundaries in parallel builds
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


def test_header_fields(tmp_path):
    path = write_ct(tmp_path / "ID_0a1b.dcm", [[0]])
    assert read_header(path) == SliceHeader("ID_0a1b", "ID_patient1", "1.2.3.4", "1.2.3.4.5", 37.5)


def test_header_without_position(tmp_path):
    path = write_ct(tmp_path / "a.dcm", [[0]])
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient
    del ds.PatientID
    ds.save_as(path)
    header = read_header(path)
    assert math.isnan(header.z) and header.patient_id == ""


@pytest.mark.parametrize(
    ("name", "expected"),
    [("/x/ID_abc.dcm", "ID_abc"), ("ID_abc.dcm.gz", "ID_abc"), (Path("a/ID_0f.dcm"), "ID_0f")],
)
def test_image_id(name, expected):
    assert image_id(name) == expected


# pydicom's sample files: real headers from real machines.


def test_sample_ct_small_decodes_to_plausible_hu():
    hu = read_hu(SAMPLES / "CT_small.dcm")
    ds = pydicom.dcmread(SAMPLES / "CT_small.dcm")
    assert hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, ds.pixel_array.astype(np.float32) - 1024)
    assert hu.min() >= -1100 and hu.max() <= 3100 and hu.std() > 100
    header = read_header(SAMPLES / "CT_small.dcm")
    assert header.patient_id == "1CT1" and header.z == pytest.approx(-75.7)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_small.dcm", "modality is MR, not CT"),
        ("JPEG2000.dcm", "modality is NM, not CT"),
        ("rtplan.dcm", "no pixel data"),
        ("no_meta.dcm", "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"),
    ],
)
def test_sample_files_refused(name, reason):
    with pytest.raises(DicomError) as caught:
        read_hu(SAMPLES / name)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtdose.dcm", "15 frames; expected one slice per file"),
        ("SC_rgb_rle.dcm", "not a greyscale slice (RGB, 3 samples per pixel); "
                           "expected MONOCHROME2 CT"),
        ("MR_truncated.dcm", "truncated pixel data (expected 8192 bytes, found 8130)"),
    ],
)
def test_sample_pixel_checks(tmp_path, name, reason):
    with pytest.raises(DicomError) as caught:
        read_hu(as_ct_copy(name, tmp_path))
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("name", "packages"),
    [
        ("MR_small_bigendian.dcm", ""),
        ("MR_small_RLE.dcm", ""),
        ("MR_small_jp2klossless.dcm", "pylibjpeg pylibjpeg-openjpeg"),
        ("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg pylibjpeg-libjpeg"),
    ],
)
def test_sample_encodings_match_or_name_the_missing_decoder(tmp_path, name, packages):
    reference = pydicom.dcmread(SAMPLES / "MR_small.dcm").pixel_array.astype(np.float32)
    path = as_ct_copy(name, tmp_path)
    syntax = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    if get_decoder(syntax).is_available:
        np.testing.assert_array_equal(read_hu(path), reference)  # no rescale tags: HU = stored
    else:  # here: JPEG-LS, which pydicom and Pillow cannot decode
        with pytest.raises(DicomError) as caught:
            read_hu(path)
        assert caught.value.reason == (f"compressed with {syntax.name} and no decoder is "
                                       f"installed: pip install {packages}")


def test_decoder_failure_is_a_dicom_error(tmp_path):
    # RLE data whose header announces 1 segment where a 16-bit slice has 2: pydicom's own RLE
    # decoder (always available) must refuse it, and the error must say which decoding failed.
    path = write_ct(tmp_path / "a.dcm", np.arange(256).reshape(16, 16), syntax=RLELossless)
    ds = pydicom.dcmread(path)
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    assert struct.unpack("<I", frame[:4]) == (2,)  # high and low byte segments
    ds.PixelData = encapsulate([struct.pack("<I", 1) + frame[4:]])
    ds.save_as(path)
    with pytest.raises(DicomError) as caught:
        read_hu(path)
    reason = caught.value.reason
    assert reason.startswith("cannot decode the RLE Lossless pixel data (")
    assert "segments" in reason  # the decoder's own words on what is wrong
    assert reason.endswith("; pip install pylibjpeg pylibjpeg-rle may help")
    assert str(caught.value) == f"{path}: {reason}"


def test_twelve_bit_jpeg_decodes_or_names_the_decoder_to_install(tmp_path):
    # 12-bit JPEG Extended: Pillow is a decoder for it but refuses 12-bit samples.
    path = as_ct_copy("JPEG-lossy.dcm", tmp_path)
    try:
        hu = read_hu(path)
    except DicomError as err:
        assert "JPEG Extended" in err.reason and "pip install pylibjpeg" in err.reason
    else:  # pylibjpeg or GDCM installed
        assert hu.shape == (1024, 256)
