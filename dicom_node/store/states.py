"""The states of the node's work: of a series, a study-level case and a job.

One vocabulary shared by the stores of :mod:`dicom_node.store` (``series.state``,
``cases.state``, ``jobs.state``), which read and write each other's states inside one
transaction (:func:`dicom_node.store.series.note_arrival`, the retention queries).
"""

from __future__ import annotations

import enum


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; not yet complete
    QUEUED = "queued"  # complete; jobs created, or an input of a study-level case
    UNROUTED = "unrouted"  # complete; no route matched
    IGNORED = "ignored"  # kept, not processed (late instances with policy "ignore")


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # more instances arrived before it ran; a new job replaces it


class CaseState(enum.StrEnum):
    WAITING = "waiting"  # collecting the study's series for its roles
    QUEUED = "queued"  # a job was made (its state is the job's)
    FAILED = "failed"  # a required role had no series at study_timeout_s (see ``error``)
