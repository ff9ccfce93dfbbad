"""A same-origin web server for the OHIF viewer tests: OHIF's built ``dist/`` and a DICOMweb proxy.

OHIF is a single-page application: a path that is not a file (``/viewer``, ``/segmentation``)
gets ``index.html``. ``/app-config.js`` is our own configuration (one DICOMweb data source at
``/dicom-web`` of this same origin), and every ``/dicom-web/...`` request is forwarded to the
DICOMweb plugin of the Orthanc under test, so the browser sees one origin and needs no CORS.

Test support only: nothing in ``dicom_node`` imports it.
"""

from __future__ import annotations

import http.client
import mimetypes
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Path prefix that is forwarded to Orthanc's DICOMweb plugin (its default root).
DICOMWEB_ROOT = "/dicom-web"

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: { 'ohif.tours': { $set: [] } },
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc under test',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: 'DICOMWEB_ROOT',
        wadoRoot: 'DICOMWEB_ROOT',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
""".replace("DICOMWEB_ROOT", DICOMWEB_ROOT)

#: Request headers not forwarded to Orthanc (hop-by-hop, or set by the client library).
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "accept-encoding"}


class ViewerServer:
    """Serves ``dist`` on ``127.0.0.1:port`` and forwards :data:`DICOMWEB_ROOT` to Orthanc.

    Parameters
    ----------
    dist
        OHIF's built application (the ``dist/`` folder of the ``@ohif/app`` npm package).
    orthanc_http_port
        HTTP port of an Orthanc with its DICOMweb plugin (root ``/dicom-web/``).
    """

    def __init__(self, dist: Path, orthanc_http_port: int) -> None:
        self.dist = dist.resolve()
        self.orthanc_http_port = orthanc_http_port
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ViewerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return  # quiet: the tests report what matters

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._serve()

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve()

            def do_POST(self) -> None:  # noqa: N802
                self._serve()

            def _serve(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path == DICOMWEB_ROOT or path.startswith(DICOMWEB_ROOT + "/"):
                    self._forward()
                elif path == "/app-config.js":
                    self._send(200, APP_CONFIG.encode(), "application/javascript")
                else:
                    self._static(path)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _static(self, path: str) -> None:
                relative = urllib.parse.unquote(path).lstrip("/")
                file = (server.dist / relative).resolve()
                if not file.is_relative_to(server.dist) or not file.is_file():
                    file = server.dist / "index.html"  # the single-page app's routes
                content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                if file.suffix == ".wasm":
                    content_type = "application/wasm"
                self._send(200, file.read_bytes(), content_type)

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length", 0) or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                connection = http.client.HTTPConnection(
                    "127.0.0.1", server.orthanc_http_port, timeout=60
                )
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
