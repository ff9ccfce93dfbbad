"""dicom-node: a DICOM network node that segments incoming studies and sends back SEG and SR."""

__version__ = "0.1.0"
