"""The catalogue's files on disk, beside the store that describes them.

Layout under the catalogue directory (default: the coordinator's state_dir/catalogue):
- models/NAME/source.onnx, models/NAME/data.npz or models/NAME/data/ (a split/label/image
  tree), models/NAME/options.json: a source model as `models add` gave it;
- jobs/JOB/build.log: what the optimizer printed; jobs/JOB/work/: its output while it runs
  (removed when the job ends), jobs/JOB/pid: its process; jobs/JOB/report.json and
  report.png: the optimizer's report of a build that succeeded.

Nothing is ever visible half written: a model is assembled in a hidden temporary directory
beside its final place, every file fsynced, then renamed into place in one step; single
files go through a temporary name in their own directory. The store keeps paths relative to
the catalogue directory, so the directory can move with its database.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.durable import fsync_dir, write_atomic

SOURCE_NAME = "source.onnx"
DATA_NPZ = "data.npz"
DATA_DIR = "data"
OPTIONS_NAME = "options.json"
LOG_NAME = "build.log"
_CHUNK = 1 << 20
_TMP = re.compile(r"^\..*\.tmp-")


@dataclass(frozen=True)
class StoredModel:
    """Where a model's files landed (paths relative to the catalogue directory) and their
    sha256: the source file's bytes; for a data folder, the sha256 of its listing of
    "sha256  relative/path" lines in path order (what `sha256sum` would print, sorted)."""

    source_path: str
    source_sha256: str
    source_bytes: int
    data_path: str
    data_sha256: str
    data_bytes: int


def copy_file(src: Path, dest: Path) -> tuple[str, int]:
    """Copy a regular file (never through a link) and fsync it; its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(src, flags), "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError(f"{src}: not a regular file")
        with dest.open("xb") as out:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    return digest.hexdigest(), size


def copy_tree(src: Path, dest: Path) -> tuple[str, int]:
    """Copy a folder of plain files and folders (a link anywhere is refused), fsyncing each;
    the listing sha256 (see StoredModel) and the total size."""
    lines: list[str] = []
    total = 0
    dest.mkdir()
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(src)
        for d in sorted(dirnames):
            if (here / d).is_symlink():
                raise ValueError(f"{here / d}: a link; the data folder must hold plain files")
            (dest / rel_dir / d).mkdir()
        for f in sorted(filenames):
            path = here / f
            if path.is_symlink() or not path.is_file():
                raise ValueError(f"{path}: not a plain file; the data folder must hold plain files")
            sha, size = copy_file(path, dest / rel_dir / f)
            lines.append(f"{sha}  {(rel_dir / f).as_posix()}")
            total += size
    for dirpath, _dirs, _files in os.walk(dest):
        fsync_dir(Path(dirpath))
    lines.sort(key=lambda line: line[66:])
    return hashlib.sha256("".join(f"{ln}\n" for ln in lines).encode()).hexdigest(), total


class CatalogueFiles:
    """The catalogue directory: models' source files and build jobs' logs and work."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def path(self, stored: str) -> Path:
        """A path as the store keeps it (relative to the catalogue directory), on disk."""
        p = Path(stored)
        return p if p.is_absolute() else self.root / p

    # -- models -----------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name

    def put_model(self, name: str, source: Path, data: Path, options_json: str) -> StoredModel:
        """Copy a source model, its data (an .npz file or a folder) and its options into
        models/NAME, all at once; FileExistsError when that directory exists."""
        final = self.model_dir(name)
        if final.exists():
            raise FileExistsError(f"{final} exists")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.models_dir, prefix=f".{name}.tmp-"))
        try:
            src_sha, src_bytes = copy_file(source, tmp / SOURCE_NAME)
            if data.is_dir():
                data_name = DATA_DIR
                data_sha, data_bytes = copy_tree(data, tmp / DATA_DIR)
            else:
                data_name = DATA_NPZ
                data_sha, data_bytes = copy_file(data, tmp / DATA_NPZ)
            with (tmp / OPTIONS_NAME).open("x") as fh:
                fh.write(options_json)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            # rename refuses a non-empty target: a racing add of the same name loses here.
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.models_dir)
        rel = final.relative_to(self.root)
        return StoredModel(
            source_path=(rel / SOURCE_NAME).as_posix(),
            source_sha256=src_sha,
            source_bytes=src_bytes,
            data_path=(rel / data_name).as_posix(),
            data_sha256=data_sha,
            data_bytes=data_bytes,
        )

    def remove_model(self, name: str) -> None:
        """Take a model's files away (hidden rename first, so no half-removed model shows)."""
        final = self.model_dir(name)
        if not final.exists():
            return
        gone = Path(tempfile.mkdtemp(dir=self.models_dir, prefix=f".{name}.tmp-"))
        os.rename(final, gone / name)
        shutil.rmtree(gone, ignore_errors=True)

    # -- jobs -------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def work_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "work"

    def pid_file(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "pid"

    @staticmethod
    def log_ref(job_id: str) -> str:
        """The build log's path as the store keeps it."""
        return f"jobs/{job_id}/{LOG_NAME}"

    def fresh_work_dir(self, job_id: str) -> Path:
        """An empty work directory for a job (what an earlier attempt left is removed)."""
        self.remove_work(job_id)
        work = self.work_dir(job_id)
        work.mkdir(parents=True)
        return work

    def remove_work(self, job_id: str) -> None:
        """A job's work directory and pid file, gone (renamed aside first, then deleted)."""
        self.pid_file(job_id).unlink(missing_ok=True)
        work = self.work_dir(job_id)
        if work.exists():
            aside = work.with_name(f".work.tmp-{os.getpid()}-{id(work)}")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(work, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def keep_report(self, job_id: str, out_dir: Path) -> None:
        """The optimizer's report.json and report.png beside the job's log."""
        for name in ("report.json", "report.png"):
            src = out_dir / name
            if src.is_file():
                write_atomic(self.job_dir(job_id) / name, src.read_bytes())

    def sweep(self, active_jobs: set[str]) -> list[str]:
        """Remove what a process killed mid-write left: hidden temporary copies of models
        and the work directories of jobs not in active_jobs. Returns what was removed."""
        doomed: list[Path] = []
        uploads = self.root / ".uploads"
        if uploads.is_dir():
            doomed += uploads.iterdir()  # nothing is uploading while the coordinator starts
        if self.models_dir.is_dir():
            doomed += [p for p in self.models_dir.iterdir() if _TMP.match(p.name)]
        if self.jobs_dir.is_dir():
            for job in self.jobs_dir.iterdir():
                if job.is_dir() and job.name not in active_jobs:
                    doomed += [
                        p for p in job.iterdir() if p.name in ("work", "pid") or _TMP.match(p.name)
                    ]
        for p in doomed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return [str(p) for p in doomed]

    def uploads_dir(self) -> Path:
        """Where uploads are received and unpacked (same filesystem as models/)."""
        path = self.root / ".uploads"
        path.mkdir(parents=True, exist_ok=True)
        return path
