"""One CT slice from a DICOM file: its grouping header, and its pixels in Hounsfield units.

RSNA files carry quirks (12-bit unsigned slices with a wrong intercept, multi-valued window
tags, a few corrupt images); each is handled here so that everything downstream sees plain HU.
Every failure is a DicomError naming the file and the reason, so that a dataset build can skip
and count bad images instead of stopping.
"""

from __future__ import annotations

import gzip
import io
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom import uid
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from ich_tune.errors import DataError

_INTEGERS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
_REQUIRED = (*_INTEGERS, "PhotometricInterpretation")
_HEADER = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber",
           "ImagePositionPatient")
_PIXEL_MODULE = ("Modality", *_REQUIRED, "SamplesPerPixel", "NumberOfFrames", "RescaleSlope",
                 "RescaleIntercept", "PixelData")  # every element the pixel path reads
_PACKAGES = {  # what to pip install for a compressed transfer syntax pydicom cannot decode alone
    **dict.fromkeys(uid.JPEG2000TransferSyntaxes, "pylibjpeg pylibjpeg-openjpeg"),
    **dict.fromkeys(uid.JPEGTransferSyntaxes, "pylibjpeg pylibjpeg-libjpeg"),
    **dict.fromkeys(uid.JPEGLSTransferSyntaxes, "pylibjpeg pylibjpeg-libjpeg"),
    **dict.fromkeys(uid.RLETransferSyntaxes, "pylibjpeg pylibjpeg-rle"),
}


class DicomError(DataError):
    """One DICOM file that cannot be used; `reason` says why without the path, for reports."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keeps the error intact across worker processes
        return type(self), (self.path, self.reason)


class NotDicomError(DicomError):
    """A file that holds no DICOM at all (a README beside the slices, say), as against a broken one."""


@dataclass(frozen=True)
class SliceHeader:
    """What groups and orders slices: patient and exam for the split, z within a series."""

    image_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    z: float  # ImagePositionPatient[2]; NaN when absent


@dataclass(frozen=True)
class InstanceHeader(SliceHeader):
    """A slice's header with what names it in any export, whatever its file is called."""

    instance_uid: str  # SOPInstanceUID
    instance_number: int | None


def image_id(path: str | Path) -> str:
    """The RSNA image id ("ID_abc") of ".../ID_abc.dcm" or ".../ID_abc.dcm.gz"."""
    name = Path(path).name
    for suffix in (".gz", ".dcm"):
        name = name.removesuffix(suffix)
    return name


def read_header(path: str | Path) -> SliceHeader:
    """The grouping header of a slice, read without its pixel data."""
    path = Path(path)
    return _header(path, _dataset(path, pixels=False))


def read_instance_header(path: str | Path) -> InstanceHeader:
    """The grouping header and the instance's UID and number, read without pixel data."""
    path = Path(path)
    ds = _dataset(path, pixels=False)
    return InstanceHeader(**vars(_header(path, ds)), instance_uid=_text(ds, "SOPInstanceUID"),
                          instance_number=_whole(ds.get("InstanceNumber")))


def read_slice(path: str | Path) -> tuple[SliceHeader, np.ndarray]:
    """Header and HU from one read of the file: what building the cache needs of every slice."""
    path = Path(path)
    ds = _dataset(path, pixels=True)
    _check_slice(path, ds)
    return _header(path, ds), _to_hu(path, ds, _stored_values(path, ds))


def _header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    return SliceHeader(
        image_id=image_id(path),
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        z=_z(ds),
    )


def read_hu(path: str | Path) -> np.ndarray:
    """The slice as float32 [H, W] Hounsfield units.

    HU = stored * RescaleSlope + RescaleIntercept, with the RSNA 12-bit fix. MONOCHROME1 is not
    inverted: DICOM applies the rescale to the stored values whatever the photometric
    interpretation, and MONOCHROME1 only asks a viewer to show low values white after windowing
    (PS3.3 C.7.6.3.1.2). Inverting first would turn bone into air.
    """
    path = Path(path)
    ds = _dataset(path, pixels=True)
    _check_slice(path, ds)
    return _to_hu(path, ds, _stored_values(path, ds))


def _read(path: Path, pixels: bool) -> pydicom.Dataset:
    if path.suffix != ".gz":
        return _parse(path, pixels)
    if pixels:  # whole, so that a damaged gzip fails here rather than as a short read
        return _parse(io.BytesIO(gzip.decompress(path.read_bytes())), pixels)
    with gzip.open(path) as stream:  # streamed: a header needs only the first few KB
        return _parse(stream, pixels)


def _parse(source: Path | BinaryIO, pixels: bool) -> pydicom.Dataset:
    """A DICOM file, or a bare data set without preamble and file meta, as older exports write.

    pydicom's `force` reads any bytes as some data set, so a forced read counts as DICOM only when
    it finds a SOP Class UID, which every stored image has; its transfer syntax is then the
    encoding pydicom recognised.
    """
    try:
        return pydicom.dcmread(source, stop_before_pixels=not pixels)
    except InvalidDicomError as err:
        refused = err
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        with warnings.catch_warnings():  # guessing the encoding warns; the check below decides
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source, stop_before_pixels=not pixels, force=True)
            is_dicom = isinstance(ds.get("SOPClassUID"), str)
    except Exception:  # bytes that are no data set at all
        is_dicom = False
    if not is_dicom:
        raise refused
    implicit, little = ds.original_encoding
    if "TransferSyntaxUID" not in ds.file_meta and little is not None:
        ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                          uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    return ds


def _dataset(path: Path, pixels: bool) -> pydicom.Dataset:
    """The file read, with every element this module uses decoded.

    pydicom decodes an element on first access, so a corrupt one (an unknown VR, a bad length)
    would otherwise fail wherever it is first used; decoding them here makes it one DicomError.
    Only these elements: decoding all of them would double the time per slice.
    """
    try:
        ds = _read(path, pixels)
        if pixels:
            ds.file_meta.get("TransferSyntaxUID")
        for keyword in _HEADER + (_PIXEL_MODULE if pixels else ()):
            ds.get(keyword)
        return ds
    except FileNotFoundError:
        raise DicomError(path, "file not found") from None
    except InvalidDicomError:
        reason = "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
        raise NotDicomError(path, reason) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DicomError(path, f"damaged file ({_one_line(err)})") from None
    except OSError as err:
        raise DicomError(path, f"cannot read the file: {err.strerror or err}") from None
    except Exception as err:  # pydicom raises many types on corrupt input; all mean "unusable"
        reason = f"unreadable DICOM ({type(err).__name__}: {_one_line(err)})"
        raise DicomError(path, reason) from None


def _check_slice(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse anything that is not one single-frame greyscale CT slice."""
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    modality = _text(ds, "Modality").upper()
    if modality not in ("", "CT"):
        raise DicomError(path, f"modality is {modality}, not CT")
    for keyword in _REQUIRED:
        if ds.get(keyword) in (None, ""):
            raise DicomError(path, f"no {keyword} element, so the pixels cannot be read")
    for keyword in _INTEGERS:
        if not isinstance(ds.get(keyword), int):
            raise DicomError(path, f"{keyword} is {_short(ds.get(keyword))}, not one whole number")
    samples = ds.get("SamplesPerPixel") or 1
    photometric = ds.PhotometricInterpretation
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(path, f"not a greyscale slice ({photometric}, {samples} samples per "
                               "pixel); expected MONOCHROME2 CT")
    frames = _number(path, ds, "NumberOfFrames", 1.0)
    if frames != 1:
        raise DicomError(path, f"{frames:g} frames; expected one slice per file")


def _stored_values(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """The stored pixel values, decoded and sign-extended by pydicom."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise DicomError(path, "no Transfer Syntax UID in the file meta information")
    if not isinstance(syntax, str):
        raise DicomError(path, f"Transfer Syntax UID is {_short(syntax)}, not one UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(path, f"transfer syntax {syntax.name} is not supported") from None
    packages = _PACKAGES.get(syntax, "python-gdcm")
    if not decoder.is_available:
        raise DicomError(path, f"compressed with {syntax.name} and no decoder is installed: "
                               f"pip install {packages}")
    if not syntax.is_encapsulated:
        expected = (ds.Rows * ds.Columns * ds.BitsAllocated + 7) // 8  # one greyscale frame
        found = len(ds.PixelData or b"")
        if found < expected:
            raise DicomError(path, f"truncated pixel data (expected {expected} bytes, "
                                   f"found {found})")
    try:
        stored = ds.pixel_array
    except Exception as err:  # decoders raise many types on damaged or exotic data
        hint = f"; pip install {packages} may help" if syntax.is_encapsulated else ""
        raise DicomError(path, f"cannot decode the {syntax.name} pixel data "
                               f"({_one_line(err)}){hint}") from None
    if stored.ndim != 2:
        raise DicomError(path, f"pixel data has shape {stored.shape}; expected one 2D slice")
    return stored


def _to_hu(path: Path, ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    slope = _number(path, ds, "RescaleSlope", 1.0)
    intercept = _number(path, ds, "RescaleIntercept", 0.0)
    hu = stored.astype(np.float32)  # exact for CT's 16-bit stored values
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        # These RSNA slices hold HU modulo 4096 (air, -1000, is stored as 3096) under a wrong
        # intercept; FACTS.md's fix unwraps HU >= -1000. Arithmetic rather than a masked
        # assignment: over 10x faster on a 512x512 slice.
        hu += np.float32(1000.0)
        hu -= np.float32(4096.0) * (hu >= 4096.0)
        intercept = -1000.0
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def _number(path: Path, ds: pydicom.Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DicomError(path, f"{keyword} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise DicomError(path, f"{keyword} is {value!r}, not a finite number")
    return number


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    return str(ds.get(keyword) or "").strip()


def _z(ds: pydicom.Dataset) -> float:
    try:
        return float(ds.ImagePositionPatient[2])
    except (AttributeError, IndexError, TypeError, ValueError):
        return math.nan


def _whole(value: object) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
