"""Public scans fetched at run time with the registries' own clients, checked against pinned sha256 sums and
cached, so later runs work offline. Nothing here is ever committed (the licences differ: see docs/demo.md).

Three archives are known:

- ``totalsegmentator==2.18.0`` source distribution (PyPI, Apache-2.0): ``pip download --no-deps --no-binary
  :all:``. Its ``tests/reference_files`` hold real CT scans with TotalSegmentator's *predicted* label maps
  (regression-test references), not manual annotations.
- ``slicerio==1.4.0`` wheel (PyPI, MIT): ``pip download --no-deps``. 3D Slicer's CTChest sample (4x
  downsampled) with a rough hand-made segmentation.
- ``mricron-data`` (Debian, ``apt-get download``): the Colin27 T1 (``ch2``) with the AAL atlas on its grid.

Only the member files a caller needs are extracted (each checked against its pinned sha256) into
``<cache>/<archive key>/<local name>``; the archive itself is checked (where its sha256 is pinned) and then
deleted. The cache folder is ``$LORKD_CACHE``, else ``$XDG_CACHE_HOME/nnunetv2_lorkd``, else
``~/.cache/nnunetv2_lorkd``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

Downloader = Callable[[Path], Path]  # downloads the archive into the given folder, returns its path


class SourceError(RuntimeError):
    """A source file cannot be obtained or fails its checks; the message says which and what to do."""


class SourceUnavailableError(SourceError):
    """The download failed (no network, no pip/apt); the message says how to provide the files instead."""


def default_cache_dir() -> Path:
    if os.environ.get("LORKD_CACHE"):
        return Path(os.environ["LORKD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nnunetv2_lorkd"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `target`, renamed onto it only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- downloaders
def _run_download(cmd: list[str], cwd: Path, what: str, how_to_provide: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceUnavailableError(f"`{' '.join(cmd)}` could not run ({exc}); {how_to_provide}") from None
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SourceUnavailableError(f"downloading {what} failed ({tail or 'no output'}); {how_to_provide}")


def pip_downloader(requirement: str, filename: str, sdist: bool) -> Downloader:
    """``pip download --no-deps [--no-binary :all:] REQUIREMENT`` into the folder; returns the archive path."""

    def download(dest: Path) -> Path:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd += [requirement, "-d", str(dest)]
        _run_download(
            cmd,
            dest,
            requirement,
            "without network access, run this once where PyPI is reachable and copy the cache folder "
            f"({dest.parent.parent}) to this machine",
        )
        path = dest / filename
        if not path.is_file():
            raise SourceUnavailableError(f"pip download of {requirement} did not produce {filename}")
        return path

    return download


def apt_downloader(package: str) -> Downloader:
    """``apt-get download PACKAGE`` (no root, no install) into the folder; returns the .deb path."""

    def download(dest: Path) -> Path:
        _run_download(
            ["apt-get", "download", package],
            dest,
            f"the Debian package {package}",
            "this needs apt-get and a Debian/Ubuntu package index (apt-get update)",
        )
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise SourceUnavailableError(f"apt-get download {package} gave {len(debs)} .deb files, expected one")
        return debs[0]

    return download


# ---------------------------------------------------------------------------------------------- archives
@dataclass(frozen=True)
class Archive:
    """A registry archive and the files taken from it: local name -> (member path, pinned sha256)."""

    key: str  # cache sub-folder, e.g. "totalsegmentator-2.18.0"
    description: str  # for messages and reports, e.g. "totalsegmentator==2.18.0 sdist (PyPI, Apache-2.0)"
    files: Mapping[str, tuple[str, str]]
    sha256: str | None  # of the archive itself; None where only the members can be pinned (Debian .deb)
    downloader: Downloader = field(compare=False, repr=False)

    def subset(self, names: Iterable[str]) -> Archive:
        names = list(names)
        unknown = [n for n in names if n not in self.files]
        if unknown:
            raise SourceError(f"{self.key} has no file(s) {unknown}; known: {sorted(self.files)}")
        return Archive(self.key, self.description, {n: self.files[n] for n in names}, self.sha256, self.downloader)


def _read_members(archive_path: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of `members` from a .tar.gz, .whl/.zip or .deb (ar + data.tar.*), missing ones left out."""
    name = archive_path.name
    out: dict[str, bytes] = {}
    if name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive_path, "r:gz") as tf:
            out = _from_tar(tf, members)
    elif name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive_path) as zf:
            present = set(zf.namelist())
            out = {m: zf.read(m) for m in members if m in present}
    elif name.endswith(".deb"):
        data = _deb_data_member(archive_path)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            out = _from_tar(tf, members)
    else:
        raise SourceError(f"{archive_path}: unknown archive type")
    return out


def _from_tar(tf: tarfile.TarFile, members: list[str]) -> dict[str, bytes]:
    """Debian data tarballs name their members './usr/...'; sdists 'pkg-1.0/...': compare without './'."""
    wanted = {m.removeprefix("./"): m for m in members}
    out: dict[str, bytes] = {}
    for info in tf:
        key = info.name.removeprefix("./")
        if key in wanted and info.isfile():
            fh = tf.extractfile(info)
            if fh is not None:
                out[wanted[key]] = fh.read()
    return out


def _deb_data_member(path: Path) -> bytes:
    """The data.tar.* member of a Debian package (an `ar` archive: 8-byte magic, 60-byte member headers)."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise SourceError(f"{path} is not a Debian package (no ar header)")
        while True:
            header = fh.read(60)
            if len(header) < 60:
                break
            member = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            data = fh.read(size)
            if size % 2:
                fh.read(1)
            if member.startswith("data.tar"):
                return data
    raise SourceError(f"{path}: no data.tar member found")


def fetch_archive_files(
    archive: Archive, cache_dir: str | Path | None = None, downloader: Downloader | None = None
) -> dict[str, Path]:
    """Paths of the archive's files in the cache, downloading (once) and checking sha256 as needed.

    A cached file whose sha256 differs is fetched again; an offline run with a complete cache never calls the
    downloader.
    """
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / archive.key
    paths = {name: folder / name for name in archive.files}
    missing = [n for n, p in paths.items() if not (p.is_file() and sha256_file(p) == archive.files[n][1])]
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        archive_path = (downloader or archive.downloader)(Path(tmp))
        if archive.sha256 is not None:
            got = sha256_file(archive_path)
            if got != archive.sha256:
                raise SourceError(
                    f"{archive_path}: sha256 {got} is not the pinned {archive.sha256} of {archive.description}; "
                    "the registry served a different file: do not use it"
                )
        members = _read_members(archive_path, [archive.files[n][0] for n in missing])
        for name in missing:
            member, sha = archive.files[name]
            if member not in members:
                raise SourceError(f"{archive_path}: member {member} is missing")
            data = members[member]
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                raise SourceError(
                    f"{archive_path}: {member} has sha256 {got}, not its pinned {sha}; the archive differs from "
                    f"the one this code was written for ({archive.description})"
                )
            with atomic_path(paths[name]) as out:
                out.write_bytes(data)
    return paths


# ------------------------------------------------------------------------------------------ the archives
TS_VERSION = "2.18.0"
TS_SDIST_NAME = f"totalsegmentator-{TS_VERSION}.tar.gz"
TS_SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_TS = f"totalsegmentator-{TS_VERSION}"
_TS_REF = f"{_TS}/tests/reference_files"
TS_FILES: dict[str, tuple[str, str]] = {
    "example_ct.nii.gz": (
        f"{_TS_REF}/example_ct.nii.gz",
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    ),
    "example_seg_fast_force_split.nii.gz": (
        f"{_TS_REF}/example_seg_fast_force_split.nii.gz",
        "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
    ),
    "map_to_binary.py": (
        f"{_TS}/totalsegmentator/map_to_binary.py",
        "ee19259dacd4d52d424849b8bac44a5a5d41c895426bf7c048c69203a1a3777d",
    ),
    "aorta_report/example_ct.nii.gz": (
        f"{_TS_REF}/aorta_report/example_ct.nii.gz",
        "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
    ),
    "aorta_report/ct_cropped.nii.gz": (
        f"{_TS_REF}/aorta_report/test_result/models/ct_cropped.nii.gz",
        "f776ecfa1326e7e21a8c30e5530f517c16f16a59a68fc06e8119cefc7c3b87a0",
    ),
    "aorta_report/aorta.nii.gz": (
        f"{_TS_REF}/aorta_report/test_result/models/aorta.nii.gz",
        "7fa1b813c63abcbe455b62a510c5e7a00fe0998f30541d5a8af46b20a88dd7f7",
    ),
    "aorta_report/brachiocephalic_trunk.nii.gz": (
        f"{_TS_REF}/aorta_report/test_result/models/brachiocephalic_trunk.nii.gz",
        "76ce8a3b3e9aeea03c88a358d9c6ceeb66e2fd6fbae33398a4ae4a8596e99661",
    ),
    "aorta_report/subclavian_artery_left.nii.gz": (
        f"{_TS_REF}/aorta_report/test_result/models/subclavian_artery_left.nii.gz",
        "993695ad2e9833fd3346bedc8e31635d4084c6b8e853620870fb52e41958be9a",
    ),
    "aorta_report/common_carotid_artery_left.nii.gz": (
        f"{_TS_REF}/aorta_report/test_result/models/common_carotid_artery_left.nii.gz",
        "d878d1bb6dd9fe999c6523e4b705f99a1e99b6f77f910edcc9d5d06384a4da9b",
    ),
    "pulmonary_report/heart.nii.gz": (
        f"{_TS_REF}/pulmonary_report/models/heart.nii.gz",
        "3c3eaf9e029e07aa3248e8d9973103b3168f35cc37756867bcb47b507cad288a",
    ),
    "pulmonary_report/ct_cropped.nii.gz": (
        f"{_TS_REF}/pulmonary_report/models/ct_cropped.nii.gz",
        "4da078fe43c9aa4d358903ac95105cea4fbe93b029474e4701bdde4db72126eb",
    ),
    "pulmonary_report/pulmonary_artery.nii.gz": (
        f"{_TS_REF}/pulmonary_report/models/pulmonary_artery.nii.gz",
        "b227c99939d441d52b9e9d975934f479f0c7e6388095ca719e5eb57e43f2ba2d",
    ),
}
TOTALSEGMENTATOR = Archive(
    key=_TS,
    description=f"totalsegmentator=={TS_VERSION} source distribution (PyPI, Apache-2.0)",
    files=TS_FILES,
    sha256=TS_SDIST_SHA256,
    downloader=pip_downloader(f"totalsegmentator=={TS_VERSION}", TS_SDIST_NAME, sdist=True),
)

SLICERIO_VERSION = "1.4.0"
SLICERIO_WHEEL = f"slicerio-{SLICERIO_VERSION}-py3-none-any.whl"
SLICERIO = Archive(
    key=f"slicerio-{SLICERIO_VERSION}",
    description=f"slicerio=={SLICERIO_VERSION} wheel (PyPI, MIT; 3D Slicer CTChest sample data)",
    files={
        "CTChest4.nrrd": (
            "slicerio/data/CTChest4.nrrd",
            "439ee098e50ee8e3254bd80ed8bcf7f8d006da4cab35be7a65b61ccb30dd6a3d",
        ),
        "Segmentation.seg.nrrd": (
            "slicerio/data/Segmentation.seg.nrrd",
            "1a35d7165f51521cf4c747d81278eb461e5f151b0ea43f1bfb38fba3453140cf",
        ),
    },
    sha256="ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
    downloader=pip_downloader(f"slicerio=={SLICERIO_VERSION}", SLICERIO_WHEEL, sdist=False),
)

_MRICRON = "usr/share/mricron/templates"
MRICRON = Archive(
    key="mricron-data",
    description="mricron-data (Debian; Colin27 T1 'ch2' and the AAL atlas: BSD-3 package, AAL is GIN freeware)",
    files={
        "ch2.nii.gz": (f"{_MRICRON}/ch2.nii.gz", "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309"),
        "aal.nii.gz": (f"{_MRICRON}/aal.nii.gz", "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454"),
        "aal.nii.txt": (f"{_MRICRON}/aal.nii.txt", "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e"),
    },
    sha256=None,  # .deb builds differ between Debian releases; the three files inside are pinned
    downloader=apt_downloader("mricron-data"),
)
