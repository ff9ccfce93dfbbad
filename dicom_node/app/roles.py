"""Roles: which stages one ``dicom-node serve`` process runs.

``all`` (the default) is the one-host node: every stage in one process, SQLite or PostgreSQL.
The other roles split that node over processes and hosts that share one PostgreSQL database
and one storage folder (docs/deployment.md):

- ``receiver``: the DICOM port (receive + index) and the scheduler, which assembles complete
  series and cases into jobs and runs retention. Assembly belongs here: it needs no GPU, it is
  woken the moment an association is released (an in-process event of the receiver, so
  ``release_grace_s`` is honoured without polling another host), and retention deletes the
  spool files that receivers write.
- ``worker``: the model runs. Loads the model packages, selects the device (CUDA when
  present), warms up, claims jobs with leases and writes outputs to the shared outbox.
- ``sender``: the delivery threads, one per destination; sends are claimed with leases, so
  several sender processes never send one result at once.

Which role a process takes is the ``--role`` flag of ``serve`` (default: the environment
variable ``DICOM_NODE_ROLE``, then ``all``), not a config key: one config file serves every
role of a deployment.
"""

from __future__ import annotations

import enum
import os

from dicom_node.common.errors import StartupError

#: Environment variable that gives ``serve --role`` its default (systemd, containers).
ROLE_ENV = "DICOM_NODE_ROLE"


class Role(enum.StrEnum):
    ALL = "all"
    RECEIVER = "receiver"
    WORKER = "worker"
    SENDER = "sender"

    @property
    def receives(self) -> bool:
        """Runs the DICOM port and the scheduler (assembly, retention)."""
        return self in (Role.ALL, Role.RECEIVER)

    @property
    def works(self) -> bool:
        """Runs the model: device, model packages, worker threads."""
        return self in (Role.ALL, Role.WORKER)

    @property
    def sends(self) -> bool:
        """Runs the delivery threads."""
        return self in (Role.ALL, Role.SENDER)


def default_role() -> Role:
    """The role from ``DICOM_NODE_ROLE``, or ``all`` when it is unset or empty.

    Raises
    ------
    StartupError
        When the variable holds something that is not a role.
    """
    value = os.environ.get(ROLE_ENV, "").strip()
    return parse_role(value, source=ROLE_ENV) if value else Role.ALL


def parse_role(value: str, source: str = "--role") -> Role:
    """``value`` as a :class:`Role`; a :class:`StartupError` naming the choices otherwise."""
    try:
        return Role(value.strip().lower())
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise StartupError(f"{source}: {value!r} is not a role; choose one of {choices}") from None


def check_role(role: Role, backend: str, *, has_routes: bool, has_destinations: bool) -> None:
    """Refuse to start ``role`` when the configuration lacks what it needs.

    Parameters
    ----------
    role
        The role this process takes.
    backend
        ``"sqlite"`` or ``"postgresql"`` (``Database.backend``).
    has_routes
        The configuration has routes (a model to run).
    has_destinations
        The configuration has destinations (somewhere to send).

    Raises
    ------
    StartupError
        One line: the role, what is missing and what to do.
    """
    if role is Role.ALL:
        return
    if backend != "postgresql":
        raise StartupError(
            f"--role {role}: roles in separate processes need a shared PostgreSQL database "
            "(SQLite is for one process on one host); set database: postgresql://... "
            "(or DICOM_NODE_DATABASE) in every role's config, or run --role all"
        )
    if role is Role.WORKER and not has_routes:
        raise StartupError(
            "--role worker: the config has no routes, so there is no model to run; add routes "
            "(the same config as the receivers')"
        )
    if role is Role.SENDER and not has_destinations:
        raise StartupError(
            "--role sender: the config has no destinations to send to; add destinations "
            "(the same config as the workers')"
        )
