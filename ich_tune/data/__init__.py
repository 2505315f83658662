"""RSNA data: labels CSV, DICOM slices to Hounsfield units, window channels and resizing."""

import logging
import warnings

# RSNA stores image ids ("ID_<hex>") where DICOM wants UIDs. pydicom warns and logs this once per
# file read or written, which would drown a 750,000-file build in noise.
_RSNA_UIDS = "Invalid value for VR UI"
warnings.filterwarnings("ignore", _RSNA_UIDS, UserWarning)
logging.getLogger("pydicom").addFilter(lambda record: _RSNA_UIDS not in record.getMessage())
