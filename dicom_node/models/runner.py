"""The seam between the node and a model it did not train: a *volume runner*.

A site's own model (a MONAI bundle, an nnU-Net v2 folder) brings its own preprocessing,
inferer and postprocessing. The node does not re-implement them: it hands such a model the
input volumes of one case, on the reference series' grid, with their geometry, and takes back
a label map on the same grid. Everything before (receive, assemble, the case's roles,
resampling secondary series onto the reference grid) and after (masks per structure, SEG, SR,
overlay, send) stays the node's own.

A runner says what it needs and gives (``channel_names``, ``labels``) in the format's own
words; the mapping of those to case roles and to coded structures (SNOMED CT) comes from the
package or route (see ``docs/model-package.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of a ``(z, y, x)`` array lie in patient coordinates (DICOM LPS, mm).

    ``z`` runs along the slices, ``y`` along the columns of a slice (down the rows), ``x``
    along its rows, as :class:`~dicom_node.imaging.series.ImageSeries` stores them.
    """

    spacing_zyx_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    #: 3x3 row-major, as SimpleITK orders it: columns are the x (row), y (column) and z
    #: (slice normal) directions in LPS.
    direction: tuple[float, ...]

    def affine_lps(self) -> np.ndarray:
        """The 4x4 matrix from voxel index ``(x, y, z, 1)`` to LPS millimetres."""
        axes = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        spacing_xyz = np.asarray(self.spacing_zyx_mm[::-1], dtype=np.float64)
        affine = np.eye(4)
        affine[:3, :3] = axes * spacing_xyz[None, :]
        affine[:3, 3] = self.origin_mm
        return affine


class VolumeRunner(Protocol):
    """A loaded foreign model that segments volumes.

    Implementations: :mod:`dicom_node.models.formats` (one module per format).
    """

    #: The format's name as routes and ``model check`` print it, e.g. ``"monai-bundle"``.
    format: str
    #: The input channels in the model's order, named as the format names them (e.g. a
    #: bundle's ``image`` channel names, nnU-Net's ``dataset.json`` ``channel_names``).
    channel_names: tuple[str, ...]
    #: Label value -> name as the format names them; background (0) left out.
    labels: dict[int, str]

    def predict(self, channels: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
        """Segment one case.

        Parameters
        ----------
        channels
            ``float32`` array ``(C, z, y, x)``, ``C = len(channel_names)``: stored values
            after the Modality LUT (e.g. Hounsfield units for CT), each channel on the
            reference series' grid, in ``channel_names`` order.
        geometry
            The grid of ``channels`` in patient coordinates.

        Returns
        -------
        numpy.ndarray
            Integer label map ``(z, y, x)`` on the same grid; values are keys of ``labels``
            or 0.
        """
        ...
