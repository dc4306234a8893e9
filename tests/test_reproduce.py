"""`wsimil reproduce`: a registered tuning trial rebuilt from its lineage, to the bit.

The project is the session's tiny project made a committed one: a git repository holding
a copy of the wsimil package (the demo checkout case), a dvc.yaml whose stages run the
CLI, its data recorded by `dvc commit` (the stages' commands made it: `dvc repro` then has
nothing to do) and pushed to a local remote. `wsimil tune` and `wsimil register` publish
`wsimil-dtfd` version 1 from a tuning trial. A second commit drops the package, and a run
made there from a dirty tree (with a `--set` override) is the installed-package case.

Reproducing version 1 must give identical fold metrics and weight hashes; a changed
feature file in the DVC cache must make it fail naming a fold and a metric; a dirty tree,
a missing commit, a run without lineage, data in neither the cache nor the remote and a
bad URI must each fail with one line (exit 2, no traceback), leaving no worktree behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import mlflow
import pytest
import yaml
from projects import REPO, clean_env, run, wsimil, wsimil_status

from wsimil.experiment.lineage import ReproduceError, resolve

pytestmark = pytest.mark.slow

MODEL = "wsimil-dtfd"
STAGES = {
    "synth": {"cmd": "python -m wsimil synth", "params": ["synth"], "outs": ["data/cohort"]},
    "tiles": {"cmd": "python -m wsimil tiles", "deps": ["data/cohort"], "params": ["tiles"],
              "outs": [{"data/tiles": {"persist": True}}]},
    "features": {"cmd": "python -m wsimil features", "deps": ["data/cohort", "data/tiles"],
                 "params": ["features"], "outs": [{"data/features": {"persist": True}}]},
    "splits": {"cmd": "python -m wsimil splits", "deps": ["data/cohort/slides.csv"],
               "params": ["crossval"], "outs": [{"data/splits.json": {"cache": False}}]},
}  # fmt: skip
IGNORED = ["/mlruns.db", "/mlruns/", "/mlartifacts/", "/results/", "/reports/", "/.prefect/",
           "__pycache__/"]  # fmt: skip
GIT_USER = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}  # fmt: skip


def env(project: Path, **extra: str) -> dict[str, str]:
    return clean_env(project, **GIT_USER, **extra)


def sh(cmd: list[str], project: Path) -> str:
    return run(cmd, project, env(project), timeout=300)


def store(project: Path) -> str:
    return f"sqlite:///{project / 'mlruns.db'}"


def fails_with_one_line(args: list[str], project: Path, **extra: str) -> str:
    """Run ``wsimil ARGS``; it must exit 2 with one ``error:`` line on stderr; return it."""
    done = wsimil_status(args, project, env(project, **extra))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def worktrees(project: Path) -> list[str]:
    out = sh(["git", "worktree", "list", "--porcelain"], project)
    return [line for line in out.splitlines() if line.startswith("worktree ")]


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory) -> Path:
    """The tiny project committed with git + DVC, tuned and registered; a dirty run too."""
    root = tmp_path_factory.mktemp("reproduce")
    project = root / "project"
    shutil.copytree(tiny_project, project, ignore=shutil.ignore_patterns(
        "mlruns.db", "mlruns", "mlartifacts", "results", "reports", ".prefect"))  # fmt: skip
    for package in ("wsimil", "flows"):
        shutil.copytree(REPO / package, project / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}, sort_keys=False))
    (project / ".gitignore").write_text("\n".join(IGNORED) + "\n")
    sh(["git", "init", "-q"], project)
    sh(["dvc", "init", "-q"], project)
    sh(["dvc", "remote", "add", "-d", "local", str(root / "remote")], project)
    sh(["dvc", "commit", "-f"], project)
    assert "Data and pipelines are up to date" in sh(["dvc", "repro"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "tiny project: data by dvc, package in the repository"], project)
    sh(["dvc", "push"], project)
    wsimil(["tune", "--model", "dtfd"], project)
    wsimil(["register", "--model", "dtfd"], project)

    sh(["git", "rm", "-rq", "wsimil"], project)
    shutil.rmtree(project / "wsimil", ignore_errors=True)  # __pycache__ left by git rm
    sh(["git", "commit", "-qm", "the package is installed, not in the repository"], project)
    with open(project / "dvc.yaml", "a") as f:
        f.write("# an uncommitted change\n")
    out = wsimil(["crossval", "--model", "dtfd", "-S", "train.dtfd.epochs=1"], project)
    sh(["git", "checkout", "-q", "dvc.yaml"], project)
    (root / "dirty_run").write_text(out.split("(MLflow run ")[1].split(")")[0])
    return project


def version(project: Path) -> mlflow.entities.model_registry.ModelVersion:
    client = mlflow.MlflowClient(store(project), store(project))
    return client.get_model_version(MODEL, "1")


def test_a_registered_trial_reproduces_identically(project):
    trial = version(project).tags["tune_trial"]
    done = wsimil_status(["reproduce", f"models:/{MODEL}/1"], project, env(project))
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    assert "code: the wsimil package at commit" in out
    assert f"rerun: wsimil crossval --model dtfd --trial {trial} " in out
    assert "every file matches data version" in out
    rows = [line.split() for line in out.splitlines() if line[:2] in ("0 ", "1 ")]
    compared = {(r[0], r[1]) for r in rows}
    for fold in ("0", "1"):
        assert {(fold, "test_auc"), (fold, "test_acc"), (fold, "weights_sha256")} <= compared
    assert not any("DIFFERS" in line for line in out.splitlines())
    assert out.strip().splitlines()[-1].startswith("identical: ")
    assert len(worktrees(project)) == 1  # the temporary worktree is gone


def test_a_changed_feature_file_in_the_dvc_cache_fails_naming_a_fold_and_metric(project):
    version = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["features"]
    md5 = version["outs"][0]["md5"]  # the data version: its listing's md5 + ".dir"
    listing = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    entries = yaml.safe_load(listing.read_text())  # JSON is YAML
    entry = next(e for e in entries if "/20x/" in e["relpath"])  # DTFD reads 20x
    cached = listing.parents[1] / entry["md5"][:2] / entry["md5"][2:]
    original = cached.read_bytes()
    cached.chmod(0o644)
    try:
        with h5py.File(cached, "r+") as f:
            f["features"][...] = -3 * f["features"][()]
        done = wsimil_status(["reproduce", f"models:/{MODEL}@champion"], project, env(project))
    finally:
        cached.write_bytes(original)
        cached.chmod(0o444)
    assert done.returncode == 1, f"{done.stdout}\n{done.stderr}"
    assert f"data/features/{entry['relpath']} does not match its md5" in done.stderr
    assert "DIFFERS" in done.stdout
    verdict = done.stderr.strip().splitlines()[-1]
    assert verdict.startswith("error: not identical: fold ")
    fold, metric = verdict.split("fold ")[1].split()[:2]
    assert f"{fold:<6}{metric}" in done.stdout
    assert len(worktrees(project)) == 1


def test_a_dirty_run_fails_unless_allowed_and_then_reruns_with_the_installed_package(project):
    run_id = (project.parent / "dirty_run").read_text()
    line = fails_with_one_line(["reproduce", f"runs:/{run_id}"], project)
    assert "uncommitted changes" in line and "--allow-dirty" in line

    done = wsimil_status(["reproduce", f"runs:/{run_id}", "--allow-dirty"], project, env(project))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "rerunning the committed code anyway (--allow-dirty)" in done.stderr
    assert "code: the installed wsimil" in done.stdout
    assert "holds no wsimil package" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("identical: ")


def test_a_commit_missing_from_the_repository_is_one_line(project, tmp_path):
    other = tmp_path / "other"  # the same files in a repository with another history
    other.mkdir()
    shutil.copy(project / "params.yaml", other / "params.yaml")
    sh(["git", "init", "-q"], other)
    sh(["git", "add", "-A"], other)
    sh(["git", "commit", "-qm", "another history"], other)
    line = fails_with_one_line(
        ["reproduce", f"models:/{MODEL}/1"], other, MLFLOW_TRACKING_URI=store(project)
    )
    assert "is not in the repository" in line and str(other) in line


def test_a_run_without_lineage_is_one_line(project):
    client = mlflow.MlflowClient(store(project))
    experiment = client.get_experiment_by_name("tiny").experiment_id
    bare = client.create_run(experiment, run_name="logged by hand")
    client.log_metric(bare.info.run_id, "auc", 0.5)
    client.set_terminated(bare.info.run_id)
    line = fails_with_one_line(["reproduce", f"runs:/{bare.info.run_id}"], project)
    assert "records no lineage" in line and "git_commit" in line


def test_data_in_neither_the_cache_nor_the_remote_names_the_dvc_pull(project):
    cache, remote = project / ".dvc" / "cache", project.parent / "remote"
    cache.rename(cache.with_name("cache.away"))
    remote.rename(remote.with_name("remote.away"))
    try:
        line = fails_with_one_line(["reproduce", f"models:/{MODEL}/1"], project)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # what the failed pull created
        cache.with_name("cache.away").rename(cache)
        remote.with_name("remote.away").rename(remote)
    assert "is neither in the DVC cache" in line and f"remote 'local' ({remote})" in line
    assert "`dvc pull --all-commits -r REMOTE data/features data/cohort`" in line
    assert len(worktrees(project)) == 1  # removed after the failure too


def test_a_bad_uri_is_one_line(project):
    line = fails_with_one_line(["reproduce", "wsimil-dtfd"], project)
    assert "not a model or run URI" in line and "models:/NAME@ALIAS" in line


@pytest.mark.parametrize(
    "uri, message",
    [
        (f"models:/{MODEL}/9", f"model '{MODEL}' has no version 9 (versions: 1)"),
        (f"models:/{MODEL}@best", f"model '{MODEL}' has no alias 'best' (aliases: challenger"),
        ("models:/wsimil-transmil/1", f"no registered model 'wsimil-transmil' in {{store}} "
         f"(registered: {MODEL})"),
        ("runs:/0123456789abcdef0123456789abcdef", "no run 0123456789abcdef0123456789abcdef in"),
    ],
)  # fmt: skip
def test_unknown_models_versions_aliases_and_runs_are_named(project, uri, message):
    client = mlflow.MlflowClient(store(project), store(project))
    with pytest.raises(ReproduceError) as info:
        resolve(client, uri)
    assert message.format(store=store(project)) in str(info.value)


def test_a_study_run_points_at_its_best_trial(project):
    client = mlflow.MlflowClient(store(project))
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (study,) = client.search_runs([experiment], "tags.run_kind = 'study'")
    with pytest.raises(ReproduceError, match="is a tuning study") as info:
        resolve(client, f"runs:/{study.info.run_id}")
    assert f"runs:/{study.data.tags['best_trial_run_id']}" in str(info.value)


def test_crossval_records_what_reproduce_needs(project):
    client = mlflow.MlflowClient(store(project))
    run_id = version(project).tags["source_run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["wsimil_version"]
    assert run.data.params["trial.number"] == version(project).tags["tune_trial"]
    path = client.download_artifacts(run_id, "lineage/resolved_params.yaml")
    resolved = yaml.safe_load(Path(path).read_text())
    best = yaml.safe_load((project / "results" / "tune" / "dtfd" / "best.json").read_text())
    for key, value in best["params"].items():  # the trial's values, not params.yaml's
        section, family, name = key.split(".")
        assert resolved[section][family][name] == value
