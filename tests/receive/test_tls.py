"""TLS on the DICOM port: DCMTK peers with certificates get in, others do not."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.common.errors import ConfigError
from dicom_node.config.settings import parse_settings
from tests.conftest import PEER_ENV, NodeProcess, StoreSCP, require_tool, storescu
from tests.factories import ct_series, write_files
from tests.test_end_to_end import results

pytestmark = pytest.mark.peers


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def certificate(folder: Path, name: str, ca: str | None) -> None:
    """``name.key`` + ``name.crt``, signed by ``ca`` (or self-signed when None)."""
    if ca is None:
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            cwd=folder,
        )
        return
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    certificate(folder, "ca", None)
    certificate(folder, "node", "ca")
    certificate(folder, "modality", "ca")
    certificate(folder, "pacs", "ca")
    certificate(folder, "rogue", None)
    return folder


def tls_echo(port: int, pki: Path, client: str | None) -> int:
    tls = ["+tls", str(pki / f"{client}.key"), str(pki / f"{client}.crt")] if client else []
    return subprocess.run(
        [
            require_tool("echoscu"),
            *tls,
            "+cf",
            str(pki / "ca.crt"),
            "-aet",
            "MODALITY",
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(port),
        ],
        env=PEER_ENV,
        capture_output=True,
        timeout=30,
    ).returncode


def test_mutual_tls(
    tmp_path: Path,
    pki: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    tls = {
        "cert_file": str(pki / "node.crt"),
        "key_file": str(pki / "node.key"),
        "ca_file": str(pki / "ca.crt"),
    }
    node = node_factory(random_package, storescp.port, tls=tls).start()
    assert tls_echo(node.port, pki, "modality") == 0
    assert tls_echo(node.port, pki, "rogue") != 0  # certificate not signed by the node's CA
    assert tls_echo(node.port, pki, None) != 0  # plain TCP is not spoken on a TLS port
    files = write_files(ct_series(n_slices=3), tmp_path / "ct")
    sent = storescu(
        node.port,
        files,
        "+tls",
        str(pki / "modality.key"),
        str(pki / "modality.crt"),
        "+cf",
        str(pki / "ca.crt"),
    )
    assert sent.returncode == 0, sent.stderr
    assert set(results(storescp)) == {"SEG", "SR"}


def test_tls_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls: cert_file and key_file go together"):
        parse_settings({"storage_dir": str(tmp_path), "tls": {"cert_file": __file__}})
    with pytest.raises(ConfigError, match="tls.cert_file: missing"):
        parse_settings({"storage_dir": str(tmp_path), "tls": {"ca_file": __file__}})
    dest = {
        "ae_title": "PACS",
        "host": "h",
        "port": 104,
        "tls": {"cert_file": __file__, "key_file": __file__},
    }
    with pytest.raises(ConfigError, match="destinations.pacs.tls.ca_file: missing"):
        parse_settings({"storage_dir": str(tmp_path), "destinations": {"pacs": dest}})
    with pytest.raises(ConfigError, match="tls.cert_file: '/nope.crt' is not a readable file"):
        parse_settings(
            {"storage_dir": str(tmp_path), "tls": {"cert_file": "/nope.crt", "key_file": __file__}}
        )


def test_results_are_sent_over_tls(
    tmp_path: Path, pki: Path, node_factory: Callable[..., NodeProcess], random_package: Path
) -> None:
    """A destination that speaks only TLS (DCMTK storescp +tls) still gets every result."""
    from tests.conftest import free_port, wait_port

    port = free_port()
    pacs = tmp_path / "pacs"
    pacs.mkdir()
    scp = subprocess.Popen(
        [
            require_tool("storescp"),
            "+tls",
            str(pki / "pacs.key"),
            str(pki / "pacs.crt"),
            "+cf",
            str(pki / "ca.crt"),
            "-aet",
            "PACS",
            "-od",
            str(pacs),
            "-uf",
            str(port),
        ],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        tls = {
            "ca_file": str(pki / "ca.crt"),
            "cert_file": str(pki / "modality.crt"),
            "key_file": str(pki / "modality.key"),
        }
        node = node_factory(random_package, port)
        node.settings["destinations"]["pacs"]["tls"] = tls
        node.config.write_text(__import__("yaml").safe_dump(node.settings))
        node.start()
        files = write_files(ct_series(n_slices=2), tmp_path / "ct")
        assert storescu(node.port, files).returncode == 0
        receiver = StoreSCP(pacs, port)
        assert set(results(receiver)) == {"SEG", "SR"}
    finally:
        scp.terminate()
        scp.wait(timeout=10)
