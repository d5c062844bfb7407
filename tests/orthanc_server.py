"""A real DICOMweb server for the tests: Debian's Orthanc with its DICOMweb plugin (`.ci/install` installs both),
started on 127.0.0.1 with a generated configuration and a temporary storage folder, stopped and removed after."""

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_orthanc(folder: Path, startup_seconds: float = 60.0):
    """Orthanc serving DICOMweb at the URL this yields (`http://127.0.0.1:PORT/dicom-web`), its storage in
    `folder/storage`; stopped, and `folder` removed, on exit."""
    port = free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True)
    config = folder / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "voxlm-tests", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpBindAddress": "127.0.0.1", "HttpPort": port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomServerEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }))
    log = open(folder / "orthanc.log", "w")
    server = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
