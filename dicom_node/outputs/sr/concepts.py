"""The coded concepts and units of dicom-node's measurement reports, and their precision.

Codes of pydicom's dictionary (``codes.SCT.Area``) are looked up by name at run time and
typed ``Any``; the ones the report writes of its own accord are named here as :class:`Code`.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Private coding scheme of dicom-node's own concepts (PS3.16 8.2: designators starting "99").
PRIVATE_SCHEME = "99DCMNODE"
#: No standard code confirmed for the radiographic cardiothoracic ratio; see
#: :mod:`dicom_node.outputs.sr`.
CARDIOTHORACIC_RATIO = Code("CTR", PRIVATE_SCHEME, "Cardiothoracic ratio")

UNIT_CM2: Code = codes.UCUM.SquareCentimeter  # "cm2"
UNIT_ML = Code("ml", "UCUM", "milliliter")  # as dcmqi writes it
UNIT_MM: Code = codes.UCUM.Millimeter
UNIT_RATIO: Code = codes.UCUM.Ratio  # "{ratio}", CID 7181

#: DCM 121112, the segment a value was inferred from.
SOURCE_OF_MEASUREMENT: Code = codes.DCM.SourceOfMeasurement
#: TID 1500 row 12: the report's Qualitative Evaluations container (not in pydicom's dictionary).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: Procedure Reported (TID 1500 row 4) of a chest, of a breast ultrasound, and of any other
#: imaging, and by modality: the "unspecified body region" LOINC codes of CID 100.
CHEST_IMAGING: Code = codes.SCT.ChestImaging
BREAST_ULTRASOUND: Code = codes.SCT.UltrasonographyOfBreast
IMAGING_PROCEDURE: Code = codes.SCT.ImagingProcedure
PROCEDURE_OF_MODALITY: dict[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
}

#: Decimal places of each unit's values in the SR: what the measurement can mean.
DECIMALS = {UNIT_CM2.value: 1, UNIT_ML.value: 1, UNIT_MM.value: 1, UNIT_RATIO.value: 2}


def rounded(value: float, unit: Code) -> float:
    """``value`` rounded to the :data:`DECIMALS` of ``unit`` (Numeric Value (0040,A30A))."""
    return round(float(value), DECIMALS[unit.value])
