"""Rebuild a tracked run from its lineage and rerun it: ``wsimil reproduce`` (SPEC §6).

1. Read the run (:mod:`wsimil.lineage`): git commit and state, data version, the params
   as the run used them, its splits and dvc.lock. A run made from a dirty tree, one whose
   commit the repository lacks, or one without lineage stops here with one line.
2. Check the commit out in a temporary git worktree of the project's repository.
3. Restore the data with DVC: the worktree uses the project's cache (``config.local``) and
   remotes; ``dvc checkout``, else ``dvc pull``, of the feature cache and of the output
   that holds the cohort table. DVC trusts its cache, so every restored feature file is
   checked against the md5 the data version lists; a mismatch is reported and the rerun
   goes on, so the comparison shows what it changed.
4. Rerun the cross-validation (a tuning trial: its params, seeded as that trial) in a
   fresh process, with the wsimil package at the commit if the repository holds one, else
   the installed one, tracking into a throwaway MLflow store in the temporary folder.
5. Compare fold by fold, metric by metric, and the fold weights' sha256.

The worktree is removed afterwards, also when something fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow import MlflowClient

from wsimil import cpu_isa
from wsimil.experiment.lineage import (
    METRICS_FILE,
    ReproduceError,
    Row,
    RunRecord,
    check_lineage,
    compare,
    download_lineage,
    read_run,
    resolve,
)

GIT_TIMEOUT_S = 120
RERUN_PARAMS = "params.reproduce.yaml"  # written beside the worktree's params.yaml


@dataclass
class Report:
    """What ``reproduce`` found: the compared rows, and whether the restored data matched."""

    run_id: str
    rows: list[Row] = field(default_factory=list)
    data_problem: str | None = None

    @property
    def differing(self) -> list[Row]:
        """The rows that differ, test metrics first (what a reader looks for)."""
        rows = [r for r in self.rows if not r.same]
        return sorted(rows, key=lambda r: not r.name.startswith("test_"))

    @property
    def identical(self) -> bool:
        return self.data_problem is None and not self.differing

    def verdict(self) -> str:
        """One line: identical, or the first difference (a fold and metric where any)."""
        if self.identical:
            n = len(self.rows)
            return f"identical: run {self.run_id} reproduced to the bit ({n} values compared)"
        parts = []
        if self.differing:
            r, more = self.differing[0], len(self.differing) - 1
            parts.append(
                f"{_where(r)} {r.name} differs (recorded {_shown(r.recorded)}, reproduced "
                f"{_shown(r.reproduced)})" + (f", and {more} more value(s) above" if more else "")
            )
        if self.data_problem:
            parts.append("the restored data is not the recorded data version (warning above)")
        return "not identical: " + "; ".join(parts)


def reproduce(
    uri: str,
    root: Path,
    *,
    allow_dirty: bool = False,
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> Report:
    """Rerun the cross-validation behind ``uri`` from its recorded lineage; compare.

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``runs:/RUN_ID``.
        root: the project root, inside the git repository the run was made in.
        allow_dirty: rerun a run made from a dirty tree (its committed code) with a warning.
        say, warn: where progress lines and warnings go.

    Raises:
        ReproduceError: the run cannot be rebuilt (bad URI, no lineage, dirty tree, missing
            commit, data in neither the DVC cache nor a remote, the rerun failed).
    """
    client = MlflowClient()
    run_id = resolve(client, uri)
    recorded = read_run(client, run_id)
    check_lineage(recorded)
    tags = recorded.tags
    commit, family, trial = tags["git_commit"], tags["model_family"], recorded.trial
    if tags["git_dirty"] != "false":
        why = (
            f"run {run_id} was made from a working tree with uncommitted changes (commit "
            f"{commit[:12]}, git_dirty {tags['git_dirty']}); the commit is not the tree it ran from"
        )
        if not allow_dirty:
            raise ReproduceError(
                f"{why}, so reproduce cannot vouch for its result; pass --allow-dirty to "
                "rerun the committed code anyway"
            )
        warn(f"{why}: rerunning the committed code anyway (--allow-dirty)")
    top = repository(root)
    if _git(top, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise ReproduceError(
            f"commit {commit} of run {run_id} is not in the repository {top}; fetch it "
            "(`git fetch --all`), or run reproduce in the clone the run was made in"
        )
    trial_note = "" if trial is None else f", tuning trial {trial}"
    say(
        f"reproducing run {run_id} ({family}{trial_note}, seed {tags['seed']}) from {uri}: "
        f"commit {commit[:12]}, data version {tags['data_version']}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="wsimil-reproduce-"))
    try:
        files = download_lineage(client, run_id, tmp / "recorded")
        with worktree(top, commit, tmp / "src") as src:
            wt_root = src / root.resolve().relative_to(top)
            report = Report(run_id, data_problem=_rebuild(wt_root, files, recorded, root, tmp))
            if report.data_problem:
                warn(f"{report.data_problem}; rerunning on it anyway to show what it changes")
            else:
                say(f"data: restored; every file matches data version {tags['data_version']}")
            store = f"sqlite:///{(tmp / 'mlruns.db').as_posix()}"
            code = _code(src, commit, tags.get("wsimil_version"), say, warn)
            _check_cpu_kernels(tags, warn)
            rerun(wt_root, family, trial, store, code, say)
            reproduced = _only_crossval_run(MlflowClient(store, store))
            report.rows = compare(recorded, reproduced)
            report.rows.append(_metrics_file_row(files, store, reproduced.run_id, tmp))
            report.rows.sort(key=lambda r: r.fold == "param")  # stable: params last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def format_rows(rows: list[Row]) -> list[str]:
    """The comparison as aligned lines, differing rows marked."""
    lines = [f"{'fold':<6}{'metric':<24}{'recorded':<26}reproduced"]
    for r in rows:
        mark = "" if r.same else "DIFFERS"
        rec, rep = _shown(r.recorded), _shown(r.reproduced)
        lines.append(f"{r.fold:<6}{r.name:<24}{rec:<26}{rep:<26}{mark}".rstrip())
    return lines


def _where(row: Row) -> str:
    return {"all": "the run's", "param": "param"}.get(row.fold, f"fold {row.fold}")


def _shown(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return f"{value[:16]}…"
    return repr(value) if isinstance(value, float) else str(value)


# --- the repository and its worktree --------------------------------------------------------


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReproduceError(f"`git {' '.join(args)}` in {cwd} failed: {exc}") from None


def repository(root: Path) -> Path:
    """The top folder of the git repository holding the project root."""
    done = _git(root, "rev-parse", "--show-toplevel") if root.is_dir() else None
    if done is None or done.returncode != 0:
        raise ReproduceError(
            f"the project root {root} is not in a git repository; run reproduce in the "
            "clone the run was made in, or pass --params path/to/that/params.yaml"
        )
    return Path(done.stdout.strip()).resolve()


@contextlib.contextmanager
def worktree(top: Path, commit: str, dest: Path) -> Iterator[Path]:
    """A detached worktree of ``top`` at ``commit``; removed on exit, also after a failure."""
    done = _git(top, "worktree", "add", "--detach", str(dest), commit)
    if done.returncode != 0:
        raise ReproduceError(f"cannot check out {commit[:12]} into {dest}: {done.stderr.strip()}")
    try:
        yield dest
    finally:
        if _git(top, "worktree", "remove", "--force", str(dest)).returncode != 0:
            shutil.rmtree(dest, ignore_errors=True)
            _git(top, "worktree", "prune")


# --- data -----------------------------------------------------------------------------------


def _rebuild(
    wt_root: Path, files: dict[str, Path], recorded: RunRecord, root: Path, tmp: Path
) -> str | None:
    """Write the recorded dvc.lock, splits and params into the worktree; restore the data.

    Returns:
        None when every restored feature file has the md5 the data version lists, else
        what differs and how to repair the cache.
    """
    resolved = yaml.safe_load(files["resolved_params.yaml"].read_text())
    splits = Path(resolved["crossval"]["splits_path"])
    if splits.is_absolute():
        raise ReproduceError(
            f"run {recorded.run_id} read its splits from {splits}, outside the project; "
            "reproduce rebuilds the project only"
        )
    shutil.copyfile(files["dvc.lock"], wt_root / "dvc.lock")
    (wt_root / splits).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files["splits.json"], wt_root / splits)
    (wt_root / RERUN_PARAMS).write_text(yaml.safe_dump(resolved, sort_keys=False))
    lock = yaml.safe_load(files["dvc.lock"].read_text()) or {}
    outs = [o for s in (lock.get("stages") or {}).values() for o in s.get("outs") or []]
    version = recorded.tags["data_version"]
    features = next((o["path"] for o in outs if o.get("md5") == version), None)
    if features is None:
        raise ReproduceError(
            f"run {recorded.run_id}'s data version {version} is no output of its dvc.lock; "
            "the lineage is inconsistent, so the data cannot be restored"
        )
    cohort = Path(resolved["crossval"]["cohort_csv"])
    targets = [features] + [
        o["path"] for o in outs if o["path"] != features and cohort.is_relative_to(o["path"])
    ]
    cache = restore(root, wt_root, targets, tmp, recorded.run_id, version)
    if not (wt_root / cohort).is_file():
        raise ReproduceError(
            f"the cohort table {cohort} is neither in git at commit "
            f"{recorded.tags['git_commit'][:12]} nor a DVC output of its dvc.lock"
        )
    bad = changed_files(wt_root / features, version, cache)
    if not bad:
        return None
    (name, md5), more = bad[0], (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
    return (
        f"restored data differs from data version {version}: {features}/{name}{more} does "
        f"not match its md5 {md5}; its copy in the DVC cache "
        f"({cache / 'files' / 'md5' / md5[:2] / md5[2:]}) changed: delete it and "
        f"`dvc pull --all-commits {features}` in {root}"
    )


def _dvc(cwd: Path, *args: str, timeout: float | None = GIT_TIMEOUT_S):
    """DVC of this Python environment; a checkout or pull has no timeout (it moves data)."""
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ReproduceError(f"`dvc {' '.join(args)}` in {cwd} took over {timeout} s") from None


def restore(
    root: Path, wt_root: Path, targets: list[str], tmp: Path, run_id: str, version: str
) -> Path:
    """Check ``targets`` out of the project's DVC cache, else pull them; return the cache."""
    found = _dvc(root, "cache", "dir")
    if found.returncode != 0:
        raise ReproduceError(
            f"the project root {root} is no DVC project ({_last_line(found)}); run reproduce "
            "in the clone the run was made in"
        )
    cache = Path(found.stdout.strip())
    # `dvc remote list` wraps its table at 80 columns when not on a terminal (a long remote
    # path lands on a line of its own); `dvc config --list` gives key=value lines, unwrapped
    listed = (line.partition("=") for line in _dvc(root, "config", "--list").stdout.splitlines())
    remotes = [
        (key.removeprefix("remote.").removesuffix(".url"), url)
        for key, _, url in listed
        if key.startswith("remote.") and key.endswith(".url")
    ]
    default = _dvc(root, "remote", "default").stdout.strip()
    settings = [
        ("config", "--local", "cache.dir", str(cache)),
        ("config", "--local", "core.site_cache_dir", str(tmp / "dvc-site")),
        *(("remote", "add", "--local", "--force", name, url) for name, url in remotes),
        *([("remote", "default", "--local", default)] if default else []),
    ]
    for args in settings:
        done = _dvc(wt_root, *args)
        if done.returncode != 0:
            raise ReproduceError(f"`dvc {' '.join(args)}` failed: {_last_line(done)}")
    if _dvc(wt_root, "checkout", *targets, timeout=None).returncode == 0:
        return cache
    if remotes and _dvc(wt_root, "pull", *targets, timeout=None).returncode == 0:
        return cache
    name = default or (remotes[0][0] if remotes else None)
    where = f"remote '{name}' ({dict(remotes)[name]})" if name else "a remote (there is none)"
    raise ReproduceError(
        f"data version {version} of run {run_id} ({targets[0]}) is neither in the "
        f"DVC cache {cache} nor on {where}; pull it from a remote that has it, in {root}: "
        f"`dvc pull --all-commits -r REMOTE {' '.join(targets)}` (or `dvc push "
        "--all-commits` it from the clone that made the run)"
    )


def changed_files(path: Path, version: str, cache: Path) -> list[tuple[str, str]]:
    """(relative path, md5 due) of each restored file that data version ``version`` lists
    with another md5 (a directory's version is the md5 of its listing in the cache)."""
    if not version.endswith(".dir"):
        return [] if _md5(path) == version else [(path.name, version)]
    listing = cache / "files" / "md5" / version[:2] / version[2:]
    if _md5(listing) != version.removesuffix(".dir"):
        return [("(its listing in the DVC cache)", version)]
    entries = json.loads(listing.read_bytes())
    return [(e["relpath"], e["md5"]) for e in entries if _md5(path / e["relpath"]) != e["md5"]]


def _md5(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


# --- the rerun ------------------------------------------------------------------------------


def _code(src: Path, commit: str, recorded_version: str | None, say, warn) -> Path | None:
    """The folder to import wsimil from: the worktree's when it holds the package, else None."""
    if (src / "wsimil" / "__init__.py").is_file():
        say(f"code: the wsimil package at commit {commit[:12]}")
        return src
    from wsimil import __version__ as installed

    say(
        f"code: the installed wsimil {installed} ({Path(__file__).parents[1]}); the "
        f"repository at {commit[:12]} holds no wsimil package"
    )
    if recorded_version and recorded_version != installed:
        warn(
            f"the run was made with wsimil {recorded_version}, the installed one is "
            f"{installed}: differences may come from the code, not the data"
        )
    return None


def _check_cpu_kernels(tags: dict[str, str], warn) -> None:
    """Warn when the run computed with other CPU kernels than this process's (its rerun's)."""
    recorded, here = tags.get("cpu_kernels"), cpu_isa.in_use()
    if recorded is None or recorded == here:
        return
    like = (
        f"set {cpu_isa.ENV}={recorded}"
        if recorded in cpu_isa.PINS
        else f"rerun with {cpu_isa.ENV}=native on a CPU with the run's instruction set"
    )
    warn(
        f"the run computed with CPU kernels '{recorded}' (on {tags.get('cpu_model', 'a CPU')}), "
        f"this rerun with '{here}': the last bits may differ; {like} to compare like with like"
    )


def rerun(
    wt_root: Path, family: str, trial: int | None, store: str, code: Path | None, say
) -> None:
    """``wsimil crossval`` in a fresh process, tracking into ``store``."""
    args = ["crossval", "--model", family, *([] if trial is None else ["--trial", str(trial)])]
    cmd = [sys.executable, "-m", "wsimil", *args, "--params", str(wt_root / RERUN_PARAMS)]
    keep = {"MLFLOW_DISABLE_TELEMETRY"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") or k in keep}
    env["MLFLOW_TRACKING_URI"] = store
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    shown = " ".join(["wsimil", *args])
    say(f"rerun: {shown} (throwaway MLflow store) ...")
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=wt_root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise ReproduceError(f"the rerun `{shown}` failed (exit {done.returncode}):\n{tail}")
    last = (done.stdout.strip().splitlines() or [""])[-1]
    say(f"rerun: {last} ({time.monotonic() - start:.0f} s)")


def _only_crossval_run(client: MlflowClient) -> RunRecord:
    """The rerun's cross-validation run: the one such run in the throwaway store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.run_kind = 'crossval'")
    if len(runs) != 1:
        raise ReproduceError(f"the rerun left {len(runs)} cross-validation runs, not one")
    return read_run(client, runs[0].info.run_id)


def _metrics_file_row(files: dict[str, Path], store: str, run_id: str, tmp: Path) -> Row:
    """metrics.json (the DVC metrics file) of both runs, by sha256."""
    path = MlflowClient(store, store).download_artifacts(run_id, METRICS_FILE, str(tmp / "rerun"))
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    recorded = digest(files["metrics.json"]) if "metrics.json" in files else None
    return Row("all", "metrics.json sha256", recorded, digest(path))
